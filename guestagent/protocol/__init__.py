"""The tmem protocol, shared by both agents: the one place that knows the wire.

- `wire`: the sans-IO codec (frames, enums, payload helpers) and the constants (`PAGE_SIZE`,
  `PORT_NAME`, the limits);
- `headers`: the header packers both agents' hot paths use, and the enums as plain ints;
- `session`: the session rules (HELLO first, negotiated limits, request ids, reply matching),
  sans-IO, with a guest role and a host role;
- `jsonline`, `tomlfile`: the agents' control-socket client and config-file reader.

It lives under `guestagent` because the guest image ships that tree; the host imports it from
here, and nothing in it imports either agent.
"""

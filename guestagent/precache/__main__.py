"""`python -m guestagent.precache BACKING MOUNTPOINT --channel SPEC`: one mount in the foreground."""

from __future__ import annotations

import argparse
import logging
import sys

from guestagent import precache
from guestagent.precache.mount import MountError, mount


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m guestagent.precache",
        description=(precache.__doc__ or "").split("\n")[0],
    )
    parser.add_argument("backing")
    parser.add_argument("mountpoint", help="may be the backing directory itself: the mount covers it")
    parser.add_argument("--channel", required=True, help="virtio port name or unix socket path")
    parser.add_argument(
        "--allow-other",
        action="store_true",
        help="let every user use the mount, the kernel checking permissions",
    )
    parser.add_argument(
        "--no-auto-unmount",
        action="store_true",
        help="leave a dead mount behind if the shim dies (default: fusermount3 unmounts it)",
    )
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        mount(
            args.backing,
            args.mountpoint,
            args.channel,
            allow_other=args.allow_other,
            auto_unmount=not args.no_auto_unmount,
        )
    except MountError as exc:
        raise SystemExit(str(exc)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())

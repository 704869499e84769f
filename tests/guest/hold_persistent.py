"""Runs INSIDE a lab guest (`env PYTHONPATH=/opt/tmem python3 -`, through qemu-guest-agent), on the
tmem port directly.

Puts N persistent pages, writes "stored N" to a progress file, waits for a go-file, then gets every
page back and verifies it. Meanwhile the test may SIGKILL and restart the host agent (gets wait for
the reconnect) or destroy the domain (then this program simply dies with it). argv: N PROGRESS GO.
"""

import hashlib
import os
import sys

import trio

from guestagent.channel import open_channel
from guestagent.ports import find_port
from guestagent.protocol import wire


def page(i: int) -> bytes:
    return hashlib.shake_128(b"hold %d" % i).digest(wire.PAGE_SIZE)


async def main(n: int, progress: str, go: str) -> None:
    oid = hashlib.sha256(b"hold_persistent").digest()[:24]
    async with open_channel(find_port(), name="hold-test") as ch:
        pool = await ch.new_pool(int(wire.PoolFlag.PERSISTENT))
        stored = 0
        for i in range(n):
            stored += await pool.put(oid, i, page(i))
        with open(progress, "w") as f:
            f.write(f"stored {stored}\n")
        while not os.path.exists(go):
            await trio.sleep(0.2)
        good = 0
        for i in range(n):
            good += (await pool.get(oid, i)) == page(i)
        print(f"verified {good} of {n}")
        sys.exit(0 if good == n == stored else 1)


trio.run(main, int(sys.argv[1]), sys.argv[2], sys.argv[3])

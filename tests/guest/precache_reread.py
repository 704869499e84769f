"""Runs inside a lab guest (Debian's python3, stdin of guest-exec): the precache re-read workload.

`make DIR FILES PAGES`: random files in DIR (the backing directory) and DIR/../sums.json, their
sha256; `read MOUNT PASSES`: reads every file through the mount PASSES times, each read checked
against sums.json; prints one JSON line with the pages read and the failures (must be none).
"""

import hashlib
import json
import os
import random
import sys
import time

PAGE = 4096


def make(backing: str, files: int, pages: int) -> None:
    rng = random.Random(7)
    sums = {}
    os.makedirs(backing, exist_ok=True)
    for n in range(files):
        data = rng.randbytes(pages * PAGE - 37 * n)  # most files end in a short page
        name = f"f{n:03d}"
        with open(os.path.join(backing, name), "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        sums[name] = hashlib.sha256(data).hexdigest()
    with open(os.path.join(os.path.dirname(backing.rstrip("/")), "sums.json"), "w") as f:
        json.dump(sums, f)
    print(json.dumps({"files": files, "bytes": sum(pages * PAGE - 37 * n for n in range(files))}))


def read(mount: str, passes: int, sums_path: str) -> None:
    with open(sums_path) as f:
        sums = json.load(f)
    bad, pages, start = [], 0, time.monotonic()
    for p in range(passes):
        for name, digest in sorted(sums.items()):
            h = hashlib.sha256()
            with open(os.path.join(mount, name), "rb") as f:
                while chunk := f.read(1 << 17):
                    h.update(chunk)
                    pages += (len(chunk) + PAGE - 1) // PAGE
            if h.hexdigest() != digest:
                bad.append([p, name])
    print(
        json.dumps(
            {"passes": passes, "pages": pages, "bad": bad, "seconds": round(time.monotonic() - start, 2)}
        )
    )


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        read(sys.argv[2], int(sys.argv[3]), sys.argv[4])

"""An fsx-style exerciser: a seeded random sequence of operations on one file, checked against a model.

After the design of fsx (LTP, xfstests), written for this project: the file's expected bytes live in
memory; every read (read(2), and mmap reads with fsx's check that the last page is zero past the end
of the file) is compared with them, and so is the file's size after every operation. Offsets and
lengths lean on page boundaries (one byte either side, partial pages, ranges straddling the end of
the file), the places a page cache and a page-granular pool get wrong. Written bytes are random,
runs of one byte (same-filled pages) or a short repeated pattern (pages the pool compresses).

Operations: read, write, mmap read, mmap write (MAP_SHARED, msync), truncate (grow and shrink),
posix_fallocate, fallocate(2) modes the file system supports (probed first: punch hole, zero range,
keep size), close and reopen, fsync and fdatasync, dropping the kernel's cached pages of the file
(POSIX_FADV_DONTNEED), plus any named hooks the caller adds (a mount's own eviction, the host dropping
its pool). A mismatch raises `FsxMismatch` with the first differing offset and the tail of the
operation log, operations that touched the bad page marked.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

PAGE = mmap.PAGESIZE
LOG_TAIL = 48  # operations shown when a check fails

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
FALLOCATE_MODES = {
    "punch_hole": FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
    "zero_range": FALLOC_FL_ZERO_RANGE,
    "keep_size": FALLOC_FL_KEEP_SIZE,
}

# Relative frequencies; fallocate modes only where supported, hooks with the caller's weights.
WEIGHTS: Mapping[str, float] = {
    "read": 20,
    "write": 18,
    "mapread": 10,
    "mapwrite": 10,
    "truncate": 6,
    "posix_fallocate": 1.5,  # glibc's emulation: a read and a write a block, 17 ms for 64 KiB
    "punch_hole": 3,
    "zero_range": 3,
    "keep_size": 1,
    "reopen": 3,
    "fsync": 2,
    "dontneed": 8,
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def fallocate(fd: int, mode: int, off: int, length: int) -> None:
    """fallocate(2), which the os module does not offer."""
    if _libc.fallocate(fd, mode, off, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def mapped_read(fd: int, offset: int, length: int) -> bytes:
    """`length` bytes of a MAP_SHARED read-only mapping at `offset` (a page multiple).  Through libc:
    Python's mmap refuses to map past the end of the file, and fsx's check of the last page's tail
    (zeros past the end) needs exactly that."""
    addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
    if addr == _MAP_FAILED or addr is None:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    try:
        return ctypes.string_at(addr, length)
    finally:
        _libc.munmap(addr, length)


def probe_fallocate(fd: int, at: int) -> set[str]:
    """The fallocate(2) modes the file system behind `fd` supports, tried at offset `at` (at or past
    the end of the file, with the size kept or the range past it: the bytes are not changed)."""
    supported = set()
    for name, mode in FALLOCATE_MODES.items():
        try:
            fallocate(fd, mode | FALLOC_FL_KEEP_SIZE, at, PAGE)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        else:
            supported.add(name)
    return supported


@dataclass(frozen=True)
class Op:
    """One line of the operation log: what ran, on which range, and the size it left."""

    n: int
    name: str
    off: int
    length: int
    size: int  # the file's size after the operation

    def touches(self, page: int) -> bool:
        if self.length <= 0:
            return False
        return self.off // PAGE <= page <= (self.off + self.length - 1) // PAGE

    def __str__(self) -> str:
        span = f" {self.off:#x}..{self.off + self.length:#x} ({self.length})" if self.length else ""
        return f"{self.n:7d} {self.name:<15}{span}  size {self.size:#x}"


class FsxMismatch(AssertionError):
    """A read, an mmap read or the file's size disagreed with the model."""


class Fsx:
    """One file, one seed: `run(n)` applies n operations, checking as it goes."""

    def __init__(
        self,
        path: Path,
        seed: int,
        *,
        max_size: int = 4 << 20,
        max_len: int = 64 << 10,
        hooks: Mapping[str, tuple[float, Callable[[], None]]] | None = None,
        check_every: int = 2000,
    ) -> None:
        self.path, self.seed = path, seed
        self.max_size, self.max_len, self.check_every = max_size, max_len, check_every
        self.rng = random.Random(seed)
        # the expected bytes: model[:size]; past size always zeros (so growing needs no copying)
        self.model = bytearray(max_size)
        self.size = 0
        self._zeros = memoryview(bytes(max_size))
        self.log: deque[Op] = deque(maxlen=LOG_TAIL)
        self.counts: Counter[str] = Counter()
        self.seconds: defaultdict[str, float] = defaultdict(
            float
        )  # time spent per operation, to see where it goes
        self.n = 0
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.fallocate_modes = probe_fallocate(self.fd, 0)
        self.hooks = dict(hooks or {})
        ops = {k: w for k, w in WEIGHTS.items() if k not in FALLOCATE_MODES or k in self.fallocate_modes}
        ops.update({name: weight for name, (weight, _) in self.hooks.items()})
        self.names, self.weights = list(ops), list(ops.values())

    def close(self) -> None:
        os.close(self.fd)

    # ------------------------------------------------------------------ choosing ranges

    def _near_page_edge(self, limit: int) -> int:
        """An offset in [0, limit]: half the time on or one byte off a page boundary."""
        if limit <= 0:
            return 0
        if self.rng.random() < 0.5:
            edge = self.rng.randrange(limit // PAGE + 1) * PAGE + self.rng.choice((-1, 0, 0, 1))
            return min(max(edge, 0), limit)
        return self.rng.randrange(limit + 1)

    def _length(self) -> int:
        r = self.rng.random()
        if r < 0.3:
            return self.rng.randint(1, self.max_len // PAGE) * PAGE
        if r < 0.5:
            return self.rng.randint(1, 64)
        return self.rng.randint(1, self.max_len)

    def _data(self, length: int) -> bytes:
        r = self.rng.random()
        if r < 0.125:  # same-filled pages
            return bytes([self.rng.randrange(256)]) * length
        if r < 0.25:  # compressible
            unit = self.rng.randbytes(self.rng.randint(2, 24))
            return (unit * (length // len(unit) + 1))[:length]
        return self.rng.randbytes(length)

    # ------------------------------------------------------------------ the model

    def _resize(self, size: int) -> None:
        if size < self.size:
            self.model[size : self.size] = self._zeros[: self.size - size]
        self.size = size

    def _store(self, off: int, data: bytes | memoryview) -> None:
        self.model[off : off + len(data)] = data
        self.size = max(self.size, off + len(data))

    def expected(self, off: int = 0, length: int | None = None) -> bytes:
        """The file's bytes as the model has them (`length` bytes at `off`, cut at the end)."""
        end = self.size if length is None else min(off + length, self.size)
        return bytes(self.model[off:end]) if end > off else b""

    # ------------------------------------------------------------------ checks

    def _fail(self, what: str, first: int | None = None, expected: bytes = b"", got: bytes = b"") -> None:
        lines = [f"fsx {self.path.name} seed {self.seed}, op {self.n}: {what}"]
        page = None
        if first is not None:
            page = first // PAGE
            lines.append(
                f"first difference at {first:#x} (page {page} + {first % PAGE:#x}); "
                f"expected {expected[:16].hex(' ')}, got {got[:16].hex(' ')}"
            )
        lines.append(f"model size {self.size:#x}, file size {os.fstat(self.fd).st_size:#x}")
        marked = f" (* touched page {page})" if page is not None else ""
        lines.append(f"last {len(self.log)} operations{marked}:")
        lines += [("* " if page is not None and op.touches(page) else "  ") + str(op) for op in self.log]
        raise FsxMismatch("\n".join(lines))

    def _compare(self, what: str, off: int, got: bytes, want: int) -> None:
        """`got` must be the model's `want` bytes at `off`."""
        expected = self.expected(off, want)
        if got == expected:
            return
        n = min(len(got), len(expected))
        i = next((i for i in range(n) if got[i] != expected[i]), n)
        if i < n:
            self._fail(f"{what} differs", off + i, expected[i:], got[i:])
        self._fail(f"{what} of {want} at {off:#x} returned {len(got)} bytes, expected {len(expected)}")

    def _check_size(self) -> None:
        size = os.fstat(self.fd).st_size
        if size != self.size:
            self._fail(f"size {size:#x} after the operation, expected {self.size:#x}")

    def check_all(self) -> None:
        """The whole file, read from offset 0 in large chunks."""
        got = bytearray()
        while chunk := os.pread(self.fd, 1 << 20, len(got)):
            got += chunk
        expected = self.expected()
        if got != expected:
            n = min(len(got), len(expected))
            i = next((i for i in range(n) if got[i] != expected[i]), n)
            self._fail(f"the whole file differs ({len(got)} bytes read)", i, expected[i:], bytes(got[i:]))

    # ------------------------------------------------------------------ operations

    def _read(self) -> tuple[int, int]:
        off = self._near_page_edge(self.size + PAGE)  # sometimes at or past the end
        length = self._length()
        self._compare("read", off, os.pread(self.fd, length, off), length)
        return off, length

    def _write(self) -> tuple[int, int]:
        length = self._length()
        off = self._near_page_edge(self.max_size - length)  # may leave a hole past the end
        data = self._data(length)
        if os.pwrite(self.fd, data, off) != length:
            self._fail(f"short write of {length} at {off:#x}")
        self._store(off, data)
        return off, length

    def _mapread(self) -> tuple[int, int]:
        size = self.size
        if size == 0:
            return 0, 0
        off = self._near_page_edge(size - 1)
        length = min(self._length(), size - off)
        base = off // PAGE * PAGE
        end = min(-(-(off + length) // PAGE) * PAGE, -(-size // PAGE) * PAGE)
        mapped = mapped_read(self.fd, base, end - base)
        self._compare("mmap read", off, mapped[off - base : off + length - base], length)
        if end >= size and size % PAGE:  # the last page: zeros past the end of the file
            tail = mapped[size - base :]
            if tail.count(0) != len(tail):
                i = next(i for i, b in enumerate(tail) if b)
                self._fail("mmap of the last page is not zero past the end", size + i, bytes(1), tail[i:])
        return off, length

    def _mapwrite(self) -> tuple[int, int]:
        length = self._length()
        off = self._near_page_edge(self.max_size - length)
        if off + length > self.size:  # a mapping cannot extend the file: grow it first
            os.ftruncate(self.fd, off + length)
            self._resize(off + length)
        data = self._data(length)
        base = off // PAGE * PAGE
        with mmap.mmap(self.fd, off + length - base, mmap.MAP_SHARED, offset=base) as mm:
            mm[off - base : off + length - base] = data
            mm.flush()  # msync(MS_SYNC)
        self._store(off, data)
        return off, length

    def _truncate(self) -> tuple[int, int]:
        """Grow or shrink; logged as the range between the old and the new end."""
        old, size = self.size, self._near_page_edge(self.max_size)
        os.ftruncate(self.fd, size)
        self._resize(size)
        return min(old, size), abs(size - old)

    def _posix_fallocate(self) -> tuple[int, int]:
        length = min(self._length(), 16 * PAGE)
        off = self._near_page_edge(self.max_size - length)
        os.posix_fallocate(self.fd, off, length)
        self._resize(max(self.size, off + length))
        return off, length

    def _fallocate(self, name: str) -> tuple[int, int]:
        length = self._length()
        off = self._near_page_edge(self.max_size - length)
        fallocate(self.fd, FALLOCATE_MODES[name], off, length)
        if name == "punch_hole":
            end = min(off + length, self.size)
            if end > off:
                self.model[off:end] = self._zeros[: end - off]
        elif name == "zero_range":
            self._store(off, self._zeros[:length])
        return off, length

    def _reopen(self) -> tuple[int, int]:
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_RDWR)
        return 0, 0

    def _fsync(self) -> tuple[int, int]:
        (os.fdatasync if self.rng.random() < 0.5 else os.fsync)(self.fd)
        return 0, 0

    def _dontneed(self) -> tuple[int, int]:
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return 0, 0

    def step(self) -> None:
        name = self.rng.choices(self.names, self.weights)[0]
        self.n += 1
        t0 = time.perf_counter()
        if name in self.hooks:
            self.hooks[name][1]()
            off, length = 0, 0
        elif name in FALLOCATE_MODES:
            off, length = self._fallocate(name)
        else:
            off, length = getattr(self, f"_{name}")()
        self.counts[name] += 1
        self.seconds[name] += time.perf_counter() - t0
        self.log.append(Op(self.n, name, off, length, self.size))
        self._check_size()
        if self.n % self.check_every == 0:
            self.check_all()

    def run(self, ops: int, stop: threading.Event | None = None) -> float:
        """Apply `ops` operations (fewer if `stop` is set: another run failed), then check the whole
        file; returns the seconds it took."""
        t0 = time.monotonic()
        for i in range(ops):
            if stop is not None and i % 100 == 0 and stop.is_set():
                break
            self.step()
        self.check_all()
        return time.monotonic() - t0

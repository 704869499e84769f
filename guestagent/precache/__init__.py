"""precache: a FUSE passthrough file system behind the guest's own page cache, with tmem second.

`mount(backing, mountpoint, channel_spec)` serves BACKING at MOUNTPOINT with pyfuse3 (MOUNTPOINT
may be BACKING itself: the shim serves the tree it covers).  One private ephemeral tmem pool per
mount; the contract is in docs/precache.md.  One concept per module:

- `backing`: the backing tree's system calls, each in a worker thread (`io`);
- `inodes`: the inode table (inode <-> file and paths, lookup counts), plain code;
- `victim`: the victim cache (what a page-in gets from the pool, what is put, what a write, a
  truncate or a change behind the mount invalidates; the counters), no FUSE;
- `fs`: `PrecacheFS`, the thin `pyfuse3.Operations` over the three;
- `attach`: the mount's pool on a channel; `mount`: `mounted()`, `serve`, the mount options.

Works with pyfuse3 3.2 (Debian bookworm) to 3.4 and trio 0.22 onwards.
"""

from guestagent.precache.attach import connect, use_channel
from guestagent.precache.fs import EVICT_XATTR, STATS_XATTR, PrecacheFS
from guestagent.precache.mount import MountError, mount, mount_options, mounted, serve, stay_off
from guestagent.precache.victim import FORGOTTEN_OBJECTS, Counters, VictimCache, written_pages

__all__ = [
    "EVICT_XATTR",
    "FORGOTTEN_OBJECTS",
    "STATS_XATTR",
    "Counters",
    "MountError",
    "PrecacheFS",
    "VictimCache",
    "connect",
    "mount",
    "mount_options",
    "mounted",
    "serve",
    "stay_off",
    "use_channel",
    "written_pages",
]

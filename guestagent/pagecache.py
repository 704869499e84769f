"""The precache shim's own bounded cache of clean file pages (an LRU keyed by object and index).

The shim, not the kernel, owns the guest-side copy of a mount's file pages, so it sees every
eviction: when the cache is over its bound, the least recently used page is handed to the
`evict` callback (which puts it to tmem).  Dropping an object's pages (write, truncate, unlink,
a change behind the mount) does not call `evict`: those pages are no longer valid.

Pages are kept as the bytes read (the last page of a file may be shorter than a page); the
callback pads them if it needs to.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

__all__ = ["PageCache"]

Evict = Callable[[bytes, int, bytes], None]


class PageCache:
    """At most `capacity` pages; `evict(oid, index, page)` is called for each page pushed out."""

    def __init__(self, capacity: int, evict: Evict) -> None:
        if capacity < 1:
            raise ValueError("the page cache needs room for at least one page")
        self.capacity = capacity
        self._evict = evict
        self._pages: OrderedDict[tuple[bytes, int], bytes] = OrderedDict()
        self._by_object: dict[bytes, set[int]] = {}
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._pages)

    def get(self, oid: bytes, index: int) -> bytes | None:
        key = (oid, index)
        page = self._pages.get(key)
        if page is not None:
            self._pages.move_to_end(key)
        return page

    def insert(self, oid: bytes, index: int, page: bytes) -> None:
        key = (oid, index)
        pages = self._pages
        if key in pages:
            pages.move_to_end(key)
        else:
            self._by_object.setdefault(oid, set()).add(index)
        pages[key] = page
        self.shrink(self.capacity)

    def shrink(self, target: int) -> int:
        """Evict least recently used pages until at most `target` remain; returns how many went."""
        pages = self._pages
        n = 0
        while len(pages) > max(target, 0):
            (oid, index), page = pages.popitem(last=False)
            self._forget(oid, index)
            self.evictions += 1
            n += 1
            self._evict(oid, index, page)
        return n

    def drop_object(self, oid: bytes) -> int:
        """Forget every page of `oid` without evicting them (they are stale); returns how many."""
        indexes = self._by_object.pop(oid, None)
        if not indexes:
            return 0
        for index in indexes:
            del self._pages[(oid, index)]
        return len(indexes)

    def drop_pages(self, oid: bytes, indexes: Iterable[int]) -> int:
        """Forget these pages of `oid` (those it holds) without evicting them; returns how many."""
        held = self._by_object.get(oid)
        if not held:
            return 0
        n = 0
        for index in indexes:
            if index in held:
                held.discard(index)
                del self._pages[(oid, index)]
                n += 1
        if not held:
            del self._by_object[oid]
        return n

    def discard_all(self) -> int:
        """Forget every page without evicting (a test and benchmark hook)."""
        n = len(self._pages)
        self._pages.clear()
        self._by_object.clear()
        return n

    def holds(self, oid: bytes) -> bool:
        return oid in self._by_object

    def _forget(self, oid: bytes, index: int) -> None:
        indexes = self._by_object[oid]
        indexes.discard(index)
        if not indexes:
            del self._by_object[oid]

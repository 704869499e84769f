"""Page encodings: same-filled, lz4 block, raw.

Why three: zero pages (and other same-filled pages) are common in guests and cost nothing to keep;
text-like pages compress ~1.5x with lz4 at a few microseconds; pages that do not shrink enough to fit a
smaller arena slot are kept raw so nobody pays a decompression for nothing.
"""

from __future__ import annotations

from typing import Final

import lz4.block  # type: ignore[import-untyped,unused-ignore]

from guestagent.protocol.wire import PAGE_SIZE

RAW: Final = 0
LZ4: Final = 1
FILL: Final = 2

ENCODING_NAMES: Final = {RAW: "raw", LZ4: "lz4", FILL: "fill"}

_WORD: Final = 8
_REPEAT: Final = PAGE_SIZE // _WORD
_ZERO_WORD: Final = bytes(_WORD)
# Every get of a zero page returns this one object: bytes are immutable, so sharing it is safe, and
# the commonest same-filled page then costs no allocation at all.
ZERO_PAGE: Final = bytes(PAGE_SIZE)


def fill_word(page: bytes) -> bytes | None:
    """The repeated 8-byte word if `page` is same-filled, else None.

    The first 16 bytes reject almost every ordinary page: one cache line, which storing the page
    reads anyway (the last word, checked first before, was a cache miss of its own on a cold page).
    Only a page whose head repeats is compared in full, against the zero page without building one.
    """
    for i in range(_WORD):
        if page[i] != page[i + _WORD]:
            return None
    head = page[:_WORD]
    if head == _ZERO_WORD:
        return head if page == ZERO_PAGE else None
    return head if page == head * _REPEAT else None


def encode(page: bytes, compress: bool, max_compressed: int) -> tuple[int, bytes]:
    """Choose the cheapest encoding for a page: (encoding, stored bytes).

    `max_compressed` is the largest compressed length worth keeping: anything longer would land in the
    raw page's slot class anyway, so the page is stored raw.
    """
    word = fill_word(page)
    if word is not None:
        return FILL, word
    if compress:
        return pack(page, max_compressed)
    return RAW, page


def pack(page: bytes, max_compressed: int) -> tuple[int, bytes]:
    """`encode` for a page already known not to be same-filled, compression on."""
    packed: bytes = lz4.block.compress(page, store_size=False)
    if len(packed) <= max_compressed:
        return LZ4, packed
    return RAW, page


def decode(encoding: int, data: bytes) -> bytes:
    """The page stored as (`encoding`, `data`)."""
    if encoding == RAW:
        return data
    if encoding == LZ4:
        page: bytes = lz4.block.decompress(data, uncompressed_size=PAGE_SIZE)
        if len(page) != PAGE_SIZE:
            raise ValueError(f"lz4 page decoded to {len(page)} bytes")
        return page
    if encoding == FILL:
        return ZERO_PAGE if data == _ZERO_WORD else data * _REPEAT
    raise ValueError(f"unknown page encoding {encoding}")

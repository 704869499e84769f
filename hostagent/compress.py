"""Page encodings: same-filled, lz4 block, raw.

Why three: zero pages (and other same-filled pages) are common in guests and cost nothing to keep;
text-like pages compress ~1.5x with lz4 at a few microseconds; pages that do not shrink enough to fit a
smaller arena slot are kept raw so nobody pays a decompression for nothing.
"""

from __future__ import annotations

from typing import Final

import lz4.block  # type: ignore[import-untyped,unused-ignore]

from guestagent.wire import PAGE_SIZE

RAW: Final = 0
LZ4: Final = 1
FILL: Final = 2

ENCODING_NAMES: Final = {RAW: "raw", LZ4: "lz4", FILL: "fill"}

_WORD = 8
_REPEAT = PAGE_SIZE // _WORD


def fill_word(page: bytes) -> bytes | None:
    """The repeated 8-byte word if `page` is same-filled, else None.

    A cheap first/last-word check rejects almost every ordinary page before the full comparison.
    """
    head = page[:_WORD]
    if head != page[PAGE_SIZE - _WORD :]:
        return None
    if page[_WORD:] != page[:-_WORD]:
        return None
    return head


def encode(page: bytes, compress: bool, max_compressed: int) -> tuple[int, bytes]:
    """Choose the cheapest encoding for a page: (encoding, stored bytes).

    `max_compressed` is the largest compressed length worth keeping: anything longer would land in the
    raw page's slot class anyway, so the page is stored raw.
    """
    word = fill_word(page)
    if word is not None:
        return FILL, word
    if compress:
        packed = lz4.block.compress(page, store_size=False)
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
        return data * _REPEAT
    raise ValueError(f"unknown page encoding {encoding}")

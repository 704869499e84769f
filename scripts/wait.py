"""One way to wait for a condition: poll it until it holds or a deadline passes."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(
    cond: Callable[[], object], timeout: float = 5.0, what: str = "the condition", interval: float = 0.02
) -> float:
    """Poll `cond` every `interval` s until it is true; returns the seconds it took.

    Raises TimeoutError naming `what` after `timeout` s, so a failure says what never happened.
    """
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start

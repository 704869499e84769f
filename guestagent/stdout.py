"""A command-line tool's stdout whose reader went away (`hostagent pools | head -1`).

Python ignores SIGPIPE, so the write fails with BrokenPipeError instead of the tool dying quietly
as cat would, and prints a traceback. `quiet_pipe` ends such a tool as SIGPIPE would have: status
141, nothing on stderr. Used by both agents' CLIs.
"""

from __future__ import annotations

import os
import select
import signal
import sys
from collections.abc import Callable

__all__ = ["quiet_pipe"]


def _reader_gone(fd: int) -> bool:
    """The write end of a pipe whose read end is closed polls as an error."""
    try:
        p = select.poll()
        p.register(fd, 0)
        return any(ev & select.POLLERR for _, ev in p.poll(0))
    except (OSError, ValueError):
        return False


def quiet_pipe(main: Callable[[], int]) -> int:
    """Run `main` and flush stdout; a BrokenPipeError from stdout becomes exit status 141."""
    try:
        rc = main()
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        fd = sys.stdout.fileno()
        if not _reader_gone(fd):
            raise  # another pipe (a socket): not ours to hide
        # what is still buffered would fail again at exit: let it go to /dev/null
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
        return 128 + signal.SIGPIPE

"""What both agents' command lines share: `main` (errors as one line, quiet on a closed pipe), the
options every daemon and client command has, and logging to stderr.

It lives under `guestagent` because the guest image ships that tree; `hostagent/cli.py` imports it
from here, as it does `guestagent.stdout`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping, Sequence

from guestagent.stdout import quiet_pipe

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(
    prog: str,
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    command: Callable[[argparse.Namespace], int],
    failures: Mapping[type[Exception], str],
) -> int:
    """Parse `argv` and run `command` on it. An exception of a class in `failures` is one line on
    stderr (`PROG: PREFIX MESSAGE`) and exit status 1, never a traceback; ^C is status 130; a reader
    of stdout that went away (`| head`) ends it quietly."""

    def parsed_and_run() -> int:
        args = parser.parse_args(argv)
        try:
            return command(args)
        except tuple(failures) as err:
            prefix = next(p for cls, p in failures.items() if isinstance(err, cls))
            print(f"{prog}: {prefix}{err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130

    return quiet_pipe(parsed_and_run)


def add_log_level(parser: argparse.ArgumentParser, default: str) -> None:
    """`--log-level LEVEL`, any case, for a command that runs in the foreground and logs."""
    parser.add_argument(
        "--log-level", default=default, type=str.upper, choices=LOG_LEVELS, help=f"default: {default}"
    )


def log_to_stderr(level: str) -> None:
    """Log records of `level` and above to stderr, timed (a unit's journal, or a terminal)."""
    logging.basicConfig(level=level, stream=sys.stderr, format=LOG_FORMAT)


def client_options(socket_help: str, default_socket: str) -> argparse.ArgumentParser:
    """The parent parser of the commands that ask a running agent: its control socket is
    `--control PATH`, else the one named in `--config FILE`, else the default."""
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--control",
        metavar="PATH",
        help=f"{socket_help} (default: from --config, else {default_socket})",
    )
    client.add_argument("--config", metavar="FILE", help="read the control socket path from here")
    return client

"""Reading an agent's TOML config file, with errors that name the file (both agents use it)."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def read(path: Path, error: type[Exception]) -> dict[str, Any]:
    """The decoded document at `path`; `error("PATH: reason")` when it cannot be read or parsed."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as e:
        raise error(f"{path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path}: {e}") from None


def load(path: str | Path, parse: Callable[..., T], error: type[Exception]) -> T:
    """`parse(document, base_dir=the file's directory)` of the file at `path`, so that relative
    paths in it are relative to the file; every `error` it raises names the file."""
    p = Path(path)
    data = read(p, error)
    try:
        return parse(data, base_dir=p.resolve().parent)
    except error as e:
        raise error(f"{p}: {e}") from None

"""Reading an agent's TOML config file, with errors that name the file (both agents use it)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any


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

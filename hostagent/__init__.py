"""tmem host agent: the page pool, its guest channels, its control socket and CLI.

The engine's hot modules (arena, compress, pool) are compiled with mypyc at install time. If a module's
source is newer than its compiled form (edited since the last `scripts/setup`), the source is loaded
instead, with a warning: a stale binary must never run in place of the code in front of you.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

_COMPILED = ("arena", "compress", "pool")


def _load_stale_from_source() -> None:
    here = Path(__file__).parent
    for name in _COMPILED:
        source = here / f"{name}.py"
        binaries = list(here.glob(f"{name}.cpython-*.so"))
        if not binaries or not source.exists():
            continue
        if source.stat().st_mtime <= max(b.stat().st_mtime for b in binaries):
            continue
        fullname = f"{__name__}.{name}"
        spec = importlib.util.spec_from_file_location(fullname, source)
        if spec is None or spec.loader is None:
            continue
        warnings.warn(f"{source} is newer than its compiled module; using the source "
                      "(run scripts/setup to recompile)", stacklevel=2)
        module = importlib.util.module_from_spec(spec)
        sys.modules[fullname] = module
        spec.loader.exec_module(module)


_load_stale_from_source()

"""tmem host agent: the page pool, its guest channels, its control socket and CLI.

The hot modules (the engine's arena, compress and pool, and the guest channel that drives it) are
compiled with mypyc at install time. If any of their sources is newer than its compiled form (edited
since the last `scripts/setup`), all of them are loaded from source instead, with a warning: a stale
binary must never run in place of the code in front of you.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

# compiled.txt is the one list of compiled modules (setup.py and scripts/setup read it too)
_COMPILED = tuple(
    line.strip()
    for line in (Path(__file__).parent / "compiled.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
)  # in import order


def _load_stale_from_source() -> None:
    here = Path(__file__).parent
    stale = []
    for name in _COMPILED:
        source = here / f"{name}.py"
        binaries = list(here.glob(f"{name}.cpython-*.so"))
        if binaries and source.exists() and source.stat().st_mtime > max(b.stat().st_mtime for b in binaries):
            stale.append(source.name)
    if not stale:
        return
    # All or nothing: compiled and source classes of the same name do not mix.
    warnings.warn(
        f"{', '.join(stale)} newer than the compiled build; using the sources "
        "(run scripts/setup to recompile)",
        stacklevel=2,
    )
    for name in _COMPILED:
        fullname = f"{__name__}.{name}"
        spec = importlib.util.spec_from_file_location(fullname, here / f"{name}.py")
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {fullname} from source")
        module = importlib.util.module_from_spec(spec)
        sys.modules[fullname] = module
        spec.loader.exec_module(module)


_load_stale_from_source()

"""Build hook: compile the host's hot path (the engine's arena, compress, pool; the host's
per-guest channel) with mypyc.

Why: a put+get through the engine in pure CPython costs ~8x a dict-of-bytes store; compiled,
3.6-5x depending on the host (`scripts/bench pool`). The host channel (decode dispatch, replies) compiled
with the engine calls it natively, which cuts the host agent's CPU per pipelined request by a
sixth. The modules stay plain, typed Python: setting TMEM_PURE_PYTHON=1 at install time skips
compilation and everything still works, only slower.
"""

import os
from pathlib import Path

from setuptools import setup

# The list of compiled modules lives in hostagent/compiled.txt (scripts/setup and the stale-source
# fallback in hostagent/__init__.py read it too).
COMPILED = [
    line.strip()
    for line in (Path(__file__).parent / "hostagent" / "compiled.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

ext_modules = []
if not os.environ.get("TMEM_PURE_PYTHON"):
    from mypyc.build import mypycify

    ext_modules = mypycify([f"hostagent/{name}.py" for name in COMPILED], opt_level="3")

setup(ext_modules=ext_modules)

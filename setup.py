"""Build hook: compile the pool engine's hot path (arena, compress, pool) with mypyc.

Why: a put+get through the engine in pure CPython costs ~8x a dict-of-bytes store; compiled it is
within the 4x the foundation issue asks for. The modules stay plain, typed Python: setting
TMEM_PURE_PYTHON=1 at install time skips compilation and everything still works, only slower.
"""

import os

from setuptools import setup

ext_modules = []
if not os.environ.get("TMEM_PURE_PYTHON"):
    from mypyc.build import mypycify

    ext_modules = mypycify(
        ["hostagent/arena.py", "hostagent/compress.py", "hostagent/pool.py"],
        opt_level="3",
    )

setup(ext_modules=ext_modules)

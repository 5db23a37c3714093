"""Compiled programs and on-disk caches: how selfopt compiles, and where it keeps results.

:data:`COMPILER_OPTIONS` is how selfopt's own jitted programs are compiled. The caches live
under one root: tuned-Adam results and JAX's compiled programs.

The root is ``$SELFOPT_CACHE`` or ``~/.cache/selfopt``. ``adam/`` holds tuned-Adam results
(:func:`selfopt.evaluate.tune_adam`); ``jax/`` holds XLA executables (JAX's persistent
compilation cache), so a run's task shapes compile once per machine rather than once per
process (loading a program takes a fraction of its compile time; docs/results.md has the
numbers). ``SELFOPT_COMPILE_CACHE=0`` turns the compilation cache off.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import jax

#: XLA options of selfopt's jitted programs (the outer step, scoring, evaluation): LLVM's
#: backend optimisation level 1 instead of XLA's default: on this project's programs it cuts
#: compile time severalfold and leaves the run time per call unchanged (docs/results.md); the
#: user's own programs are compiled as JAX's defaults say.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def cache_root() -> Path:
    """``$SELFOPT_CACHE``, or ``~/.cache/selfopt``."""
    return Path(os.environ.get("SELFOPT_CACHE") or Path.home() / ".cache" / "selfopt")


def enable_compilation_cache() -> Path | None:
    """Points JAX's persistent compilation cache at ``cache_root() / "jax"``.

    Programs that took at least half a second to compile are stored. Call it before the first
    compilation. Does nothing (and returns ``None``) when ``SELFOPT_COMPILE_CACHE=0``; a cache
    directory that cannot be created is a warning, not an error: the run only compiles more.

    Returns:
      The cache directory in use, or ``None``.
    """
    if os.environ.get("SELFOPT_COMPILE_CACHE", "1") == "0":
        return None
    path = cache_root() / "jax"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"selfopt: warning: no compilation cache ({err.strerror}: {path})",
              file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path

"""Lets test modules import shared helpers from each other (``from test_lopt import ...``)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# Tests that call ``selfopt.cli.main`` in-process must not point this process's JAX at a
# temporary compilation cache; tests/test_cache.py turns it on in subprocesses.
import os  # noqa: E402

os.environ["SELFOPT_COMPILE_CACHE"] = "0"

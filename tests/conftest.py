"""Lets test modules import shared helpers from each other (``from test_lopt import ...``), and
sets up JAX for the tests."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# Tests that call ``selfopt.cli.main`` in-process must not point this process's JAX at a
# temporary compilation cache; tests/test_cache.py turns it on in subprocesses.
os.environ["SELFOPT_COMPILE_CACHE"] = "0"
# Most of the suite's time is XLA compiling small programs once each; without its optimisation
# passes that is about a fifth faster (the same for the ``selfopt train`` subprocesses, which
# inherit the variable). The optimised programs run in CI's ``selfopt train`` before the tests.
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"

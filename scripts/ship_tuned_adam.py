"""Tune Adam on the held-out suite at the default budget and ship the results in the package.

    python scripts/ship_tuned_adam.py [--from-cache]

Writes ``selfopt/tuned_adam/adam-*.json`` (:data:`selfopt.evaluate.SHIPPED_ADAM`): for every
task of the held-out suite (the quick suite is a subset), Adam tuned over
:data:`~selfopt.evaluate.ADAM_LEARNING_RATES` for 300 steps over 3 seeds (evaluation seed 0),
the budget of ``selfopt train``'s held-out checks and of ``selfopt eval``. ``tune_adam`` reads
these files as it reads its cache, so a first run compiles and runs no Adam. ``--from-cache``
copies the results already in ``$SELFOPT_CACHE/adam`` instead of tuning again (a results file is
the same whoever computed it; ``tests/test_evaluate.py`` recomputes one). Also writes
``PROVENANCE.json``: the machine, JAX version and date.

Run it again whenever the suite, the rate grid, the default budget or the tasks change: a
shipped file that no longer matches its key is never read (the key names everything), and a test
fails when a suite task has no shipped result.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax

from selfopt.evaluate import (ADAM_LEARNING_RATES, SHIPPED_ADAM, _cache_path, default_cache_dir,
                              suite, task_label, tune_adam)
from selfopt.tasks.distribution import full_config

STEPS, SEEDS, SEED = 300, 3, 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-cache", action="store_true",
                        help="copy the results in $SELFOPT_CACHE/adam instead of tuning")
    args = parser.parse_args()
    SHIPPED_ADAM.mkdir(exist_ok=True)
    for old in SHIPPED_ADAM.glob("adam-*.json"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        source = default_cache_dir() if args.from_cache else Path(tmp)
        for config in suite("heldout"):
            name = _cache_path(source, full_config(config), STEPS, SEEDS, SEED,
                               ADAM_LEARNING_RATES).name
            if not (source / name).is_file():
                if args.from_cache:
                    print(f"ship_tuned_adam: {task_label(config)} is not in {source}; run "
                          "without --from-cache", file=sys.stderr)
                    return 2
                started = time.monotonic()
                tune_adam(config, STEPS, SEEDS, cache_dir=source, seed=SEED)
                print(f"{task_label(config)}: {time.monotonic() - started:.0f} s", file=sys.stderr)
            shutil.copyfile(source / name, SHIPPED_ADAM / name)
    (SHIPPED_ADAM / "PROVENANCE.json").write_text(json.dumps({
        "made_by": "scripts/ship_tuned_adam.py", "date": time.strftime("%Y-%m-%d"),
        "jax": jax.__version__, "backend": jax.default_backend(),
        "platform": platform.platform(), "steps": STEPS, "seeds": SEEDS, "seed": SEED,
        "tasks": [task_label(c) for c in suite("heldout")]}, indent=2) + "\n")
    print(f"wrote {len(suite('heldout'))} results to {SHIPPED_ADAM}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""JAX's persistent compilation cache under ``$SELFOPT_CACHE/jax`` (selfopt/cache.py)."""
import json
import os
import subprocess
import sys

from safetensors.numpy import load_file

TINY = ["--population", "2", "--max-steps", "2", "--quiet",
        "--set", "estimator.num_pairs=1", "--set", "estimator.truncation_length=4",
        "--set", "estimator.min_inner_length=8", "--set", "estimator.max_inner_length=16",
        "--set", 'tasks.families=["quadratic"]', "--set", "num_slots=1",
        "--set", "lopt.hidden=[4]", "--set", "eval_minutes=0", "--set", "pbt.score_steps=4",
        "--set", "validate_steps=4"]

# ``selfopt train`` in a fresh process, counting JAX's persistent-cache hits.
COUNTING_TRAIN = """
import collections, json, sys
import jax.monitoring
events = collections.Counter()
jax.monitoring.register_event_listener(lambda event, **kwargs: events.update([event]))
from selfopt.cli import main
assert main(sys.argv[1:]) == 0
print(json.dumps(events["/jax/compilation_cache/cache_hits"]))
"""


def train(out, cache, enabled=True):
    """Trains TINY into ``out``; returns the checkpoint's arrays and the cache hits."""
    env = {**os.environ, "SELFOPT_CACHE": str(cache),
           "SELFOPT_COMPILE_CACHE": "1" if enabled else "0"}
    done = subprocess.run([sys.executable, "-c", COUNTING_TRAIN, "train", "--out", str(out),
                           *TINY], env=env, check=True, capture_output=True, text=True,
                          timeout=300)
    (checkpoint,) = sorted((out / "checkpoints").glob("step-*.safetensors"))
    return load_file(checkpoint), json.loads(done.stdout.splitlines()[-1])


def test_compiled_programs_are_stored_then_loaded_with_identical_results(tmp_path):
    cold, cold_hits = train(tmp_path / "cold", tmp_path / "cache")
    assert cold_hits == 0 and any((tmp_path / "cache" / "jax").iterdir())
    warm, warm_hits = train(tmp_path / "warm", tmp_path / "cache")
    assert warm_hits > 0  # the outer step, inner-problem set-up and scoring were loaded
    assert cold.keys() == warm.keys()
    for name in cold:
        assert (cold[name] == warm[name]).all(), name


def test_the_compilation_cache_can_be_turned_off(tmp_path):
    _, hits = train(tmp_path / "run", tmp_path / "cache", enabled=False)
    assert hits == 0 and not (tmp_path / "cache" / "jax").exists()

"""Every benchmark still runs: each one's ``--smoke`` mode (toy sizes, the same code path) in a
subprocess, and the keys of the JSON it prints.

The subprocesses of the selected tests start together when the first test asks for one, two at
a time (the compilations of one process use about one core), so the module takes about the
time of the longest chain rather than of the sum. Each one has its own empty ``SELFOPT_CACHE``
(nothing touches ``~/.cache``), no compilation cache and unoptimised XLA compiles.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Benchmark -> extra arguments, in the order they start (longest first; ``elite_probe`` last: it
#: probes the self-training run that ``ttb`` leaves, so it waits for ``ttb``).
BENCHMARKS = {
    "cold_start": [],
    "ttb": ["--control"],
    "throughput": [],
    "adam_rates": [],
    "tasks": [],
    "lopt_step": [],
    "torch_step": [],
    "ray_scaling": [],
    "elite_probe": ["all"],
}
AFTER = {"elite_probe": "ttb"}


def run_benchmark(name: str, args: list[str], tmp: Path) -> dict:
    """``benchmarks/NAME.py --smoke ARGS``; the JSON it printed."""
    env = {**os.environ, "SELFOPT_CACHE": str(tmp / f"cache-{name}"),
           "SELFOPT_COMPILE_CACHE": "0", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--smoke",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{name} failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout)


class Runs:
    """The benchmarks' smoke runs, in the background, two at a time, each started once."""

    def __init__(self, tmp: Path):
        self.tmp, self.lock = tmp, threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=2)
        self.futures: dict[str, Future] = {}

    def start(self, name: str) -> Future:
        if name in AFTER:
            self.start(AFTER[name])  # queued first, so it never waits behind its follower
        with self.lock:
            if name not in self.futures:
                self.futures[name] = self.pool.submit(self._run, name)
            return self.futures[name]

    def _run(self, name: str) -> dict:
        args = list(BENCHMARKS[name])
        if name == "ttb":
            args += ["--out", str(self.tmp / "ttb")]
        if name == "elite_probe":
            try:
                self.futures["ttb"].result()
            except Exception as error:
                raise RuntimeError(f"no run to probe: ttb failed ({error})") from None
            args.append(str(self.tmp / "ttb" / "self"))
        return run_benchmark(name, args, self.tmp)

    def result(self, name: str) -> dict:
        return self.start(name).result()


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """Starts the smoke runs of the tests of this module that were selected."""
    runs = Runs(tmp_path_factory.mktemp("benchmarks"))
    selected = {item.name for item in request.session.items
                if getattr(item, "module", None) is request.module}
    for name in BENCHMARKS:
        if f"test_{name}" in selected:
            runs.start(name)
    yield runs
    runs.pool.shutdown(wait=True, cancel_futures=True)


def has(tree: dict, *paths: str) -> None:
    """Asserts that ``tree`` holds every dotted path."""
    for path in paths:
        node = tree
        for key in path.split("."):
            assert isinstance(node, dict) and key in node, f"no {path!r} in {sorted(tree)}"
            node = node[key]


def test_tasks(runs):
    out = runs.result("tasks")
    has(out, "device", "budget_ms", "steps_per_scan", "families")
    assert out["smoke"] and out["families"]
    for row in out["families"].values():
        has(row, "config", "ms_per_step", "under_budget")


def test_lopt_step(runs):
    out = runs.result("lopt_step")
    has(out, "benchmark", "device", "cpu_count", "machine", "jax", "results", "flops_per_param",
        "matmul_gflops", "lopt_fraction_of_matmul_rate")
    assert out["results"] and out["matmul_gflops"] > 0
    for row in out["results"]:
        has(row, "model", "num_params", "lopt_ms", "adam_ms", "ratio", "lopt_gflops")


def test_torch_step(runs):
    pytest.importorskip("torch")
    out = runs.result("torch_step")
    has(out, "benchmark", "torch", "flops_per_param", "matmul_gflops",
        "selfopt_fraction_of_matmul_rate", "convnet_step.selfopt_s", "convnet_step.adam_s",
        "convnet_step.adamw_foreach_s", "convnet_step.ratio_to_adam")
    for row in out["optimizer_step"].values():
        has(row, "params", "selfopt_s", "adam_s", "adamw_foreach_s", "ratio_to_adam",
            "selfopt_gflops")


def test_throughput(runs):
    out = runs.result("throughput")
    has(out, "device", "reference.outer_steps_per_s", "reference.lopt_inner_steps_per_s",
        "reference.adam_inner_steps_per_s", "reference.es_path_cost_vs_adam_step",
        "fused.separate_calls_s", "fused.one_fused_call_s", "fused.speedup")
    assert out["population_scaling"] and out["truncation_scaling"]
    for row in out["population_scaling"] + out["truncation_scaling"]:
        has(row, "outer_step_s")


def test_adam_rates(runs):
    out = runs.result("adam_rates")
    has(out, "tuned_mean_normalized", "tuned_rate_by_task", "best_single_rate.learning_rate",
        "best_single_rate.margin", "tuned_with_linear_decay.margin",
        "tuned_with_linear_decay.wins", "tuned_with_linear_decay.by_task")
    assert len(out["by_rate"]) == 14 and len(out["tuned_rate_by_task"]) == 2


def test_ttb(runs):
    out = runs.result("ttb")
    has(out, "machine", "compilation_cache", "figure")
    for arm, label in (("self", "self-training"), ("control", "adam-control")):
        has(out[arm], "time_to_beat_adam_s", "best_margin", "best_margin_at_s", "best_wins",
            "best_margin_by_minute", "curve", "adam_mean_normalized", "steps")
        assert out[arm]["outer_optimizer"] == label and out[arm]["steps"] == 2
        assert [row["step"] for row in out[arm]["curve"]] == [0, 2]  # at the start and the end


def test_elite_probe(runs):
    out = runs.result("elite_probe")
    has(out, "heldin.margin", "heldin.tasks_by_label", "continue.start", "continue.best",
        "continue.improved", "continue.curve", "population.distance_to_elite_rms",
        "population.validation", "population.quick_margin", "scale.by_factor",
        "curve.steps", "curve.adam.loss", "curve.elite_by_factor", "updates.by_task")
    assert len(out["continue"]["curve"]) == 2 and len(out["scale"]["by_factor"]) == 3


@pytest.mark.slow  # the default configuration's first steps: about a minute on 2 cores
def test_cold_start(runs):
    out = runs.result("cold_start")
    has(out, "this.compile_s", "this.programs", "this.steps")
    assert out["this"]["exit_code"] == 0 and out["this"]["steps"] == 2


def test_the_gpu_script_names_only_real_config_fields():
    """scripts/gpu_ttb.sh runs only where a GPU is lent, so nothing else would notice a
    renamed field in its ``--set`` flags."""
    import re

    from selfopt.cli import parse_assignment
    from selfopt.config import make_config

    text = (ROOT / "scripts" / "gpu_ttb.sh").read_text()
    overrides = dict(parse_assignment(m) for m in re.findall(r"--set (\S+)", text))
    assert overrides
    make_config(overrides)  # raises ConfigError naming an unknown field


def test_ray_scaling(runs):
    pytest.importorskip("ray")
    out = runs.result("ray_scaling")
    has(out, "benchmark", "cpus", "shards", "population", "in_process.s_per_step")
    for workers in (1, 2):
        row = out[f"ray_{workers}_workers"]
        has(row, "s_per_step", "steps_per_s", "vs_in_process", "driver_waiting_fraction")
        assert row["s_per_step"] > 0 and 0 <= row["driver_waiting_fraction"] <= 1

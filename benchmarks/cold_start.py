"""Cold start of ``selfopt train``: what a new user's first minutes are spent on.

    python benchmarks/cold_start.py [--minutes 10] [--ref COMMIT] [--smoke]

Runs the default ``selfopt train`` (``--quiet``) in a fresh process with an empty cache
(``SELFOPT_CACHE`` a new temporary folder, so no compiled program and no tuned-Adam result is
reused), records every XLA compilation through ``jax.monitoring``, and prints JSON:

* ``compile_s``: seconds inside compilation (the union of the time spans of tracing,
  lowering and XLA compiling, so nested traces are not counted twice), split into what the
  training loop compiled and what the held-out checks compiled (``eval_compile_s``);
* ``programs``: XLA programs compiled (``programs_over_1s``: those that took over a second;
  ``training_programs_by_name``: the training loop's programs and their backend-compile
  seconds by function name);
* ``steps_2min`` / ``steps_10min``: outer steps done within 2 and 10 minutes of training time
  (the run's clock, which counts compiling and excludes the held-out checks);
* ``first_eval`` / ``eval_2min``: the held-out check of the random start and the first one at
  or after 2 training minutes (mean normalised loss, wins), and whether the latter is past the
  random start;
* ``best_margin`` / ``final_margin``: the best and the last held-out check of the run (margin:
  the elite's mean normalised loss over tuned Adam's; wins of the 9 quick-suite tasks).

With ``--ref COMMIT`` the same measurement runs first on that commit (a temporary git
worktree, its own empty cache), so before and after come from one invocation on one machine.
``--smoke`` runs a few outer steps (seconds, for CI: it checks the benchmark still works).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from selfopt.run_dir import read_jsonl

ROOT = Path(__file__).resolve().parents[1]

#: Runs in the child: listens to JAX's compile events, then runs ``selfopt train``.
PROBE = r"""
import json, sys, threading, time
import jax.monitoring as mon
spans, programs, lock = [], [], threading.Lock()
evaluating = [False]
def on_span(event, start, end, **kw):
    if event.startswith("/jax/core/compile/"):
        with lock:
            spans.append((start, end, evaluating[0]))
def on_duration(event, secs, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
        with lock:
            programs.append((kw.get("fun_name", "?"), secs, evaluating[0]))
mon.register_event_time_span_listener(on_span)
mon.register_event_duration_secs_listener(on_duration)
import selfopt.train as train
# the held-out check: train.check_elite, or Trainer.evaluate_best before the pure train step
owner, name = (train, "check_elite") if hasattr(train, "check_elite") else (
    train.Trainer, "evaluate_best")
check = getattr(owner, name)
def tagged(*args, **kwargs):
    evaluating[0] = True
    try:
        return check(*args, **kwargs)
    finally:
        evaluating[0] = False
setattr(owner, name, tagged)
from selfopt.cli import main
started = time.time()
code = main(sys.argv[2:])
json.dump({"code": code, "wall_s": time.time() - started, "spans": spans,
           "programs": programs}, open(sys.argv[1], "w"))
"""


def union_seconds(spans: list[tuple[float, float]]) -> float:
    """Length of the union of time intervals (nested compile spans count once)."""
    total, end = 0.0, -float("inf")
    for start, stop in sorted(spans):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def ratio(row: dict) -> float:
    """A held-out check's margin: the elite's mean normalised loss over tuned Adam's."""
    return row["mean_normalized"] / row["adam_mean_normalized"]


def margin(row: dict) -> dict:
    return {"margin": round(ratio(row), 4), "wins": row["wins"], "elapsed": row["elapsed"]}


def by_name(programs: list) -> dict[str, list]:
    """``{function name: [programs, backend-compile seconds]}``, costliest first."""
    totals: dict[str, list] = {}
    for name, seconds, _ in programs:
        count, total = totals.get(name, [0, 0.0])
        totals[name] = [count + 1, total + seconds]
    return {k: [n, round(t, 1)] for k, (n, t) in sorted(totals.items(), key=lambda x: -x[1][1])}


def measure(root: Path, minutes: float, extra: list[str]) -> dict:
    """One cold ``selfopt train`` of the tree at ``root``; its compile and progress numbers."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "SELFOPT_CACHE": str(tmp / "cache"), "PYTHONPATH": str(root)}
        out = tmp / "probe.json"
        command = [sys.executable, "-c", PROBE, str(out), "train", "--quiet", "--minutes",
                   str(minutes), "--out", str(tmp / "run"), *extra]
        subprocess.run(command, cwd=tmp, env=env, check=True, stdout=subprocess.DEVNULL)
        probe = json.loads(out.read_text())
        steps = sorted({r["step"]: r["elapsed"] for r in read_jsonl(tmp / "run" / "metrics.jsonl")
                        }.items())
        evals = read_jsonl(tmp / "run" / "eval.jsonl")
    spans = probe["spans"]
    programs = probe["programs"]
    check = lambda row: row and {k: row[k] for k in ("step", "elapsed", "mean_normalized",
                                                    "adam_mean_normalized", "wins")}
    at_2min = next((r for r in evals if r["elapsed"] >= 120), None)
    return {
        "exit_code": probe["code"],
        "wall_s": round(probe["wall_s"], 1),
        "compile_s": round(union_seconds([(a, b) for a, b, e in spans if not e]), 1),
        "eval_compile_s": round(union_seconds([(a, b) for a, b, e in spans if e]), 1),
        "programs": len(programs),
        "programs_over_1s": sum(s > 1 for _, s, _ in programs),
        "slowest_programs": [[name, round(s, 1)] for name, s, _ in
                             sorted(programs, key=lambda p: -p[1])[:8]],
        "training_programs_by_name": by_name([p for p in programs if not p[2]]),
        "steps": len(steps),
        "steps_2min": sum(e <= 120 for _, e in steps),
        "steps_10min": sum(e <= 600 for _, e in steps),
        "first_eval": check(evals[0] if evals else None),
        "eval_2min": check(at_2min),
        "past_random_start_2min": bool(at_2min and evals[0]["mean_normalized"]
                                       > at_2min["mean_normalized"]),
        "best_margin": margin(min(evals, key=ratio)) if evals else None,
        "final_margin": margin(evals[-1]) if evals else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training minutes per run")
    parser.add_argument("--ref", help="a commit to measure first, in a temporary worktree")
    parser.add_argument("--smoke", action="store_true", help="a few steps, for CI")
    args = parser.parse_args()
    extra = ["--max-steps", "2", "--set", "eval_minutes=0"] if args.smoke else []
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "minutes": args.minutes, "date": time.strftime("%Y-%m-%d")}
    if args.ref:
        with tempfile.TemporaryDirectory() as tmp:
            tree = Path(tmp) / "ref"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree),
                            args.ref], check=True, capture_output=True)
            try:
                result["ref"] = {"commit": args.ref, **measure(tree, args.minutes, extra)}
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(tree)], check=False, capture_output=True)
    result["this"] = measure(ROOT, args.minutes, extra)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

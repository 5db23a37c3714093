"""Crash harness: SIGKILL ``selfopt train`` at random moments, resume it, and check nothing is lost.

    python scripts/crash_harness.py --kills 20          # the full run (a few minutes on 2 cores)
    python scripts/crash_harness.py --kills 3 --seed 1  # what the default test suite runs

It runs a small configuration (2 members, quadratics, a checkpoint after every outer step, a PBT
round every 3 steps, a task change halfway) twice as real ``selfopt train`` processes:

1. a *baseline*, never interrupted, to ``--max-steps``;
2. the same run, killed with SIGKILL ``--kills`` times and resumed with
   ``selfopt train --resume RUN`` after each kill. One kill in five lands at a random moment of
   start-up (imports, compilation, resume, log truncation); the others after the run has made
   progress again: 40% the moment the harness, polling the checkpoint folder from outside,
   sees a checkpoint's temporary file (a write in progress), the rest at a random phase of an
   outer step. Evidence of where kills landed is counted afterwards: a temporary file left
   (killed while writing a checkpoint), one checkpoint more than ``keep_checkpoints`` (killed
   after the rename, before pruning), a half-written log line. The timing is real: no hook in
   ``selfopt`` helps, and whether a kill beats the rename is up to the scheduler.

After every kill it checks that every checkpoint file verifies (SHA-256), that the work lost
(outer steps done minus the step of the newest good checkpoint) is at most one checkpoint
interval (one step here), and that the resumed process runs on. At the end it checks that the
final checkpoint's arrays equal the baseline's bitwise, that its metadata, ``metrics.jsonl`` and
``lineage.jsonl`` are equal apart from wall-clock fields, and that no temporary file is left.

Prints one JSON object (kills, resumes, steps lost, evidence of kills inside writes, equality)
and exits 0 if every check held, 1 if not.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.numpy import load_file

from selfopt import checkpoint as ckpt

#: The small, fast configuration every process of the harness runs.
CONFIG = {"estimator.num_pairs": 1, "estimator.truncation_length": 2,
          "tasks.families": ["quadratic"], "lopt.hidden": [4], "num_slots": 1, "pbt.interval": 3,
          "pbt.score_steps": 2, "validate_interval": 7, "validate_steps": 2,
          "estimator.min_inner_length": 4, "estimator.max_inner_length": 8,
          "checkpoint_seconds": 0,
          "keep_checkpoints": 2, "eval_minutes": 0, "minutes": 600}
#: Fields of log rows and checkpoint metadata that measure wall time (they may differ).
WALL_TIME_FIELDS = ("elapsed",)
POLL_S = 0.002


def train_argv(out: Path, max_steps: int, seed: int) -> list[str]:
    """The ``selfopt train`` command line of a fresh run."""
    # The slot changes task once, halfway (each new task shape costs a compilation).
    config = dict(CONFIG, task_steps=max(6, max_steps // 2 + 1))
    sets = [f"{k}={json.dumps(v)}" for k, v in config.items()]
    return [sys.executable, "-m", "selfopt.cli", "train", "--out", str(out), "--quiet",
            "--population", "2", "--seed", str(seed), "--max-steps", str(max_steps),
            *[arg for s in sets for arg in ("--set", s)]]


def resume_argv(run: Path) -> list[str]:
    return [sys.executable, "-m", "selfopt.cli", "train", "--resume", str(run), "--quiet"]


def checkpoint_steps(run: Path) -> list[int]:
    """Steps of the checkpoint files in ``run`` (verified or not), ascending."""
    names = (p.name for p in (run / "checkpoints").glob("step-*.safetensors"))
    return sorted(int(n[5:-12]) for n in names if n[5:-12].isdigit())


def temp_files(run: Path) -> list[Path]:
    """Temporary files of interrupted atomic writes in the run and checkpoint folders."""
    return [p for folder in (run, run / "checkpoints") if folder.is_dir()
            for p in folder.glob(".*.tmp-*")]


def log_rows(path: Path) -> tuple[list[dict], bool]:
    """The complete rows of a JSON-lines log, and whether a half-written last line follows."""
    if not path.exists():
        return [], False
    text = path.read_text()
    lines = text.split("\n")
    partial = lines[-1] != ""  # a complete log ends with a newline
    rows = [json.loads(line) for line in lines[:-1] if line.strip()]
    return rows, partial


def without(row: dict, fields=WALL_TIME_FIELDS) -> dict:
    return {k: v for k, v in row.items() if k not in fields}


class Life:
    """One ``selfopt train`` process of the killed run."""

    def __init__(self, argv: list[str], workdir: Path, index: int, env: dict):
        self.err_path = workdir / f"life-{index:02d}.stderr"
        self.started = time.monotonic()
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(argv, cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                                         stderr=err)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")


def wait_for_step(life: Life, run: Path, step: int) -> bool:
    """Waits until ``run`` has a checkpoint of ``step`` or later; False if the process ended."""
    while life.alive():
        steps = checkpoint_steps(run)
        if steps and steps[-1] >= step:
            return True
        time.sleep(POLL_S)
    return False


def wait_for_write(life: Life, folder: Path, timeout_s: float = 5.0) -> None:
    """Returns as soon as a temporary file of a checkpoint write is in ``folder`` (a write in
    progress), or the process ended, or ``timeout_s`` passed. Busy-polls: a write lasts ~1 ms."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and life.alive():
        if any(".tmp-" in name for name in os.listdir(folder)):
            return
    return


def inspect_after_kill(run: Path) -> dict:
    """What a kill left behind: verified and corrupt checkpoints, temporary files, logs."""
    good, corrupt = [], []
    for step in checkpoint_steps(run):
        path = run / "checkpoints" / f"step-{step:08d}.safetensors"
        try:
            ckpt.read_metadata(path)
            good.append(step)
        except ckpt.CheckpointError as err:
            corrupt.append(f"{path.name}: {err}")
    metrics, partial_metrics = log_rows(run / "metrics.jsonl")
    _, partial_lineage = log_rows(run / "lineage.jsonl")
    done = max((r["step"] for r in metrics), default=-1) + 1  # outer steps computed
    temps = temp_files(run)
    mid_write = any(p.parent.name == "checkpoints" for p in temps)
    return {"good": good, "corrupt": corrupt, "done": done, "mid_checkpoint_write": mid_write,
            # inside save(): writing (a temporary file) or after the rename, before pruning
            "inside_save": mid_write or len(good) + len(corrupt) > CONFIG["keep_checkpoints"],
            "mid_log_write": partial_metrics or partial_lineage
            or any(p.name.startswith((".metrics", ".lineage")) for p in temps)}


def compare_runs(base: Path, crash: Path) -> dict:
    """Bitwise comparison of the two runs' final checkpoints and logs."""
    base_steps, crash_steps = checkpoint_steps(base), checkpoint_steps(crash)
    result = {"final_step": crash_steps[-1] if crash_steps else None}
    if not base_steps or base_steps[-1] != result["final_step"]:
        return {**result, "arrays_bitwise_equal": False, "metadata_equal": False,
                "logs_equal": False, "note": f"final steps differ: {base_steps} {crash_steps}"}
    name = f"step-{base_steps[-1]:08d}.safetensors"
    a, b = load_file(str(base / "checkpoints" / name)), load_file(str(crash / "checkpoints" / name))
    result["arrays"] = len(a)
    result["arrays_bitwise_equal"] = a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and a[k].tobytes() == b[k].tobytes() for k in a)
    meta_a = ckpt.read_metadata(base / "checkpoints" / name)
    meta_b = ckpt.read_metadata(crash / "checkpoints" / name)
    # Log sizes differ with the width of the wall-time fields; the logs are compared below.
    result["metadata_equal"] = (
        without(meta_a["run"]) == without(meta_b["run"]) and meta_a["config"] == meta_b["config"])
    logs = {}
    for log in ("metrics.jsonl", "lineage.jsonl"):
        (rows_a, partial_a), (rows_b, partial_b) = log_rows(base / log), log_rows(crash / log)
        logs[log] = (not partial_a and not partial_b
                     and [without(r) for r in rows_a] == [without(r) for r in rows_b])
        result[f"{log}_rows"] = len(rows_b)
    result["logs_equal"] = all(logs.values())
    if not result["logs_equal"]:
        result["logs_differ"] = [log for log, same in logs.items() if not same]
    return result


def run_harness(kills: int, seed: int, workdir: Path, max_steps: int | None = None,
                startup_fraction: float = 0.2, write_fraction: float = 0.4,
                compile_cache: bool = True) -> dict:
    """Runs the baseline and the killed run in ``workdir``; returns the summary (see module).

    Args:
      kills: SIGKILLs to deliver.
      seed: seed of the run and of the kill timing.
      workdir: folder of the two runs and each process's stderr.
      max_steps: outer steps of the run (default 20 x kills + 60).
      startup_fraction: share of kills at a random moment of start-up.
      write_fraction: share of the other kills sent the moment a checkpoint's temporary file is
        seen (polling the folder from outside; whether the kill lands before the rename is up
        to real timing). The rest land at a random phase of an outer step.
      compile_cache: restarts load compiled steps from JAX's cache (filled by the baseline).

    Returns:
      The summary printed by the script.
    """
    rng = random.Random(seed)
    max_steps = max_steps or 20 * kills + 60
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    base, crash = workdir / "baseline", workdir / "crashed"
    started = time.monotonic()
    failures: list[str] = []

    # 1. The uninterrupted baseline. It also fills JAX's compilation cache, so each restart of
    # the killed run loads its compiled steps (about 1 s) instead of compiling them again
    # (10-20 s on 2 busy cores); the baseline's executables are then the ones being compared.
    if compile_cache:
        env.update(JAX_COMPILATION_CACHE_DIR=str(workdir / "jax-cache"),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2")
    baseline = Life(train_argv(base, max_steps, seed), workdir, 0, env)
    if baseline.proc.wait() != 0:
        failures.append(f"baseline exited {baseline.proc.returncode}: {baseline.stderr()[-500:]}")
    baseline_s = time.monotonic() - started

    # 2. The same run, killed and resumed. The first life is always killed while stepping;
    # its time to its first checkpoint sizes the window of start-up kills.
    startup_s, step_s = None, 0.02  # step_s: seconds per outer step, measured as it runs
    stats = {"kills": 0, "kills_during_startup": 0, "kills_while_stepping": 0,
             "kills_inside_checkpoint_save": 0, "kills_mid_checkpoint_write": 0,
             "kills_mid_log_write": 0, "resumes": 0,
             "resumes_failed": 0, "corrupt_checkpoints": 0, "max_steps_lost": 0,
             "steps_lost_total": 0, "warnings": []}
    argv = train_argv(crash, max_steps, seed)
    index = 1
    while stats["kills"] < kills and not failures:
        life = Life(argv, workdir, index, env)
        index += 1
        start_step = max(checkpoint_steps(crash), default=-1)
        if startup_s is not None and rng.random() < startup_fraction:
            # Within the shortest start-up seen so far (imports, lock, resume, compilation).
            time.sleep(rng.uniform(0, 0.9 * startup_s))
        else:
            # After 1-5 new checkpoints, at a random phase of the next outer step.
            alive = wait_for_step(life, crash, start_step + 1)
            first = time.monotonic()
            startup_s = min(startup_s or math.inf, first - life.started)
            extra = rng.randint(0, 4)
            if alive and extra:
                alive = wait_for_step(life, crash, start_step + 1 + extra)
                step_s = (time.monotonic() - first) / extra
            if alive and rng.random() < write_fraction:
                wait_for_write(life, crash / "checkpoints")  # kill as soon as one is seen
            elif alive:
                time.sleep(rng.uniform(0, step_s))
        # Where the kill landed, as seen from outside: had this life saved a checkpoint yet?
        stepping = max(checkpoint_steps(crash), default=-1) > start_step
        kind = "kills_while_stepping" if stepping else "kills_during_startup"
        if not life.alive():
            if life.proc.returncode == 0:
                failures.append(f"the run finished after {stats['kills']} kills; raise "
                                "--max-steps")
            else:
                failures.append(f"life {index - 1} exited {life.proc.returncode}: "
                                f"{life.stderr()[-500:]}")
            break
        life.proc.send_signal(signal.SIGKILL)
        life.proc.wait()
        stats["kills"] += 1
        stats[kind] += 1
        after = inspect_after_kill(crash)
        stats["kills_inside_checkpoint_save"] += after["inside_save"]
        stats["kills_mid_checkpoint_write"] += after["mid_checkpoint_write"]
        stats["kills_mid_log_write"] += after["mid_log_write"]
        stats["corrupt_checkpoints"] += len(after["corrupt"])
        failures += [f"corrupt after kill {stats['kills']}: {c}" for c in after["corrupt"]]
        if (crash / "config.json").exists():
            lost = after["done"] - max(after["good"], default=0)
            stats["max_steps_lost"] = max(stats["max_steps_lost"], lost)
            stats["steps_lost_total"] += max(lost, 0)
            if lost > 1:  # one checkpoint interval is one outer step here
                failures.append(f"kill {stats['kills']} lost {lost} steps (done "
                                f"{after['done']}, newest good checkpoint {after['good']})")
            argv = resume_argv(crash)
            stats["resumes"] += 1
        # else: killed before the run wrote its config; nothing to resume, start it again.
        # A resume must get going: the next life makes progress or the final one finishes.

    # 3. The last life runs to the end.
    if not failures:
        life = Life(argv, workdir, index, env)
        if life.proc.wait() != 0:
            stats["resumes_failed"] += 1
            failures.append(f"final resume exited {life.proc.returncode}: {life.stderr()[-500:]}")
    for err in sorted(workdir.glob("life-*.stderr")):
        stats["warnings"] += [line for line in err.read_text(errors="replace").splitlines()
                              if line.startswith("selfopt: warning")]
        if "Traceback" in err.read_text(errors="replace"):
            failures.append(f"{err.name} holds a traceback")

    comparison = compare_runs(base, crash) if not failures else {}
    leftovers = [str(p) for p in temp_files(crash)]
    corrupt_at_end = inspect_after_kill(crash)["corrupt"] if crash.exists() else []
    for check in ("arrays_bitwise_equal", "metadata_equal", "logs_equal"):
        if comparison and not comparison.get(check):
            failures.append(f"{check} is false")
    if leftovers:
        failures.append(f"temporary files left: {leftovers}")
    if corrupt_at_end:
        failures.append(f"corrupt checkpoints at the end: {corrupt_at_end}")
    return {"ok": not failures, "kills_requested": kills, **stats, "max_steps": max_steps,
            "checkpoint_interval_steps": 1, "startup_s": round(startup_s or 0, 2),
            "baseline_s": round(baseline_s, 1), "compile_cache": compile_cache,
            **comparison,
            "temp_files_left": len(leftovers), "data_lost_steps": 0 if not failures else None,
            "seed": seed, "wall_s": round(time.monotonic() - started, 1), "failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to survive (default 20)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the kill timing and of the run (default: random)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="outer steps of the run (default 20 x kills + 60)")
    parser.add_argument("--workdir", type=Path, help="where the runs go (default: a temporary "
                                                     "folder, removed unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="compile afresh in every process (slower restarts)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="selfopt-crash-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        summary = run_harness(args.kills, seed, workdir, args.max_steps,
                              compile_cache=not args.no_compile_cache)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    summary["workdir"] = str(workdir) if args.keep or args.workdir else None
    print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

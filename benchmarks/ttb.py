"""Time to beat Adam (TTB): how long self-training takes to beat per-task tuned Adam.

    python benchmarks/ttb.py [--minutes 10] [--eval-minutes 1] [--control] [--heldout]
                             [--set FIELD=VALUE ...] [--grid FAMILY.FIELD=VALUES ...]
                             [--out DIR]

Runs ``selfopt train`` (the default configuration plus ``--set`` overrides; random
initialisation, no hand-designed optimizer in the loop) for ``--minutes`` of training, with the
run's elite (its best held-in validation so far) evaluated against Adam tuned per task over 14
learning rates on the quick held-out suite every ``--eval-minutes`` (``eval.jsonl``;
evaluation time is not training time). Prints JSON: the training seconds until the elite first
*beats tuned Adam* (a lower mean normalised loss and a win on the majority of tasks; ``null``
if it never did), the best margin reached (mean normalised loss of the learned optimizer / of
tuned Adam; below 1 is better than Adam) and the margin at 10, 30 and 60 minutes where the run got there. ``--control`` runs the
Adam-meta-trained control with the same budget afterwards and reports it the same way;
``--heldout`` also evaluates each run's final elite on the whole held-out suite (12 tasks).
``--grid mlp.hidden='[[32]]'`` replaces the values one field of a family draws from in
the compact task grid (``selfopt.tasks.distribution.COMPACT_GRIDS``, the default ``task_grid``),
for this process only: a run resumed later with ``selfopt train --resume`` uses the shipped
grid. Each value is checked by building its task before anything trains.
The curves (the elite's quick-suite loss against training time, each arm, and tuned Adam's)
go to ``OUT/curve.png``.

Like ``selfopt train``, it uses the compilation cache in ``$SELFOPT_CACHE/jax``; the JSON says
how many compiled programs were there at the start. Point ``SELFOPT_CACHE`` at an empty folder
(with a copy of ``adam/`` to skip re-tuning Adam) to measure a first run on a new machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax

from selfopt.cache import enable_compilation_cache
from selfopt.cli import parse_assignment
from selfopt.config import ConfigError, make_config
from selfopt.evaluate import default_cache_dir, evaluate, suite
from selfopt.experiment import heldout_over_time_figure
from selfopt.tasks.distribution import COMPACT_GRIDS, full_config, make_task
from selfopt.train import Trainer, open_checkpoint, read_jsonl, time_to_beat_adam

MARGIN_MINUTES = (10, 30, 60)


def margins(rows: list[dict]) -> dict:
    """TTB and margins from the rows of ``eval.jsonl``."""
    margin = [r["mean_normalized"] / r["adam_mean_normalized"] for r in rows]
    best = min(range(len(rows)), key=margin.__getitem__)
    at = {}
    for minutes in MARGIN_MINUTES:
        before = [m for r, m in zip(rows, margin) if r["elapsed"] <= 60 * minutes + 1]
        if rows[-1]["elapsed"] >= 60 * minutes - 30:  # the run reached that time
            at[str(minutes)] = min(before)
    return {"time_to_beat_adam_s": time_to_beat_adam(rows),
            "best_margin": margin[best], "best_margin_at_s": rows[best]["elapsed"],
            "best_wins": max(r["wins"] for r in rows), "tasks": rows[-1]["tasks"],
            "best_margin_by_minute": at,
            "curve": [{"elapsed_s": r["elapsed"], "step": r["step"], "margin": m,
                       "wins": r["wins"], "mean_normalized": r["mean_normalized"]}
                      for r, m in zip(rows, margin)],
            "adam_mean_normalized": rows[-1]["adam_mean_normalized"]}


def run_arm(run_dir: Path, overrides: dict, heldout: bool) -> dict:
    cfg = make_config(overrides)
    started = time.monotonic()
    summary = Trainer(cfg, run_dir).run()
    result = {"run_dir": str(run_dir), "outer_optimizer": summary["outer_optimizer"],
              "steps": summary["steps"], "training_s": summary["elapsed_s"],
              "wall_s": round(time.monotonic() - started, 1),
              **margins(read_jsonl(run_dir / "eval.jsonl"))}
    if heldout:
        trainer, state, _ = open_checkpoint(run_dir)
        full = evaluate(trainer.member_candidate(state), suite("heldout"), cfg.eval_steps,
                        cfg.eval_seeds, cache_dir=default_cache_dir())
        result["heldout_at_end"] = full.summary()
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}), file=sys.stderr)
    return result


def edit_grid(edits: list[tuple[str, object]]) -> dict[str, dict]:
    """Applies ``--grid FAMILY.FIELD=VALUES`` edits to :data:`COMPACT_GRIDS` in place.

    Returns the edited families' grids (for the report). Raises ``ValueError`` (one line) for
    an unknown family or field, a value list that is not a non-empty JSON list, or a value its
    task refuses."""
    for name, values in edits:
        family, _, field = name.partition(".")
        if family not in COMPACT_GRIDS or not field:
            raise ValueError(f"--grid {name}: expected FAMILY.FIELD, FAMILY one of "
                             f"{sorted(COMPACT_GRIDS)}")
        if not isinstance(values, list) or not values:
            raise ValueError(f"--grid {name}: the values must be a non-empty JSON list, got "
                             f"{values!r}")
        for value in values:
            try:
                make_task(full_config({"family": family, field: value}))
            except (ValueError, TypeError) as error:
                raise ValueError(f"--grid {name}: {error}") from None
        COMPACT_GRIDS[family] = {**COMPACT_GRIDS[family],
                                 field: tuple(tuple(v) if isinstance(v, list) else v
                                              for v in values)}
    return {family: {k: list(v) for k, v in COMPACT_GRIDS[family].items()}
            for family in {name.partition(".")[0] for name, _ in edits}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--eval-minutes", type=float, default=1.0)
    parser.add_argument("--control", action="store_true", help="also run the Adam control")
    parser.add_argument("--heldout", action="store_true",
                        help="evaluate the final elites on all 12 held-out tasks")
    parser.add_argument("--set", type=parse_assignment, action="append", default=[],
                        metavar="FIELD=VALUE")
    parser.add_argument("--grid", type=parse_assignment, action="append", default=[],
                        metavar="FAMILY.FIELD=VALUES",
                        help="the values a family's field draws from in the compact grid")
    parser.add_argument("--out", type=Path,
                        default=Path("runs") / f"ttb-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args()
    overrides = {**dict(args.set), "minutes": args.minutes, "eval_minutes": args.eval_minutes}
    try:
        grids = edit_grid(args.grid)
        make_config(overrides)
    except (ValueError, ConfigError) as error:
        parser.error(str(error).splitlines()[0])
    cache = enable_compilation_cache()
    report = {"benchmark": "time_to_beat_adam", "overrides": dict(args.set),
              "grid_edits": grids,
              "minutes": args.minutes, "machine": {
                  "platform": platform.platform(), "cpus": os.cpu_count(),
                  "devices": [str(d) for d in jax.devices()]},
              "compilation_cache": {"dir": str(cache) if cache else None,
                                    "programs_at_start": len(list(cache.iterdir())) if cache
                                    else 0}}
    report["self"] = run_arm(args.out / "self", overrides, args.heldout)
    arms = [("self-training", args.out / "self")]
    if args.control:
        report["control"] = run_arm(args.out / "control", {**overrides, "outer_optimizer": "adam"},
                                    args.heldout)
        arms.append(("control (Adam-meta-trained)", args.out / "control"))
    try:  # a figure that fails to draw must not lose the runs' report
        heldout_over_time_figure(arms).savefig(args.out / "curve.png", dpi=110)
        report["figure"] = str(args.out / "curve.png")
    except Exception as error:  # noqa: BLE001
        report["figure_error"] = f"{type(error).__name__}: {error}"
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""``selfopt experiment self-vs-adam``: the paper's headline comparison as one command.

1. ``self/``: a population of randomly initialised learned optimizers trains itself
   (``outer.kind="self"``), ``minutes`` of training;
2. ``control/``: the same architecture, population, tasks and budget, meta-trained by Adam
   (``outer.kind="adam"``, the conventional control);
3. the elite of each (its best held-in validation), and Adam tuned per task over 14 learning
   rates, on the whole held-out suite (same seeds, initialisations and batches);
4. ``report.html`` (both runs side by side, self-contained) and ``results.json``.

Both runs log evaluations on the quick held-out suite during training (``eval.jsonl``), so the
report also shows when each first beat tuned Adam, if it did.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from selfopt.config import make_config
from selfopt.evaluate import Evaluation, default_cache_dir, evaluate, print_progress, suite
from selfopt.live_view import LiveView
from selfopt.report import comparison_page, figure_html, table
from selfopt.run_dir import open_checkpoint, read_jsonl
from selfopt.safe_io import atomic_write_bytes
from selfopt.train import candidate, train

#: The two arms: run folder, config value of ``outer.kind``, label.
ARMS = (("self", "self", "self-training (no hand-designed optimizer)"),
        ("control", "adam", "CONTROL: meta-trained by Adam"))


def train_arm(run_dir: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """One run with a live view on stderr; returns its summary."""
    cfg = make_config(overrides)
    label = "Adam control" if cfg.outer.kind == "adam" else "self-training"
    with LiveView(label, 60 * cfg.minutes) as view:
        return train(cfg, run_dir, on_step=view.update)


def evaluate_arm(run_dir: Path, name: str, num_steps: int) -> Evaluation:
    """The run's answer (its elite, see :func:`selfopt.train.candidate`) on the held-out suite;
    written to ``run_dir/evaluation.json``."""
    cfg, state, path = open_checkpoint(run_dir)
    elite, source = candidate(cfg, state, name=f"{name} elite")
    result = evaluate(elite, suite("heldout"), num_steps, cache_dir=default_cache_dir(),
                      progress=print_progress(f"{name} "))
    result.save(run_dir / "evaluation.json", target=str(run_dir), checkpoint=str(path),
                step=state.step, **source)
    return result


def heldout_over_time_figure(runs: list[tuple[str, Path]]):
    """Both arms' quick held-out loss during training, against tuned Adam."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    adam = None
    for (name, run_dir), color in zip(runs, ("tab:green", "tab:blue")):
        rows = read_jsonl(run_dir / "eval.jsonl")
        if rows:
            ax.plot([r["elapsed"] / 60 for r in rows], [r["mean_normalized"] for r in rows],
                    "o-", color=color, label=name)
            adam = rows[-1]["adam_mean_normalized"]
    if adam is not None:
        ax.axhline(adam, color="black", ls="--", label="Adam tuned per task")
    ax.set_yscale("log")
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("mean normalised held-out loss (quick suite)")
    ax.set_title("the elite during training")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def self_vs_adam(out: Path, minutes: float, seed: int = 0, num_steps: int = 300,
                 overrides: dict[str, Any] | None = None) -> Path:
    """Runs the experiment into ``out``; returns the report's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs, summaries, evaluations = [], {}, {}
    for folder, outer, name in ARMS:
        run_dir = out / folder
        print(f"== {name}: {minutes:g} minutes -> {run_dir}", file=sys.stderr)
        summaries[folder] = train_arm(run_dir, {**(overrides or {}), "minutes": minutes,
                                                "seed": seed, "outer.kind": outer})
        runs.append((name, run_dir))
    for (folder, _, name), (_, run_dir) in zip(ARMS, runs):
        print(f"== evaluating {name} on the held-out suite", file=sys.stderr)
        evaluations[folder] = evaluate_arm(run_dir, name, num_steps)
    results = {folder: {"summary": summaries[folder], "evaluation": evaluations[folder].summary()}
               for folder, _, _ in ARMS}
    atomic_write_bytes(out / "results.json", (json.dumps(results, indent=2) + "\n").encode())

    first = evaluations["self"]
    rows = [(name, evaluations[folder].mean_normalized, f"{evaluations[folder].num_wins}/"
             f"{len(first.tasks)}", evaluations[folder].beats_adam,
             summaries[folder]["time_to_beat_adam_s"] and summaries[folder]["time_to_beat_adam_s"] / 60,
             summaries[folder]["steps"], summaries[folder]["held_in_end"]["median"])
            for folder, _, name in ARMS]
    rows.append(("Adam, learning rate tuned per task", first.adam_mean_normalized, "-", "-",
                 "-", "-", "-"))
    overview = table(("optimizer", "mean normalised held-out loss", "wins vs tuned Adam",
                      "beats tuned Adam", "time to beat (min, quick suite)", "outer steps",
                      "held-in meta-loss at end (median)"), rows)
    per_task = table(
        ("task", "self-trained", "control", "tuned Adam", "Adam lr"),
        [(a.label, a.normalized, b.normalized, a.adam_normalized, a.adam_learning_rate)
         for a, b in zip(first.tasks, evaluations["control"].tasks)])
    intro = (f"<p>Two populations of {make_config(overrides).population} randomly initialised "
             f"learned optimizers, {minutes:g} training minutes each (seed {seed}) on this "
             "machine. <b>Self-training</b>: the members' own learned optimizers update their "
             "weights; no hand-designed optimizer is in the loop. <b>Control</b>: the same, "
             "meta-trained by Adam. Each run's elite is then evaluated on the held-out suite "
             f"({len(first.tasks)} tasks, {num_steps} steps, {first.num_seeds} seeds) against "
             "Adam with its learning rate tuned per task over 14 values.</p>")
    body = (overview + "<h3>Held-out loss per task (normalised, lower is better)</h3>" + per_task
            + figure_html(heldout_over_time_figure(runs), "held-out loss during training"))
    path = out / "report.html"
    atomic_write_bytes(path, comparison_page("selfopt experiment: self-training vs the Adam "
                                             "control", intro, body, runs).encode())
    return path


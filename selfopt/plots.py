"""Figures of a run (matplotlib): what self-training did, drawn from its run directory.

``selfopt plot RUN`` writes each figure as PNG and SVG to ``RUN/plots``:

* ``meta_loss``: every member's training meta-loss against training time and against outer
  step (thin), the population's best and median (bold), PBT copies and replacements marked;
* ``improvement_rate``: how fast the median meta-loss (and the held-out loss) falls, in decades
  per minute: the positive feedback loop of self-training shows as a rate that grows;
* ``step_bound``: the fraction of member steps that ``outer.max_update`` shortened, and the
  members' median step length, over the run;
* ``heldout``: the best member's mean normalised held-out loss during training against tuned
  Adam's, and the fraction of tasks it wins (from ``eval.jsonl``);
* ``per_task``: the final evaluation, task by task, against tuned Adam (``evaluation.json``);
* ``lineage``: the population's family tree (who was copied from whom, and when).

A figure whose data the run does not have (no evaluation yet, no PBT event) is skipped.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from selfopt.run_dir import read_jsonl  # noqa: E402

#: Colours of the lineage events.
EVENT_COLORS = {"exploit": "tab:blue", "replace_non_finite": "tab:red",
                "replace_diverged": "tab:orange", "restore_elite": "tab:purple"}


class RunData:
    """A run directory's logs, read once.

    Raises:
      FileNotFoundError: ``run_dir`` holds no run (no ``metrics.jsonl``).
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        if not (self.run_dir / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"{run_dir} holds no selfopt run (no metrics.jsonl)")
        self.metrics = read_jsonl(self.run_dir / "metrics.jsonl")
        self.lineage = read_jsonl(self.run_dir / "lineage.jsonl")
        self.evals = read_jsonl(self.run_dir / "eval.jsonl")
        path = self.run_dir / "evaluation.json"
        self.evaluation = json.loads(path.read_text()) if path.is_file() else None
        path = self.run_dir / "config.json"
        self.config = json.loads(path.read_text()) if path.is_file() else {}
        path = self.run_dir / "summary.json"  # written when a run ends
        self.summary = json.loads(path.read_text()) if path.is_file() else None
        self.label = ("CONTROL (meta-trained by Adam)"
                      if (self.config.get("outer") or {}).get("kind") == "adam"
                      else "self-training")

    def meta_loss_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(steps,)`` outer steps, ``(steps,)`` training minutes and ``(steps, K)`` meta-loss
        by member position (NaN where not finite)."""
        steps = sorted({r["step"] for r in self.metrics})
        index = {s: i for i, s in enumerate(steps)}
        members = 1 + max(r["member"] for r in self.metrics)
        losses = np.full((len(steps), members), np.nan)
        minutes = np.zeros(len(steps))
        for r in self.metrics:
            i = index[r["step"]]
            minutes[i] = r["elapsed"] / 60
            if r["meta_loss"] is not None:
                losses[i, r["member"]] = r["meta_loss"]
        return np.asarray(steps), minutes, losses


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing rolling median along axis 0 (NaN-aware): the meta-loss of consecutive steps
    comes from different tasks, so single steps are noisy."""
    values = np.asarray(values, float)
    out = np.full_like(values, np.nan)
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1):i + 1]
        with np.errstate(all="ignore"):
            if np.isfinite(chunk).any(axis=0).all():
                out[i] = np.nanmedian(chunk, axis=0)
    return out


def _window(n: int) -> int:
    return max(1, min(100, n // 15))


def meta_loss_figure(data: RunData) -> Figure | None:
    if not data.metrics:
        return None
    steps, minutes, losses = data.meta_loss_table()
    w = _window(len(steps))
    per_member = smooth(losses, w)
    with np.errstate(all="ignore"):
        median, best = smooth(np.nanmedian(losses, 1), w), smooth(np.nanmin(losses, 1), w)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, x, xlabel in ((axes[0], minutes, "training time (minutes)"),
                          (axes[1], steps, "outer step")):
        for k in range(per_member.shape[1]):
            ax.plot(x, per_member[:, k], lw=0.6, alpha=0.45)
        ax.plot(x, median, color="black", lw=2.2, label="median member")
        ax.plot(x, best, color="tab:green", lw=2.2, label="best member")
        for event in data.lineage:
            at = event["step"] if x is steps else minutes[min(np.searchsorted(steps, event["step"]),
                                                               len(steps) - 1)]
            ax.axvline(at, color=EVENT_COLORS.get(event["kind"], "grey"), lw=0.4, alpha=0.25)
        ax.set_xlabel(xlabel)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(f"training meta-loss (rolling median, {w} steps)")
    kinds = sorted({e["kind"] for e in data.lineage})
    handles = [plt.Line2D([], [], color=EVENT_COLORS.get(k, "grey"), lw=1, label=f"PBT: {k}")
               for k in kinds]
    axes[1].legend(handles=axes[1].get_legend_handles_labels()[0] + handles, fontsize=8)
    fig.suptitle(f"{data.label}: meta-loss of every member (1 = no progress)")
    fig.tight_layout()
    return fig


def improvement_rate(minutes: np.ndarray, values: np.ndarray, num_windows: int = 12
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Decades per minute by which ``values`` fall: ``minutes`` is cut into ``num_windows``
    equal windows, each summarised by the median of ``log10(values)`` in it (robust to the
    task-to-task noise of single steps), and the rate between neighbouring windows is the fall
    of that median over the time between their centres. Positive means improving.

    Returns:
      The midpoints between neighbouring window centres, and the rates there.
    """
    minutes, values = np.asarray(minutes, float), np.asarray(values, float)
    ok = np.isfinite(values) & (values > 0)
    minutes, logs = minutes[ok], np.log10(values[ok])
    if len(minutes) < 2 or minutes[-1] <= minutes[0]:
        return np.zeros(0), np.zeros(0)
    edges = np.linspace(minutes[0], minutes[-1], num_windows + 1)
    centres, medians = [], []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        inside = (minutes >= lo) & ((minutes < hi) if i < num_windows - 1 else (minutes <= hi))
        if inside.any():
            centres.append((lo + hi) / 2)
            medians.append(np.median(logs[inside]))
    centres, medians = np.asarray(centres), np.asarray(medians)
    return (centres[1:] + centres[:-1]) / 2, -np.diff(medians) / np.diff(centres)


def improvement_rate_figure(data: RunData) -> Figure | None:
    if not data.metrics:
        return None
    _, minutes, losses = data.meta_loss_table()
    with np.errstate(all="ignore"):
        median = np.nanmedian(losses, 1)
    x, rate = improvement_rate(minutes, median)
    if not len(x):
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(x, rate, width=0.8 * (x[1] - x[0]) if len(x) > 1 else 0.5, alpha=0.6,
           label="median training meta-loss (all members)")
    if len(data.evals) >= 3:
        ex, erate = improvement_rate([r["elapsed"] / 60 for r in data.evals],
                                     [r["mean_normalized"] for r in data.evals],
                                     num_windows=len(data.evals))
        ax.plot(ex, erate, "o-", color="tab:red", label="best member, held-out loss")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("improvement (decades of loss per minute)")
    ax.set_title(f"{data.label}: rate of improvement (rising = accelerating descent)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def heldout_figure(data: RunData) -> Figure | None:
    if not data.evals:
        return None
    minutes = [r["elapsed"] / 60 for r in data.evals]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    ax.plot(minutes, [r["mean_normalized"] for r in data.evals], "o-", color="tab:green",
            label="best member (learned optimizer)")
    ax.plot(minutes, [r["adam_mean_normalized"] for r in data.evals], "--", color="black",
            label="Adam, learning rate tuned per task")
    beat = next((r for r in data.evals if r["beats_adam"]), None)
    if beat:
        ax.axvline(beat["elapsed"] / 60, color="tab:red", lw=1,
                   label=f"first beats tuned Adam ({beat['elapsed'] / 60:.1f} min)")
    ax.set_yscale("log")
    ax.set_ylabel("mean normalised held-out loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    first = data.evals[-1]
    ax.set_title(f"{data.label}: held-out ({first['tasks']} tasks, {first['steps']} steps, "
                 f"{first['seeds']} seeds)")
    ax2.plot(minutes, [r["win_fraction"] for r in data.evals], "s-", color="tab:purple")
    ax2.axhline(0.5, color="black", lw=0.8, ls=":")
    ax2.set_ylim(-0.05, 1.05)
    ax2.set_ylabel("tasks won")
    ax2.set_xlabel("training time (minutes)")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def per_task_figure(data: RunData) -> Figure | None:
    if data.evaluation:
        rows = [(t["label"], t["normalized"], t["adam_normalized"])
                for t in data.evaluation["tasks"]]
        title = data.evaluation["summary"]["candidate"]
    elif data.evals:
        last = data.evals[-1]
        rows = [(k, v, last["adam_normalized"][k]) for k, v in last["normalized"].items()]
        title = f"best member at {last['elapsed'] / 60:.1f} min"
    else:
        return None
    labels = [r[0].replace("(", "\n(").replace(", ", ",\n") for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(rows)), 5))
    ax.bar(x - 0.2, [max(r[1], 1e-6) for r in rows], 0.4, color="tab:green",
           label="learned optimizer")
    ax.bar(x + 0.2, [max(r[2], 1e-6) for r in rows], 0.4, color="grey", label="tuned Adam")
    ax.set_xticks(x, labels, fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel("final loss, normalised (lower is better)")
    ax.set_title(f"{data.label}: {title} against tuned Adam, per task")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y", which="both")
    fig.tight_layout()
    return fig


def lineage_figure(data: RunData) -> Figure | None:
    if not data.lineage or not data.metrics:
        return None
    last_step = max(r["step"] for r in data.metrics) + 1
    born, died, parent, kind = {}, {}, {}, {}
    for r in data.metrics:
        born.setdefault(r["id"], r["step"])
    for e in data.lineage:
        born[e["child_id"]] = e["step"]
        died[e["replaced_id"]] = e["step"]
        parent[e["child_id"]] = e["parent_id"]
        kind[e["child_id"]] = e["kind"]
    fig, ax = plt.subplots(figsize=(10, max(3.5, min(12, 0.04 * len(born) + 3))))
    for member, start in born.items():
        end = died.get(member, last_step)
        ax.plot([start, end], [member, member], color="grey", lw=0.8)
        if member in parent:
            ax.plot([start, start], [parent[member], member],
                    color=EVENT_COLORS.get(kind[member], "grey"), lw=0.6, alpha=0.7)
    best = _best_id(data)
    chain = ancestry(data.lineage, best) if best is not None else []
    for member in chain:
        ax.plot([born.get(member, 0), died.get(member, last_step)], [member, member],
                color="tab:green", lw=2.4)
    ax.set_xlabel("outer step")
    ax.set_ylabel("lineage id")
    handles = [plt.Line2D([], [], color=c, label=k) for k, c in EVENT_COLORS.items()
               if k in kind.values()]
    handles.append(plt.Line2D([], [], color="tab:green", lw=2.4, label="ancestry of the best"))
    ax.legend(handles=handles, fontsize=8, loc="upper left")
    ax.set_title(f"{data.label}: lineage ({len(data.lineage)} copies)")
    ax.grid(alpha=0.2)
    fig.tight_layout()
    return fig


def _best_id(data: RunData) -> int | None:
    if data.summary:
        return answer_id(data.summary)
    return data.evals[-1]["id"] if data.evals else None


def answer_id(summary: dict[str, Any]) -> int:
    """Lineage id of the run's answer: its elite, or PBT's best member in a run without one."""
    return summary["elite"]["id"] if summary.get("elite") else summary["best_id"]


def ancestry(lineage: list[dict[str, Any]], member_id: int) -> list[int]:
    """Lineage ids from ``member_id`` back to its random-initialised ancestor."""
    parents = {e["child_id"]: e["parent_id"] for e in lineage}
    chain = [member_id]
    while chain[-1] in parents:
        chain.append(parents[chain[-1]])
    return chain


def step_bound_figure(data: RunData) -> Figure | None:
    """How often ``outer.max_update`` shortened a member's step, and the length of the
    members' steps, over the run (issue 32: the members should set their own step length)."""
    rows = [r for r in data.metrics if r.get("trust") is not None]
    if not rows:
        return None
    steps = np.asarray([r["step"] for r in rows])
    bound = np.asarray([r["trust"] < 1.0 for r in rows], float)
    length = np.asarray([r["update_rms"] if r["update_rms"] is not None else np.nan
                         for r in rows])
    edges = np.unique(np.linspace(steps.min(), steps.max() + 1, 21).astype(int))
    at = np.digitize(steps, edges) - 1
    centres = (edges[:-1] + edges[1:]) / 2
    with np.errstate(all="ignore"):
        fraction = np.array([bound[at == i].mean() if (at == i).any() else np.nan
                             for i in range(len(centres))])
        median = np.array([np.nanmedian(length[at == i]) if (at == i).any() else np.nan
                           for i in range(len(centres))])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    left.plot(centres, 100 * fraction, marker="o", color="tab:red")
    left.axhline(10, color="grey", ls="--", lw=1, label="10%")
    left.set(xlabel="outer step", ylabel="member steps shortened by the bound (%)", ylim=(-2, 102))
    left.legend(fontsize=8)
    right.plot(centres, median, marker="o", label="median member step (RMS)")
    cap = (data.config.get("outer") or {}).get("max_update")
    if cap:
        right.axhline(cap, color="tab:red", ls="--", lw=1, label=f"outer.max_update = {cap:g}")
    right.set(xlabel="outer step", ylabel="RMS of a member's step", yscale="log")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"{data.label}: who sets the length of the members' steps")
    fig.tight_layout()
    return fig


FIGURES: dict[str, Callable[[RunData], Figure | None]] = {
    "meta_loss": meta_loss_figure, "improvement_rate": improvement_rate_figure,
    "step_bound": step_bound_figure,
    "heldout": heldout_figure, "per_task": per_task_figure, "lineage": lineage_figure,
}


def render(data: RunData) -> dict[str, Figure]:
    """Every figure the run has data for, by name."""
    figures = {name: make(data) for name, make in FIGURES.items()}
    return {name: fig for name, fig in figures.items() if fig is not None}


def write_plots(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Writes every figure of a run as PNG and SVG; returns the files written.

    Raises:
      FileNotFoundError: ``run_dir`` holds no run (no ``metrics.jsonl``).
    """
    data = RunData(run_dir)
    out_dir = Path(out_dir) if out_dir else data.run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in render(data).items():
        for suffix in ("png", "svg"):
            path = out_dir / f"{name}.{suffix}"
            fig.savefig(path, dpi=110)
            written.append(path)
        plt.close(fig)
    return written

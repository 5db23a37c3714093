"""``selfopt report RUN``: one self-contained HTML page about a run.

Everything is inside the file (figures as embedded PNG, no script, no style sheet or font from
the network), so it opens in any browser with no server and can be mailed or archived. It holds
the run's summary, the figures of :mod:`selfopt.plots`, the evaluation against tuned Adam (the
final one, ``evaluation.json``, and the ones during training, ``eval.jsonl``), the lineage of the
best member and the configuration. :func:`comparison_page` puts several runs side by side (the
``self-vs-adam`` experiment).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import matplotlib.pyplot as plt

from selfopt.plots import RunData, ancestry, answer_id, render
from selfopt.safe_io import atomic_write_bytes

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
tr.win td { background: #eaf7ea; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { color: #555; font-size: 0.9em; }
.big { font-size: 1.15em; font-weight: 600; }
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]],
          classes: Iterable[str] | None = None) -> str:
    """An HTML table; the first column is left-aligned."""
    head = "".join(f'<th class="{"l" if i == 0 else ""}">{html.escape(h)}</th>'
                   for i, h in enumerate(header))
    body = []
    classes = list(classes) if classes is not None else None
    for n, row in enumerate(rows):
        cells = "".join(f'<td class="{"l" if i == 0 else ""}">{html.escape(_fmt(v))}</td>'
                        for i, v in enumerate(row))
        cls = f' class="{classes[n]}"' if classes and classes[n] else ""
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def figure_html(fig, alt: str) -> str:
    """A matplotlib figure as an embedded PNG ``<img>`` (the figure is closed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def evaluation_table(evaluation: dict[str, Any]) -> str:
    tasks = evaluation["tasks"]
    rows = [(t["label"], t["normalized"], t["adam_normalized"], t["adam_learning_rate"],
             t["final"], t["adam_final"], t["valid"], t["adam_valid"], t["speedup"], t["wins"])
            for t in tasks]
    s = evaluation["summary"]
    return (f'<p class="big">{html.escape(s["candidate"])}: mean normalised loss '
            f'{_fmt(s["mean_normalized"])} vs tuned Adam {_fmt(s["adam_mean_normalized"])}; '
            f'wins {s["wins"]}/{s["tasks"]}; beats tuned Adam: '
            f'{"YES" if s["beats_adam"] else "no"}</p>'
            + table(("task", "normalised", "tuned Adam", "Adam lr", "final loss",
                     "Adam final", "valid loss", "Adam valid", "speedup", "win"), rows,
                    ["win" if t["wins"] else "" for t in tasks])
            + f'<p class="note">{s["steps"]} inner steps, {s["seeds"]} seeds (evaluation seed '
            f'{s["seed"]}), same initialisations and batches for both; Adam tuned per task over '
            '14 learning rates from 1e-4 to 1. Normalised = (final - floor) / (initial - floor), '
            'capped at 10; final = mean training loss over the last 10% of steps; speedup = steps '
            'tuned Adam needs to reach the final loss / steps.</p>')


def run_sections(data: RunData, heading_level: int = 2) -> str:
    """The body of one run's report."""
    h = f"h{heading_level}"
    parts = []
    summary = data.summary
    if summary:
        start, end = summary["held_in_start"], summary["held_in_end"]
        ttb = summary.get("time_to_beat_adam_s")
        parts.append(f"<{h}>Summary</{h}>" + table(("", "value"), [
            ("outer steps", summary["steps"]),
            ("training minutes", summary["elapsed_s"] / 60),
            ("held-in meta-loss, random start (median / best)",
             f"{_fmt(start['median'])} / {_fmt(start['best'])}"),
            ("held-in meta-loss, end (median / best)",
             f"{_fmt(end['median'])} / {_fmt(end['best'])}"),
            ("time to beat tuned Adam (training minutes)",
             "not reached" if ttb is None else ttb / 60),
            ("best member (position, lineage id)",
             f"{summary['best_position']}, {summary['best_id']}"),
            ("elite (lineage id, chosen at step, held-in meta-loss)",
             f"{summary['elite']['id']}, {summary['elite']['step']}, "
             f"{_fmt(summary['elite']['validation'])}" if summary.get("elite") else "none"),
            ("stopped early", summary["interrupted"]),
        ]))
    figures = render(data)
    if figures:
        parts.append(f"<{h}>Figures</{h}>" + "".join(figure_html(fig, name)
                                                      for name, fig in figures.items()))
    if data.evaluation:
        parts.append(f"<{h}>Evaluation against per-task tuned Adam</{h}>"
                     + evaluation_table(data.evaluation))
    if data.evals:
        parts.append(f"<{h}>Evaluations during training (quick held-out suite)</{h}>" + table(
            ("training minutes", "step", "member id", "mean normalised", "tuned Adam", "wins",
             "beats tuned Adam"),
            [(r["elapsed"] / 60, r["step"], r["id"], r["mean_normalized"],
              r["adam_mean_normalized"], f"{r['wins']}/{r['tasks']}", r["beats_adam"])
             for r in data.evals]))
    if summary and data.lineage:
        chain = ancestry(data.lineage, answer_id(summary))
        by_child = {e["child_id"]: e for e in data.lineage}
        rows = [(member, by_child[member]["step"], by_child[member]["kind"],
                 by_child[member]["parent_id"], by_child[member]["after"]["step_mult"],
                 by_child[member]["after"]["sigma"])
                for member in chain if member in by_child]
        counts = {}
        for e in data.lineage:
            counts[e["kind"]] = counts.get(e["kind"], 0) + 1
        whose = "the elite" if summary.get("elite") else "the best member"
        parts.append(f"<{h}>Lineage of {whose}</{h}>"
                     + f'<p>Member {chain[0]} descends from randomly initialised member '
                       f'{chain[-1]} through {len(chain) - 1} copies. All copies in the run: '
                       f'{html.escape(", ".join(f"{k} {v}" for k, v in sorted(counts.items())))}.</p>'
                     + table(("lineage id", "born at step", "how", "parent", "step mult",
                              "sigma"), rows))
    if data.config:
        flat = [(f"{k}.{f}" if isinstance(v, dict) else k, x)
                for k, v in data.config.items()
                for f, x in (v.items() if isinstance(v, dict) else [(None, v)])]
        parts.append(f"<{h}>Configuration</{h}>" + table(("field", "value"), flat))
    return "\n".join(parts)


def page(title: str, body: str) -> str:
    """A whole HTML document around ``body``."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>"
            f'<p class="note">selfopt report, written {time.strftime("%Y-%m-%d %H:%M")}.</p>'
            f"{body}</body></html>\n")


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Writes the report of one run (atomically); returns its path.

    Raises:
      FileNotFoundError: ``run_dir`` holds no run.
    """
    data = RunData(run_dir)
    out = Path(out) if out else data.run_dir / "report.html"
    atomic_write_bytes(out, page(f"selfopt run {data.run_dir.name}: {data.label}",
                                 run_sections(data)).encode())
    return out


def comparison_page(title: str, intro: str, comparison: str,
                    runs: Sequence[tuple[str, Path]]) -> str:
    """A report of several runs: an introduction, a comparison section, then each run."""
    body = [intro, "<h2>Comparison</h2>", comparison]
    for name, run_dir in runs:
        body.append(f"<h2>{html.escape(name)}</h2>")
        body.append(run_sections(RunData(run_dir), heading_level=3))
    return page(title, "\n".join(body))

"""What a person watching ``selfopt train`` sees: a live table, or periodic lines in a log.

On a terminal, a ``rich`` live view redraws after every outer step: step, elapsed time, inner
steps per second, best and median meta-loss, how often the step bound (``outer.max_update``)
shortened a member's step over the last 100 outer steps, and one row per member with its lineage id,
generation, hyperparameters, latest meta-loss and PBT score, and a footer line with the members
replaced so far in the run (non-finite, diverged) and PBT's copies. Without a terminal (a log
file, CI) it prints one line every ``every_s`` seconds instead, replacements included.
"""
from __future__ import annotations

import collections
import math
import sys
import time
from typing import Any

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text


#: Outer steps over which the live view reports how often the step bound shortened a step.
BOUND_WINDOW = 100


def _fmt(value: float, spec: str = ".4f") -> str:
    return format(value, spec) if value is not None and math.isfinite(value) else "-"


class LiveView:
    """Context manager whose :meth:`update` is the training loop's ``on_step`` callback."""

    def __init__(self, label: str, budget_s: float, every_s: float = 10.0, stream=None):
        self.label, self.budget_s, self.every_s = label, budget_s, every_s
        self.stream = stream or sys.stderr
        self.console = Console(file=self.stream)
        self.live = Live(console=self.console, refresh_per_second=4, transient=False) \
            if self.console.is_terminal else None
        self._last_line = -math.inf
        self._started = time.monotonic()
        self._inner_steps = 0
        self._bound = collections.deque(maxlen=BOUND_WINDOW)  # per outer step: members bound

    def __enter__(self) -> LiveView:
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.live.__exit__(*exc)

    def update(self, info: dict[str, Any]) -> None:
        state, metrics = info["state"], info["metrics"]
        self._inner_steps += info["inner_steps"]
        mean_rate = self._inner_steps / max(time.monotonic() - self._started, 1e-9)
        losses = metrics["meta_loss"][np.isfinite(metrics["meta_loss"])]
        best = float(losses.min()) if losses.size else math.nan
        median = float(np.median(losses)) if losses.size else math.nan
        self._bound.append(float(np.mean(np.asarray(metrics["trust"]) < 1.0)))
        header = (f"{self.label} | step {state.step} | {state.elapsed / 60:.1f}/"
                  f"{self.budget_s / 60:g} min | inner steps/s {info['inner_steps_per_s']:,.0f} "
                  f"(mean {mean_rate:,.0f}, compiles included)"
                  f" | meta-loss best {_fmt(best)} median {_fmt(median)}"
                  f" | start {_fmt(state.start_meta_loss)}"
                  f" | bound {np.mean(self._bound):.0%} of steps (last {len(self._bound)})")
        # running counts of the whole run (in the lineage: a resumed run restores them)
        footer = replacements_line(dict(state.lineage.counts))
        if self.live is None:
            # A replacement is news: report it at once rather than at the next periodic line.
            if (time.monotonic() - self._last_line >= self.every_s
                    or metrics.get("replaced")):
                print(f"{header} | {footer}", file=self.stream, flush=True)
                self._last_line = time.monotonic()
            return
        table = Table(box=None, pad_edge=False)
        for column in ("member", "id", "gen", "step mult", "sigma", "meta-loss", "score"):
            table.add_column(column, justify="right")
        step_mult, sigma = (np.exp(np.asarray(h)) for h in state.hparams)
        for i in range(state.num_members):
            style = "bold" if i == state.best else None
            table.add_row(str(i), str(state.lineage.ids[i]), str(state.lineage.generation[i]),
                          f"{step_mult[i]:.3g}", f"{sigma[i]:.3g}",
                          _fmt(float(metrics["meta_loss"][i])), _fmt(state.scores[i]),
                          style=style)
        self.live.update(Group(Text(header), table, Text(footer)))


def replacements_line(counts: dict[str, int]) -> str:
    """Replacements so far: ``replaced: non-finite N, diverged M | PBT copies P | elite
    restored R``."""
    return (f"replaced: non-finite {counts.get('replace_non_finite', 0)}, diverged "
            f"{counts.get('replace_diverged', 0)} | PBT copies {counts.get('exploit', 0)}"
            f" | elite restored {counts.get('restore_elite', 0)}")

"""``selfopt train``: a population of randomly initialised learned optimizers trains itself.

The loop around :func:`~selfopt.train_step.train_step`: start or resume a run directory, step
until the time or step budget is spent (or Ctrl-C), append each step's log rows, checkpoint
every ``checkpoint_seconds``, check the elite against tuned Adam on the quick held-out suite
every ``eval_minutes`` of training (method.md section 7; evaluation time is not training time),
and write the summary. A run stopped and resumed reaches bitwise the state of one never stopped.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from selfopt import checkpoint as ckpt
from selfopt.config import TrainConfig
from selfopt.evaluate import Candidate, default_cache_dir, evaluate, lopt_candidate, suite
from selfopt.population.elite import answer
from selfopt.population.state import PopulationState, finite_or_none
from selfopt.provenance import provenance
from selfopt.run_dir import RunDir
from selfopt.train_step import (Backend, BackendError, held_in_scores, in_process,
                                initial_state, initial_thetas, train_step, validate)

#: Fields of an ``eval.jsonl`` row that the run summary repeats for the last evaluation.
EVAL_SUMMARY_FIELDS = ("step", "elapsed", "mean_normalized", "adam_mean_normalized", "wins",
                       "tasks", "beats_adam")


def train(cfg: TrainConfig, run_dir: Path, resume: bool = False,
          on_step: Callable[[dict[str, Any]], None] | None = None,
          on_eval: Callable[[dict[str, Any]], None] | None = None,
          backend: Backend = in_process) -> dict[str, Any]:
    """Trains in ``run_dir`` until the step or time budget is spent, or Ctrl-C.

    Args:
      cfg: the validated configuration (a resumed run's own).
      run_dir: where config, logs, checkpoints and the summary go.
      resume: continue from the run's newest good checkpoint.
      on_step: called after every step with ``{"state", "metrics", "inner_steps",
        "inner_steps_per_s"}`` (the live view).
      on_eval: called with each row of ``eval.jsonl``.
      backend: where the members' estimates run (:data:`~selfopt.train_step.Backend`; the
        results do not depend on it).

    Returns:
      The run's summary (also written to ``summary.json``).

    Raises:
      RunInUseError: another process is training in this run directory.
      CheckpointError: resuming, no checkpoint is usable.
      BackendError: the backend lost its workers; the last finished step is checkpointed.
    """
    run, stop = RunDir(run_dir), threading.Event()
    with run.lock():
        state = _start(cfg, run, resume)
        if cfg.validate_interval and state.elite is None:  # the random start is the first elite
            state, events, row = validate(cfg, state)
            run.append({"lineage.jsonl": events, "validation.jsonl": [row]})
        with _stop_on_signals(stop):
            state, path = _loop(cfg, run, state, resume, stop, on_step, on_eval, backend)
        return summarize(cfg, run, state, path, stop.is_set())


def _loop(cfg: TrainConfig, run: RunDir, state: PopulationState, resume: bool,
          stop: threading.Event, on_step, on_eval, backend: Backend
          ) -> tuple[PopulationState, Path]:
    """Steps until the budget is spent or ``stop`` is set; returns the last state and its
    checkpoint."""
    # ``elapsed`` counts training only: the budget, the logs and time-to-beat-Adam use it.
    session_start, elapsed0, evaluating = time.monotonic(), state.elapsed, 0.0
    last_save = time.monotonic()
    inner_per_call = (cfg.population * cfg.estimator.num_pairs * 2
                      * cfg.estimator.truncation_length * cfg.steps_per_call)
    every = 60.0 * cfg.eval_minutes
    next_eval = every * (state.elapsed // every + 1) if resume and every else 0.0
    while not stop.is_set():
        if every and state.elapsed >= next_eval:
            evaluating += check_elite(cfg, run, state, on_eval)
            next_eval = every * (state.elapsed // every + 1)
        if budget_spent(cfg, state) or stop.is_set():
            break
        started = time.monotonic()
        try:
            state, out = train_step(cfg, state, backend)
        except BackendError:
            run.save(cfg, state)
            raise
        state = state.replace(elapsed=elapsed0 + time.monotonic() - session_start - evaluating)
        run.append(out.logs)
        if on_step:
            on_step({"state": state, "metrics": out.metrics, "inner_steps": inner_per_call,
                     "inner_steps_per_s": inner_per_call / max(time.monotonic() - started,
                                                               1e-9)})
        if time.monotonic() - last_save >= cfg.checkpoint_seconds:
            run.save(cfg, state)
            last_save = time.monotonic()
    path = run.save(cfg, state)
    evals = run.read("eval.jsonl")
    if every and not stop.is_set() and (not evals or evals[-1]["step"] != state.step):
        check_elite(cfg, run, state, on_eval)  # the end state, unless Ctrl-C asked to stop
    return state, path


def _start(cfg: TrainConfig, run: RunDir, resume: bool) -> PopulationState:
    """The state a run starts from: step 0, or the newest good checkpoint (logs cut back to
    it)."""
    if not resume:
        run.write_json("config.json", cfg.to_json())
        run.write_json("provenance.json", provenance())
        return initial_state(cfg)
    latest = run.load_latest(cfg)
    if latest is None:
        ckpt.warn(f"{run.path} has no checkpoint yet (stopped before its first one); starting it "
                  "again from step 0")
    run.truncate_logs(latest and latest[1])
    return initial_state(cfg) if latest is None else latest[0]


def budget_spent(cfg: TrainConfig, state: PopulationState) -> bool:
    return bool(cfg.max_steps and state.step >= cfg.max_steps) or state.elapsed >= 60 * cfg.minutes


def candidate(cfg: TrainConfig, state: PopulationState, member: int | None = None,
              name: str | None = None) -> tuple[Candidate, dict[str, Any]]:
    """Member ``member`` of ``state`` (by default the run's answer, its elite) as an optimizer
    under evaluation, and where its weights come from (:func:`~selfopt.population.elite.answer`).

    Raises:
      ValueError: ``member`` is not a position of the population.
    """
    theta, source, description = answer(state, member)
    return lopt_candidate(cfg.lopt, theta, name or f"{cfg.outer.label} {description}"), source


def check_elite(cfg: TrainConfig, run: RunDir, state: PopulationState,
                on_eval: Callable[[dict[str, Any]], None] | None = None) -> float:
    """The run's answer against tuned Adam on the quick held-out suite, appended to
    ``eval.jsonl`` with the training time; returns its seconds. Tuned Adam is cached on disk
    (:func:`~selfopt.evaluate.default_cache_dir`): only a run's first check pays for it."""
    started = time.monotonic()
    elite, source = candidate(cfg, state)
    result = evaluate(elite, suite("quick"), cfg.eval_steps, cfg.eval_seeds,
                      cache_dir=default_cache_dir())
    seconds = time.monotonic() - started
    row = {"step": state.step, "elapsed": round(state.elapsed, 3),
           "eval_seconds": round(seconds, 3), "member": source["member"],
           "id": source["member_id"], **result.summary(),
           "normalized": {t.label: t.normalized for t in result.tasks},
           "adam_normalized": {t.label: t.adam_normalized for t in result.tasks}}
    run.append({"eval.jsonl": [row]})
    if on_eval:
        on_eval(row)
    return seconds


def summarize(cfg: TrainConfig, run: RunDir, state: PopulationState, path: Path,
              interrupted: bool) -> dict[str, Any]:
    """Held-in validation scores at the random start and at the end (the validation's
    problems and measure, so nothing compiles for the summary alone), the best member, the
    elite, the last held-out check and the checkpoint written; saved as ``summary.json``."""
    start, end = held_in_scores(cfg, initial_thetas(cfg)), held_in_scores(cfg, state.thetas)
    evals, rows = run.read("eval.jsonl"), run.read("metrics.jsonl")
    recent = [r["meta_loss"] for r in rows
              if r["step"] >= state.step - 10 and r["meta_loss"] is not None]
    elite = state.elite
    summary = {
        "outer_optimizer": cfg.outer.label, "steps": state.step,
        "elapsed_s": round(state.elapsed, 1),
        "held_in_start": {"median": float(np.median(start)), "best": float(start.min())},
        "held_in_end": {"median": float(np.median(end)), "best": float(end.min())},
        "first_step_meta_loss": state.start_meta_loss,
        "last_steps_meta_loss": float(np.median(recent)) if recent else None,
        "best_position": state.best, "best_id": state.lineage.ids[state.best],
        "best_score": finite_or_none(state.scores[state.best]),
        # the elite's validation score: the measure of held_in_start/held_in_end
        "elite": None if elite is None else {"id": elite.id, "step": elite.step,
                                             "validation": finite_or_none(elite.score)},
        "checkpoint": str(path), "interrupted": interrupted,
        "last_eval": {k: evals[-1][k] for k in EVAL_SUMMARY_FIELDS} if evals else None,
        "time_to_beat_adam_s": time_to_beat_adam(evals),
        "step_bound": {"all": bound_fraction(rows),
                       "last_third": bound_fraction(rows, 2 * state.step // 3)}}
    run.write_json("summary.json", summary)
    return summary


def bound_fraction(rows: list[dict[str, Any]], from_step: int = 0) -> float | None:
    """The fraction of member steps from ``from_step`` on that ``outer.max_update`` shortened
    (``trust`` below 1 in ``metrics.jsonl``); ``None`` without any."""
    trust = [r["trust"] for r in rows if r["step"] >= from_step and r.get("trust") is not None]
    return float(np.mean(np.asarray(trust) < 1.0)) if trust else None


def time_to_beat_adam(eval_rows: list[dict[str, Any]]) -> float | None:
    """Training seconds at the first evaluation that beat tuned Adam (``None``: none did)."""
    return next((row["elapsed"] for row in eval_rows if row["beats_adam"]), None)


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event):
    """Ctrl-C / SIGTERM set ``stop`` (the loop ends after the current step and checkpoints);
    a second Ctrl-C interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

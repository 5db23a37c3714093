"""``selfopt train``: a population of randomly initialised learned optimizers trains itself.

One outer step, for every member at once (:func:`outer_step`, one jitted call per task shape):

    population -> ES/PES unrolls on the step's task -> meta-gradients -> self-update

and every ``pbt.interval`` steps, on the host, PBT: score every member on the same fresh
problems with unperturbed weights, exploit and explore, record the lineage. Members with
non-finite weights or meta-loss are replaced at once.

Inner problems live in *slots*: each slot holds one task and every member's persistent inner
problems on it; outer step ``t`` works on slot ``t % num_slots``, and each slot draws a new task
from the distribution every ``task_steps`` outer steps (slots staggered), restarting its problems.

Everything random is a pure function of ``(seed, step)``, so a run stopped and resumed from a
checkpoint reaches bitwise the same state as one never stopped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from selfopt import checkpoint as ckpt
from selfopt.cache import COMPILER_OPTIONS
from selfopt.config import ConfigError, TrainConfig, make_config
from selfopt.estimators.inner_problem import ratio_scale
from selfopt.evaluate import Candidate, default_cache_dir, evaluate, lopt_candidate, suite
from selfopt.population import Hyperparams, score_members
from selfopt.population.pbt import replace_failed
from selfopt.population.self_training import clip_threshold, clipped_fraction, member_rms
from selfopt.tasks import make_task


#: Fields of an ``eval.jsonl`` row that the run summary repeats for the last evaluation.
EVAL_SUMMARY_FIELDS = ("step", "elapsed", "mean_normalized", "adam_mean_normalized", "wins",
                       "tasks", "beats_adam")
#: Seed of the fixed held-in problems of the run summary (inside the training seed range).
HELD_IN_SEED = 424_242


@dataclasses.dataclass
class RunState:
    """Everything a run needs to continue: device arrays and host bookkeeping."""

    step: int
    thetas: Any  # members' LO weights, leading axis K
    outer_state: Any  # per-member state of the outer optimizer
    hparams: Hyperparams  # per-member PBT hyperparameters (device arrays)
    slot_configs: list[dict]  # task configuration of each slot
    slot_inner: list[Any]  # each slot's inner problems, leading axes (K, pairs)
    member_ids: list[int]  # lineage id of the member in each position
    generation: list[int]  # PBT copies in each member's ancestry
    scores: list[float]  # latest PBT score per member (lower is better; inf before the first)
    best: int  # position of the best-scored member
    next_id: int  # next unused lineage id
    elapsed: float  # seconds of training across all sessions
    start_meta_loss: float | None  # population median meta-loss at step 0
    # the elite: the best held-in validation so far (weights and outer state of one member)
    elite: dict[str, Any] | None = None  # {"theta": ..., "outer_state": ...}
    elite_score: float = math.inf
    elite_step: int = -1  # the validation step that found it
    elite_id: int = -1  # its lineage id
    elite_generation: int = 0  # PBT copies in its ancestry

    def arrays(self) -> dict[str, Any]:
        arrays = {"thetas": self.thetas, "outer_state": self.outer_state,
                  "hparams": self.hparams, "slots": self.slot_inner}
        return arrays if self.elite is None else {**arrays, "elite": self.elite}

    def metadata(self) -> dict[str, Any]:
        return {"step": self.step, "slot_configs": self.slot_configs,
                "member_ids": self.member_ids, "generation": self.generation,
                "scores": [s if math.isfinite(s) else None for s in self.scores],
                "best": self.best, "next_id": self.next_id, "elapsed": self.elapsed,
                "start_meta_loss": self.start_meta_loss,
                "elite_score": _finite_or_none(self.elite_score), "elite_step": self.elite_step,
                "elite_id": self.elite_id, "elite_generation": self.elite_generation}


def step_key(seed: int, step: int, purpose: int) -> jax.Array:
    """The PRNG key of one purpose at one outer step: a pure function of (seed, step)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), purpose)


def step_rng(seed: int, step: int, purpose: int) -> np.random.Generator:
    """Host randomness (PBT choices) at one outer step: a pure function of (seed, step)."""
    return np.random.default_rng([seed, step, purpose])


@functools.partial(jax.jit, static_argnames=("lopt", "estimator"),
                   compiler_options=COMPILER_OPTIONS)
def init_inner(lopt, estimator, task, thetas, key):
    """Fresh inner problems for every member on ``task`` (leading axes K, pairs)."""
    keys = jax.random.split(key, jax.tree.leaves(thetas)[0].shape[0])
    return jax.vmap(estimator.init_state, in_axes=(None, None, 0, 0))(lopt, task, thetas, keys)


def _outer_step(lopt, estimator, outer, thetas, outer_state, hparams, best, inner, task, key):
    """One outer step of the whole population: ES/PES estimates, then the self-update.

    Returns:
      New weights, outer state and inner problems, and per-member metrics: the meta-loss near
      theta, whether the member is finite, the sizes of its estimate and update, and the
      trust-region factor applied to the update (1: not bounded).
    """
    num = jax.tree.leaves(thetas)[0].shape[0]
    es_key, update_key = jax.random.split(key)
    estimates, inner = jax.vmap(estimator.estimate, in_axes=(None, None, 0, 0, 0, 0))(
        lopt, task, thetas, jnp.exp(hparams.log_sigma), inner, jax.random.split(es_key, num))
    new_thetas, outer_state, shrink = outer.update(lopt, thetas, outer_state, estimates.grad,
                                                   hparams.log_step_mult, best, update_key,
                                                   estimates.meta_loss)
    finite = jnp.isfinite(estimates.meta_loss)
    for leaf in jax.tree.leaves(new_thetas):
        finite &= jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
    metrics = {"meta_loss": estimates.meta_loss, "finite": finite,
               "grad_rms": member_rms(estimates.grad),
               "clipped": clipped_fraction(estimates.grad, clip_threshold(
                   estimates.grad, outer.clip, outer.clip_relative)),
               "update_rms": member_rms(jax.tree.map(jnp.subtract, new_thetas, thetas)),
               "trust": shrink}
    return new_thetas, outer_state, inner, metrics


outer_step = jax.jit(_outer_step, static_argnames=("lopt", "estimator", "outer"),
                     compiler_options=COMPILER_OPTIONS)


@functools.partial(jax.jit, static_argnames=("lopt", "estimator", "outer", "num_steps"),
                   compiler_options=COMPILER_OPTIONS)
def outer_steps(lopt, estimator, outer, thetas, outer_state, hparams, best, inner, task, seed,
                first_step, num_steps):
    """``num_steps`` outer steps on one task in one compiled call (``lax.scan`` over
    :func:`outer_step`), with no trip to the host in between: what a GPU needs, where one outer
    step takes milliseconds. Step ``first_step + i`` uses the key :func:`step_key` gives it.

    Returns:
      As :func:`outer_step`, with every metric stacked over the steps: ``(num_steps, K)``.
    """
    def body(carry, i):
        thetas, outer_state, inner = carry
        key = step_key(seed, first_step + i, 0)
        thetas, outer_state, inner, metrics = _outer_step(
            lopt, estimator, outer, thetas, outer_state, hparams, best, inner, task, key)
        return (thetas, outer_state, inner), metrics

    (thetas, outer_state, inner), metrics = jax.lax.scan(
        body, (thetas, outer_state, inner), jnp.arange(num_steps))
    return thetas, outer_state, inner, metrics


score = jax.jit(score_members, static_argnames=("lopt", "num_steps", "num_problems", "loss"),
                compiler_options=COMPILER_OPTIONS)


def select(tree: Any, sources: np.ndarray) -> Any:
    """Every member position ``i`` takes the value of position ``sources[i]``."""
    index = jnp.asarray(sources)
    return jax.tree.map(lambda x: x[index], tree)


def crossed(step: int, n: int, interval: int) -> bool:
    """Whether the last ``n`` steps, ending at ``step``, passed a multiple of ``interval``."""
    return step // interval > (step - n) // interval


def member_slice(tree: Any, member: int) -> Any:
    """One member's part of a population pytree (leading axis removed)."""
    return jax.tree.map(lambda x: x[member], tree)


def repeat_member(value: Any, num: int) -> Any:
    """A population pytree of ``num`` copies of one member's pytree ``value``."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num, *jnp.shape(x))), value)


def put_member(tree: Any, member: int, value: Any) -> Any:
    """``tree`` with member position ``member`` set to ``value`` (one member's pytree)."""
    return jax.tree.map(lambda x, v: x.at[member].set(v), tree, value)


class Trainer:
    """Runs, checkpoints and resumes a self-training run in a run directory.

    Args:
      cfg: the validated configuration.
      run_dir: where config, metrics, lineage and checkpoints go.
      on_step: called after every outer step with a dict of live information (for the view).
      on_eval: called with each row of ``eval.jsonl`` (evaluation during training).
    """

    def __init__(self, cfg: TrainConfig, run_dir: Path,
                 on_step: Callable[[dict[str, Any]], None] | None = None,
                 on_eval: Callable[[dict[str, Any]], None] | None = None):
        self.cfg, self.run_dir, self.on_step, self.on_eval = cfg, Path(run_dir), on_step, on_eval
        self._tasks: dict[str, Any] = {}
        self._replacements: dict[str, int] = {}  # a resumed run loads them (:meth:`load`)
        self.ckpt_dir = self.run_dir / "checkpoints"

    # -- tasks and slots ------------------------------------------------------------------
    def task(self, config: dict):
        """The task of a configuration, built once while it is in use."""
        name = json.dumps(config, sort_keys=True)
        if name not in self._tasks:
            if len(self._tasks) >= 4 * self.cfg.num_slots + 16:  # slots move on; forget old
                self._tasks.clear()
            self._tasks[name] = make_task(config)
        return self._tasks[name]

    def slot_epoch(self, slot: int, step: int) -> int:
        """Which task a slot holds at ``step``: slots refresh staggered every task_steps."""
        offset = slot * self.cfg.task_steps // self.cfg.num_slots
        return (step + offset) // self.cfg.task_steps

    def slot_config(self, slot: int, step: int) -> dict:
        """The task slot ``slot`` holds at ``step``, drawn from the task distribution."""
        return self.cfg.tasks.sample(step_key(self.cfg.seed, self.slot_epoch(slot, step),
                                              1000 + slot))

    def fresh_slot(self, slot: int, step: int, thetas) -> tuple[dict, Any]:
        config = self.slot_config(slot, step)
        key = step_key(self.cfg.seed, step, 2000 + slot)
        return config, init_inner(self.cfg.lopt, self.cfg.estimator, self.task(config), thetas, key)

    # -- state ------------------------------------------------------------------------------
    def initial_thetas(self):
        """The members' random initial weights (a function of the seed only)."""
        keys = jax.random.split(step_key(self.cfg.seed, 0, 1), self.cfg.population)
        return jax.vmap(self.cfg.lopt.init)(keys)

    def initial_state(self) -> RunState:
        cfg = self.cfg
        thetas = self.initial_thetas()  # random initialisation, nothing else
        hparams = cfg.pbt.initial(step_rng(cfg.seed, 0, 1), cfg.population)
        slots = [self.fresh_slot(s, 0, thetas) for s in range(cfg.num_slots)]
        return RunState(
            step=0, thetas=thetas, outer_state=cfg.outer.init(cfg.lopt, thetas),
            hparams=Hyperparams(*map(jnp.asarray, hparams)),
            slot_configs=[c for c, _ in slots], slot_inner=[s for _, s in slots],
            member_ids=list(range(cfg.population)), generation=[0] * cfg.population,
            scores=[math.inf] * cfg.population, best=0, next_id=cfg.population,
            elapsed=0.0, start_meta_loss=None)

    def template(self, slot_configs: list[dict], elite: bool) -> dict[str, Any]:
        """A state with the structure a checkpoint of these slot tasks (and an elite, or not)
        must have."""
        cfg = self.cfg
        thetas = jax.vmap(cfg.lopt.init)(jax.random.split(jax.random.key(0), cfg.population))
        hparams = Hyperparams(*[jnp.zeros(cfg.population, jnp.float32)] * 2)
        inner = [init_inner(cfg.lopt, cfg.estimator, self.task(c), thetas, jax.random.key(0))
                 for c in slot_configs]
        outer_state = cfg.outer.init(cfg.lopt, thetas)
        template = {"thetas": thetas, "outer_state": outer_state, "hparams": hparams,
                    "slots": inner}
        if elite:
            template["elite"] = member_slice({"theta": thetas, "outer_state": outer_state}, 0)
        return template

    # -- files ------------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """The run's checkpoint files, oldest first (never a temporary file of a write)."""
        steps = {p: p.name[len("step-"):-len(".safetensors")]
                 for p in self.ckpt_dir.glob("step-*.safetensors")}
        return sorted((p for p, n in steps.items() if n.isdigit()), key=lambda p: int(steps[p]))

    def save(self, state: RunState) -> Path:
        """Writes ``state`` as checkpoint ``step-N`` (atomically), then tidies the folders.

        The metadata also records the byte size of every ``*.jsonl`` log at this moment (the
        log lines a resume from this checkpoint keeps) and the running replacement counts.
        Tidying removes temporary files of writes that a crash cut short, checkpoints of later
        steps (a timeline abandoned by resuming from an older, good checkpoint) and all but the
        newest ``keep_checkpoints``. Only the trainer holding the run's lock calls this.

        Returns:
          The checkpoint's path.

        Raises:
          CheckpointError: the write failed (a full disk); earlier checkpoints are intact.
        """
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        path = self.ckpt_dir / f"step-{state.step:08d}.safetensors"
        logs = {log.name: log.stat().st_size for log in sorted(self.run_dir.glob("*.jsonl"))}
        ckpt.save_checkpoint(path, state.arrays(),
                             {"config": self.cfg.to_json(), "run": state.metadata(),
                              "logs": logs, "replacements": dict(self.replacement_counts())})
        ckpt.remove_temp_files(self.ckpt_dir, "step-*.safetensors")
        for name in ("config.json", "*.jsonl"):
            ckpt.remove_temp_files(self.run_dir, name)
        paths = self.checkpoints()
        for later in paths[paths.index(path) + 1:]:
            later.unlink(missing_ok=True)
        for old in paths[:paths.index(path) + 1][:-self.cfg.keep_checkpoints]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self) -> RunState:
        """The state of the newest checkpoint that verifies.

        A damaged newest checkpoint (bad checksum, truncated, unreadable) is skipped with a
        one-line warning on stderr and the previous one is used. A run directory without any
        checkpoint (stopped before its first) starts again from step 0, with a warning.

        Raises:
          CheckpointError: checkpoints exist but none is usable; the message says why for the
            newest.
        """
        paths = self.checkpoints()
        if not paths:
            ckpt.warn(f"{self.run_dir} has no checkpoint yet (stopped before its first one); "
                      "starting it again from step 0")
            return self.initial_state()
        errors = []
        for path in reversed(paths):
            try:
                state = self.load(path)
            except ckpt.CheckpointError as err:
                errors.append(err)
                continue
            if errors:
                skipped = ", ".join(p.name for p in paths[len(paths) - len(errors):])
                ckpt.warn(f"skipping {skipped} ({errors[0]}); resuming from {path.name}")
            return state
        older = f" (and the {len(errors) - 1} older ones)" if len(errors) > 1 else ""
        raise ckpt.CheckpointError(f"no usable checkpoint to resume from: {errors[0]}{older}")

    def load(self, path: Path) -> RunState:
        """The state stored in one checkpoint file of this run's configuration.

        Raises:
          CheckpointError: unreadable, damaged, another schema version, or saved by another
            configuration (architecture, population size).
        """
        meta = ckpt.read_metadata(path)
        try:
            run = meta["run"]
            has_elite = run.get("elite_id", -1) >= 0  # older checkpoints have none
            arrays, _ = ckpt.load_checkpoint(path, self.template(run["slot_configs"], has_elite))
            state = RunState(
                step=int(run["step"]), thetas=arrays["thetas"],
                outer_state=arrays["outer_state"], hparams=Hyperparams(*arrays["hparams"]),
                slot_configs=run["slot_configs"], slot_inner=arrays["slots"],
                member_ids=list(run["member_ids"]), generation=list(run["generation"]),
                scores=[math.inf if s is None else float(s) for s in run["scores"]],
                best=int(run["best"]), next_id=int(run["next_id"]),
                elapsed=float(run["elapsed"]), start_meta_loss=run["start_meta_loss"],
                elite=arrays.get("elite"),
                elite_score=math.inf if run.get("elite_score") is None else float(
                    run["elite_score"]),
                elite_step=int(run.get("elite_step", -1)), elite_id=int(run.get("elite_id", -1)),
                elite_generation=int(run.get("elite_generation", 0)))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            # The checksum held, so the file is as written, but not by this selfopt's trainer.
            raise ckpt.CheckpointError(f"{path} does not hold a selfopt run state ({err!r})"
                                       ) from None
        self._replacements = dict(meta.get("replacements") or {})
        return state

    def replacement_counts(self) -> dict[str, int]:
        """Members copied over others so far in this run, by lineage kind (``exploit``,
        ``replace_non_finite``, ``replace_diverged``); kept in checkpoints."""
        return self._replacements

    def truncate_logs(self, step: int) -> None:
        """Drops log lines written after the checkpoint of ``step`` (the one resumed from).

        A checkpoint records each log's size when it was written, and the logs are cut back to
        exactly that: this keeps the PBT round logged at ``step`` just before its checkpoint and
        drops a line that a crash or a full disk cut short. For a checkpoint without sizes
        (older selfopt), complete lines of steps before ``step`` are kept."""
        path = self.ckpt_dir / f"step-{step:08d}.safetensors"
        sizes = ckpt.read_metadata(path).get("logs") if path.exists() else {}
        for name in ("metrics.jsonl", "lineage.jsonl", "eval.jsonl", "validation.jsonl"):
            log = self.run_dir / name
            if not log.exists():
                continue
            data = log.read_bytes()
            if sizes is not None:
                kept = data[:sizes.get(name, 0)]
            else:
                kept = b"".join(line for line in data.splitlines(keepends=True)
                                if _logged_step(line) < step)
            if kept != data:
                ckpt.atomic_write_bytes(log, kept)

    def append(self, name: str, rows: list[dict]) -> None:
        if rows:
            with open(self.run_dir / name, "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)

    # -- PBT ----------------------------------------------------------------------------------
    def apply_copies(self, state: RunState, sources: np.ndarray, copies: list,
                     kinds: dict[int, str], new_hparams: Hyperparams | None = None) -> None:
        """Moves weights, outer state and hyperparameters and records the lineage.

        ``kinds`` maps each child position to the event's kind (``exploit``,
        ``replace_non_finite``, ``replace_diverged``)."""
        old_hparams = jax.tree.map(np.asarray, state.hparams)
        state.thetas = select(state.thetas, sources)
        state.outer_state = select(state.outer_state, sources)
        hparams = new_hparams if new_hparams is not None else select(old_hparams, sources)
        state.hparams = Hyperparams(*map(jnp.asarray, hparams))
        parent_ids, parent_gens = list(state.member_ids), list(state.generation)
        events = [self.new_lineage(state, child, kinds[child], parent_ids[parent], parent,
                                   parent_gens[parent], state.scores[parent],
                                   _hparams_at(old_hparams, parent), _hparams_at(hparams, child))
                  for child, parent in copies]
        for child, parent in copies:
            state.scores[child] = state.scores[parent]
        self.append("lineage.jsonl", events)

    def new_lineage(self, state: RunState, child: int, kind: str, parent_id: int,
                    parent_position: int | None, parent_generation: int, parent_score: float,
                    before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
        """Gives position ``child`` a new lineage id as a copy of ``parent_id``, counts the
        replacement by ``kind`` and returns the ``lineage.jsonl`` event (not yet written)."""
        event = {"step": state.step, "kind": kind, "position": child,
                 "child_id": state.next_id, "replaced_id": state.member_ids[child],
                 "parent_id": parent_id, "parent_position": parent_position,
                 "generation": parent_generation + 1,
                 "parent_score": _finite_or_none(parent_score),
                 "replaced_score": _finite_or_none(state.scores[child]),
                 "before": before, "after": after}
        state.member_ids[child], state.generation[child] = state.next_id, parent_generation + 1
        state.next_id += 1
        counts = self.replacement_counts()
        counts[kind] = counts.get(kind, 0) + 1
        return event

    def pbt_round(self, state: RunState, task) -> None:
        """Scores every member on the step's task (the same fresh problems, unperturbed
        weights), then exploit and explore (method.md section 5)."""
        cfg = self.cfg
        scores = np.asarray(score(cfg.lopt, state.thetas, task, step_key(cfg.seed, state.step, 3),
                                  cfg.pbt.score_steps, loss=cfg.pbt.score_loss))
        state.scores = [float(s) for s in scores]
        sources, hparams, copies = cfg.pbt.exploit_and_explore(
            scores, jax.tree.map(np.asarray, state.hparams), step_rng(cfg.seed, state.step, 2))
        self.apply_copies(state, sources, copies, {c: "exploit" for c, _ in copies}, hparams)
        state.best = int(np.argmin(np.nan_to_num(state.scores, nan=np.inf)))

    def validate(self, state: RunState) -> None:
        """Held-in validation of every member; keeps the best weights seen as the elite.

        Every member trains the fixed held-in problems (:meth:`held_in_meta_loss`: training
        families and seeds only) for ``validate_steps`` steps, scored by ``pbt.score_loss``. A
        member that validates better than the elite becomes the elite (its weights and outer
        state are copied). If none does and ``restore_elite`` is on, the elite replaces the
        member that validated worst (lineage kind ``restore_elite``; it keeps that position's
        PBT hyperparameters), so that a population that drifted away from its best point is
        pulled back. Logged to ``validation.jsonl``.
        """
        cfg = self.cfg
        scores = np.nan_to_num(self.held_in_meta_loss(state.thetas), nan=np.inf)
        best, restored = int(np.argmin(scores)), None
        if scores[best] < state.elite_score:
            state.elite = member_slice({"theta": state.thetas, "outer_state": state.outer_state},
                                       best)
            state.elite_score, state.elite_step = float(scores[best]), state.step
            state.elite_id, state.elite_generation = state.member_ids[best], state.generation[best]
        elif cfg.restore_elite and state.elite is not None:
            restored = int(np.argmax(scores))
            state.thetas = put_member(state.thetas, restored, state.elite["theta"])
            state.outer_state = put_member(state.outer_state, restored,
                                           state.elite["outer_state"])
            hparams = _hparams_at(jax.tree.map(np.asarray, state.hparams), restored)
            # the position keeps its PBT hyperparameters
            self.append("lineage.jsonl", [self.new_lineage(
                state, restored, "restore_elite", state.elite_id, None, state.elite_generation,
                state.elite_score, hparams, hparams)])
        self.append("validation.jsonl", [{
            "step": state.step, "elapsed": round(state.elapsed, 3),
            "scores": [_finite_or_none(x) for x in scores], "best": best,
            "elite_score": _finite_or_none(state.elite_score), "elite_id": state.elite_id,
            "elite_step": state.elite_step, "restored": restored}])

    # -- the loop -----------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict[str, Any]:
        """Trains until the step or time budget is spent, or Ctrl-C; returns a summary.

        Raises:
          RunInUseError: another process is training in this run directory.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with _exclusive(self.run_dir):
            return self._run_locked(resume)

    def _run_locked(self, resume: bool) -> dict[str, Any]:
        cfg = self.cfg
        if resume:
            state = self.load_latest()
            self.truncate_logs(state.step)
        else:
            ckpt.atomic_write_bytes(self.run_dir / "config.json",
                                    (json.dumps(cfg.to_json(), indent=2) + "\n").encode())
            state = self.initial_state()
        if cfg.validate_interval and state.elite is None:
            self.validate(state)  # the random start is the first elite
        stop = threading.Event()
        last_save = time.monotonic()
        # Training time excludes evaluations (measurement, not training): ``elapsed`` is what
        # the budget, the logs and time-to-beat-Adam count.
        session_start, session_elapsed0, evaluating = time.monotonic(), state.elapsed, 0.0
        inner_per_call = (cfg.population * cfg.estimator.num_pairs * 2 * cfg.estimator.truncation_length
                          * cfg.steps_per_call)
        eval_every = 60.0 * cfg.eval_minutes
        next_eval = eval_every * (state.elapsed // eval_every + 1) if resume and eval_every else 0.0
        with _stop_on_signals(stop):
            while not stop.is_set():
                if eval_every and state.elapsed >= next_eval:
                    evaluating += self.evaluate_best(state)
                    next_eval = eval_every * (state.elapsed // eval_every + 1)
                if self.budget_spent(state) or stop.is_set():
                    break
                started = time.monotonic()
                metrics = self.one_step(state)
                state.elapsed = (session_elapsed0 + time.monotonic() - session_start
                                 - evaluating)
                if self.on_step:
                    self.on_step({"state": state, "metrics": metrics,
                                  "inner_steps": inner_per_call,
                                  "inner_steps_per_s": inner_per_call / max(
                                      time.monotonic() - started, 1e-9)})
                if time.monotonic() - last_save >= cfg.checkpoint_seconds:
                    self.save(state)
                    last_save = time.monotonic()
            path = self.save(state)
            if eval_every and not stop.is_set() and self.last_eval_step() != state.step:
                self.evaluate_best(state)  # the end state, unless Ctrl-C asked to stop now
        return self.summary(state, path, stop.is_set())

    # -- evaluation during training ----------------------------------------------------------
    def evaluate_best(self, state: RunState) -> float:
        """The run's answer (:meth:`member_candidate`: the elite, or PBT's best member without
        validation) against tuned Adam on the ``quick`` held-out suite (method.md section 7),
        appended to ``eval.jsonl`` with the training time; returns its seconds.

        Tuned Adam is cached on disk (:func:`selfopt.evaluate.default_cache_dir`), so only a
        run's first evaluation pays for it."""
        cfg, started = self.cfg, time.monotonic()
        source = self.member_source(state)
        result = evaluate(self.member_candidate(state, name=f"member {source['member']}"),
                          suite("quick"), cfg.eval_steps, cfg.eval_seeds,
                          cache_dir=default_cache_dir())
        seconds = time.monotonic() - started
        row = {"step": state.step, "elapsed": round(state.elapsed, 3),
               "eval_seconds": round(seconds, 3), "member": source["member"],
               "id": source["member_id"], **result.summary(),
               "normalized": {t.label: t.normalized for t in result.tasks},
               "adam_normalized": {t.label: t.adam_normalized for t in result.tasks}}
        self.append("eval.jsonl", [row])
        if self.on_eval:
            self.on_eval(row)
        return seconds

    def member_candidate(self, state: RunState, member: int | None = None,
                         name: str | None = None) -> Candidate:
        """Member ``member`` of ``state`` as an optimizer under evaluation; by default the run's
        answer: the elite (best held-in validation so far), or PBT's best member in a run
        without validation.

        Raises:
          ValueError: ``member`` is not a position of the population.
        """
        if member is not None and not 0 <= member < self.cfg.population:
            raise ValueError(f"member {member} is not in the population (positions 0 to "
                             f"{self.cfg.population - 1})")
        source = self.member_source(state, member)
        if source["member"] == "elite":
            theta, default_name = state.elite["theta"], (
                f"elite (id {state.elite_id}, validated at step {state.elite_step})")
        else:
            theta, default_name = member_slice(state.thetas, source["member"]), (
                f"member {source['member']} (id {source['member_id']}, step {state.step})")
        return lopt_candidate(self.cfg.lopt, theta,
                              name or f"{self.cfg.outer.label} {default_name}")

    @staticmethod
    def member_source(state: RunState, member: int | None = None) -> dict[str, Any]:
        """Which weights :meth:`member_candidate` takes for ``member``, for the record:
        ``{"member": "elite" or a position, "member_id": lineage id, ...}``."""
        if member is None and state.elite is not None:
            return {"member": "elite", "member_id": state.elite_id,
                    "elite_step": state.elite_step}
        member = state.best if member is None else member
        return {"member": member, "member_id": state.member_ids[member]}

    def last_eval_step(self) -> int | None:
        rows = read_jsonl(self.run_dir / "eval.jsonl")
        return rows[-1]["step"] if rows else None

    def budget_spent(self, state: RunState) -> bool:
        if self.cfg.max_steps and state.step >= self.cfg.max_steps:
            return True
        return state.elapsed >= 60.0 * self.cfg.minutes

    def one_step(self, state: RunState) -> dict[str, Any]:
        """One call's outer steps (``steps_per_call``, all on one slot's task; then a PBT round
        when one is due); appends their metrics; advances ``state``. Returns the metrics of the
        call's last step."""
        cfg = self.cfg
        n = cfg.steps_per_call
        slot = (state.step // n) % cfg.num_slots
        if self.slot_config(slot, state.step) != state.slot_configs[slot]:
            state.slot_configs[slot], state.slot_inner[slot] = self.fresh_slot(
                slot, state.step, state.thetas)
        task = self.task(state.slot_configs[slot])
        args = (cfg.lopt, cfg.estimator, cfg.outer, state.thetas, state.outer_state, state.hparams,
                jnp.asarray(state.best), state.slot_inner[slot], task)
        if n == 1:  # the plain step (no scan around it)
            *new, metrics = outer_step(*args, step_key(cfg.seed, state.step, 0))
            history = {k: np.asarray(v)[None] for k, v in metrics.items()}
        else:
            *new, metrics = outer_steps(*args, cfg.seed, state.step, n)
            history = {k: np.asarray(v) for k, v in metrics.items()}
        # logged, shown and checked on the ratio scale (1 = no progress)
        history["meta_loss"] = ratio_scale(history["meta_loss"], cfg.estimator.normalization)
        state.thetas, state.outer_state, state.slot_inner[slot] = new
        metrics = {k: v[-1] for k, v in history.items()}
        if state.start_meta_loss is None:
            finite_losses = history["meta_loss"][0][np.isfinite(history["meta_loss"][0])]
            state.start_meta_loss = (float(np.median(finite_losses)) if finite_losses.size
                                     else None)
        hparams = jax.tree.map(np.asarray, state.hparams)
        ids, generation = list(state.member_ids), list(state.generation)  # before replacement
        replaced = self.replace_failed_members(state, metrics)
        self.append("metrics.jsonl", [{
            "step": state.step + j, "elapsed": round(state.elapsed, 3), "member": i,
            "id": ids[i], "generation": generation[i],
            "meta_loss": _finite_or_none(history["meta_loss"][j, i]),
            "grad_rms": _finite_or_none(history["grad_rms"][j, i]),
            "clipped": _finite_or_none(history["clipped"][j, i]),
            "update_rms": _finite_or_none(history["update_rms"][j, i]),
            "trust": _finite_or_none(history["trust"][j, i]),
            "step_mult": float(np.exp(hparams.log_step_mult[i])),
            "sigma": float(np.exp(hparams.log_sigma[i])),
            "task": state.slot_configs[slot]["family"],
            "outer_optimizer": cfg.outer.label,
            # this member was replaced after this step (kind); replacement follows a call
            "replaced": replaced.get(i) if j == n - 1 else None,
        } for j in range(n) for i in range(cfg.population)])
        state.step += n
        if crossed(state.step, n, cfg.pbt.interval):
            self.pbt_round(state, task)
        if cfg.validate_interval and crossed(state.step, n, cfg.validate_interval):
            self.validate(state)
        metrics["replaced"] = replaced
        metrics["replacements"] = dict(self.replacement_counts())
        return metrics

    def replace_failed_members(self, state: RunState, metrics: dict[str, np.ndarray]
                               ) -> dict[int, str]:
        """Replaces non-finite members, and members whose meta-loss reached
        ``diverged_meta_loss``, by copies of healthy ones (method.md section 5).

        If no member is healthy, the non-finite ones are replaced by copies of finite (diverged)
        ones, which stay: a diverged member is still a usable starting point.

        Returns:
          The kind of each replaced position (``replace_non_finite``, ``replace_diverged``).

        Raises:
          FloatingPointError: no member is finite; nothing is left to copy.
        """
        finite = metrics["finite"]
        healthy = finite & (np.nan_to_num(metrics["meta_loss"], nan=np.inf)
                            < self.cfg.diverged_meta_loss)
        if healthy.all():
            return {}
        if not finite.any():
            raise FloatingPointError(
                f"step {state.step}: every member's weights or meta-loss are not finite; "
                "nothing is left to copy (try a smaller pbt.step_mult_prior, outer.max_update "
                "or pbt.sigma_prior)")
        sources, copies = replace_failed(healthy if healthy.any() else finite,
                                         np.asarray(state.scores),
                                         step_rng(self.cfg.seed, state.step, 4))
        kinds = {c: "replace_diverged" if finite[c] else "replace_non_finite" for c, _ in copies}
        self.apply_copies(state, sources, copies, kinds)
        return kinds

    def held_in_meta_loss(self, thetas) -> np.ndarray:
        """``(K,)`` meta-loss of each member on the fixed held-in problems: every training
        family's default task (instance seed ``HELD_IN_SEED``, training families and seeds
        only), two problems each, ``validate_steps`` steps, unperturbed weights, scored by
        ``pbt.score_loss`` (:func:`score_members`); the mean over families. The same
        problems every time, so scores compare like with like. None of them is held out."""
        cfg, key = self.cfg, jax.random.key(HELD_IN_SEED)
        per_family = [score(cfg.lopt, thetas, self.task({"family": family, "seed": HELD_IN_SEED}),
                            key, cfg.validate_steps, loss=cfg.pbt.score_loss)
                      for family in cfg.tasks.families]
        return np.mean(np.stack([np.asarray(x) for x in per_family]), axis=0)

    def summary(self, state: RunState, path: Path, interrupted: bool) -> dict[str, Any]:
        """Held-in validation scores at the random start and at the end (the validation's
        problems and measure, so no program is compiled for the summary alone), the best
        member, the elite, and the checkpoint written."""
        start = self.held_in_meta_loss(self.initial_thetas())
        end = self.held_in_meta_loss(state.thetas)
        evals = read_jsonl(self.run_dir / "eval.jsonl")
        summary = {"outer_optimizer": self.cfg.outer.label, "steps": state.step,
                "elapsed_s": round(state.elapsed, 1),
                "held_in_start": {"median": float(np.median(start)), "best": float(start.min())},
                "held_in_end": {"median": float(np.median(end)), "best": float(end.min())},
                "first_step_meta_loss": state.start_meta_loss,
                "last_steps_meta_loss": self.recent_meta_loss(state.step),
                "best_position": state.best,
                "best_id": state.member_ids[state.best],
                "best_score": _finite_or_none(state.scores[state.best]),
                # the elite's validation score: the measure of held_in_start/held_in_end
                "elite": ({"id": state.elite_id, "step": state.elite_step,
                           "validation": _finite_or_none(state.elite_score)}
                          if state.elite is not None else None),
                "checkpoint": str(path), "interrupted": interrupted,
                "last_eval": ({k: evals[-1][k] for k in EVAL_SUMMARY_FIELDS}
                              if evals else None),
                "time_to_beat_adam_s": time_to_beat_adam(evals)}
        ckpt.atomic_write_bytes(self.run_dir / "summary.json",
                                (json.dumps(summary, indent=2) + "\n").encode())
        return summary

    def recent_meta_loss(self, step: int, window: int = 10) -> float | None:
        """Median over members and the last ``window`` steps of the logged meta-loss."""
        rows = read_jsonl(self.run_dir / "metrics.jsonl")
        values = [r["meta_loss"] for r in rows
                  if r["step"] >= step - window and r["meta_loss"] is not None]
        return float(np.median(values)) if values else None


def open_checkpoint(target: Path) -> tuple[Trainer, RunState, Path]:
    """A trained population from a run directory (its latest checkpoint) or a checkpoint file.

    Returns:
      The run's trainer (its configuration and components), the state, and the file read.

    Raises:
      CheckpointError: no such run or file, or a damaged or incompatible checkpoint.
    """
    target = Path(target)
    if target.is_dir():
        if not (target / "config.json").is_file():
            raise ckpt.CheckpointError(f"{target} is not a selfopt run directory (no config.json)")
        trainer = Trainer(make_config({}, target / "config.json"), target)
        paths = trainer.checkpoints()
        if not paths:
            raise ckpt.CheckpointError(f"{target} has no checkpoint yet")
        return trainer, trainer.load_latest(), paths[-1]
    if not target.is_file():
        raise ckpt.CheckpointError(f"no run directory or checkpoint file at {target}")
    try:
        config = ckpt.read_metadata(target)["config"]
        cfg = make_config(config)
    except (KeyError, TypeError, ConfigError) as err:
        raise ckpt.CheckpointError(f"{target} is not a selfopt training checkpoint ({err})") from None
    trainer = Trainer(cfg, target.parent.parent)
    return trainer, trainer.load(target), target


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's log file (``[]`` if there is none yet)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def time_to_beat_adam(eval_rows: list[dict[str, Any]]) -> float | None:
    """Training seconds at the first evaluation that beat tuned Adam (``None``: none did)."""
    return next((row["elapsed"] for row in eval_rows if row["beats_adam"]), None)


class RunInUseError(RuntimeError):
    """Another ``selfopt train`` holds the run directory."""


@contextlib.contextmanager
def _exclusive(run_dir: Path):
    """Holds an exclusive lock on ``run_dir/.lock`` for the life of a run, so that two trainers
    never interleave writes in one run directory. The OS drops the lock if the process dies."""
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunInUseError(f"{run_dir} is in use by another selfopt train; wait for it or "
                                "stop it first") from None
        yield
    finally:
        os.close(fd)


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


def _logged_step(line: bytes) -> float:
    """The step of a complete log line (``inf`` for a line a crash cut short)."""
    try:
        return json.loads(line)["step"] if line.endswith(b"\n") else math.inf
    except (ValueError, KeyError, TypeError):
        return math.inf


def _hparams_at(hparams: Hyperparams, member: int) -> dict[str, float]:
    """One member's PBT hyperparameters as a lineage event records them."""
    return {"step_mult": float(np.exp(hparams.log_step_mult[member])),
            "sigma": float(np.exp(hparams.log_sigma[member]))}


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None

"""The state of a self-training population: everything a run needs to continue.

:class:`PopulationState` is an immutable pytree (evosax's style): its leaves are the device
arrays (members' weights, outer-optimizer state, PBT hyperparameters, every slot's inner
problems, the elite's weights); the host record (step, lineage, PBT scores, the slots' task
configurations, the best member, the training time, the elite's score) is its static part,
plain host values (so ``jax.tree.map`` reaches every array, but a whole state is not a ``jit``
argument). A step returns a new state with ``state.replace(...)``; nothing mutates one in
place.

Randomness is a pure function of the seed and the outer step (:func:`step_key`,
:func:`step_rng`), so a run resumed from a checkpoint reaches bitwise the state of one never
stopped.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from selfopt.population.pbt import Hyperparams


#: The ``purpose`` of each random draw of a step (:func:`step_key`, :func:`step_rng`): the ES
#: perturbations and the self-update; the initial weights and hyperparameters (at step 0); PBT's
#: exploit and explore; PBT's scoring problems; the replacement of failed members; a slot's task
#: (at its task epoch) and its problems (both plus the slot's index).
(ESTIMATE, INIT, EXPLORE, SCORE, REPLACE, SLOT_TASK, SLOT_PROBLEMS) = (0, 1, 2, 3, 4, 1000, 2000)


def step_key(seed: int, step: int, purpose: int) -> jax.Array:
    """The PRNG key of one purpose at one outer step: a pure function of (seed, step)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), purpose)


def step_rng(seed: int, step: int, purpose: int) -> np.random.Generator:
    """Host randomness (PBT choices) at one outer step: a pure function of (seed, step)."""
    return np.random.default_rng([seed, step, purpose])


def _static():
    """A field of the pytree's static part (host values, not arrays)."""
    return dataclasses.field(metadata={"static": True})


@dataclasses.dataclass(frozen=True)
class Lineage:
    """Who each member position descends from (method.md section 5: PBT's family tree)."""

    ids: tuple[int, ...]  # lineage id of the member in each position
    generation: tuple[int, ...]  # PBT copies in each member's ancestry
    next_id: int  # next unused lineage id
    counts: tuple[tuple[str, int], ...] = ()  # copies so far by kind (exploit, restore_elite...)

    @classmethod
    def start(cls, num: int) -> Lineage:
        return cls(tuple(range(num)), (0,) * num, num)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Elite:
    """The best member the held-in validation has seen: its weights and outer state."""

    theta: Any
    outer_state: Any
    score: float = _static()  # its held-in validation
    step: int = _static()  # the validation that found it
    id: int = _static()  # its lineage id
    generation: int = _static()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PopulationState:
    """Members (leading axis K) and the run's record, at the start of outer step ``step``."""

    thetas: Any  # members' learned-optimizer weights
    outer_state: Any  # per-member state of the outer optimizer
    hparams: Hyperparams  # per-member PBT hyperparameters (log scale)
    slot_problems: tuple[Any, ...]  # each slot's inner problems, leading axes (K, pairs)
    elite: Elite | None  # the best held-in validation so far (None: not validated yet)
    step: int = _static()
    slot_configs: tuple[dict, ...] = _static()  # the task each slot holds
    lineage: Lineage = _static()
    scores: tuple[float, ...] = _static()  # latest PBT score per member (inf before the first)
    best: int = _static()  # position of the best-scored member
    elapsed: float = _static()  # seconds of training across all sessions
    start_meta_loss: float | None = _static()  # population median meta-loss at step 0

    replace = dataclasses.replace

    @property
    def num_members(self) -> int:
        return len(self.lineage.ids)

    @property
    def elite_score(self) -> float:
        return math.inf if self.elite is None else self.elite.score

    def arrays(self) -> dict[str, Any]:
        """The arrays a checkpoint stores (named as the checkpoint names them)."""
        arrays = {"thetas": self.thetas, "outer_state": self.outer_state,
                  "hparams": self.hparams, "slots": list(self.slot_problems)}
        if self.elite is not None:
            arrays["elite"] = {"theta": self.elite.theta, "outer_state": self.elite.outer_state}
        return arrays

    def metadata(self) -> dict[str, Any]:
        """The host record a checkpoint stores (JSON)."""
        elite = self.elite
        return {"step": self.step, "slot_configs": list(self.slot_configs),
                "member_ids": list(self.lineage.ids), "generation": list(self.lineage.generation),
                "next_id": self.lineage.next_id, "replacements": dict(self.lineage.counts),
                "scores": [finite_or_none(s) for s in self.scores], "best": self.best,
                "elapsed": self.elapsed, "start_meta_loss": self.start_meta_loss,
                "elite_score": None if elite is None else finite_or_none(elite.score),
                "elite_step": -1 if elite is None else elite.step,
                "elite_id": -1 if elite is None else elite.id,
                "elite_generation": 0 if elite is None else elite.generation}

    @classmethod
    def from_checkpoint(cls, arrays: dict[str, Any], run: dict[str, Any],
                        replacements: dict[str, int] | None = None) -> PopulationState:
        """The state of :meth:`arrays` and :meth:`metadata` as a checkpoint gave them back
        (``replacements``: the counts of a checkpoint that kept them outside ``run``).

        Raises:
          KeyError, TypeError, ValueError: ``run`` is not such a record.
        """
        replacements = run.get("replacements", replacements or {})
        elite = None
        if "elite" in arrays:
            elite = Elite(arrays["elite"]["theta"], arrays["elite"]["outer_state"],
                          none_as_inf(run["elite_score"]), int(run["elite_step"]),
                          int(run["elite_id"]), int(run["elite_generation"]))
        return cls(
            thetas=arrays["thetas"], outer_state=arrays["outer_state"],
            hparams=Hyperparams(*arrays["hparams"]), slot_problems=tuple(arrays["slots"]),
            elite=elite, step=int(run["step"]), slot_configs=tuple(run["slot_configs"]),
            lineage=Lineage(tuple(map(int, run["member_ids"])),
                            tuple(map(int, run["generation"])), int(run["next_id"]),
                            tuple(sorted((str(k), int(v))
                                         for k, v in replacements.items()))),
            scores=tuple(none_as_inf(s) for s in run["scores"]), best=int(run["best"]),
            elapsed=float(run["elapsed"]), start_meta_loss=run["start_meta_loss"])


def finite_or_none(value: float) -> float | None:
    """``value`` for JSON: ``None`` where it is not finite."""
    value = float(value)
    return value if math.isfinite(value) else None


def none_as_inf(value: float | None) -> float:
    """A score read back from JSON (``None`` was a non-finite score)."""
    return math.inf if value is None else float(value)


@jax.jit
def member_slice(tree: Any, member: int) -> Any:
    """One member's part of a population pytree (leading axis removed)."""
    return jax.tree.map(lambda x: x[member], tree)

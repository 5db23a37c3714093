"""The elite: the best weights a held-in validation has seen, and the run's answer.

PBT ranks members on one step's task; the population can then drift away from its best point.
Every ``validate_interval`` steps each member trains the same fixed held-in problems, and the
best member seen so far is kept as the elite (weights and outer state). With ``restore_elite``,
a validation that finds no better member puts the elite back in place of the worst one. The
elite is what a run hands over: it is what the evaluations during training score.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from selfopt.cache import COMPILER_OPTIONS
from selfopt.lopt.base import LearnedOptimizer
from selfopt.population import slots
from selfopt.population.lineage import hparams_at, record
from selfopt.population.pbt import score_members
from selfopt.population.state import Elite, PopulationState, finite_or_none, member_slice
from selfopt.tasks.augmentation import Reparametrized

#: Seed of the fixed held-in problems (inside the training seed range: not held out).
HELD_IN_SEED = 424_242

#: :func:`score_members` compiled (PBT rounds and validations share its programs).
score = jax.jit(score_members, static_argnames=("lopt", "loss"), compiler_options=COMPILER_OPTIONS)


def held_in_task(family: str, augmented: bool):
    """The held-in task of one training family: its default configuration. ``augmented``: in
    the wrapper of the training tasks (:class:`~selfopt.tasks.augmentation.Reparametrized`) with
    every scale 1, the same problem exactly, so that it has a training task's shape and shares
    its compiled programs."""
    task = slots.task({"family": family, "seed": HELD_IN_SEED})
    return Reparametrized.identity(task) if augmented else task


def held_in_meta_loss(lopt: LearnedOptimizer, families: tuple[str, ...], thetas: Any,
                      num_steps: int, loss: str, augmented: bool = False) -> np.ndarray:
    """``(K,)`` meta-loss of each member on the fixed held-in problems.

    Every training family's default task (instance seed :data:`HELD_IN_SEED`),
    :data:`~selfopt.population.pbt.SCORE_PROBLEMS` problems each, ``num_steps`` steps, unperturbed weights, averaged as ``loss`` says
    (:func:`score_members`); the mean over families. The same problems every time, so scores
    compare like with like. ``augmented``: the training tasks are augmented
    (:func:`held_in_task`).
    """
    key = jax.random.key(HELD_IN_SEED)
    per_family = [np.asarray(score(lopt, thetas, held_in_task(f, augmented), key, num_steps,
                                   loss=loss)) for f in families]
    return np.mean(np.stack(per_family), axis=0)


def keep_best(state: PopulationState, scores: np.ndarray, restore: bool
              ) -> tuple[PopulationState, list[dict], dict]:
    """The elite after a validation that scored every member ``scores`` (lower is better).

    A member better than the elite becomes the elite. Otherwise, with ``restore``, the elite
    replaces the member that validated worst (lineage kind ``restore_elite``; the position
    keeps its PBT hyperparameters), pulling back a population that drifted from its best point.

    Returns:
      The new state, its lineage events, and the ``validation.jsonl`` row.
    """
    scores = np.nan_to_num(scores, nan=np.inf)
    best, restored, events = int(np.argmin(scores)), None, []
    if scores[best] < state.elite_score:
        member = member_slice((state.thetas, state.outer_state), best)
        state = state.replace(elite=Elite(*member, score=float(scores[best]), step=state.step,
                                          id=state.lineage.ids[best],
                                          generation=state.lineage.generation[best]))
    elif restore and state.elite is not None:
        restored, elite = int(np.argmax(scores)), state.elite
        hparams = hparams_at(jax.tree.map(np.asarray, state.hparams), restored)
        lineage, event = record(state, state.lineage, restored, "restore_elite", elite.id, None,
                                elite.generation, elite.score, hparams, hparams)
        thetas, outer_state = _put((state.thetas, state.outer_state), restored,
                                   (elite.theta, elite.outer_state))
        state, events = state.replace(thetas=thetas, outer_state=outer_state,
                                      lineage=lineage), [event]
    elite = state.elite
    row = {"step": state.step, "elapsed": round(state.elapsed, 3),
           "scores": [finite_or_none(x) for x in scores], "best": best,
           "elite_score": finite_or_none(state.elite_score),
           "elite_id": -1 if elite is None else elite.id,
           "elite_step": -1 if elite is None else elite.step, "restored": restored}
    return state, events, row


@jax.jit
def _put(tree: Any, member: int, value: Any) -> Any:
    """``tree`` with member position ``member`` set to ``value`` (one member's pytree)."""
    return jax.tree.map(lambda x, v: x.at[member].set(v), tree, value)


def answer(state: PopulationState, member: int | None = None) -> tuple[Any, dict[str, Any], str]:
    """The weights a run hands over: member ``member``, or by default the elite (PBT's best
    member in a run without validation).

    Returns:
      The weights, their source for the record (``{"member": "elite" or a position,
      "member_id": lineage id, ...}``) and a description.

    Raises:
      ValueError: ``member`` is not a position of the population.
    """
    if member is not None and not 0 <= member < state.num_members:
        raise ValueError(f"member {member} is not in the population (positions 0 to "
                         f"{state.num_members - 1})")
    if member is None and state.elite is not None:
        elite = state.elite
        return (elite.theta, {"member": "elite", "member_id": elite.id, "elite_step": elite.step},
                f"elite (id {elite.id}, validated at step {elite.step})")
    member = state.best if member is None else member
    member_id = state.lineage.ids[member]
    return (member_slice(state.thetas, member), {"member": member, "member_id": member_id},
            f"member {member} (id {member_id}, step {state.step})")

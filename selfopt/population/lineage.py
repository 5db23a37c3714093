"""Copying members over others, and the family tree it leaves (``lineage.jsonl``).

Every copy (a PBT exploit, the replacement of a failed member, the elite restored) gives the
child position a new lineage id whose parent is the member copied, one generation deeper, and
is recorded as an event: who replaced whom, their scores, and the hyperparameters before and
after (method.md section 5).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from selfopt.population.pbt import Hyperparams
from selfopt.population.state import Lineage, PopulationState, finite_or_none

@jax.jit
def select(tree: Any, sources: np.ndarray) -> Any:
    """Every member position ``i`` takes the value of position ``sources[i]`` (one compiled
    program for the whole tree, not one per leaf shape)."""
    return jax.tree.map(lambda x: x[sources], tree)


def hparams_at(hparams: Hyperparams, member: int) -> dict[str, float]:
    """One member's PBT hyperparameters as a lineage event records them."""
    return {"step_mult": float(np.exp(hparams.log_step_mult[member])),
            "sigma": float(np.exp(hparams.log_sigma[member]))}


def record(state: PopulationState, lineage: Lineage, child: int, kind: str, parent_id: int,
           parent_position: int | None, parent_generation: int, parent_score: float,
           before: dict[str, float], after: dict[str, float]) -> tuple[Lineage, dict]:
    """Position ``child`` becomes a new member, a copy of ``parent_id``.

    Returns:
      The lineage after the copy and the ``lineage.jsonl`` event of it.
    """
    event = {"step": state.step, "kind": kind, "position": child,
             "child_id": lineage.next_id, "replaced_id": lineage.ids[child],
             "parent_id": parent_id, "parent_position": parent_position,
             "generation": parent_generation + 1, "parent_score": finite_or_none(parent_score),
             "replaced_score": finite_or_none(state.scores[child]),
             "before": before, "after": after}
    counts = dict(lineage.counts)
    counts[kind] = counts.get(kind, 0) + 1
    lineage = Lineage(
        ids=tuple(lineage.next_id if i == child else x for i, x in enumerate(lineage.ids)),
        generation=tuple(parent_generation + 1 if i == child else g
                         for i, g in enumerate(lineage.generation)),
        next_id=lineage.next_id + 1, counts=tuple(sorted(counts.items())))
    return lineage, event


def copy_members(state: PopulationState, sources: np.ndarray, copies: list[tuple[int, int]],
                 kinds: dict[int, str], new_hparams: Hyperparams | None = None
                 ) -> tuple[PopulationState, list[dict]]:
    """Each child of ``copies`` takes its parent's weights, outer state and score.

    Args:
      state: the population.
      sources: for each position, the position it copies (itself if kept).
      copies: ``(child, parent)`` pairs, as :meth:`PBT.exploit_and_explore` gives them.
      kinds: the kind of each child's copy (``exploit``, ``replace_non_finite``,
        ``replace_diverged``; ``restore_elite`` is recorded by the elite).
      new_hparams: everyone's hyperparameters after the copies (PBT's explore); by default
        the children take their parents'.

    Returns:
      The new state and the lineage events.
    """
    old = jax.tree.map(np.asarray, state.hparams)
    hparams = new_hparams if new_hparams is not None else jax.tree.map(lambda x: x[sources], old)
    lineage, events = state.lineage, []
    for child, parent in copies:
        lineage, event = record(state, lineage, child, kinds[child], state.lineage.ids[parent],
                                parent, state.lineage.generation[parent], state.scores[parent],
                                hparams_at(old, parent), hparams_at(hparams, child))
        events.append(event)
    scores = list(state.scores)
    for child, parent in copies:
        scores[child] = state.scores[parent]
    return state.replace(
        thetas=select(state.thetas, sources), outer_state=select(state.outer_state, sources),
        hparams=Hyperparams(*map(jnp.asarray, hparams)), lineage=lineage,
        scores=tuple(scores)), events

"""Task slots: the tasks the population trains on, and every member's inner problems on them.

Each of ``num_slots`` slots holds one task and every member's persistent inner problems on it
(the estimator's state, leading axes K and pairs). Outer step ``t`` works on slot
``(t // steps_per_call) % num_slots``; each slot draws a new task from the distribution every
``task_steps`` outer steps (slots staggered, so tasks change one slot at a time), restarting its
problems. Which task a slot holds is a pure function of the seed and the step.
"""
from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any

import jax

from selfopt.cache import COMPILER_OPTIONS
from selfopt.population.state import SLOT_PROBLEMS, SLOT_TASK, step_key
from selfopt.tasks import make_task

if TYPE_CHECKING:
    from selfopt.config import TrainConfig


@functools.partial(jax.jit, static_argnames=("lopt", "estimator"),
                   compiler_options=COMPILER_OPTIONS)
def init_problems(lopt, estimator, task, thetas, key):
    """Fresh inner problems for every member on ``task`` (leading axes K, pairs)."""
    keys = jax.random.split(key, jax.tree.leaves(thetas)[0].shape[0])
    return jax.vmap(estimator.init_state, in_axes=(None, None, 0, 0))(lopt, task, thetas, keys)


@functools.lru_cache(maxsize=64)
def _task(name: str):
    return make_task(json.loads(name))


def task(config: dict):
    """The task of a configuration (built once while it is in use)."""
    return _task(json.dumps(config, sort_keys=True))


def slot_of(cfg: TrainConfig, step: int) -> int:
    """The slot that outer step ``step`` works on."""
    return (step // cfg.steps_per_call) % cfg.num_slots


def slot_config(cfg: TrainConfig, slot: int, step: int) -> dict:
    """The task slot ``slot`` holds at ``step``, drawn from the task distribution; slots draw
    anew every ``task_steps``, staggered."""
    epoch = (step + slot * cfg.task_steps // cfg.num_slots) // cfg.task_steps
    return cfg.tasks.sample(step_key(cfg.seed, epoch, SLOT_TASK + slot))


def fresh_problems(cfg: TrainConfig, config: dict, slot: int, step: int, thetas: Any) -> Any:
    """Every member's new inner problems on the task ``config`` of ``slot`` at ``step``."""
    return init_problems(cfg.lopt, cfg.estimator, task(config), thetas,
                         step_key(cfg.seed, step, SLOT_PROBLEMS + slot))

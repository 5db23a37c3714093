"""The task protocol: an inner problem that a learned optimizer trains.

A task is a frozen dataclass registered as a JAX pytree. Its *static* fields (sizes, widths,
batch size, a recurrent cell) decide array shapes and code, so they are part of the pytree
structure; its *array* fields (the data set, a quadratic's matrix, the index of an activation or
a test function) are leaves. A jitted function that takes a task as an argument therefore
compiles once per task shape and is reused for every other instance (another seed, another
conditioning, data set or activation) of that shape, and the data arrays are passed in rather
than baked into the compiled program as constants.

Every method is a pure function of its arguments, so unrolls ``jit``, ``vmap`` and ``scan``:

* ``init(key) -> params``: fresh parameters (any pytree of float arrays);
* ``sample_batch(key, split) -> batch``: a minibatch as a pure function of a PRNG key;
* ``loss(params, batch) -> scalar``: the training objective on one batch;
* ``normalize(loss, init_loss)``: the loss on a scale comparable across tasks.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

Params = Any
Batch = Any
SPLITS = ("train", "test")


def static_field(default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that is part of the pytree structure (it decides shapes or code)."""
    return dataclasses.field(default=default, metadata={"static": True})


def task_dataclass(cls: type) -> type:
    """Makes ``cls`` a frozen dataclass and registers it as a pytree.

    Fields created with :func:`static_field` become pytree metadata; all others are leaves.
    Equality is identity (``eq=False``) because leaves are arrays.
    """
    cls = dataclasses.dataclass(frozen=True, eq=False)(cls)
    return jax.tree_util.register_dataclass(cls)


class Task:
    """Base class of every task; subclasses are decorated with :func:`task_dataclass`."""

    #: The family name used in task configurations (``"mlp"``, ``"quadratic"``, ...).
    family: ClassVar[str] = "task"
    #: A lower bound of the loss (the known minimum where there is one, else 0).
    loss_floor: ClassVar[float] = 0.0

    def init(self, key: jax.Array) -> Params:
        raise NotImplementedError

    def sample_batch(self, key: jax.Array, split: str = "train") -> Batch:
        raise NotImplementedError

    def loss(self, params: Params, batch: Batch) -> jax.Array:
        raise NotImplementedError

    def normalize(self, loss: jax.Array, init_loss: jax.Array) -> jax.Array:
        """Loss relative to the loss at initialisation: 1 at the start, 0 at the floor.

        ``(loss - floor) / (init_loss - floor)``, so tasks of different scale count alike in a
        meta-loss (method.md section 3). The denominator is kept positive.
        """
        return (loss - self.loss_floor) / jnp.maximum(init_loss - self.loss_floor, 1e-8)

    @property
    def shape_key(self) -> Any:
        """Hashable description of everything that decides compiled shapes (the pytree
        structure plus leaf shapes and dtypes): tasks with equal keys share compiled code."""
        leaves, treedef = jax.tree_util.tree_flatten(self)
        return treedef, tuple((x.shape, str(x.dtype)) for x in leaves)

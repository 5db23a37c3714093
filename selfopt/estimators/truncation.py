"""Truncation schedules: how long each inner problem runs before it restarts.

An inner problem is trained for a sampled number of steps, cut into truncations of a fixed
length; the meta-gradient is estimated on one truncation at a time (method.md section 3).
Lengths are sampled inside ``jit`` from a key, so every inner problem in a batch can have its own.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ConstantLength:
    """Every inner problem runs ``length`` steps."""

    length: int = 200

    def __post_init__(self):
        if self.length < 1:
            raise ValueError(f"ConstantLength.length must be >= 1, got {self.length}")

    def sample(self, key: jax.Array) -> jax.Array:
        del key
        return jnp.asarray(self.length, jnp.int32)


@dataclasses.dataclass(frozen=True)
class LogUniformLength:
    """Inner lengths drawn log-uniformly from ``[min_length, max_length]``.

    Many short problems and a few long ones, as learned_optimization's truncation schedules;
    a learned optimizer then sees both early and late phases of training.
    """

    min_length: int = 100
    max_length: int = 1000

    def __post_init__(self):
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(
                "LogUniformLength needs 1 <= min_length <= max_length, got "
                f"min_length={self.min_length}, max_length={self.max_length}")

    def sample(self, key: jax.Array) -> jax.Array:
        log_len = jax.random.uniform(key, minval=math.log(self.min_length),
                                     maxval=math.log(self.max_length))
        return jnp.round(jnp.exp(log_len)).astype(jnp.int32)


LengthSchedule = ConstantLength | LogUniformLength

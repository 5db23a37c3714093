"""The hierarchical learned optimizer: a per-tensor recurrent cell that sets each tensor's step
length over a run, on top of the per-parameter MLP (method.md section 2).

The design line of Metz et al. 2020 ("Tasks, stability, architecture, and compute", section 3,
the LSTM_FF optimizer), which the 2021 self-training paper, VeLO and Celo's step-size scheduler
follow. The per-parameter MLP of :mod:`selfopt.lopt.mlp_lopt` chooses every parameter's step
from scale-free features, so by itself it cannot lengthen or shorten its steps as a run goes on.
Here a small GRU cell, one state per tensor ``T``, reads tensor-level statistics and features of
the loss, and its output sets a log step size ``s_T`` that multiplies the MLP's step:

    h_T <- GRU(h_T, x_T),    s_T = w . h_T + b,    delta_T = exp(s_T) * delta_T^MLP

with ``w, b`` zero at initialisation, so a fresh optimizer takes the MLP's steps and the cell
learns from there which length each moment of a run wants. Inputs ``x_T`` (``F`` of them,
:attr:`HierarchicalLOpt.num_cell_features`), each of order one:

1. ``log(rms(.) + 1e-12) / 5``, clipped to ``[-5, 5]``, of the tensor's gradient, parameters
   and ``sqrt(v)``: its absolute scale, which the MLP's per-tensor normalisation removes;
2. ``rms(m_k) / (rms(g) + eps)`` for the momentum decays 0.9 and 0.99: near 1 for a consistent
   gradient, near ``sqrt((1 - b) / (1 + b))`` for noise;
3. ``log(size) / 10`` and whether the tensor is a matrix (one or the other kind of weight);
4. **the loss** ``l`` (the protocol's ``loss``): ``(l - mu_k) / sigma_k``, clipped to
   ``[-5, 5]``, against a running mean ``mu_k`` and deviation ``sigma_k`` at each of
   :attr:`~HierarchicalLOpt.loss_decays` (bias corrected): below zero the loss is falling
   faster than it has, above it rising; shift and scale free, so it reads a task's loss and a
   member's meta-loss alike (learned_optimization's RNN-MLP optimizer normalises its loss the
   same way);
5. the fraction of training done, ``t / num_steps`` when the horizon is known (else 0), and
   whether it is known;
6. ``log(1 + t) / 10``.

Items 4-6 are the same for every tensor. In self-training the "loss" a member's optimizer sees
when it updates a member is that member's meta-loss and the "gradient" its ES estimate (method.md
section 4), so the same cell can set the length of the members' own steps.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import optax

from selfopt.checks import as_tuple, check_int, is_number, require
from selfopt.lopt.base import Theta
from selfopt.lopt.mlp_lopt import EPS, MLPLOpt

#: Momentum decays whose consistency (item 2) the cell reads; each must be one of the MLP's.
CONSISTENCY_DECAYS = (0.9, 0.99)


class HierarchicalLOptState(NamedTuple):
    """Accumulators of :class:`HierarchicalLOpt`: the MLP's, the cell's and the loss's."""

    momenta: Any  # pytree like params; each leaf (*param.shape, len(decays))
    rms: Any  # pytree like params: running mean of the squared gradient
    step: jax.Array  # int32 scalar: number of updates applied so far
    hidden: jax.Array  # (num_tensors, cell_size): the GRU state of every tensor
    loss_mean: jax.Array  # (len(loss_decays),) running means of the loss (not bias corrected)
    loss_var: jax.Array  # (len(loss_decays),) running mean squared deviations
    horizon: jax.Array  # float32: the run's number of updates, 0 when unknown


@dataclasses.dataclass(frozen=True)
class HierarchicalLOpt(MLPLOpt):
    """Per-parameter MLP with a per-tensor GRU that sets each tensor's log step size (see the
    module docstring for the maths).

    Attributes (besides :class:`MLPLOpt`'s):
      cell_size: units of the per-tensor GRU (its weights: ``3 * cell_size * (F + cell_size
        + 1)`` plus the ``cell_size + 1`` of the step head).
      loss_decays: decays of the running mean and deviation of the loss (item 4).
    """

    kind: ClassVar[str] = "hierarchical"

    cell_size: int = 8
    loss_decays: tuple[float, ...] = (0.9, 0.99)

    def __post_init__(self):
        super().__post_init__()
        as_tuple(self, "loss_decays")
        check_int(self, "cell_size", 1, 256)
        require("loss_decays", isinstance(self.loss_decays, tuple) and len(self.loss_decays) >= 1
                and all(is_number(b) and 0 < b < 1 for b in self.loss_decays),
                "one or more numbers in (0, 1)", self.loss_decays)
        require("decays", all(b in self.decays for b in CONSISTENCY_DECAYS),
                f"a list that includes {list(CONSISTENCY_DECAYS)} (the hierarchical cell reads "
                "their momenta)", self.decays)

    @property
    def num_cell_features(self) -> int:
        """``F``: the cell's inputs per tensor (module docstring, items 1-6)."""
        return 3 + len(CONSISTENCY_DECAYS) + 2 + len(self.loss_decays) + 2 + 1

    def init(self, key: jax.Array) -> Theta:
        """Random LO weights: the MLP's (:meth:`MLPLOpt.init`), the GRU's (fan-in scaled normal
        weights, zero biases) and a zero step head (a fresh optimizer takes the MLP's steps).

        Returns:
          ``{"layers": [...], "cell": {"wx": (F, 3H), "wh": (H, 3H), "b": (3H,)},
          "head": {"w": (H,), "b": ()}}``; the gates in the order update, reset, candidate.
        """
        mlp_key, x_key, h_key = jax.random.split(key, 3)
        f, h = self.num_cell_features, self.cell_size
        return {**super().init(mlp_key),
                "cell": {"wx": jax.random.normal(x_key, (f, 3 * h)) / jnp.sqrt(f),
                         "wh": jax.random.normal(h_key, (h, 3 * h)) / jnp.sqrt(h),
                         "b": jnp.zeros(3 * h)},
                "head": {"w": jnp.zeros(h), "b": jnp.zeros([])}}

    def cell(self, theta: Theta, hidden: jax.Array, x: jax.Array) -> jax.Array:
        """One GRU step of every tensor: ``hidden`` ``(T, H)``, inputs ``x`` ``(T, F)``."""
        c, h = theta["cell"], self.cell_size
        gx, gh = x @ c["wx"] + c["b"], hidden @ c["wh"]
        update = jax.nn.sigmoid(gx[:, :h] + gh[:, :h])
        reset = jax.nn.sigmoid(gx[:, h:2 * h] + gh[:, h:2 * h])
        candidate = jnp.tanh(gx[:, 2 * h:] + reset * gh[:, 2 * h:])
        return (1 - update) * hidden + update * candidate

    def tensor_features(self, g: jax.Array, p: jax.Array, m: jax.Array, v: jax.Array,
                        matrix: bool) -> jax.Array:
        """Items 1-3 of one tensor: flattened inputs as :meth:`MLPLOpt.param_features`'s, and
        whether the tensor has two or more dimensions."""
        rms = lambda x: jnp.sqrt(jnp.mean(jnp.square(x)))
        log = lambda x: jnp.clip(jnp.log(x + 1e-12) / 5.0, -5.0, 5.0)
        g_rms = rms(g)
        consistency = [rms(m[:, self.decays.index(b)]) / (g_rms + EPS)
                       for b in CONSISTENCY_DECAYS]
        return jnp.stack([log(g_rms), log(rms(p)), log(jnp.sqrt(jnp.mean(v))), *consistency,
                          jnp.log(jnp.float32(g.size)) / 10.0, jnp.float32(matrix)])

    def loss_features(self, state: HierarchicalLOptState, loss: jax.Array, step: jax.Array
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Items 4-6 and the new running mean and deviation of the loss.

        A non-finite loss reads as far above the mean (feature 5) and leaves the running
        statistics unchanged."""
        decays = jnp.asarray(self.loss_decays)
        loss = jnp.asarray(loss, jnp.float32)
        finite = jnp.isfinite(loss)
        safe = jnp.where(finite, loss, 0.0)
        mean = jnp.where(finite, decays * state.loss_mean + (1 - decays) * safe, state.loss_mean)
        var = jnp.where(finite, decays * state.loss_var + (1 - decays) * jnp.square(safe - mean),
                        state.loss_var)
        correction = 1.0 / (1.0 - decays ** step.astype(jnp.float32))
        z = (safe - mean * correction) * jax.lax.rsqrt(var * correction + 1e-12)
        z = jnp.where(finite, jnp.clip(z, -5.0, 5.0), 5.0)
        known = state.horizon > 0
        fraction = jnp.where(known, jnp.clip(step / jnp.maximum(state.horizon, 1.0), 0.0, 1.0),
                             0.0)
        shared = jnp.concatenate([z, jnp.stack([fraction, known.astype(jnp.float32),
                                                jnp.log1p(step.astype(jnp.float32)) / 10.0])])
        return shared, mean, var

    def optimizer(self, theta: Theta, num_steps: int | jax.Array | None = None
                  ) -> optax.GradientTransformationExtraArgs:
        """The optax optimizer that these weights define (use :func:`as_optax` to check theta).

        Args:
          theta: the LO weights.
          num_steps: the run's number of updates, read by :meth:`init` (the fraction of
            training done); ``None``: unknown.
        """
        def init_fn(params):
            num_tensors = len(jax.tree.leaves(params))
            zeros = jnp.zeros(len(self.loss_decays), jnp.float32)
            return HierarchicalLOptState(
                *self.init_accumulators(params),
                hidden=jnp.zeros((num_tensors, self.cell_size), jnp.float32),
                loss_mean=zeros, loss_var=zeros,
                horizon=jnp.asarray(0 if num_steps is None else num_steps, jnp.float32))

        def update_fn(grads, state, params=None, loss=None, **extra_args):
            del extra_args
            if loss is None:
                raise ValueError("HierarchicalLOpt.update needs loss=...: the cell reads the "
                                 "loss's trend")
            step = state.step + 1
            treedef, p_leaves, steps, (new_m, new_v, flat) = self.leaf_steps(
                theta, grads, state, params, step)
            shared, loss_mean, loss_var = self.loss_features(state, loss, step)
            per_tensor = jnp.stack([self.tensor_features(*f, jnp.ndim(p) >= 2)
                                    for f, p in zip(flat, p_leaves)])
            x = jnp.concatenate([per_tensor,
                                 jnp.broadcast_to(shared, (len(flat), shared.shape[0]))], axis=1)
            hidden = self.cell(theta, state.hidden, x)
            log_step = hidden @ theta["head"]["w"] + theta["head"]["b"]
            updates = [(u * jnp.exp(s)).astype(jnp.result_type(p))
                       for u, s, p in zip(steps, log_step, p_leaves)]
            new_state = HierarchicalLOptState(
                momenta=jax.tree_util.tree_unflatten(treedef, new_m),
                rms=jax.tree_util.tree_unflatten(treedef, new_v), step=step, hidden=hidden,
                loss_mean=loss_mean, loss_var=loss_var, horizon=state.horizon)
            return jax.tree_util.tree_unflatten(treedef, updates), new_state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

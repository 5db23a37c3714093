"""The per-parameter MLP learned optimizer (method.md section 2).

The small MLP of the learned-optimizer literature (learned_optimization's ``MLPLOpt``; Metz et
al. 2020, section 3): for every scalar parameter it reads features built from the gradient, the
parameter and a few accumulators, and emits a direction ``d`` and a log-magnitude ``m``. The
step of a parameter in tensor ``W`` of a model with ``K`` weight matrices is

    delta = -d * exp(exp_mult * m) * step_mult * w(W) * K ** -depth_power,
    w(W) = min(1, width_base / fan_in(W))

(``w`` and the depth factor are 1 for vectors and scalars, and when switched off). The MLP is
shared by all parameters of all tensors, so one set of weights ``theta`` optimises any model.

Features of one parameter tensor, in order (``F = 2 + 3 * len(decays) + 1 + 3 + len(timescales)``):

1. gradient ``g`` and parameter ``p``;
2. momenta ``m_k <- b_k m_k + (1 - b_k) g`` at each decay ``b_k``;
3. RMS ``sqrt(v)`` of the accumulator ``v <- b_v v + (1 - b_v) g^2``;
4. Adam-like normalised momenta ``m_k / sqrt(v + eps)``;
   -- features 1-4 are each divided by their root mean square over the tensor, then clipped to
   ``[-feature_clip, feature_clip]`` (the 2020 paper calls this crucial for stability);
5. log-magnitudes ``log(|x| + 1e-12) / 5`` of ``g``, ``p`` and ``sqrt(v)``, clipped to
   ``[-5, 5]`` **(ours)**: features 1-4 are scale free, these keep the absolute scale;
6. the Adam-like momenta of 4 again, clipped but *not* divided by their RMS over the tensor
   **(ours)**: the per-tensor normalisation of 4 erases what they say about the tensor as a
   whole, a consistent gradient (near 1) or noise (near 0), the signal Adam's steps shrink with;
7. the step count embedded as ``tanh(t / s)`` at timescales ``s`` from 1 to 1e5 steps: the same
   for every parameter (the *shared* features).

The width and depth factors **(ours)** are rules, not learned: maximal update parametrisation
scales Adam's rate as ``1 / fan_in`` (muLO, Therien et al. 2024, derive it for learned
optimizers), and tuned Adam's rate falls with a model's depth. The measurements behind every
choice are in ``docs/results.md``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import optax

from selfopt.checks import as_tuple, check_int, check_number, is_int, is_number, require
from selfopt.lopt.base import Theta, check_float_params

#: Epsilon of the Adam-like ratios and of the per-tensor normalisation.
EPS = 1e-8
#: Above this many parameters the MLP runs over blocks of this many rows (``lax.map``): each
#: block's hidden activations stay in the CPU's cache instead of a round trip to memory per
#: layer; the same numbers, faster (benchmarks/lopt_step.py).
MLP_BLOCK_ROWS = 32768


class MLPLOptState(NamedTuple):
    """Per-parameter accumulators of :class:`MLPLOpt`."""

    momenta: Any  # pytree like params; each leaf (*param.shape, len(decays))
    rms: Any  # pytree like params: running mean of the squared gradient
    step: jax.Array  # int32 scalar: number of updates applied so far


@dataclasses.dataclass(frozen=True)
class MLPLOpt:
    """Per-parameter MLP learned optimizer (see the module docstring for the maths).

    Attributes:
      hidden: widths of the hidden layers (ReLU).
      decays: momentum decays.
      rms_decay: decay of the squared-gradient accumulator.
      timescales: step-count embedding timescales, in steps.
      step_mult: ``c_s``, the scale of a step.
      exp_mult: ``c_m``, how strongly the magnitude output scales the step.
      feature_clip: features 1-4 and 6 are clipped to ``[-feature_clip, feature_clip]``.
      width_base: 0 (off) or a width ``b``: the step of a tensor of two or more dimensions is
        multiplied by ``min(1, b / fan_in)``, ``fan_in`` the product of all but its last
        dimension; an optimizer trained on layers at most ``b`` wide then takes smaller steps
        on wider ones, as tuned Adam does.
      depth_power: 0 (off) or a power ``a``: every step of a model with ``K >= 1`` tensors of two
        or more dimensions is multiplied by ``K ** -a``.
    """

    kind: ClassVar[str] = "mlp"

    hidden: tuple[int, ...] = (32, 32)
    decays: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999, 0.9999)
    rms_decay: float = 0.999
    timescales: tuple[float, ...] = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
    step_mult: float = 1e-3
    exp_mult: float = 1e-3
    feature_clip: float = 5.0
    width_base: int = 32
    depth_power: float = 1.5

    def __post_init__(self):
        as_tuple(self, "hidden", "decays", "timescales")
        require("hidden", isinstance(self.hidden, tuple) and 1 <= len(self.hidden) <= 4
                and all(is_int(w) and 1 <= w <= 1024 for w in self.hidden),
                "1 to 4 layer widths, each in [1, 1024]", self.hidden)
        require("decays", isinstance(self.decays, tuple) and len(self.decays) >= 1
                and all(is_number(b) and 0 < b < 1 for b in self.decays),
                "one or more numbers in (0, 1)", self.decays)
        require("timescales", isinstance(self.timescales, tuple) and len(self.timescales) >= 1
                and all(is_number(s) and s > 0 for s in self.timescales),
                "one or more positive numbers", self.timescales)
        check_number(self, "rms_decay", 0, 1, open_low=True, open_high=True)
        for name in ("step_mult", "exp_mult", "feature_clip"):
            check_number(self, name, 0, 1e3, open_low=True)
        check_int(self, "width_base", 0, 1_000_000, " (0: off)")
        check_number(self, "depth_power", 0, 4, note=" (0: off)")

    def width_factor(self, shape: tuple[int, ...]) -> float:
        """The step multiplier of a tensor of ``shape`` (``width_base``; 1 when off)."""
        if not self.width_base or len(shape) < 2:
            return 1.0
        return min(1.0, self.width_base / math.prod(shape[:-1]))

    def depth_factor(self, depth: int) -> float:
        """The step multiplier of every tensor of a model with ``depth`` weight tensors (tensors
        of two or more dimensions): ``depth ** -depth_power``; 1 without any, or when off."""
        if not self.depth_power or depth < 1:
            return 1.0
        return float(depth) ** -self.depth_power

    @property
    def num_features(self) -> int:
        return 2 + 3 * len(self.decays) + 1 + 3 + len(self.timescales)

    @property
    def num_shared_features(self) -> int:
        """Features that are the same for every parameter (7 of the module docstring)."""
        return len(self.timescales)

    def init(self, key: jax.Array) -> Theta:
        """Random LO weights: fan-in scaled normal weights and zero biases.

        Returns:
          ``{"layers": [{"w": (fan_in, fan_out), "b": (fan_out,)}, ...]}``; the last layer has
          two outputs, direction and log-magnitude.
        """
        sizes = (self.num_features, *self.hidden, 2)
        keys = jax.random.split(key, len(sizes) - 1)
        return {"layers": [
            {"w": jax.random.normal(k, (n_in, n_out)) / jnp.sqrt(n_in), "b": jnp.zeros(n_out)}
            for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:])]}

    def param_features(self, g: jax.Array, p: jax.Array, m: jax.Array, v: jax.Array
                       ) -> jax.Array:
        """The ``(n, num_features - num_shared_features)`` per-parameter inputs of one tensor.

        Args:
          g, p, v: gradient, parameter and squared-gradient accumulator, flattened ``(n,)``.
          m: momenta ``(n, len(decays))``.
        """
        rms = jnp.sqrt(v)
        adam = m / jnp.sqrt(v + EPS)[:, None]
        # Built as (n, features) directly: no transpose of the largest array in the update.
        scaled = jnp.concatenate([g[:, None], p[:, None], m, rms[:, None], adam], axis=1)
        scaled = scaled * jax.lax.rsqrt(jnp.mean(jnp.square(scaled), axis=0) + EPS)
        scaled = jnp.clip(scaled, -self.feature_clip, self.feature_clip)
        magnitudes = jnp.clip(jnp.log(jnp.abs(jnp.stack([g, p, rms], axis=1)) + 1e-12) / 5.0,
                              -5.0, 5.0)
        raw_adam = jnp.clip(adam, -self.feature_clip, self.feature_clip)
        return jnp.concatenate([scaled, magnitudes, raw_adam], axis=1)

    def shared_features(self, step: jax.Array) -> jax.Array:
        """``tanh(step / s)`` for every timescale ``s``."""
        return jnp.tanh(step.astype(jnp.float32) / jnp.asarray(self.timescales))

    def features(self, g: jax.Array, p: jax.Array, m: jax.Array, v: jax.Array,
                 step: jax.Array) -> jax.Array:
        """All ``(n, num_features)`` inputs of one tensor, in the order of the module docstring
        (the update computes the same without materialising the shared columns)."""
        time = jnp.broadcast_to(self.shared_features(step), (g.shape[0], len(self.timescales)))
        return jnp.concatenate([self.param_features(g, p, m, v), time], axis=1)

    def apply_mlp(self, theta: Theta, x: jax.Array, step: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
        """Runs the shared MLP; returns direction and magnitude, each ``(n,)``.

        Args:
          theta: the LO weights.
          x: ``(n, num_features)`` inputs, or, with ``step`` given, the ``(n, num_features -
            num_shared_features)`` per-parameter inputs: the shared features are the same for
            every parameter, so their share of the first layer is computed once and added to
            its bias (the same result, fewer FLOPs per parameter).
          step: the step count, when ``x`` holds only the per-parameter inputs.
        """
        first, *hidden, last = theta["layers"]
        if step is None:
            w0, b0 = first["w"], first["b"]
        else:
            split = x.shape[1]
            w0 = first["w"][:split]
            b0 = self.shared_features(step) @ first["w"][split:] + first["b"]

        def mlp(x):
            x = jax.nn.relu(x @ w0 + b0)
            for layer in hidden:
                x = jax.nn.relu(x @ layer["w"] + layer["b"])
            return x @ last["w"] + last["b"]

        n = x.shape[0]
        if n <= MLP_BLOCK_ROWS:
            out = mlp(x)
        else:  # row blocks whose hidden activations stay in cache; the same numbers
            whole = n - n % MLP_BLOCK_ROWS
            out = jax.lax.map(mlp, x[:whole].reshape(-1, MLP_BLOCK_ROWS, x.shape[1]))
            out = jnp.concatenate([out.reshape(whole, -1), mlp(x[whole:])])
        return out[:, 0], out[:, 1]

    def init_accumulators(self, params: Any) -> tuple[Any, Any, jax.Array]:
        """Zero momenta (one per decay) and RMS accumulators like ``params``, and step 0."""
        check_float_params(params)
        k = len(self.decays)
        return (jax.tree.map(lambda p: jnp.zeros((*jnp.shape(p), k), jnp.float32), params),
                jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params),
                jnp.zeros([], jnp.int32))

    def leaf_steps(self, theta: Theta, grads: Any, state: Any, params: Any, step: jax.Array
                   ) -> tuple[Any, list, list[jax.Array], tuple[list, list, list]]:
        """The MLP's step for every tensor, before any per-tensor scale of a subclass.

        Args:
          theta: the LO weights.
          grads, params: the model's gradient and parameters (pytrees of one structure).
          state: the accumulators (``momenta``, ``rms``) before this update.
          step: the count of this update (1 for the first).

        Returns:
          The treedef of ``params``, its leaves, each leaf's float32 step (shaped like it, width
          and depth factors applied), and the new momenta and RMS leaves with the flat
          ``(g, p, m, v)`` of every leaf (what a per-tensor statistic reads).
        """
        if params is None:
            raise ValueError(f"{type(self).__name__}.update needs params: the parameter value "
                             "is a feature")
        check_float_params(grads, "grads")
        k, decays = len(self.decays), jnp.asarray(self.decays)
        g_leaves, treedef = jax.tree_util.tree_flatten(grads)
        p_leaves = treedef.flatten_up_to(params)
        m_leaves = treedef.flatten_up_to(state.momenta)
        v_leaves = treedef.flatten_up_to(state.rms)

        new_m, new_v, flat, feats = [], [], [], []
        for g, p, m, v in zip(g_leaves, p_leaves, m_leaves, v_leaves):
            flat_g, flat_p = jnp.ravel(g).astype(jnp.float32), jnp.ravel(p).astype(jnp.float32)
            flat_m = decays * m.reshape(-1, k) + (1 - decays) * flat_g[:, None]
            flat_v = self.rms_decay * jnp.ravel(v) + (1 - self.rms_decay) * jnp.square(flat_g)
            feats.append(self.param_features(flat_g, flat_p, flat_m, flat_v))
            flat.append((flat_g, flat_p, flat_m, flat_v))
            new_m.append(flat_m.reshape(m.shape))
            new_v.append(flat_v.reshape(v.shape))

        # One MLP call over the parameters of all tensors at once (one matmul, not one per leaf).
        direction, magnitude = self.apply_mlp(theta, jnp.concatenate(feats), step)
        steps = -direction * jnp.exp(self.exp_mult * magnitude) * self.step_mult
        depth_factor = self.depth_factor(sum(jnp.ndim(p) >= 2 for p in p_leaves))
        updates, offset = [], 0
        for p in p_leaves:
            size = jnp.size(p)
            update = steps[offset:offset + size].reshape(jnp.shape(p))
            factor = self.width_factor(jnp.shape(p)) * depth_factor
            updates.append(update * factor if factor != 1.0 else update)
            offset += size
        return treedef, p_leaves, updates, (new_m, new_v, flat)

    def optimizer(self, theta: Theta, num_steps: int | jax.Array | None = None
                  ) -> optax.GradientTransformationExtraArgs:
        """The optax optimizer that these weights define (use :func:`as_optax` to check theta).

        Args:
          theta: the LO weights.
          num_steps: the run's number of updates (the protocol's; this architecture does not
            read it).
        """
        del num_steps

        def init_fn(params):
            return MLPLOptState(*self.init_accumulators(params))

        def update_fn(grads, state, params=None, **extra_args):
            del extra_args  # the loss: this architecture does not read it
            step = state.step + 1
            treedef, p_leaves, steps, (new_m, new_v, _) = self.leaf_steps(theta, grads, state,
                                                                         params, step)
            updates = [u.astype(jnp.result_type(p)) for u, p in zip(steps, p_leaves)]
            new_state = MLPLOptState(momenta=jax.tree_util.tree_unflatten(treedef, new_m),
                                     rms=jax.tree_util.tree_unflatten(treedef, new_v), step=step)
            return jax.tree_util.tree_unflatten(treedef, updates), new_state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)


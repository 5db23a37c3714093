"""The per-parameter MLP learned optimizer (method.md section 2).

The small MLP of the learned-optimizer literature (learned_optimization's ``MLPLOpt``, Metz et
al. 2020/2021): for every scalar parameter it reads features built from the gradient, the
parameter and a few accumulators, and emits a direction ``d`` and a log-magnitude ``m``; the
step is ``-d * exp(exp_mult * m) * step_mult`` (with ``width_base``, times a per-tensor width
factor; with ``depth_power``, times a per-model depth factor; with ``ratio_step_scale``, times
a per-tensor factor that shrinks as the gradient does). The MLP is shared by all
parameters of all tensors, so one set of weights ``theta`` (2,018 floats at the defaults)
optimises any model.

Features of one parameter tensor, in order (``F = 2 + 2 * len(decays) + 1 + 3 + len(timescales)``
``+ len(decays)`` with ``raw_adam_features``, less 3 without ``magnitude_features``, plus 2 each
with ``horizon_features``, ``tensor_features`` and ``loss_features``, plus 1 with
``depth_features``; 27 at the defaults):

1. gradient ``g`` and parameter ``p``;
2. momenta ``m_k <- b_k m_k + (1 - b_k) g`` at each decay ``b_k``;
3. RMS ``sqrt(v)`` of the accumulator ``v <- b_v v + (1 - b_v) g^2``;
4. Adam-like normalised momenta ``m_k / sqrt(v + eps)``;
   -- features 1-4 are each divided by their root mean square over the tensor, then clipped to
   ``[-feature_clip, feature_clip]`` (the 2020 paper calls this crucial for stability);
5. with ``magnitude_features`` (default on): log-magnitudes ``log(|x| + 1e-12) / 5`` of ``g``,
   ``p`` and ``sqrt(v)``, clipped to ``[-5, 5]`` **(ours)**: the normalised features above are
   scale free, these keep the absolute scale (``|x|`` from about 1e-11 to 7e10 is represented);
   without them the step does not depend on the gradient's scale (beyond the epsilons);
6. with ``raw_adam_features`` **(ours)**: the Adam-like momenta ``m_k / sqrt(v + eps)`` again,
   clipped to ``[-feature_clip, feature_clip]`` but *not* divided by their RMS over the tensor.
   They are scale free already; the per-tensor normalisation of feature 4 keeps their RMS at 1
   and so erases what they say about the tensor as a whole: a consistent gradient (near 1) or
   noise and oscillation (near 0), the signal Adam's own steps shrink with. Measured in
   ``docs/results.md``: the best held-out margin of a 6-minute run fell from 1.51 to 1.21
   (seed 0) and from 1.83 to 1.33 (seed 1);
6b. with ``tensor_features`` **(ours)**: the tensor's shape, ``log(fan_in) / 5`` and
   ``log(fan_out) / 5``, with ``fan_out`` its last dimension and ``fan_in`` the product of the
   others (1 for a vector or a scalar): the same for every parameter of a tensor, so the
   optimizer can tell a bias from a weight and a layer's width (a logistic regression's one
   10-output layer from an MLP's hidden layers);
7. the step count embedded as ``tanh(t / s)`` at timescales ``s`` from 1 to 1e5 steps;
8. with ``horizon_features`` **(ours, as VeLO, Metz et al. 2022)**: the fraction of training done,
   ``f = t / T`` clipped to [0, 1], and ``f ** 3``, where ``T`` is the number of updates the run
   will take, given as ``optimizer(theta, num_steps=T)``. Knowing how much of its budget is
   left lets the optimizer learn a schedule (large steps early, small ones at the end), which
   Adam with one constant learning rate does not have;
9. with ``loss_features`` **(ours)**: the trend of the training loss ``L`` the optimizer is given
   (``update(..., loss=L)``), scale and shift free: with exponential moving averages ``F`` and
   ``S`` of ``L`` (decays 0.9 and 0.99, both starting at the first loss) and ``D``, the
   bias-corrected moving average (0.99) of ``|L - S|``, the features are ``(F - S) / D`` (is the
   loss falling or rising, relative to its noise?) and ``(L - S) / D``, each clipped to
   ``[-feature_clip, feature_clip]``. They let the optimizer see what a per-task learning-rate
   search sees, whether its steps make progress on this task, and adapt its step to it.

10. with ``depth_features`` **(ours)**: the model's depth as ``1 / (1 + K)``, with ``K`` the
   number of its parameter tensors of two or more dimensions (its weight matrices and
   kernels: 0 for a quadratic, 1 for a logistic regression, 3 for an MLP with two hidden
   layers; the reciprocal keeps models deeper than the training ones near the trained range).
   Tuned Adam's rate falls with depth (0.24 for the held-out logistic regression, 0.03 for the
   one-hidden-layer training MLPs, 0.007 for the held-out 128-64 MLP), and the per-parameter
   features of a logistic regression's weights look like those of an MLP's last layer: a
   learned optimizer trained on logistic regression alone wins it, one trained on the mix
   steps a compromise between the two (``docs/results.md``, run 92; runs 93-100 measure this
   feature and ``depth_power``).

Features 7-10 are the same for every parameter (the *shared* features).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from selfopt.lopt.base import Theta, check_float_params

_EPS = 1e-8
#: Decays of the loss trend's fast and slow moving averages (feature 9).
LOSS_DECAYS = (0.9, 0.99)
#: The momentum decay whose Adam-like ratio sets the step's scale with ``ratio_step_scale``
#: (Adam's own ``b1``).
RATIO_DECAY = 0.9
#: With ``step_adaptation``: the bound on each tensor's log step scale (``e ** 5``, about 150x,
#: either way: a wider range than tuned Adam's rates span on the quick suite, 0.007 to 1).
ADAPTATION_CLIP = 5.0
#: The fixed schedules of the step over a run (``step_schedule``).
STEP_SCHEDULES = ("constant", "linear")


class MLPLOptState(NamedTuple):
    """Per-parameter accumulators of :class:`MLPLOpt`."""

    momenta: Any  # pytree like params; each leaf (*param.shape, len(decays))
    rms: Any  # pytree like params: running mean of the squared gradient
    step: jax.Array  # int32 scalar: number of updates applied so far
    # float32 scalar: the updates the run will take (with horizon_features; else None, no leaf)
    horizon: Any = None
    # float32 (3,): the loss's fast and slow moving averages and its mean absolute deviation
    # from the slow one (with loss_features; else None, no leaf)
    loss_stats: Any = None
    # pytree like params, one float32 scalar per tensor: the log of the tensor's step scale
    # (with step_adaptation; else None, no leaf)
    log_scales: Any = None


@dataclasses.dataclass(frozen=True)
class MLPLOpt:
    """Per-parameter MLP learned optimizer.

    Attributes:
      hidden: widths of the hidden layers (ReLU).
      decays: momentum decays.
      rms_decay: decay of the squared-gradient accumulator.
      timescales: step-count embedding timescales, in steps.
      step_mult: ``c_s``, the scale of a step.
      exp_mult: ``c_m``, how strongly the magnitude output scales the step.
      feature_clip: features 1-4 and 6 are clipped to ``[-feature_clip, feature_clip]``.
      eps: the epsilon of the Adam-like ratios ``m_k / sqrt(v + eps)`` (features 4 and 6) and of
        the per-tensor normalisation ``x / sqrt(mean(x ** 2) + eps)`` (features 1-4). The
        default 1e-8 is not small beside a tiny gradient's square: where the gradient's RMS
        is 1e-4 (the autoencoders), both are attenuated about 1.4x, at 2.5e-5 about 4x, so the
        features meant to be scale free still read the gradient's scale there. 1e-20 keeps
        them scale free down to gradients of about 1e-9.
      raw_adam_features: also read the Adam-like momenta ``m_k / sqrt(v)`` without the
        per-tensor normalisation (feature 6 of the module docstring).
      magnitude_features: read the log-magnitudes of feature 5 (off: the LO sees only
        scale-free features and the step count).
      horizon_features: read the fraction of training done (feature 8); the optimizer then
        needs ``num_steps``, the run's number of updates.
      tensor_features: read the tensor's fan-in and fan-out (feature 6b).
      bias_correction: read the momenta and the accumulator divided by ``1 - b ** t``, as Adam
        does (the state keeps them uncorrected): without it, early in a run ``v`` is a fraction
        ``1 - rms_decay ** t`` of the gradient's mean square (3% at step 30, 26% at step 300),
        so the raw Adam-like features (6) and ``log(sqrt(v))`` (5) drift with the step count.
        Features 1-4 are divided by their RMS over the tensor, which cancels the correction
        (up to the epsilon in ``sqrt(v + eps)``).
      loss_features: read the trend of the training loss (feature 9); every update then needs
        ``loss=``, the loss at ``params``.
      depth_features: read the model's depth, ``1 / (1 + K)`` for ``K`` tensors of two or more
        dimensions (feature 10), from the shapes of ``params``.
      width_base: 0 (off) or a width ``b``: the step of every tensor with two or more
        dimensions is multiplied by ``min(1, b / fan_in)`` (``fan_in``: the product of all but
        its last dimension, as in feature 6b), as maximal update parametrisation scales Adam's
        learning rate with a layer's width (muLO, Therien et al. 2024, derive it for learned
        optimizers). An optimizer trained on layers at most ``b`` wide then takes smaller steps
        on wider ones, as tuned Adam does (its rate for the held-out 128-64 MLP is 0.007, for
        the 32-wide training MLPs 0.03). Vectors and scalars (biases, quadratics) are not scaled.
      depth_power: 0 (off) or a power ``a``: the step of every tensor of a model with ``K >= 1``
        tensors of two or more dimensions (:meth:`depth`) is multiplied by ``K ** -a``, as
        tuned Adam's rate falls with depth (0.24 for the held-out logistic regression, ``K =
        1``; 0.03 for the training MLPs, ``K = 2``; 0.007 for the held-out 128-64 MLP, ``K =
        3``). A rule, like ``width_base``: nothing to learn, where ``depth_features`` leaves
        the learned optimizer to find the dependence. Default 1.5 (a training grid with one-
        and two-layer MLPs; runs 118-121 of docs/results.md, against 1 and 2).
      ratio_step_scale: multiply the step of every tensor by ``r``, the root mean square over
        the tensor of the Adam-like ratio ``m / sqrt(v + eps)`` at decay :data:`RATIO_DECAY`
        (clipped as feature 6). The features the MLP reads are mostly scale free, so its
        output, and the step, stay as large near a minimum as far from it: on a deterministic
        problem the learned optimizer hovers where Adam, whose ``v`` remembers the larger
        gradients of the past, keeps converging (Himmelblau, the noise-free quadratic). For a
        constant gradient ``r`` is 5 (the clip) up to step 40 and then falls towards 1
        (2.0 at step 300, 1.3 at 1,000: ``v`` starts at zero); for pure noise it is 1.3 at
        step 30, 0.46 at 300, 0.29 at 1,000; and it falls with the gradient once that shrinks
        below its remembered size: the step's scale that Adam's own step has (without bias
        correction), with the direction left to the MLP.
      ratio_step_knee: with ``ratio_step_scale``, 0 (the factor is ``r``) or a level ``k``: the
        factor is ``min(1, r / k)``, so a step shrinks only once ``r`` falls below ``k``. With
        ``k`` below the noise level of ``r`` (0.46 at step 300), a stochastic problem keeps the
        learned optimizer's own step, and a deterministic one whose gradient falls below what
        ``v`` remembers still converges.
      step_adaptation: 0 (off) or a rate ``eta`` **(ours)**: the MLP has a third output ``a``
        and every tensor a log step scale ``s`` in the state (0 at the start of a run), updated
        before each step as ``s <- clip(s + eta * tanh(mean(a)), -ADAPTATION_CLIP,
        ADAPTATION_CLIP)`` with the mean over the tensor's parameters; the tensor's step is
        multiplied by ``exp(s)``. The features give the optimizer one step size with little
        adaptation (3- to 4-fold over the quick suite, where tuned Adam's rates span 140-fold:
        docs/results.md); the scale lets it raise or lower a tensor's step over the run as a
        per-task rate search would, integrating a small output over many steps. The third
        output's last-layer weights start at zero (the rest of the weights are random), so a
        random optimizer starts without adaptation, which ES then has to find useful.
        Self-training's members update each other without it
        (:attr:`~selfopt.population.self_training.SelfTraining.outer_lopt`).
      step_schedule: ``"constant"`` (the default) or ``"linear"`` **(ours)**: every step is
        multiplied by ``1 - (t - 1) / T`` at update ``t`` of a run of ``T`` updates
        (:meth:`schedule_factor`; the optimizer then needs ``num_steps``), the linear decay to
        zero of the literature's learning-rate schedules. A fixed rule, not learned: the
        learned optimizer can read the fraction of training done (``horizon_features``) and
        its own state across a run (``step_adaptation``), but truncated ES rewards what a step
        gains within a 20-step truncation and not what it costs later, and both learned
        schedules grew the step instead (docs/results.md). Tuned Adam with the same decay
        beats tuned constant-rate Adam on 5 of the 9 quick-suite tasks. Self-training's members
        update each other without it (their training is open-ended).
    """

    hidden: tuple[int, ...] = (32, 32)
    decays: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999, 0.9999)
    rms_decay: float = 0.999
    timescales: tuple[float, ...] = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
    step_mult: float = 1e-3
    exp_mult: float = 1e-3
    feature_clip: float = 5.0
    eps: float = _EPS
    raw_adam_features: bool = True
    magnitude_features: bool = True
    horizon_features: bool = False
    tensor_features: bool = False
    bias_correction: bool = False
    loss_features: bool = False
    depth_features: bool = False
    width_base: int = 32
    depth_power: float = 1.5
    ratio_step_scale: bool = False
    ratio_step_knee: float = 0.0
    step_adaptation: float = 0.0
    step_schedule: str = "constant"

    def __post_init__(self):
        if not self.hidden or any(not isinstance(w, int) or w < 1 for w in self.hidden):
            raise ValueError(f"MLPLOpt.hidden must be one or more positive widths, got {self.hidden}")
        if (not isinstance(self.width_base, int) or isinstance(self.width_base, bool)
                or self.width_base < 0):
            raise ValueError(f"MLPLOpt.width_base must be 0 (off) or a positive width, "
                             f"got {self.width_base!r}")
        if (not isinstance(self.depth_power, numbers.Real) or isinstance(self.depth_power, bool)
                or not 0 <= self.depth_power <= 4):
            raise ValueError(f"MLPLOpt.depth_power must be a number in [0, 4] (0: off), "
                             f"got {self.depth_power!r}")
        if self.ratio_step_scale and RATIO_DECAY not in self.decays:
            raise ValueError(f"MLPLOpt.ratio_step_scale needs the momentum decay {RATIO_DECAY} "
                             f"in decays, got {self.decays}")
        if (not isinstance(self.ratio_step_knee, numbers.Real)
                or isinstance(self.ratio_step_knee, bool) or not 0 <= self.ratio_step_knee <= 5):
            raise ValueError(f"MLPLOpt.ratio_step_knee must be a number in [0, 5] (0: the "
                             f"factor is r itself), got {self.ratio_step_knee!r}")
        if self.ratio_step_knee and not self.ratio_step_scale:
            raise ValueError("MLPLOpt.ratio_step_knee needs ratio_step_scale=True")
        if (not isinstance(self.step_adaptation, numbers.Real)
                or isinstance(self.step_adaptation, bool) or not 0 <= self.step_adaptation <= 1):
            raise ValueError(f"MLPLOpt.step_adaptation must be a number in [0, 1] (0: off), "
                             f"got {self.step_adaptation!r}")
        if self.step_schedule not in STEP_SCHEDULES:
            raise ValueError(f"MLPLOpt.step_schedule must be one of {list(STEP_SCHEDULES)}, "
                             f"got {self.step_schedule!r}")

    def width_factor(self, shape: tuple[int, ...]) -> float:
        """The step multiplier of a tensor of ``shape`` (``width_base``; 1 when off)."""
        if not self.width_base or len(shape) < 2:
            return 1.0
        return min(1.0, self.width_base / math.prod(shape[:-1]))

    def depth_factor(self, depth: int) -> float:
        """The step multiplier of every tensor of a model of ``depth`` weight tensors
        (:meth:`depth`): ``depth ** -depth_power``, 1 for a model without any (or when off)."""
        if not self.depth_power or depth < 1:
            return 1.0
        return float(depth) ** -self.depth_power

    def ratio_scale(self, m: jax.Array, v: jax.Array) -> jax.Array:
        """The step factor of ``ratio_step_scale``: ``r``, or ``min(1, r / ratio_step_knee)``
        with a knee. ``r`` is the RMS of the clipped ratio ``m / sqrt(v + eps)`` of
        one tensor's momentum at :data:`RATIO_DECAY` (``m``: ``(n, len(decays))``, ``v``:
        ``(n,)``, as the features read them)."""
        ratio = m[:, self.decays.index(RATIO_DECAY)] / jnp.sqrt(v + self.eps)
        ratio = jnp.clip(ratio, -self.feature_clip, self.feature_clip)
        r = jnp.sqrt(jnp.mean(jnp.square(ratio)))
        return jnp.minimum(1.0, r / self.ratio_step_knee) if self.ratio_step_knee else r

    @property
    def num_features(self) -> int:
        return (2 + 2 * len(self.decays) + 1 + (3 if self.magnitude_features else 0)
                + len(self.timescales) + (len(self.decays) if self.raw_adam_features else 0)
                + (2 if self.horizon_features else 0) + (2 if self.tensor_features else 0)
                + (2 if self.loss_features else 0) + (1 if self.depth_features else 0))

    @staticmethod
    def depth(shapes) -> int:
        """``K`` of feature 10: how many of ``shapes`` have two or more dimensions."""
        return sum(len(shape) >= 2 for shape in shapes)

    def init(self, key: jax.Array) -> Theta:
        """Random LO weights: fan-in scaled normal weights and zero biases.

        Returns:
          ``{"layers": [{"w": (fan_in, fan_out), "b": (fan_out,)}, ...]}``; the last layer has
          two outputs, direction and log-magnitude, and with ``step_adaptation`` a third, the
          step scale's rate, whose weights start at zero.
        """
        sizes = (self.num_features, *self.hidden, self.num_outputs)
        keys = jax.random.split(key, len(sizes) - 1)
        layers = [
            {"w": jax.random.normal(k, (n_in, n_out)) / jnp.sqrt(n_in), "b": jnp.zeros(n_out)}
            for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:])
        ]
        layers[-1]["w"] = layers[-1]["w"].at[:, 2:].set(0.0)
        return {"layers": layers}

    @property
    def num_outputs(self) -> int:
        """Outputs per parameter: direction and log-magnitude, and the step scale's rate with
        ``step_adaptation``."""
        return 3 if self.step_adaptation else 2

    @property
    def needs_horizon(self) -> bool:
        """Whether the optimizer must be told the run's number of updates (``num_steps``):
        with ``horizon_features`` or a ``step_schedule`` other than constant."""
        return self.horizon_features or self.step_schedule != "constant"

    def schedule_factor(self, step: jax.Array, horizon: jax.Array | None) -> jax.Array | float:
        """The step's factor at update ``step`` (1 for the first) of a run of ``horizon``
        updates: 1 with the constant schedule; ``1 - (step - 1) / horizon`` (from 1 down to
        ``1 / horizon`` at the last update, 0 after it) with the linear one."""
        if self.step_schedule == "constant":
            return 1.0
        done = (step - 1).astype(jnp.float32) / jnp.maximum(horizon, 1.0)
        return jnp.clip(1.0 - done, 0.0, 1.0)

    def param_features(self, g: jax.Array, p: jax.Array, m: jax.Array, v: jax.Array,
                       shape: tuple[int, ...] = ()) -> jax.Array:
        """The ``(n, num_features - num_shared_features)`` per-parameter inputs of one tensor.

        Args:
          g, p, v: gradient, parameter and squared-gradient accumulator, flattened ``(n,)``.
          m: momenta ``(n, len(decays))``.
          shape: the tensor's shape (read with ``tensor_features``).
        """
        rms = jnp.sqrt(v)
        adam = m / jnp.sqrt(v + self.eps)[:, None]
        # Built as (n, features) directly: no transpose of the largest array in the update.
        scaled = jnp.concatenate([g[:, None], p[:, None], m, rms[:, None], adam], axis=1)
        scaled = scaled * jax.lax.rsqrt(jnp.mean(jnp.square(scaled), axis=0) + self.eps)
        scaled = jnp.clip(scaled, -self.feature_clip, self.feature_clip)
        parts = [scaled]
        if self.magnitude_features:
            parts.append(jnp.clip(jnp.log(jnp.abs(jnp.stack([g, p, rms], axis=1)) + 1e-12) / 5.0,
                                  -5.0, 5.0))
        if self.raw_adam_features:
            parts.append(jnp.clip(adam, -self.feature_clip, self.feature_clip))
        if self.tensor_features:
            fan_out = shape[-1] if shape else 1
            fan_in = math.prod(shape[:-1]) if len(shape) > 1 else 1
            parts.append(jnp.broadcast_to(jnp.log(jnp.asarray([fan_in, fan_out], jnp.float32))
                                          / 5.0, (g.shape[0], 2)))
        return jnp.concatenate(parts, axis=1)

    @property
    def num_shared_features(self) -> int:
        """Features that are the same for every parameter (7-10 of the module docstring)."""
        return (len(self.timescales) + (2 if self.horizon_features else 0)
                + (2 if self.loss_features else 0) + (1 if self.depth_features else 0))

    def shared_features(self, step: jax.Array, horizon: jax.Array | None = None,
                      loss_stats: jax.Array | None = None, loss: jax.Array | None = None,
                      depth: int = 0) -> jax.Array:
        """The shared features: ``tanh(step / s)`` for every timescale ``s``; with
        ``horizon_features`` the fraction ``f = step / horizon`` (clipped to [0, 1]) and
        ``f ** 3``; with ``loss_features`` the loss trend of feature 9, from ``loss_stats`` (the
        state's, updated with ``loss``) at ``step``; with ``depth_features`` ``1 / (1 + depth)``
        (feature 10; ``depth``: :meth:`depth` of the parameters' shapes)."""
        step = step.astype(jnp.float32)
        parts = [jnp.tanh(step / jnp.asarray(self.timescales))]
        if self.horizon_features:
            fraction = jnp.clip(step / jnp.maximum(horizon, 1.0), 0.0, 1.0)
            parts.append(jnp.stack([fraction, fraction ** 3]))
        if self.loss_features:
            fast, slow, deviation = loss_stats[0], loss_stats[1], loss_stats[2]
            # the deviation is updated from the second loss on: corrected by 1 - b ** (step - 1)
            corrected = -jnp.expm1((step - 1) * float(np.log(LOSS_DECAYS[1])))
            deviation = deviation / jnp.maximum(corrected, 1e-6)
            # the epsilons keep a loss that does not move (D = 0) from dividing by 0
            scale = 1.0 / (deviation + 1e-12 + 1e-7 * jnp.abs(slow))
            parts.append(jnp.clip(jnp.stack([fast - slow, loss - slow]) * scale,
                                  -self.feature_clip, self.feature_clip))
        if self.depth_features:
            parts.append(jnp.full((1,), 1.0 / (1 + depth), jnp.float32))
        return jnp.concatenate(parts)

    def features(self, g: jax.Array, p: jax.Array, m: jax.Array, v: jax.Array,
                 step: jax.Array, horizon: jax.Array | None = None,
                 shape: tuple[int, ...] = (), loss_stats: jax.Array | None = None,
                 loss: jax.Array | None = None, depth: int = 0) -> jax.Array:
        """All ``(n, num_features)`` inputs of one tensor, in the order of the module docstring
        (the update computes the same thing without materialising the shared columns)."""
        time = jnp.broadcast_to(self.shared_features(step, horizon, loss_stats, loss, depth),
                                (g.shape[0], self.num_shared_features))
        return jnp.concatenate([self.param_features(g, p, m, v, shape), time], axis=1)

    def apply_mlp(self, theta: Theta, x: jax.Array, step: jax.Array | None = None,
                  horizon: jax.Array | None = None, loss_stats: jax.Array | None = None,
                  loss: jax.Array | None = None, depth: int = 0) -> tuple[jax.Array, ...]:
        """Runs the shared MLP; returns direction and magnitude, each ``(n,)``, and with
        ``step_adaptation`` the step scale's rate ``a`` (``(n,)``) as a third.

        Args:
          theta: the LO weights.
          x: ``(n, num_features)`` inputs, or, with ``step`` given, ``(n, num_features -
            num_shared_features)`` per-parameter inputs: the shared features are the same for
            every parameter, so their share of the first layer is computed once and added to its bias
            (exactly the same result, about 10% fewer FLOPs per parameter).
          step: the step count, when ``x`` holds only the per-parameter inputs.
          horizon: the run's number of updates (with ``horizon_features`` and ``step``).
          loss_stats, loss: the updated loss statistics and the loss (with ``loss_features``
            and ``step``).
          depth: the model's depth (with ``depth_features`` and ``step``; :meth:`depth`).

        Weights with more outputs than :attr:`num_outputs` (a step-adapting LO's, read by the
        same LO without adaptation, as self-training's members update each other) are read for
        their first :attr:`num_outputs`.
        """
        first, *hidden, last = theta["layers"]
        if step is None:
            x = x @ first["w"] + first["b"]
        else:
            split = x.shape[1]
            shared = self.shared_features(step, horizon, loss_stats, loss, depth)
            x = x @ first["w"][:split] + (shared @ first["w"][split:] + first["b"])
        x = jax.nn.relu(x)
        for layer in hidden:
            x = jax.nn.relu(x @ layer["w"] + layer["b"])
        out = x @ last["w"] + last["b"]
        return tuple(out[:, i] for i in range(self.num_outputs))

    @staticmethod
    def update_loss_stats(stats: jax.Array, loss: jax.Array, step: jax.Array
                          ) -> tuple[jax.Array, jax.Array]:
        """The loss (a non-finite one replaced by the slow average) and the statistics of
        feature 9 updated with it; at ``step`` 1 all three start from the loss (deviation 0)."""
        loss = jnp.asarray(loss, jnp.float32).reshape(())
        fast, slow, deviation = stats[0], stats[1], stats[2]
        first = step == 1
        loss = jnp.where(jnp.isfinite(loss), loss, jnp.where(first, 0.0, slow))
        (b_fast, b_slow) = LOSS_DECAYS
        fast = jnp.where(first, loss, b_fast * fast + (1 - b_fast) * loss)
        slow = jnp.where(first, loss, b_slow * slow + (1 - b_slow) * loss)
        deviation = jnp.where(first, 0.0,
                              b_slow * deviation + (1 - b_slow) * jnp.abs(loss - slow))
        return loss, jnp.stack([fast, slow, deviation])

    def optimizer(self, theta: Theta, num_steps: int | jax.Array | None = None
                  ) -> optax.GradientTransformationExtraArgs:
        """The optax optimizer that these weights define (use :func:`as_optax` to check theta).

        Args:
          theta: the LO weights.
          num_steps: the number of updates the run will take (an int, or a traced scalar
            inside ``jit``): required by ``init`` with ``horizon_features`` or a
            ``step_schedule`` other than constant, ignored without.
        """
        if self.needs_horizon and num_steps is not None and not isinstance(num_steps, jax.Array):
            if (not isinstance(num_steps, numbers.Integral) or isinstance(num_steps, bool)
                    or num_steps < 1):
                raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")

        def init_fn(params):
            check_float_params(params)
            horizon = None
            if self.needs_horizon:
                if num_steps is None:
                    what = ("reads the fraction of training done (horizon_features)"
                            if self.horizon_features else
                            f"decays its step over the run (step_schedule={self.step_schedule!r})")
                    raise ValueError(f"this learned optimizer {what}: pass num_steps, the number "
                                     "of updates the run will take, to "
                                     "optimizer(theta, num_steps=...)")
                horizon = jnp.asarray(num_steps, jnp.float32)
            k = len(self.decays)
            loss_stats = jnp.zeros(3, jnp.float32) if self.loss_features else None
            log_scales = (jax.tree.map(lambda p: jnp.zeros([], jnp.float32), params)
                          if self.step_adaptation else None)
            return MLPLOptState(
                momenta=jax.tree.map(lambda p: jnp.zeros((*jnp.shape(p), k), jnp.float32), params),
                rms=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params),
                step=jnp.zeros([], jnp.int32),
                horizon=horizon,
                loss_stats=loss_stats,
                log_scales=log_scales,
            )

        def update_fn(grads, state, params=None, **extra_args):
            if params is None:
                raise ValueError("MLPLOpt.update needs params: the parameter value is a feature")
            check_float_params(grads, "grads")
            step = state.step + 1
            loss, loss_stats = None, state.loss_stats
            if self.loss_features:
                if extra_args.get("loss") is None:
                    raise ValueError("this learned optimizer reads the loss's trend "
                                     "(loss_features): pass the loss at params, "
                                     "update(grads, state, params, loss=loss)")
                loss, loss_stats = self.update_loss_stats(state.loss_stats, extra_args["loss"],
                                                          step)
            decays = jnp.asarray(self.decays)
            m_scale = v_scale = 1.0
            if self.bias_correction:
                # 1 - b**t as -expm1(t log b), log b from float64: in float32, b = 0.9999 is off
                # by 1.7e-8, 2e-4 of 1 - b, and 1 - b**t loses that many digits again
                t = step.astype(jnp.float32)
                m_scale = -jnp.expm1(t * jnp.asarray(np.log(self.decays), jnp.float32))
                v_scale = -jnp.expm1(t * jnp.float32(np.log(self.rms_decay)))
            g_leaves, treedef = jax.tree_util.tree_flatten(grads)
            p_leaves = treedef.flatten_up_to(params)
            m_leaves = treedef.flatten_up_to(state.momenta)
            v_leaves = treedef.flatten_up_to(state.rms)

            new_m, new_v, feats, ratio_scales = [], [], [], []
            for g, p, m, v in zip(g_leaves, p_leaves, m_leaves, v_leaves):
                flat_g = jnp.ravel(g).astype(jnp.float32)
                flat_m = decays * m.reshape(-1, len(self.decays)) + (1 - decays) * flat_g[:, None]
                flat_v = self.rms_decay * jnp.ravel(v) + (1 - self.rms_decay) * jnp.square(flat_g)
                read_m, read_v = flat_m / m_scale, flat_v / v_scale  # as the features read them
                feats.append(self.param_features(flat_g, jnp.ravel(p).astype(jnp.float32),
                                                 read_m, read_v, jnp.shape(p)))
                if self.ratio_step_scale:
                    ratio_scales.append(self.ratio_scale(read_m, read_v))
                new_m.append(flat_m.reshape(m.shape))
                new_v.append(flat_v.reshape(v.shape))

            # One MLP call over the parameters of all tensors at once (one matmul, not one per leaf).
            depth = self.depth(jnp.shape(p) for p in p_leaves)
            direction, magnitude, *rate = self.apply_mlp(theta, jnp.concatenate(feats), step,
                                                         state.horizon, loss_stats, loss, depth)
            steps = (-direction * jnp.exp(self.exp_mult * magnitude)
                     * (self.step_mult * self.schedule_factor(step, state.horizon)))
            s_leaves = treedef.flatten_up_to(state.log_scales) if self.step_adaptation else None

            updates, new_s, offset = [], [], 0
            depth_factor = self.depth_factor(depth)
            for i, p in enumerate(p_leaves):  # i: the leaf's index into ratio_scales, s_leaves
                size = jnp.size(p)
                update = steps[offset:offset + size].reshape(jnp.shape(p))
                factor = self.width_factor(jnp.shape(p)) * depth_factor
                if factor != 1.0:
                    update = update * factor
                if self.ratio_step_scale:
                    update = update * ratio_scales[i]
                if self.step_adaptation:
                    drift = jnp.tanh(jnp.mean(rate[0][offset:offset + size]))
                    s = jnp.clip(s_leaves[i] + self.step_adaptation * drift, -ADAPTATION_CLIP,
                                 ADAPTATION_CLIP)
                    update = update * jnp.exp(s)
                    new_s.append(s)
                updates.append(update.astype(jnp.result_type(p)))
                offset += size
            new_state = MLPLOptState(
                momenta=jax.tree_util.tree_unflatten(treedef, new_m),
                rms=jax.tree_util.tree_unflatten(treedef, new_v),
                step=step,
                horizon=state.horizon,
                loss_stats=loss_stats,
                log_scales=(jax.tree_util.tree_unflatten(treedef, new_s) if self.step_adaptation
                            else None),
            )
            return jax.tree_util.tree_unflatten(treedef, updates), new_state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

"""The learned optimizers of selfopt as a ``torch.optim.Optimizer`` (the ``[torch]`` extra).

The same maths as :class:`selfopt.lopt.MLPLOpt` and :class:`selfopt.lopt.HierarchicalLOpt`
(their docstrings give it), from the same files (``selfopt export``), with no JAX::

    import selfopt.torch
    opt = selfopt.torch.LearnedOptimizer(model.parameters(), weights=selfopt.torch.pretrained(),
                                         num_steps=1000)
    for x, y in batches:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step(loss=loss)   # or opt.step(closure); the hierarchical optimizer reads the loss

Every update runs as a few fused tensor operations over all the parameters of a group: their
gradients are concatenated into one vector, per-tensor statistics are segment sums over it, and
the per-parameter MLP is one matrix product. State (momenta, squared-gradient accumulator, the
cell's hidden state) is kept per parameter, as ``torch.optim`` does, so ``state_dict`` and
``load_state_dict`` work as for any optimizer.

Layouts: PyTorch stores a layer's weight as ``(out, in, ...)`` where the JAX models store
``(..., in, out)``, so a tensor's fan-in (the width factor) is the product of all but its first
dimension here and of all but its last in JAX; the two agree on the same layer. The depth
factor counts the tensors of two or more dimensions over all groups of the optimizer.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from selfopt import lopt_file

#: Epsilon of the Adam-like ratios and of the per-tensor normalisation (as selfopt.lopt).
EPS = 1e-8
#: Momentum decays whose consistency the hierarchical cell reads (as selfopt.lopt).
CONSISTENCY_DECAYS = (0.9, 0.99)
#: The fields of each architecture this module runs (a file names every one: the exporter
#: writes them all, so no default is repeated here).
MLP_FIELDS = ("hidden", "decays", "rms_decay", "timescales", "step_mult", "exp_mult",
              "feature_clip", "width_base", "depth_power")
KINDS = {"mlp": MLP_FIELDS, "hierarchical": (*MLP_FIELDS, "cell_size", "loss_decays")}


@dataclasses.dataclass(frozen=True)
class Weights:
    """A learned optimizer read from a file: its kind, configuration, weights and metadata."""

    kind: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @property
    def num_features(self) -> int:
        c = self.config
        return 2 + 3 * len(c["decays"]) + 1 + 3 + len(c["timescales"])

    @property
    def num_cell_features(self) -> int:
        return 3 + len(CONSISTENCY_DECAYS) + 2 + len(self.config["loss_decays"]) + 2 + 1


def load(path: str | Path) -> Weights:
    """The weights of a file written by ``selfopt export``, checked.

    Raises:
      ValueError: (:class:`selfopt.lopt_file.LOptFileError`) the file is missing, damaged,
        newer than this selfopt, of an architecture it does not know, or with weights of the
        wrong shapes.
    """
    path = Path(path)
    arrays, meta = lopt_file.read(path)
    kind, config = meta["architecture"]["kind"], dict(meta["architecture"]["config"])
    if kind not in KINDS:
        raise lopt_file.LOptFileError(f"{path}: architecture {kind!r} is not one this selfopt "
                                      f"runs in PyTorch ({sorted(KINDS)})")
    if missing := [f for f in KINDS[kind] if f not in config]:
        raise lopt_file.LOptFileError(f"{path}: its {kind} configuration lacks {missing}")
    weights = Weights(kind, config, {k: torch.from_numpy(np.array(v, np.float32))
                                     for k, v in arrays.items()}, meta)
    expected = _expected_shapes(weights)
    got = {k: tuple(v.shape) for k, v in weights.tensors.items()}
    if got != expected:
        wrong = sorted(set(got.items()) ^ set(expected.items()))[0][0]
        raise lopt_file.LOptFileError(
            f"{path}: weights do not fit a {kind} optimizer of its configuration (array "
            f"{wrong}: {got.get(wrong)} in the file, {expected.get(wrong)} expected)")
    return weights


def pretrained() -> Weights:
    """The self-trained optimizer shipped with selfopt (docs/pretrained.md is its card)."""
    return load(lopt_file.PRETRAINED)


def _expected_shapes(w: Weights) -> dict[str, tuple[int, ...]]:
    sizes = (w.num_features, *w.config["hidden"], 2)
    shapes = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        shapes[f"layers.{i}.w"], shapes[f"layers.{i}.b"] = (n_in, n_out), (n_out,)
    if w.kind == "hierarchical":
        f, h = w.num_cell_features, w.config["cell_size"]
        shapes.update({"cell.wx": (f, 3 * h), "cell.wh": (h, 3 * h), "cell.b": (3 * h,),
                       "head.w": (h,), "head.b": ()})
    return shapes


class LearnedOptimizer(torch.optim.Optimizer):
    """A selfopt learned optimizer as a ``torch.optim.Optimizer``.

    Args:
      params: the parameters, or parameter groups (dicts with ``params``), as for any optimizer.
      weights: the learned optimizer (:func:`pretrained`, :func:`load`).
      num_steps: the number of updates the run will take: the hierarchical optimizer reads the
        fraction done (``None``: unknown); the MLP ignores it.
    """

    def __init__(self, params: Iterable[Any], weights: Weights, num_steps: int | None = None):
        if not isinstance(weights, Weights):
            raise TypeError("weights must come from selfopt.torch.pretrained() or "
                            "selfopt.torch.load(FILE)")
        if num_steps is not None and (not isinstance(num_steps, int) or num_steps < 1):
            raise ValueError(f"num_steps must be a positive integer or None, got {num_steps!r}")
        super().__init__(params, {})
        self.weights, self.num_steps = weights, num_steps
        self._on: dict[torch.device, dict[str, torch.Tensor]] = {}
        self._layouts: dict[tuple, dict[str, Any]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if not torch.is_floating_point(p):
                    raise TypeError(f"a parameter has dtype {p.dtype}; a learned optimizer can "
                                    "only train floating-point parameters")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but the state stays float32: torch
        casts floating state to each parameter's dtype, which would round the accumulators of
        bfloat16 parameters."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for p, saved_id in zip(params, saved_ids):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32,
                                                  copy=True)

    def _theta(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device not in self._on:
            self._on[device] = {k: v.to(device) for k, v in self.weights.tensors.items()}
        return self._on[device]

    def _depth_factor(self) -> float:
        power = self.weights.config["depth_power"]
        depth = sum(p.dim() >= 2 for g in self.param_groups for p in g["params"])
        return 1.0 if not power or depth < 1 else float(depth) ** -power

    def _width_factor(self, shape: torch.Size) -> float:
        base = self.weights.config["width_base"]
        if not base or len(shape) < 2:
            return 1.0
        return min(1.0, base / math.prod(shape[1:]))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, loss: Any = None) -> Any:
        """One update of every parameter with a gradient.

        Args:
          closure: re-evaluates the model and returns the loss (called with gradients on).
          loss: the loss at the current parameters, where there is no closure.

        Returns:
          The loss (the closure's, or ``loss``).
        """
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.weights.kind == "hierarchical" and loss is None:
            raise ValueError("the hierarchical learned optimizer reads the loss: call "
                             "step(closure) or step(loss=loss)")
        depth = self._depth_factor()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                for p, update in zip(params, self._updates(params, depth, loss)):
                    p.add_(update.to(p.dtype))
        return loss

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        c, state = self.weights.config, self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.int64)
            state["momenta"] = torch.zeros((p.numel(), len(c["decays"])), device=p.device)
            state["rms"] = torch.zeros(p.numel(), device=p.device)
            if self.weights.kind == "hierarchical":
                k = len(c["loss_decays"])
                state["hidden"] = torch.zeros(c["cell_size"], device=p.device)
                state["loss_mean"] = torch.zeros(k, device=p.device)
                state["loss_var"] = torch.zeros(k, device=p.device)
        return state

    def _updates(self, params: list[torch.Tensor], depth: float, loss: Any
                 ) -> list[torch.Tensor]:
        """The float32 update of each of ``params`` (one group's, with gradients); advances
        their state."""
        c, w = self.weights.config, self.weights
        device = params[0].device
        theta = self._theta(device)
        layout = self._layout(params, depth)
        seg, counts, sizes = layout["seg"], layout["counts"], layout["sizes"]
        states = [self._init_state(p) for p in params]
        g = torch.cat([p.grad.reshape(-1) for p in params]).float()
        x = torch.cat([p.reshape(-1) for p in params]).float()
        m = torch.cat([s["momenta"] for s in states])
        v = torch.cat([s["rms"] for s in states])
        step = int(states[0]["step"]) + 1

        decays = layout["decays"]
        m = decays * m + (1 - decays) * g[:, None]
        v = c["rms_decay"] * v + (1 - c["rms_decay"]) * g.square()

        def segment_mean(values: torch.Tensor) -> torch.Tensor:
            sums = torch.zeros((len(params), values.shape[1]), device=device)
            return sums.index_add_(0, seg, values) / counts

        # The (n, F) features written in place into one buffer, in MLPLOpt's order: g, p, m,
        # sqrt(v), m / sqrt(v) (each divided by its RMS over the tensor, clipped), the log
        # magnitudes of g, p and sqrt(v), and m / sqrt(v) clipped.
        clip, k = c["feature_clip"], len(c["decays"])
        n_scaled = 3 + 2 * k
        features = torch.empty((g.shape[0], n_scaled + 3 + k), device=device)
        scaled = features[:, :n_scaled]
        rms = v.sqrt()
        adam = features[:, n_scaled + 3:]
        torch.div(m, (v + EPS).sqrt_()[:, None], out=adam)
        features[:, 0], features[:, 1], features[:, 2:2 + k] = g, x, m
        features[:, 2 + k], features[:, 3 + k:n_scaled] = rms, adam
        scaled.mul_(torch.rsqrt(segment_mean(scaled.square()) + EPS)[seg]).clamp_(-clip, clip)
        magnitudes = features[:, n_scaled:n_scaled + 3]
        magnitudes[:, 0], magnitudes[:, 1], magnitudes[:, 2] = g, x, rms
        magnitudes.abs_().add_(1e-12).log_().div_(5.0).clamp_(-5.0, 5.0)
        adam.clamp_(-clip, clip)

        layers = [(theta[f"layers.{i}.w"], theta[f"layers.{i}.b"])
                  for i in range(len(c["hidden"]) + 1)]
        (w0, b0), *hidden, (wl, bl) = layers
        split = features.shape[1]
        time = torch.tanh(step / layout["timescales"])
        h = torch.addmm(time @ w0[split:] + b0, features, w0[:split]).relu_()
        for wi, bi in hidden:
            h = torch.addmm(bi, h, wi).relu_()
        out = torch.addmm(bl, h, wl)
        steps = -out[:, 0] * torch.exp(c["exp_mult"] * out[:, 1]) * c["step_mult"]
        steps = steps * layout["factors"]
        if w.kind == "hierarchical":
            log_step = self._cell(theta, states, layout, g, x, m, v, step, loss, segment_mean)
            steps = steps * torch.exp(log_step)[seg]

        updates, offset = [], 0
        for p, s, n in zip(params, states, sizes):
            updates.append(steps[offset:offset + n].view_as(p))
            s["momenta"] = m[offset:offset + n]
            s["rms"] = v[offset:offset + n]
            s["step"] = torch.tensor(step, dtype=torch.int64)
            offset += n
        return updates

    def _layout(self, params: list[torch.Tensor], depth: float) -> dict[str, Any]:
        """Constants of a group's update that depend only on its tensors' shapes (cached): the
        tensor of every element, sizes, every element's width and depth factor, and the
        architecture's decays and timescales on the device."""
        device = params[0].device
        key = (device, depth, tuple((id(p), tuple(p.shape)) for p in params))
        if key not in self._layouts:
            c = self.weights.config
            sizes = [p.numel() for p in params]
            seg = torch.repeat_interleave(torch.arange(len(params), device=device),
                                          torch.tensor(sizes, device=device))
            factors = torch.tensor([self._width_factor(p.shape) * depth for p in params],
                                   device=device)
            self._layouts[key] = {
                "sizes": sizes, "seg": seg, "factors": factors[seg],
                "counts": torch.tensor(sizes, device=device, dtype=torch.float32)[:, None],
                "decays": torch.tensor(c["decays"], device=device),
                "timescales": torch.tensor(c["timescales"], device=device),
                "log_size": torch.tensor([math.log(n) / 10.0 for n in sizes], device=device),
                "matrix": torch.tensor([float(p.dim() >= 2) for p in params], device=device)}
        return self._layouts[key]

    def _cell(self, theta, states, layout, g, x, m, v, step, loss, segment_mean
              ) -> torch.Tensor:
        """The hierarchical cell's log step of every tensor (and its new state in ``states``)."""
        c = self.weights.config
        device = g.device
        decays = list(c["decays"])

        def log(t):
            return (t + 1e-12).log().div(5.0).clamp(-5.0, 5.0)
        g_rms = segment_mean(g[:, None].square())[:, 0].sqrt()
        per_tensor = [log(g_rms), log(segment_mean(x[:, None].square())[:, 0].sqrt()),
                      log(segment_mean(v[:, None])[:, 0].sqrt())]
        per_tensor += [segment_mean(m[:, [decays.index(b)]].square())[:, 0].sqrt() / (g_rms + EPS)
                       for b in CONSISTENCY_DECAYS]
        per_tensor += [layout["log_size"], layout["matrix"]]

        # the loss features (the same for every tensor; kept in every tensor's state)
        loss_decays = torch.tensor(c["loss_decays"], device=device)
        mean, var = states[0]["loss_mean"], states[0]["loss_var"]
        value = torch.as_tensor(loss.detach() if torch.is_tensor(loss) else loss,
                                dtype=torch.float32).to(device).reshape(())
        finite = bool(torch.isfinite(value))
        if finite:
            mean = loss_decays * mean + (1 - loss_decays) * value
            var = loss_decays * var + (1 - loss_decays) * (value - mean).square()
            correction = 1.0 / (1.0 - loss_decays ** float(step))
            z = ((value - mean * correction) * torch.rsqrt(var * correction + 1e-12)
                 ).clamp(-5.0, 5.0)
        else:
            z = torch.full_like(mean, 5.0)
        horizon = float(self.num_steps or 0)
        fraction = min(max(step / max(horizon, 1.0), 0.0), 1.0) if horizon > 0 else 0.0
        shared = torch.cat([z, torch.tensor([fraction, float(horizon > 0),
                                             math.log1p(step) / 10.0], device=device)])
        inputs = torch.cat([torch.stack(per_tensor, dim=1),
                            shared.expand(len(states), shared.shape[0])], dim=1)

        hidden = torch.stack([s["hidden"] for s in states])
        size = c["cell_size"]
        gx = inputs @ theta["cell.wx"] + theta["cell.b"]
        gh = hidden @ theta["cell.wh"]
        update = torch.sigmoid(gx[:, :size] + gh[:, :size])
        reset = torch.sigmoid(gx[:, size:2 * size] + gh[:, size:2 * size])
        candidate = torch.tanh(gx[:, 2 * size:] + reset * gh[:, 2 * size:])
        hidden = (1 - update) * hidden + update * candidate
        for i, s in enumerate(states):
            s["hidden"], s["loss_mean"], s["loss_var"] = hidden[i], mean.clone(), var.clone()
        return hidden @ theta["head.w"] + theta["head.b"]

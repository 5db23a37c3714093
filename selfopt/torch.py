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

Every update runs as fused tensor operations over all the parameters of a group: their
gradients are concatenated into one vector, per-tensor statistics are one fused norm over its
slices, and the per-parameter MLP runs as matrix products over blocks of it. State (momenta,
squared-gradient accumulator, the cell's hidden state) is kept per parameter, as
``torch.optim`` does, so ``state_dict`` and ``load_state_dict`` work as for any optimizer.

Layouts: PyTorch stores a layer's weight as ``(out, in, ...)`` where the JAX models store
``(..., in, out)``, so a tensor's fan-in (the width factor) is the product of all but its first
dimension here and of all but its last in JAX; the two agree on the same layer. The depth
factor counts the tensors of two or more dimensions over all groups of the optimizer.
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from selfopt import lopt_file

#: Epsilon of the Adam-like ratios and of the per-tensor normalisation (as selfopt.lopt).
EPS = 1e-8
#: Parameters per block of the MLP's pass on a CPU: a block's features and hidden activations
#: (about 70 floats per parameter) stay in the CPU's cache; the fastest size measured
#: (benchmarks/torch_step.py). A GPU takes the group in one block.
CHUNK_ROWS = 65536
#: Momentum decays whose consistency the hierarchical cell reads (as selfopt.lopt).
CONSISTENCY_DECAYS = (0.9, 0.99)
#: The fields of each architecture this module runs (a file names every one: the exporter
#: writes them all, so no default is repeated here).
MLP_FIELDS = ("hidden", "decays", "rms_decay", "timescales", "step_mult", "exp_mult",
              "feature_clip", "width_base", "depth_power")
KINDS = {"mlp": MLP_FIELDS, "scheduled": (*MLP_FIELDS, "schedule_knots"),
         "hierarchical": (*MLP_FIELDS, "cell_size", "loss_decays")}


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
    if w.kind == "scheduled":
        shapes["schedule"] = (w.config["schedule_knots"],)
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
      num_steps: the number of updates the run will take: the scheduled and hierarchical
        optimizers read the fraction done (``None``: unknown); the MLP ignores it.
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
            state["momenta"] = torch.zeros((len(c["decays"]), p.numel()), device=p.device)
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
        their state.

        Two passes over the group's concatenated vectors. The first updates the accumulators
        and takes the per-tensor statistics (one fused ``_foreach_norm`` over every tensor's
        slice of each feature). The second runs the per-parameter MLP over blocks of
        :data:`CHUNK_ROWS` parameters: each block's features and hidden activations stay in
        the CPU's cache, where the whole vector's would be written to memory and read back
        once per operation."""
        c, w = self.weights.config, self.weights
        device = params[0].device
        theta = self._theta(device)
        layout = self._layout(params, depth)
        sizes, k = layout["sizes"], len(c["decays"])
        states = [self._init_state(p) for p in params]
        g = torch.cat([p.grad.reshape(-1) for p in params]).float()
        x = torch.cat([p.reshape(-1) for p in params]).float()
        m = torch.cat([s["momenta"] for s in states], dim=1)  # (k, n)
        v = torch.cat([s["rms"] for s in states])
        step = int(states[0]["step"]) + 1

        # pass 1: accumulators, Adam-like ratios and the per-tensor mean squares of the
        # features MLPLOpt normalises per tensor (g, p, m, sqrt(v), m / sqrt(v))
        m.mul_(layout["decays"][:, None]).add_(g * (1 - layout["decays"][:, None]))
        v.mul_(c["rms_decay"]).addcmul_(g, g, value=1 - c["rms_decay"])
        rms = v.sqrt()
        adam = m / (v + EPS).sqrt_()
        scaled_rows = [g, x, *m, rms, *adam]
        norms = torch._foreach_norm([part for row in scaled_rows for part in row.split(sizes)])
        mean_sq = torch.stack(norms).view(len(scaled_rows), len(sizes)).square_()
        mean_sq /= layout["counts"]
        scales = torch.rsqrt(mean_sq + EPS)  # (features, tensors)

        multiplier = layout["factors"] * c["step_mult"]  # per tensor
        if w.kind == "hierarchical":
            multiplier = multiplier * torch.exp(
                self._cell(theta, states, layout, mean_sq, step, loss))
        if w.kind == "scheduled" and self.num_steps:
            multiplier = multiplier * math.exp(self._schedule(theta["schedule"], step))

        # pass 2: features, MLP and step of each block of parameters
        layers = [(theta[f"layers.{i}.w"], theta[f"layers.{i}.b"])
                  for i in range(len(c["hidden"]) + 1)]
        (w0, b0), *hidden, (wl, bl) = layers
        clip, n_scaled = c["feature_clip"], len(scaled_rows)
        w0_params = w0[:n_scaled + 3 + k]
        time = torch.tanh(step / layout["timescales"])
        b0 = time @ w0[n_scaled + 3 + k:] + b0
        rows = CHUNK_ROWS if device.type == "cpu" else g.shape[0]
        features = torch.empty((n_scaled + 3 + k, min(rows, g.shape[0])), device=device)
        steps = torch.empty_like(g)
        for start in range(0, g.shape[0], rows):
            block = slice(start, start + rows)
            # the tensor of each parameter of the block: a slice where the block lies inside
            # one tensor (most blocks; no gather), an index vector where it straddles two
            first = bisect.bisect_right(layout["ends"], start)
            seg = (slice(first, first + 1) if layout["ends"][first] >= start + rows
                   or first == len(sizes) - 1 else layout["seg"][block])
            f = features[:, :min(rows, g.shape[0] - start)]
            f[0], f[1], f[2:2 + k], f[2 + k], f[3 + k:n_scaled] = (
                g[block], x[block], m[:, block], rms[block], adam[:, block])
            f[:n_scaled].mul_(scales[:, seg]).clamp_(-clip, clip)
            magnitudes = f[n_scaled:n_scaled + 3]
            torch.abs(g[block], out=magnitudes[0])
            torch.abs(x[block], out=magnitudes[1])
            magnitudes[2] = rms[block]
            magnitudes.add_(1e-12).log_().div_(5.0).clamp_(-5.0, 5.0)
            torch.clamp(adam[:, block], -clip, clip, out=f[n_scaled + 3:])
            h = torch.addmm(b0, f.t(), w0_params).relu_()
            for wi, bi in hidden:
                h = torch.addmm(bi, h, wi).relu_()
            out = torch.addmm(bl, h, wl)
            torch.mul(out[:, 1], c["exp_mult"], out=steps[block]).exp_()
            steps[block].mul_(out[:, 0]).mul_(multiplier[seg]).neg_()

        updates, offset = [], 0
        for p, s, n in zip(params, states, sizes):
            updates.append(steps[offset:offset + n].view_as(p))
            s["momenta"] = m[:, offset:offset + n]
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
                "sizes": sizes, "seg": seg, "factors": factors,
                "ends": list(itertools.accumulate(sizes)),
                "counts": torch.tensor(sizes, device=device, dtype=torch.float32),
                "decays": torch.tensor(c["decays"], device=device),
                "timescales": torch.tensor(c["timescales"], device=device),
                "log_size": torch.tensor([math.log(n) / 10.0 for n in sizes], device=device),
                "matrix": torch.tensor([float(p.dim() >= 2) for p in params], device=device)}
        return self._layouts[key]

    def _schedule(self, knots: torch.Tensor, step: int) -> float:
        """The learned log step multiplier at the fraction of training done (piecewise linear
        between equally spaced knots, as ``ScheduledLOpt.log_multiplier``)."""
        values = knots.cpu().numpy()
        return float(np.interp(min(step / self.num_steps, 1.0),
                               np.linspace(0.0, 1.0, len(values)), values))

    def _cell(self, theta, states, layout, mean_sq, step, loss) -> torch.Tensor:
        """The hierarchical cell's log step of every tensor (and its new state in ``states``);
        ``mean_sq``: the per-tensor mean squares of pass 1 of :meth:`_updates` (rows g, p, the
        momenta, sqrt(v), ...)."""
        c = self.weights.config
        device = mean_sq.device
        k = len(c["decays"])

        def log(t):
            return (t + 1e-12).log().div(5.0).clamp(-5.0, 5.0)
        g_rms = mean_sq[0].sqrt()
        per_tensor = [log(g_rms), log(mean_sq[1].sqrt()), log(mean_sq[2 + k].sqrt())]
        per_tensor += [mean_sq[2 + c["decays"].index(b)].sqrt() / (g_rms + EPS)
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

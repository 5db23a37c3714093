"""Speed of the PyTorch drop-in against torch.optim's Adam and AdamW, in one process.

    python benchmarks/torch_step.py [--repeats 20] [--smoke]

Prints JSON:

* ``optimizer_step``: for MLPs of about 10k, 100k and 1M parameters, the median time of one
  ``opt.step()`` (gradients already there) of ``selfopt.torch.LearnedOptimizer`` (the shipped
  optimizer), ``torch.optim.Adam`` and ``torch.optim.AdamW(foreach=True)``, the drop-in's ratio
  to Adam, and its FLOP rate (``flops_per_param`` times the parameters over its time);
* ``matmul_gflops``: the FLOP rate of a plain float32 matrix product of comparable size on
  this CPU (``n_params x 32`` times ``32 x 32``: the shape of the learned optimizer's hidden
  layer), the rate its compute-bound step could reach;
* ``convnet_step``: the whole training step (forward, backward, optimizer) of the example
  convnet (examples/torch_fashion_mnist.py) on a batch of 128 Fashion-MNIST-sized images with
  each optimizer, and the drop-in's ratio to Adam.

``--smoke``: tiny sizes and one repeat, for CI (it checks the benchmark runs).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import selfopt.torch as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from torch_fashion_mnist import ConvNet  # noqa: E402

SIZES = {"10k": (96, 96, 10), "100k": (784, 128, 10), "1M": (784, 1024, 256, 10)}
SMOKE_SIZES = {"100": (8, 8, 4)}


def mlp(widths: tuple[int, ...]) -> torch.nn.Module:
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def flops_per_param(weights: st.Weights) -> int:
    """Multiply-adds of the per-parameter MLP, times 2 (the elementwise features and the
    accumulators add a few tens more)."""
    sizes = (weights.num_features - len(weights.config["timescales"]),
             *weights.config["hidden"], 2)
    return 2 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm up (allocations, the first step's state)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


#: The optimizers compared: label -> constructor from (parameters, learned-optimizer weights).
OPTIMIZERS = {
    "selfopt": lambda params, weights: st.LearnedOptimizer(params, weights=weights),
    "adam": lambda params, weights: torch.optim.Adam(params, lr=1e-3),
    "adamw_foreach": lambda params, weights: torch.optim.AdamW(params, lr=1e-3, foreach=True),
}


def optimizer_steps(sizes, repeats, weights) -> dict:
    out = {}
    for name, widths in sizes.items():
        model = mlp(widths)
        n = sum(p.numel() for p in model.parameters())
        model(torch.randn(32, widths[0])).square().mean().backward()
        row = {"params": n}
        for label, make in OPTIMIZERS.items():
            opt = make(model.parameters(), weights)
            with torch.no_grad():
                saved = [p.clone() for p in model.parameters()]
            row[f"{label}_s"] = median_seconds(opt.step, repeats)
            with torch.no_grad():
                for p, s in zip(model.parameters(), saved):
                    p.copy_(s)
        row["ratio_to_adam"] = row["selfopt_s"] / row["adam_s"]
        row["selfopt_gflops"] = flops_per_param(weights) * n / row["selfopt_s"] / 1e9
        out[name] = row
    return out


def matmul_gflops(n: int, repeats: int) -> float:
    a, b = torch.randn(n, 32), torch.randn(32, 32)
    seconds = median_seconds(lambda: a @ b, repeats)
    return 2 * n * 32 * 32 / seconds / 1e9


def convnet_steps(batch: int, repeats: int, weights: st.Weights) -> dict:
    torch.manual_seed(0)
    x, y = torch.randn(batch, 1, 16, 16), torch.randint(0, 10, (batch,))
    out = {}
    for label, make in OPTIMIZERS.items():
        model = ConvNet()
        opt = make(model.parameters(), weights)

        def step():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step(loss=loss) if label == "selfopt" else opt.step()
        out[f"{label}_s"] = median_seconds(step, repeats)
    out["params"] = sum(p.numel() for p in ConvNet().parameters())
    out["ratio_to_adam"] = out["selfopt_s"] / out["adam_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, one repeat: checks that the benchmark runs (for CI)")
    args = parser.parse_args()
    repeats = 1 if args.smoke else args.repeats
    sizes = SMOKE_SIZES if args.smoke else SIZES
    weights = st.pretrained()
    steps = optimizer_steps(sizes, repeats, weights)
    largest = max(row["params"] for row in steps.values())
    result = {
        "benchmark": "torch_step", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "cpus": os.cpu_count(),
        "flops_per_param": flops_per_param(weights), "optimizer_step": steps,
        "matmul_gflops": matmul_gflops(largest, repeats),
        "convnet_step": convnet_steps(8 if args.smoke else 128, repeats, weights),
    }
    result["selfopt_fraction_of_matmul_rate"] = (
        steps[max(steps, key=lambda k: steps[k]["params"])]["selfopt_gflops"]
        / result["matmul_gflops"])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

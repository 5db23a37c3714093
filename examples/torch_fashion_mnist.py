"""A small PyTorch convnet on the Fashion-MNIST images shipped with selfopt (16x16), trained
with the shipped learned optimizer and with Adam tuned over learning rates; saves a loss plot.

    pip install -e '.[torch]'
    python examples/torch_fashion_mnist.py [--steps 500] [--out examples/torch_fashion_mnist.png]

Adam's rate is tuned the way selfopt's evaluation tunes it: every rate of a log grid runs the
same batches from the same initialisation, and the rate with the lowest training loss over the
last 10% of steps wins. No JAX is imported.
"""
from __future__ import annotations

import argparse
import sys
from importlib import resources

import numpy as np
import torch

import selfopt.torch as st

#: Adam's learning rates: a log grid, 1e-4 to 1e-1.
ADAM_RATES = tuple(float(r) for r in np.logspace(-4, -1, 7))


class ConvNet(torch.nn.Module):
    """Two 3x3 convolutions (16 and 32 channels) with ReLU and 2x2 max pooling, then a linear
    layer to 10 classes: about 10k parameters, for 16x16 grey images."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.head = torch.nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


def load_data() -> tuple[torch.Tensor, ...]:
    """Train and test images ``(n, 1, 16, 16)`` scaled to zero mean and unit variance, and
    their labels."""
    with resources.as_file(resources.files("selfopt.tasks") / "data" / "fashion_mnist16.npz") as f:
        raw = np.load(f, allow_pickle=False)
        arrays = {k: raw[k] for k in raw.files}
    train = arrays["train_images"].astype(np.float32) / 255.0
    mean, std = train.mean(), train.std()

    def images(key):
        return torch.from_numpy((arrays[key].astype(np.float32) / 255.0 - mean) / std)[:, None]
    return (images("train_images"), torch.from_numpy(arrays["train_labels"].astype(np.int64)),
            images("test_images"), torch.from_numpy(arrays["test_labels"].astype(np.int64)))


def train(make_optimizer, data, steps: int, batch: int, seed: int = 0) -> tuple[list, float]:
    """Training losses of every step, and the test accuracy at the end."""
    x, y, x_test, y_test = data
    torch.manual_seed(seed)
    model = ConvNet()
    opt = make_optimizer(model.parameters())
    order = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=order)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step(loss=loss) if isinstance(opt, st.LearnedOptimizer) else opt.step()
        losses.append(float(loss.detach()))
        if not np.isfinite(losses[-1]):
            losses += [float("nan")] * (steps - len(losses))
            break
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    return losses, accuracy


def final_loss(losses: list) -> float:
    tail = losses[-max(1, len(losses) // 10):]
    return float(np.mean(tail)) if np.all(np.isfinite(tail)) else float("inf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", default="examples/torch_fashion_mnist.png")
    args = parser.parse_args(argv)
    if args.steps < 10 or args.batch < 1:
        print("torch_fashion_mnist: error: --steps must be at least 10 and --batch at least 1",
              file=sys.stderr)
        return 2
    data = load_data()

    learned, learned_acc = train(
        lambda p: st.LearnedOptimizer(p, weights=st.pretrained(), num_steps=args.steps),
        data, args.steps, args.batch)
    adam = {rate: train(lambda p: torch.optim.Adam(p, lr=rate), data, args.steps, args.batch)
            for rate in ADAM_RATES}
    best = min(adam, key=lambda r: final_loss(adam[r][0]))
    print(f"learned optimizer: final training loss {final_loss(learned):.4f}, test accuracy "
          f"{learned_acc:.3f}")
    print(f"Adam tuned over {len(ADAM_RATES)} rates (best {best:.2g}): final training loss "
          f"{final_loss(adam[best][0]):.4f}, test accuracy {adam[best][1]:.3f}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    smooth = lambda v: np.convolve(v, np.ones(20) / 20, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(smooth(learned), label="selfopt.torch.pretrained()")
    ax.plot(smooth(adam[best][0]), label=f"Adam, tuned (lr {best:.2g})")
    ax.set(xlabel="step", ylabel="training loss (20-step mean)", yscale="log",
           title=f"ConvNet on Fashion-MNIST 16x16, batch {args.batch}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

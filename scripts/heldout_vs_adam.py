"""Interim check until ``selfopt eval`` exists: a run's best member against tuned Adam.

    python scripts/heldout_vs_adam.py runs/NAME [--steps 300] [--seeds 3] [--cache DIR]

Loads the run's latest checkpoint, takes the member PBT ranked best, and trains every held-out
task (``TaskDistribution().heldout()``) with it and with Adam tuned per task over 14 learning
rates (``selfopt.evaluate.tune_adam``, cached), same seeds, initialisations and batches. Prints
per task the final training loss of both (normalised by the initial loss) and their ratio, then
the number of wins and the median ratio.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np

from selfopt.config import make_config
from selfopt.evaluate import final_loss, run_training, seed_keys, tune_adam
from selfopt.lopt import as_optax
from selfopt.tasks import TaskDistribution, make_task
from selfopt.train import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "selfopt" / "adam")
    args = parser.parse_args()
    trainer = Trainer(make_config({}, args.run / "config.json"), args.run)
    state = trainer.load_latest()
    optimizer = as_optax(trainer.comps.lopt, jax.tree.map(lambda x: x[state.best], state.thetas))
    rows = []
    for config in TaskDistribution().heldout():
        adam = tune_adam(config, args.steps, args.seeds, cache_dir=args.cache)
        task = make_task(config)
        lo = np.stack([run_training(task, optimizer, key, args.steps).train_losses
                       for key in seed_keys(config, args.seeds)])
        init = float(adam.train_losses[:, 0].mean())
        lo_final, adam_final = float(final_loss(lo).mean()), float(final_loss(adam.train_losses).mean())
        rows.append({"family": config["family"], "seed": config["seed"],
                     "lo": lo_final / init, "adam": adam_final / init,
                     "adam_lr": adam.learning_rate, "ratio": lo_final / adam_final})
        print(f"{config['family']:<15} learned {rows[-1]['lo']:.4f}  tuned Adam "
              f"{rows[-1]['adam']:.4f} (lr {adam.learning_rate:.3g})  ratio {rows[-1]['ratio']:.3g}")
    wins = sum(r["ratio"] < 1 for r in rows)
    print(json.dumps({"run": str(args.run), "member": state.best, "steps": args.steps,
                      "seeds": args.seeds, "wins": wins, "tasks": len(rows),
                      "median_ratio": float(np.median([r["ratio"] for r in rows]))}))


if __name__ == "__main__":
    main()

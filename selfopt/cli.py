"""The ``selfopt`` command.

    selfopt train [--config FILE] [--population 8] [--minutes 10] [--seed 0] [--out runs/NAME]
                  [--outer-optimizer self|adam] [--set FIELD=VALUE ...] [--resume RUN]
    selfopt eval RUN_OR_CHECKPOINT|FILE|pretrained|optax:NAME[:LR] [--member N]
                 [--tasks heldout|quick|test] [--steps 300] [--seeds 3] [--seed 0] [--out FILE]
    selfopt export RUN_OR_CHECKPOINT [--out FILE] [--member N]
    selfopt plot RUN [--out DIR]
    selfopt report RUN [--out FILE]
    selfopt experiment self-vs-adam [--minutes 10] [--out DIR] [--seed 0]
    selfopt demo [--task mlp] [--steps 300] [--seed 0] [--adam-lr 1e-3]

Bad input ends with one line on stderr (``selfopt: error: ...``), exit status 2, and nothing
written.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from selfopt.cache import enable_compilation_cache
from selfopt.config import ConfigError, make_config
from selfopt.evaluate import SUITES
from selfopt.tasks import FAMILIES

#: Fields that may change when a run is resumed (they extend or shape the budget only).
RESUMABLE_OVERRIDES = ("minutes", "max_steps", "checkpoint_seconds")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit status 2."""

    def error(self, message: str):
        # An argument can hold a newline or a control character; print it escaped.
        message = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
        self.exit(2, f"selfopt: error: {message} (see: {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def parse_assignment(text: str) -> tuple[str, object]:
    """``FIELD=VALUE`` of a ``--set`` flag: the value as JSON, or as a bare word if it is not."""
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value  # a bare word, e.g. policy=best
    except (ValueError, RecursionError):  # an integer of 4,300+ digits, nesting too deep
        raise argparse.ArgumentTypeError(f"{name or 'FIELD'}: the value is not usable JSON"
                                         ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="selfopt",
                           description="Learned optimizers that train themselves.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    train = commands.add_parser(
        "train", help="self-train a population of randomly initialised learned optimizers",
        description="Self-train a population of randomly initialised learned optimizers with "
                    "ES meta-gradients and PBT. Flags override --config; see "
                    "selfopt/config.py for every field (sections lopt, estimator, outer, pbt, "
                    "tasks: --set lopt.hidden=[64,64]).")
    train.add_argument("--config", type=Path, help="JSON file of config fields")
    train.add_argument("--out", type=Path, help="run directory (default runs/<label>-<time>)")
    train.add_argument("--resume", type=Path, metavar="RUN",
                       help="continue the run in this directory from its latest checkpoint")
    train.add_argument("--population", type=int)
    train.add_argument("--minutes", type=float, help="training time budget (total)")
    train.add_argument("--max-steps", type=int, help="outer-step budget (0: none)")
    train.add_argument("--seed", type=int)
    train.add_argument("--outer-optimizer", choices=("self", "adam"),
                       help="self: members trained by the population's own learned optimizers; "
                            "adam: the Adam-trained control")
    train.add_argument("--policy", help="whose LO updates a member: self, best or random")
    train.add_argument("--estimator", help="es or pes")
    train.add_argument("--set", type=parse_assignment, action="append", default=[],
                       metavar="FIELD=VALUE",
                       help="any config field, dotted (outer.max_update=0.01), value as JSON")
    train.add_argument("--quiet", action="store_true", help="no live view")
    train.add_argument("--backend", choices=("local", "ray"), default="local",
                       help="where the members' ES work runs: local (this process, the "
                            "default) or ray (one Ray worker per block of members; --set "
                            "shards=N cuts the population into N blocks; docs/scaling.md)")
    train.add_argument("--address", metavar="HOST:PORT",
                       help="with --backend ray: a running Ray cluster (default: start a local "
                            "Ray instance on this machine)")
    train.add_argument("--worker-cpus", type=_positive_float, default=1.0,
                       help="with --backend ray: CPUs Ray reserves for each worker (default 1)")

    ev = commands.add_parser(
        "eval", help="compare an optimizer with per-task tuned Adam on the held-out tasks",
        description="Train every task of a suite with the optimizer under test and with Adam "
                    "tuned per task over 14 learning rates (cached on disk), same seeds, "
                    "initialisations and batches, and compare them task by task.")
    ev.add_argument("target", metavar="RUN_OR_CHECKPOINT",
                    help="a run directory (its latest checkpoint), a checkpoint file, a file "
                         "of selfopt export, 'pretrained' (the shipped optimizer), or "
                         "optax:NAME[:LR] for a hand-designed optax optimizer (e.g. optax:sgd:0.1)")
    ev.add_argument("--member", type=_non_negative_int,
                    help="population position to evaluate (default: the run's elite, the best "
                         "held-in validation so far; PBT's best member if it has none)")
    ev.add_argument("--tasks", default="heldout", choices=SUITES,
                    help="task suite (default heldout: all 12; quick: the 9 fast ones)")
    ev.add_argument("--steps", type=_positive_int, default=300, help="inner steps (default 300)")
    ev.add_argument("--seeds", type=_positive_int, default=3, help="runs per task (default 3)")
    ev.add_argument("--seed", type=_non_negative_int, default=0, help="evaluation seed")
    ev.add_argument("--out", type=Path, help="JSON file for the results (default: "
                                             "RUN/evaluation.json for a run directory)")

    export = commands.add_parser(
        "export", help="write a run's elite as one file to hand on (selfopt.load, selfopt.torch)",
        description="Write a run's answer (its elite, the best held-in validation so far) as "
                    "one safetensors file with its architecture, how it was trained and how it "
                    "evaluated; load it with selfopt.load(FILE) (optax) or "
                    "selfopt.torch.load(FILE) (PyTorch).")
    export.add_argument("target", type=Path, metavar="RUN_OR_CHECKPOINT",
                        help="a run directory (its latest checkpoint) or a checkpoint file")
    export.add_argument("--out", type=Path,
                        help="file to write (default RUN/optimizer.safetensors)")
    export.add_argument("--member", type=_non_negative_int,
                        help="population position to export instead of the elite")

    plot = commands.add_parser("plot", help="draw a run's curves (PNG and SVG)",
                               description="Draw a run's meta-loss, improvement rate, held-out "
                                           "evaluation, per-task comparison and lineage.")
    plot.add_argument("run", type=Path, metavar="RUN")
    plot.add_argument("--out", type=Path, help="folder for the figures (default RUN/plots)")

    report = commands.add_parser("report", help="write a run's self-contained HTML report",
                                 description="One HTML file (figures embedded, no network) with "
                                             "the config, summary, evaluation and lineage.")
    report.add_argument("run", type=Path, metavar="RUN")
    report.add_argument("--out", type=Path, help="HTML file (default RUN/report.html)")

    experiment = commands.add_parser(
        "experiment", help="the headline experiment: self-training against the Adam control",
        description="self-vs-adam: a self-trained population and the Adam-meta-trained control, "
                    "the same wall time each, both evaluated with tuned Adam on the held-out "
                    "tasks; writes one comparison report.")
    experiment.add_argument("name", choices=("self-vs-adam",))
    experiment.add_argument("--minutes", type=_positive_float, default=10.0,
                            help="training minutes of each run (default 10)")
    experiment.add_argument("--out", type=Path, help="folder (default runs/self-vs-adam-<time>)")
    experiment.add_argument("--seed", type=_non_negative_int, default=0)
    experiment.add_argument("--steps", type=_positive_int, default=300,
                            help="inner steps of the final evaluation (default 300)")
    experiment.add_argument("--set", type=parse_assignment, action="append", default=[],
                            metavar="FIELD=VALUE", help="config field of both runs")

    demo = commands.add_parser(
        "demo", help="train one task with a random learned optimizer and with Adam",
        description="Train one task with a randomly initialised learned optimizer (where "
                    "self-training starts) and with Adam, and print both losses.")
    demo.add_argument("--task", default="mlp", choices=sorted(FAMILIES),
                      help="task family (default: mlp)")
    demo.add_argument("--steps", type=_positive_int, default=300, help="inner steps (default 300)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--adam-lr", type=_positive_float, default=1e-3)
    return parser


def train_overrides(args: argparse.Namespace) -> dict[str, object]:
    """Config fields given on the command line (flags, then --set)."""
    flags = {"population": args.population, "minutes": args.minutes, "max_steps": args.max_steps,
             "seed": args.seed, "outer.kind": args.outer_optimizer, "outer.policy": args.policy,
             "estimator.kind": args.estimator}
    overrides = {k: v for k, v in flags.items() if v is not None}
    overrides.update(dict(args.set))
    return overrides


def train(args: argparse.Namespace) -> int:
    from selfopt.checkpoint import CheckpointError
    from selfopt.live_view import LiveView
    from selfopt.run_dir import RunInUseError
    from selfopt.train import train as run_training
    from selfopt.train_step import BackendError, in_process

    overrides = train_overrides(args)
    if args.resume is not None:
        if args.config or args.out:
            raise ConfigError("--resume takes the run's own config; drop --config/--out")
        if fixed := sorted(set(overrides) - set(RESUMABLE_OVERRIDES)):
            raise ConfigError(f"cannot change {fixed} when resuming; only "
                              f"{list(RESUMABLE_OVERRIDES)} may change")
        run_dir = args.resume
        config_file = run_dir / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"{run_dir} is not a selfopt run directory (no config.json)")
        cfg = make_config(overrides, config_file, saved_run=True)
    else:
        cfg = make_config(overrides, args.config)
        label = "adam-control" if cfg.outer.kind == "adam" else "self"
        run_dir = args.out or Path("runs") / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"--out {run_dir} is a file, not a directory")
        # A run killed before it wrote its config leaves only its lock (and perhaps a
        # temporary file): nothing to resume, so the directory may be used again.
        if run_dir.exists() and any(p.name != ".lock" and ".tmp-" not in p.name
                                    for p in run_dir.iterdir()):
            raise ConfigError(f"{run_dir} already holds a run; resume it with --resume "
                              f"{run_dir}, or choose another --out")

    backend = make_backend(args, cfg)  # before the run directory is touched
    with LiveView("Adam control" if cfg.outer.kind == "adam" else "self-training",
                  60 * cfg.minutes) as view:
        on_eval = lambda row: view.console.print(eval_line(row), highlight=False, soft_wrap=True)
        try:
            summary = run_training(cfg, run_dir, resume=args.resume is not None,
                                   on_step=None if args.quiet else view.update, on_eval=on_eval,
                                   backend=backend)
        except (CheckpointError, RunInUseError, FloatingPointError, BackendError) as err:
            raise ConfigError(str(err)) from None
        except OSError as err:  # a full disk, a folder we may not write: one line, no traceback
            raise ConfigError(f"{run_dir}: {err}") from None
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once, the last checkpoint stays
            print(f"selfopt: interrupted; resume with: selfopt train --resume {run_dir}",
                  file=sys.stderr)
            return 130
        finally:
            if backend is not in_process:
                backend.close()
    print_summary(summary, run_dir)
    return 130 if summary["interrupted"] else 0


def make_backend(args: argparse.Namespace, cfg) -> object:
    """The backend ``--backend`` names (the Ray one connected and its workers started)."""
    from selfopt.train_step import BackendError, in_process

    if args.backend == "local":
        if args.address is not None:
            raise ConfigError("--address needs --backend ray")
        return in_process
    from selfopt.ray_backend import RayBackend

    try:
        return RayBackend(cfg, args.address, args.worker_cpus)
    except BackendError as err:
        raise ConfigError(str(err)) from None


def eval_line(row: dict) -> str:
    """One line about an evaluation during training (a row of ``eval.jsonl``)."""
    return (f"held-out check at {row['elapsed'] / 60:.1f} min (step {row['step']}, member "
            f"{row['member']}): mean normalised loss {row['mean_normalized']:.4f} vs tuned Adam "
            f"{row['adam_mean_normalized']:.4f}, wins {row['wins']}/{row['tasks']}"
            + (" -- BEATS TUNED ADAM" if row["beats_adam"] else "")
            + f" ({row['eval_seconds']:.0f} s, not counted as training time)")


def print_summary(summary: dict, run_dir: Path) -> None:
    fmt = lambda v: "-" if v is None else f"{v:.4f}"
    kind = ("CONTROL: meta-trained by Adam" if summary["outer_optimizer"] == "adam-control"
            else "self-training (no hand-designed optimizer)")
    print(f"{kind}: {summary['steps']} outer steps in {summary['elapsed_s'] / 60:.1f} min"
          + (" (stopped early)" if summary["interrupted"] else ""))
    start, end = summary["held_in_start"], summary["held_in_end"]
    print(f"meta-loss on fixed held-in problems (1 = no progress): random start median "
          f"{fmt(start['median'])} (best {fmt(start['best'])}) -> end median "
          f"{fmt(end['median'])} (best {fmt(end['best'])})"
          + (f"; elite {fmt(summary['elite']['validation'])} (lineage id {summary['elite']['id']}, "
             f"step {summary['elite']['step']})" if summary.get("elite") else ""))
    if last := summary["last_eval"]:
        ttb = summary["time_to_beat_adam_s"]
        print(f"held-out (quick suite) at the end: mean normalised loss "
              f"{last['mean_normalized']:.4f} vs tuned Adam {last['adam_mean_normalized']:.4f}, "
              f"wins {last['wins']}/{last['tasks']}; first beat tuned Adam: "
              + ("never" if ttb is None else f"after {ttb / 60:.1f} training minutes"))
    if (bound := summary.get("step_bound")) and bound["all"] is not None:
        print(f"the step bound (outer.max_update) shortened {bound['all']:.0%} of member steps "
              f"({bound['last_third']:.0%} in the last third of the run)")
    print(f"best member: position {summary['best_position']} (lineage id {summary['best_id']},"
          f" PBT score {fmt(summary['best_score'])})")
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"run directory: {run_dir} (resume with: selfopt train --resume {run_dir})")


def evaluation(args: argparse.Namespace) -> int:
    from selfopt.checkpoint import CheckpointError
    from selfopt.evaluate import (default_cache_dir, evaluate, lopt_candidate, optax_candidate,
                                  print_progress, suite)
    from selfopt.export import read as read_export
    from selfopt.lopt_file import PRETRAINED, LOptFileError, is_lopt_file
    from selfopt.run_dir import open_checkpoint
    from selfopt.train import candidate as run_candidate

    out, source = args.out, {"target": str(args.target)}
    if args.target.startswith("optax:"):
        if args.member is not None:
            raise ConfigError("--member applies to a run or checkpoint, not to an optax optimizer")
        try:
            candidate = optax_candidate(args.target.removeprefix("optax:"))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    elif args.target == "pretrained" or is_lopt_file(Path(args.target)):
        if args.member is not None:
            raise ConfigError("--member applies to a run or checkpoint, not to an exported "
                              "optimizer")
        path = PRETRAINED if args.target == "pretrained" else Path(args.target)
        try:
            lopt, theta, meta = read_export(path)
        except LOptFileError as err:
            raise ConfigError(str(err)) from None
        candidate = lopt_candidate(lopt, theta, meta.get("description", path.name))
        source.update(file=str(path))
    else:
        try:
            cfg, state, path = open_checkpoint(Path(args.target))
        except CheckpointError as err:
            raise ConfigError(str(err)) from None
        try:
            candidate, member = run_candidate(cfg, state, args.member)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        source.update(checkpoint=str(path), step=state.step, **member)
        if out is None and Path(args.target).is_dir():
            out = Path(args.target) / "evaluation.json"
    configs = suite(args.tasks)
    print(f"evaluating {candidate.name} against tuned Adam on {len(configs)} {args.tasks} tasks "
          f"({args.steps} steps, {args.seeds} seeds; tuned Adam is cached in "
          f"{default_cache_dir()})", file=sys.stderr)
    result = evaluate(candidate, configs, args.steps, args.seeds, args.seed, default_cache_dir(),
                      progress=print_progress())
    print_evaluation(result)
    if out is not None:
        result.save(out, **source)
        print(f"results: {out}")
    return 0


def print_evaluation(result) -> None:
    """The per-task table and the summary line of an :class:`~selfopt.evaluate.Evaluation`."""
    width = max(len(t.label) for t in result.tasks)
    print(f"{'task':<{width}}  {'normalised':>10}  {'tuned Adam':>10}  {'Adam lr':>8}  "
          f"{'valid':>8}  {'Adam valid':>10}  {'speedup':>7}  win")
    for t in result.tasks:
        print(f"{t.label:<{width}}  {t.normalized:>10.4f}  {t.adam_normalized:>10.4f}  "
              f"{t.adam_learning_rate:>8.2g}  {t.valid:>8.4f}  {t.adam_valid:>10.4f}  "
              f"{t.speedup:>7.2f}  {'yes' if t.wins else 'no'}")
    s = result.summary()
    print(f"{s['candidate']}: mean normalised loss {s['mean_normalized']:.4f} vs tuned Adam "
          f"{s['adam_mean_normalized']:.4f} (margin {s['margin']:.3g}); wins {s['wins']}/"
          f"{s['tasks']}; beats tuned Adam: {'YES' if s['beats_adam'] else 'no'}")


def export(args: argparse.Namespace) -> int:
    from selfopt.checkpoint import CheckpointError
    from selfopt.export import export as export_file

    if args.out is not None and args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a directory; name the file to write")
    try:
        out, meta = export_file(args.target, args.out, args.member)
    except (CheckpointError, ValueError) as err:
        raise ConfigError(str(err)) from None
    except OSError as err:
        raise ConfigError(f"cannot write {args.out or 'the file'}: {err}") from None
    evaluation = (meta["evaluation"] or {}).get("summary")
    scored = (f"; on {evaluation['tasks']} held-out tasks, margin {evaluation['margin']:.3g} "
              f"against tuned Adam, {evaluation['wins']} wins" if evaluation else
              "; not evaluated yet (selfopt eval RUN records it)")
    print(f"{meta['description']}: {meta['architecture']['kind']} learned optimizer{scored}")
    print(f"wrote {out} (load it with selfopt.load({str(out)!r}))")
    return 0


def plot(args: argparse.Namespace) -> int:
    from selfopt.plots import write_plots

    try:
        written = write_plots(args.run, args.out)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    print(f"{len(written) // 2} figures (PNG and SVG) in {written[0].parent if written else args.out}")
    return 0


def report(args: argparse.Namespace) -> int:
    from selfopt.report import write_report

    try:
        path = write_report(args.run, args.out)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    print(f"report: {path}")
    return 0


def experiment(args: argparse.Namespace) -> int:
    from selfopt.experiment import self_vs_adam

    overrides = dict(args.set)
    make_config({**overrides, "minutes": args.minutes, "seed": args.seed})  # validate first
    out = args.out or Path("runs") / f"self-vs-adam-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty; choose another --out")
    path = self_vs_adam(out, args.minutes, args.seed, args.steps, overrides)
    print(f"report: {path}")
    return 0


def demo(args: argparse.Namespace) -> int:
    from selfopt.demo import run_demo

    started = time.perf_counter()
    curves = run_demo(args.task, args.steps, args.seed, args.adam_lr)
    window = max(1, min(10, args.steps // 10))
    print(f"task: {args.task} (default configuration, seed {args.seed}), {args.steps} steps")
    print(f"{'optimizer':<28} {'first loss':>10} {'final loss':>10}")
    for curve in curves:
        first, final = curve.losses[:window].mean(), curve.losses[-window:].mean()
        print(f"{curve.name:<28} {first:>10.4f} {final:>10.4f}")
    print(f"({time.perf_counter() - started:.1f} s; final = mean of the last {window} steps. "
          "A random learned optimizer barely trains; `selfopt train` makes a population of "
          "them train itself.)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    enable_compilation_cache()
    try:
        return {"demo": demo, "train": train, "eval": evaluation, "export": export, "plot": plot,
                "report": report, "experiment": experiment}[args.command](args)
    except ConfigError as err:
        print(f"selfopt: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``selfopt eval``, ``plot`` and ``report`` on a tiny run: files, contents, errors, a browser."""
import json
import shutil
import subprocess

import numpy as np
import pytest

import selfopt.evaluate as evaluate_module
from selfopt.cli import main
from selfopt.config import make_config
from selfopt.plots import FIGURES, improvement_rate
from selfopt.tasks.distribution import HELDOUT_CONFIGS
from selfopt.train import train

TINY = {"population": 4, "estimator.num_pairs": 1, "estimator.truncation_length": 5,
        "estimator.min_inner_length": 10, "estimator.max_inner_length": 30,
        "tasks.families": ["quadratic"], "num_slots": 1, "task_steps": 3, "pbt.interval": 2,
        "pbt.score_steps": 5, "validate_steps": 5, "lopt.hidden": [8],
        "checkpoint_seconds": 1000.0, "max_steps": 8,
        # evaluate every step's worth of time: several rows in eval.jsonl
        "eval_minutes": 1e-4, "eval_steps": 10, "eval_seeds": 1}


#: The held-out suite of this module: 5 of the 12 tasks (a quadratic, Himmelblau, logistic
#: regression, the convnet for the quick suite to leave out, the digits autoencoder), so that
#: the fixture compiles 4 tasks' evaluations, not 9.
SUITE = tuple(HELDOUT_CONFIGS[i] for i in (0, 2, 4, 7, 11))
QUICK_TASKS = 4


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny run, evaluated with ``selfopt eval`` (quick suite, 10 steps, 1 seed)."""
    root = tmp_path_factory.mktemp("report")
    mp = pytest.MonkeyPatch()
    mp.setenv("SELFOPT_CACHE", str(root / "cache"))
    mp.setattr(evaluate_module, "HELDOUT_CONFIGS", SUITE)
    assert len(evaluate_module.suite("quick")) == QUICK_TASKS
    run_dir = root / "run"
    summary = train(make_config(TINY), run_dir)
    assert main(["eval", str(run_dir), "--tasks", "quick", "--steps", "10", "--seeds", "1"]) == 0
    yield run_dir, summary
    mp.undo()


def test_training_logs_evaluations_with_training_time(tiny_run):
    run_dir, summary = tiny_run
    rows = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert len(rows) >= 3 and rows[0]["step"] == 0 and rows[-1]["step"] == 8
    assert [r["elapsed"] for r in rows] == sorted(r["elapsed"] for r in rows)
    assert all(r["tasks"] == len(r["normalized"]) == QUICK_TASKS for r in rows)
    # tuned Adam is the same yardstick in every row
    assert len({r["adam_mean_normalized"] for r in rows}) == 1
    assert summary["last_eval"]["step"] == 8
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["time_to_beat_adam_s"] == summary["time_to_beat_adam_s"]


def test_eval_writes_a_table_per_task(tiny_run, capsys):
    run_dir, _ = tiny_run
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["summary"]["tasks"] == len(evaluation["tasks"]) == QUICK_TASKS
    assert {"normalized", "adam_normalized", "valid", "adam_valid", "speedup", "wins",
            "adam_learning_rate"} <= set(evaluation["tasks"][0])
    summary = json.loads((run_dir / "summary.json").read_text())
    # the run's answer is its elite, the best held-in validation
    assert evaluation["member"] == "elite"
    assert evaluation["member_id"] == summary["elite"]["id"]


def test_eval_is_reproducible(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    argv = ["eval", str(run_dir), "--tasks", "quick", "--steps", "10", "--seeds", "1"]
    assert main(argv + ["--out", str(tmp_path / "a.json")]) == 0
    assert main(argv + ["--out", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads(
        (tmp_path / "b.json").read_text())


def test_plots_and_report_hold_every_figure_and_table(tiny_run, capsys):
    run_dir, _ = tiny_run
    assert main(["plot", str(run_dir)]) == 0
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == sorted(
        f"{name}.{ext}" for name in FIGURES for ext in ("png", "svg"))
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(FIGURES)
    for heading in ("Summary", "Figures", "Evaluation against per-task tuned Adam",
                    "Evaluations during training (quick held-out suite)", "Lineage of the elite",
                    "Configuration"):
        assert f">{heading}</h2>" in page, heading
    assert "http://" not in page and "https://" not in page  # nothing from the network
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    for task in evaluation["tasks"]:
        assert task["label"] in page


@pytest.mark.parametrize("damage", ["missing", "corrupt", "not-a-run"])
def test_eval_of_a_missing_or_corrupt_checkpoint_is_one_clear_line(tiny_run, tmp_path, capsys,
                                                                    damage):
    run_dir, summary = tiny_run
    if damage == "missing":
        target = tmp_path / "nothing-here"
    elif damage == "corrupt":
        target = tmp_path / "step-1.safetensors"
        data = bytearray(open(summary["checkpoint"], "rb").read())
        data[-100:] = bytes(100)
        target.write_bytes(bytes(data))
    else:
        target = tmp_path
    assert main(["eval", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfopt: error:") and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["eval", "optax:nosuch"], ["eval", "optax:sgd:-1"],
                                  ["eval", "optax:sgd", "--member", "1"],
                                  ["eval", "RUN", "--member", "99"],
                                  ["plot", "NOWHERE"], ["report", "NOWHERE"]])
def test_bad_eval_plot_report_arguments_exit_2(tiny_run, capsys, argv):
    run_dir, _ = tiny_run
    argv = [str(run_dir) if a == "RUN" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfopt: error:") and err.count("\n") == 1


def test_improvement_rate_of_known_curves():
    minutes = np.linspace(0, 10, 1001)
    steady = 10.0 ** (-0.2 * minutes)  # 0.2 decades per minute throughout
    x, rate = improvement_rate(minutes, steady, num_windows=5)
    np.testing.assert_allclose(rate, 0.2, rtol=5e-3)
    np.testing.assert_allclose(x, [2, 4, 6, 8])
    accelerating = 10.0 ** (-0.02 * minutes ** 2)  # instantaneous rate 0.04 t
    x, rate = improvement_rate(minutes, accelerating, num_windows=5)
    np.testing.assert_allclose(rate, 0.04 * x, rtol=1e-2)
    assert np.all(np.diff(rate) > 0)
    # a run that gets worse has a negative rate; one step of noise does not change it much
    noisy = 10.0 ** (0.1 * minutes)
    noisy[500] = 1e-9
    _, rate = improvement_rate(minutes, noisy, num_windows=5)
    np.testing.assert_allclose(rate, -0.1, rtol=1e-2)


def _browser():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which(
        "google-chrome")


@pytest.mark.skipif(_browser() is None, reason="no headless browser on this machine")
def test_report_renders_in_a_headless_browser(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    report = run_dir / "report.html"
    if not report.exists():
        assert main(["report", str(run_dir)]) == 0
    flags = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(flags + ["--dump-dom", report.as_uri()], capture_output=True,
                         text=True, timeout=120).stdout
    assert dom.count("<img") == len(FIGURES) and "Evaluation against per-task tuned Adam" in dom
    shot = tmp_path / "report.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,2400", report.as_uri()],
                   capture_output=True, timeout=120)
    import matplotlib.image as mpimg

    pixels = mpimg.imread(shot)
    assert pixels.shape[0] == 2400 and pixels.shape[1] == 1200
    assert pixels[..., :3].std() > 0.05  # text and figures, not a blank page

"""Crash safety: ``selfopt train`` killed with SIGKILL at random moments resumes every time, never
leaves a corrupt checkpoint, loses at most one checkpoint interval, and ends bitwise where an
uninterrupted run ends. The harness is ``scripts/crash_harness.py`` (docs/reliability.md)."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "crash_harness.py"


def load_harness():
    spec = importlib.util.spec_from_file_location("crash_harness", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check(summary: dict, kills: int) -> None:
    assert summary["ok"], summary["failures"]
    assert summary["kills"] == kills and summary["resumes"] >= kills - 1
    assert summary["resumes_failed"] == 0 and summary["corrupt_checkpoints"] == 0
    assert 0 <= summary["max_steps_lost"] <= summary["checkpoint_interval_steps"]
    assert summary["final_step"] == summary["max_steps"]
    assert summary["arrays_bitwise_equal"] and summary["arrays"] > 10
    assert summary["metadata_equal"] and summary["logs_equal"]
    assert summary["metrics.jsonl_rows"] == 2 * summary["max_steps"]  # 2 members, every step
    assert summary["temp_files_left"] == 0 and summary["failures"] == []


def test_three_sigkills_lose_nothing(tmp_path):
    check(load_harness().run_harness(kills=3, seed=0, workdir=tmp_path), 3)


@pytest.mark.slow
def test_twenty_sigkills_lose_nothing(tmp_path):
    summary = load_harness().run_harness(kills=20, seed=20, workdir=tmp_path)
    check(summary, 20)
    print(summary)

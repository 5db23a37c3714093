"""The Ray backend (selfopt/ray_backend.py) on a local 2-CPU Ray instance: the same numbers as
the in-process run, a killed worker costing only a retry, and one-line errors."""
import json
import os
import signal
import threading

import numpy as np
import pytest
from safetensors.numpy import load_file

from selfopt.cli import main
from selfopt.config import make_config
from selfopt.train import train

ray = pytest.importorskip("ray")
from selfopt import ray_backend  # noqa: E402
from selfopt.ray_backend import RayBackend, check_address  # noqa: E402
from selfopt.train_step import BackendError  # noqa: E402

TINY = {"population": 4, "estimator.num_pairs": 1, "estimator.truncation_length": 5,
        "estimator.min_inner_length": 10, "estimator.max_inner_length": 30,
        "tasks.families": ["quadratic"], "num_slots": 1, "task_steps": 3, "pbt.interval": 2,
        "pbt.score_steps": 5, "validate_steps": 5, "lopt.hidden": [8],
        "checkpoint_seconds": 1000.0, "eval_minutes": 0, "shards": 2, "max_steps": 6}


@pytest.fixture(scope="module")
def backend():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    backend = RayBackend(make_config(TINY))
    yield backend
    backend.close()
    ray.shutdown()


def same_run(a, b):
    """Checkpoints bitwise equal and logs equal but for wall times."""
    x, y = load_file(a["checkpoint"]), load_file(b["checkpoint"])
    assert x.keys() == y.keys() and len(x) > 10
    for name in x:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)
    run_a, run_b = (os.path.dirname(os.path.dirname(s["checkpoint"])) for s in (a, b))
    for log in ("metrics.jsonl", "lineage.jsonl", "validation.jsonl"):
        rows = [[json.loads(line) for line in open(os.path.join(d, log))] for d in (run_a, run_b)]
        for row in rows[0] + rows[1]:
            row.pop("elapsed", None)
        assert rows[0] == rows[1] and rows[0], log


def test_ray_run_equals_in_process_run(tmp_path, backend):
    cfg = make_config(TINY)
    local = train(cfg, tmp_path / "local")
    remote = train(cfg, tmp_path / "ray", backend=backend)
    assert remote["steps"] == 6 and backend.calls >= 6
    same_run(local, remote)


def test_killed_worker_costs_a_retry_not_the_numbers(tmp_path, backend):
    cfg = make_config(TINY)
    local = train(cfg, tmp_path / "local")
    victim, killed = backend.pids()[1], []

    def kill_during_next_step(info):
        if info["state"].step == 2 and not killed:  # lands while step 3's blocks run
            threading.Timer(0.05, os.kill, (victim, signal.SIGKILL)).start()
            killed.append(victim)

    remote = train(cfg, tmp_path / "ray", backend=backend, on_step=kill_during_next_step)
    assert killed and victim not in backend.pids()  # restarted: a new process
    same_run(local, remote)


def test_a_lost_cluster_keeps_the_last_step_and_resume_finishes_the_same_run(tmp_path, backend):
    # every worker gone for good (as when the cluster goes away): the step fails with
    # BackendError, the run keeps its last finished step, and resuming it in-process
    # finishes the run the undisturbed one would have been
    cfg = make_config(TINY)
    local = train(cfg, tmp_path / "local")
    doomed = RayBackend(cfg, worker_cpus=0)  # the module's workers hold both CPUs

    def lose_the_cluster_after_step_3(info):
        if info["state"].step == 3:
            for worker in doomed.workers:
                ray.kill(worker, no_restart=True)

    with pytest.raises(BackendError, match="resume it with selfopt train --resume"):
        train(cfg, tmp_path / "ray", backend=doomed, on_step=lose_the_cluster_after_step_3)
    doomed.close()
    kept = sorted((tmp_path / "ray" / "checkpoints").glob("*.safetensors"))
    assert kept[-1].name == "step-00000003.safetensors"
    resumed = train(cfg, tmp_path / "ray", resume=True)
    assert resumed["steps"] == 6
    same_run(local, resumed)


def test_workers_that_cannot_be_placed_are_a_clear_error_not_a_wait(monkeypatch, backend):
    # the module's workers hold both CPUs: two more can never start
    monkeypatch.setattr(ray_backend, "WORKER_START_TIMEOUT_S", 3.0)
    with pytest.raises(BackendError, match="did not start within 3 s"):
        RayBackend(make_config(TINY))
    assert ray.is_initialized() and len(backend.pids()) == 2  # the running backend unharmed


def test_bad_or_unreachable_address_is_one_line_exit_2(tmp_path, capsys):
    for address, message in (("nonsense", "must be HOST:PORT"),
                             ("127.0.0.1:9", "no Ray cluster answers at 127.0.0.1:9")):
        assert main(["train", "--backend", "ray", "--address", address,
                     "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    with pytest.raises(BackendError, match="must be HOST:PORT"):
        check_address("host:port")


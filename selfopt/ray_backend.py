"""The Ray backend: the members' ES work of every outer step on a Ray cluster's workers.

An outer step's estimates are cut into ``cfg.shards`` blocks of members
(:func:`~selfopt.train_step.member_estimates`); here each block goes to one worker actor,
all at once, and the driver waits for them, then makes the update, PBT and the elite itself
(:func:`~selfopt.train_step.train_step`). A worker is a long-lived actor: its compiled programs
stay in its process from one step to the next (and in the node's compilation cache for a
worker that restarts). A block is a pure function of what the driver sends (weights, noise
scales, problems, keys), so every result equals the in-process run's with the same
configuration.

Faults: a worker process that dies is restarted by Ray and its block sent again
(:data:`MAX_RESTARTS` times per worker); the other blocks are not redone and the numbers do not
change. If a worker cannot be restarted or the cluster goes away, the step raises
:class:`~selfopt.train_step.BackendError`; the run saves the state of the last finished step
and ``selfopt train --resume`` continues it, here or on another cluster (docs/scaling.md).
"""
from __future__ import annotations

import logging
import math
import os
import socket
import time
import warnings
from typing import Any

from selfopt.cache import enable_compilation_cache
from selfopt.config import TrainConfig, make_config
from selfopt.population import slots
from selfopt.train_step import BackendError, estimate_block

#: Restarts of a dead worker (and retries of its block) before the run gives up.
MAX_RESTARTS = 3
#: Seconds to reach a cluster's address before it counts as unreachable.
CONNECT_TIMEOUT_S = 10.0
#: Seconds for every worker to start (be placed on a node and import selfopt and JAX) before
#: the backend gives up: a cluster whose CPUs other jobs hold would leave the run waiting.
WORKER_START_TIMEOUT_S = 300.0


class Worker:
    """A worker actor's body: one training configuration, its compiled block program."""

    def __init__(self, config: dict[str, Any]):
        enable_compilation_cache()
        self.cfg = make_config(config)

    def pid(self) -> int:
        return os.getpid()

    def estimate(self, task_config: dict, block: Any) -> Any:
        """One block's :func:`~selfopt.train_step.member_estimates` on ``task_config`` (JAX
        arrays, PRNG keys included, cross processes by pickle, bit for bit)."""
        return estimate_block(self.cfg.lopt, self.cfg.estimator, slots.task(task_config),
                              *block)


class _DropMessage(logging.Filter):
    """Drops the log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def check_address(address: str) -> None:
    """Raises :class:`BackendError` unless ``address`` (``HOST:PORT``, ``ray://HOST:PORT`` or
    ``auto``) answers within :data:`CONNECT_TIMEOUT_S`: Ray itself waits minutes on a dead
    address."""
    if address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BackendError(f"--address must be HOST:PORT, ray://HOST:PORT or auto, got "
                           f"{address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise BackendError(f"no Ray cluster answers at {address} "
                           f"({err.strerror or type(err).__name__})") from None


class RayBackend:
    """A :data:`~selfopt.train_step.Backend` on Ray: one worker actor per block.

    Args:
      cfg: the run's configuration (``cfg.shards`` workers are started).
      address: a running cluster (``HOST:PORT``, ``ray://HOST:PORT``, ``auto``); ``None``
        starts a local Ray instance with this machine's CPUs.
      worker_cpus: CPUs Ray reserves for each worker (its programs use what the node has).
      workers: worker actors (default ``cfg.shards``, one per block); with fewer, blocks are
        dealt round-robin and a worker runs its blocks one after another.

    Raises:
      BackendError: Ray is not installed, the address is bad or unreachable, or the cluster
        has too few CPUs for the workers.
    """

    def __init__(self, cfg: TrainConfig, address: str | None = None, worker_cpus: float = 1.0,
                 workers: int | None = None):
        try:
            import ray
        except ImportError:
            raise BackendError("the Ray backend needs Ray: pip install 'selfopt[ray]'") from None
        self._ray, self.waited, self.calls = ray, 0.0, 0
        if address is not None:
            check_address(address)
        self._started = not ray.is_initialized()
        if self._started:
            cpus = max(os.cpu_count() or 1, math.ceil(cfg.shards * worker_cpus))
            kwargs = {"address": address} if address is not None else {"num_cpus": cpus}
            # Two lines Ray's start prints that say nothing to act on: that a new local instance
            # has token authentication (Ray's default, kept), and JAX's warning of any fork
            # (Ray starts its processes with fork + exec)
            auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
            quiet = _DropMessage("Token authentication is enabled")
            auth_log.addFilter(quiet)
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
                    ray.init(**kwargs, include_dashboard=False, log_to_driver=False,
                             logging_level=logging.WARNING, configure_logging=True)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise BackendError(f"cannot start Ray ({address or 'local'}): "
                                   f"{str(err).splitlines()[0] if str(err) else err}") from None
            finally:
                auth_log.removeFilter(quiet)
        workers = workers or cfg.shards
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < workers * worker_cpus:
            raise BackendError(f"the Ray cluster has {cpus:g} CPUs; {workers} workers of "
                               f"{worker_cpus:g} CPUs need {workers * worker_cpus:g} (fewer "
                               "shards, a smaller --worker-cpus or a bigger cluster)")
        actor = ray.remote(num_cpus=worker_cpus, max_restarts=MAX_RESTARTS,
                           max_task_retries=MAX_RESTARTS)(Worker)
        self.workers = [actor.remote(cfg.to_json()) for _ in range(workers)]
        try:
            self.pids(timeout=WORKER_START_TIMEOUT_S)
        except (ray.exceptions.RayError, ConnectionError) as err:
            self.close()
            raise BackendError(
                f"{workers} Ray workers of {worker_cpus:g} CPUs did not start within "
                f"{WORKER_START_TIMEOUT_S:g} s ({type(err).__name__}): are the cluster's CPUs "
                "taken by other jobs? (ray status)") from None

    def __call__(self, cfg: TrainConfig, task_config: dict, blocks: list[tuple]) -> list[tuple]:
        futures = [self.workers[i % len(self.workers)].estimate.remote(task_config, block)
                   for i, block in enumerate(blocks)]
        started = time.monotonic()
        try:
            results = self._ray.get(futures)
        except (self._ray.exceptions.RayError, ConnectionError) as err:
            raise BackendError(f"Ray workers lost ({type(err).__name__}); the run keeps its last "
                               "finished step: resume it with selfopt train --resume") from None
        finally:
            self.waited += time.monotonic() - started
            self.calls += 1
        return results

    def pids(self, timeout: float | None = None) -> list[int]:
        """The workers' process ids (what a fault test kills); waits for workers to start."""
        return self._ray.get([w.pid.remote() for w in self.workers], timeout=timeout)

    def close(self) -> None:
        """Stops the workers, and disconnects from (or stops) the Ray it started."""
        for w in self.workers:
            self._ray.kill(w)
        self.workers = []
        if self._started:
            self._ray.shutdown()

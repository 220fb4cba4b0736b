"""The analysis on a Ray cluster's workers: per-chunk observables as Ray tasks (``hpcdyn analyze --address``).

    from analysis.chunk_tasks import summarize_on_workers
    with ray_tasks("auto") as submit:           # a running cluster; or HOST:PORT; or "local" (num_cpus=N)
        summary = summarize_on_workers("ensemble.zarr", submit)

Each task opens the ensemble store by path on the worker that runs it, reads a group of consecutive
chunks (at least ``analysis.chunk_tasks.MIN_TASK_SITES`` lattice sites, ~70-100 ms of work) and
returns their per-snapshot tables; they wait in Ray's object store until the driver's reduction,
the same dask graph as the local analysis, fetches them block by block, so the results are
identical to the last digit and the driver holds a few blocks at a time. The store must be readable
at the same path on every node (a shared filesystem).

Why Ray tasks per chunk and not dask's scheduler on Ray (``ray.util.dask.ray_dask_get``):

- Version support. Ray's "Dask on Ray" page lists the dask it is tested with: 2023.6.1 on Python
  < 3.12 and 2025.5.0 on Python >= 3.12 for Ray >= 2.48; ``ray.util.dask`` itself refuses dask
  < 2024.11 and warns that its optimisations only apply to dask < 2025.1. We require dask >= 2024.12
  and run dask 2026.8 with Ray 2.60 on Python 3.11: outside what Ray tests. (It did compute our
  summary correctly in a trial; a scheduler that is not tested against our dask is still not one to
  put under every study.)
- Granularity and data movement. Under ``ray_dask_get`` every node of the graph becomes a Ray task:
  the read of a chunk (whose raw occupancy then goes through the object store to the task that
  labels it) and every step of the reductions, each well under a millisecond, where a Ray task
  should carry 50 ms or more (~5 k calls/s). The reduction would run on the workers, not the driver.
- Side effects: importing ``ray.util.dask`` patches ``dask.persist`` for the whole process.

Here a task does one thing, reading and labelling its own chunks, and returns 40 bytes a snapshot.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from hpcdyn.physics.systems import ConfigurationError

LOCAL = "local"
PROBE_SECONDS = 5.0


class ClusterFailure(RuntimeError):
    """The Ray cluster failed under a task (a node or worker lost, retries spent), not the task's own code."""


def _call(function: Callable[..., Any], arguments: tuple) -> Any:
    return function(*arguments)


class RayTasks:
    """``submit(function, arguments)``: ``function(*arguments[i])`` as Ray tasks of one CPU each, all
    submitted at once; one future per call, in order (``result()``: the value, fetched from the object store).

    A task that raises re-raises its own exception from ``result()`` (a ConfigurationError stays one)
    after the other tasks of its batch are cancelled; a failure of the cluster itself (a node or
    worker lost, retries spent) raises ClusterFailure.
    """

    def __init__(self, ray: Any = None, connect: Callable[[], Any] | None = None):
        """``ray``: the connected ray module, or ``connect``: how to connect, on first use."""
        if (ray is None) == (connect is None):
            raise ValueError("RayTasks: give ray or connect")
        self._ray, self._connect, self._remote = ray, connect, None
        self.submitted = 0

    @property
    def connected(self) -> bool:
        return self._ray is not None

    @property
    def ray(self) -> Any:
        if self._ray is None:
            self._ray = self._connect()
        return self._ray

    @property
    def cpus(self) -> int:
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)))

    def __call__(self, function: Callable[..., Any], arguments: Sequence[tuple]) -> list[RayFuture]:
        if self._remote is None:
            self._remote = self.ray.remote(num_cpus=1, max_retries=3)(_call)
        references = [self._remote.remote(function, tuple(call)) for call in arguments]
        self.submitted += len(references)
        return [RayFuture(self.ray, reference, references) for reference in references]


class RayFuture:
    """The result of one Ray task; ``batch``: the references cancelled if this one fails."""

    def __init__(self, ray: Any, reference: Any, batch: list):
        self.ray, self.reference, self.batch = ray, reference, batch

    def result(self) -> Any:
        ray = self.ray
        try:
            return ray.get(self.reference)
        except ray.exceptions.RayTaskError as error:
            self.cancel_batch()
            cause = getattr(error, "cause", None)
            raise (cause if isinstance(cause, BaseException) else error) from error
        except ray.exceptions.RayError as error:
            self.cancel_batch()
            raise ClusterFailure(f"address: the Ray cluster failed under a task ({_one_line(error)}); rerun the command") from error

    def cancel_batch(self) -> None:
        for reference in self.batch:
            with contextlib.suppress(Exception):
                self.ray.cancel(reference)


def _host_port(address: str) -> tuple[str, int] | None:
    """HOST and PORT of HOST:PORT or ray://HOST:PORT; None for anything else."""
    text = address.removeprefix("ray://")
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _resolved(address: str) -> str:
    """``auto`` resolved the way Ray resolves it (RAY_ADDRESS, then the latest `ray start` on this machine)."""
    if address != "auto":
        return address
    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die
    except ImportError:  # a Ray without it: leave "auto" to ray.init
        return address
    try:
        return canonicalize_bootstrap_address_or_die(address)
    except ConnectionError as error:
        raise ConfigurationError(f"address: --address auto finds no single running Ray cluster ({_one_line(error)}); "
                                 "give the head's HOST:PORT, or local to start one here") from None


def _one_line(error: BaseException) -> str:
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def check_reachable(address: str) -> str:
    """Refuse, in one line naming --address, an address where no Ray head answers (ray.init would wait minutes)."""
    resolved = _resolved(address)
    target = _host_port(resolved)
    if target is None:
        if resolved == "auto":
            return resolved
        raise ConfigurationError(f"address: --address {address!r} is not HOST:PORT, auto or local")
    try:
        with socket.create_connection(target, timeout=PROBE_SECONDS):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigurationError(
            f"address: no Ray cluster answers at --address {address}"
            + (f" ({resolved})" if resolved != address else "")
            + f": {reason}; give the HOST:PORT that `ray start --head` printed, auto, or local"
        ) from None
    return resolved


@contextlib.contextmanager
def ray_tasks(address: str, num_cpus: int | None = None) -> Iterator[RayTasks]:
    """A RayTasks on the cluster at ``address`` (HOST:PORT, ray://HOST:PORT or auto), or on a Ray
    started here with ``address="local"`` (``num_cpus`` CPUs, default all).

    The address is checked at once (an unreachable one refused in one line); Ray is joined or
    started when the first tasks are submitted, so inputs can be checked before. A Ray this process
    already holds is reused as it is and left running; one joined or started here is shut down on leaving.
    """
    from hpcdyn.distributed.cluster import init_ray, ray_running

    address = address.strip()
    if num_cpus is not None and address != LOCAL:
        raise ConfigurationError("num_cpus: --num-cpus sizes a Ray started here (--address local); a cluster has its own CPUs")
    owned = not ray_running()
    if address == LOCAL:
        resolved = None
    elif not owned and address == "auto":  # the Ray this process already holds
        resolved = address
    else:
        resolved = check_reachable(address)

    def connect() -> Any:
        try:
            return init_ray(resolved, num_cpus=num_cpus, log_to_driver=False)
        except (ConnectionError, RuntimeError) as error:  # no cluster, or another Ray version on the cluster
            raise ConfigurationError(f"address: cannot join the Ray cluster at --address {address} ({_one_line(error)})") from None

    tasks = RayTasks(connect=connect)
    try:
        yield tasks
    finally:
        if owned and tasks.connected:
            tasks.ray.shutdown()

"""Connecting to Ray: a local cluster by default, a running one with an address.

This is the only place that starts Ray, so every command (sweep, ensemble, pipeline) sets the
authentication mode and dashboard binding the same way. Ray 2.60 switches token authentication on
when a token file exists; a driver or worker that lacks the token then fails to connect, so the mode
is always set explicitly (``disabled`` unless the environment or the caller asks for ``token``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Iterator

from hpcdyn.physics.systems import ConfigurationError
from hpcdyn.storage.signals import deferred_interrupts

AUTH_MODES = ("disabled", "token")
PRIVATE_HOST = "127.0.0.1"


def resolve_auth_mode(auth_mode: str | None = None) -> str:
    """The Ray authentication mode to use, written to RAY_AUTH_MODE so Ray's children inherit it."""
    mode = auth_mode or os.environ.get("RAY_AUTH_MODE") or "disabled"
    if mode not in AUTH_MODES:
        raise ConfigurationError(f"auth_mode: {mode!r} is not a Ray authentication mode; use one of {list(AUTH_MODES)}")
    os.environ["RAY_AUTH_MODE"] = mode
    return mode


def ray_running() -> bool:
    """Whether this process is already connected to a Ray (without importing ray when it is not)."""
    import sys

    ray = sys.modules.get("ray")
    return bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())


def import_ray():
    """ray, or a clear error naming the extra to install."""
    try:
        import ray
    except ImportError as error:
        raise ConfigurationError(
            "ray: not installed; install the distributed extra: pip install 'hpcdyn[distributed]'"
        ) from error
    return ray


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: float | None = None,
    auth_mode: str | None = None,
    dashboard_host: str = PRIVATE_HOST,
    include_dashboard: bool = False,
    log_to_driver: bool = True,
) -> Any:
    """Start a local Ray (no address) or join the cluster at ``address``; returns the ray module.

    A local Ray binds its dashboard (when included) to 127.0.0.1 unless ``dashboard_host`` says
    otherwise. ``num_cpus``/``num_gpus`` size a local Ray only; a cluster reports its own resources.
    An already initialised Ray is reused as it is.
    """
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address and address != "auto":
        # ray.init at a HOST:PORT where nothing listens retries for minutes with Ray's own messages
        # (naming other addresses); a TCP probe refuses it in seconds, naming --address
        from hpcdyn.distributed.analysis_tasks import check_reachable

        check_reachable(address)
    resolve_auth_mode(auth_mode)
    with _keeping_sigterm_handler():
        try:
            # An interrupt inside a local start would leave its core worker half made: it is held until
            # the start is complete (seconds), then Ray is left cleanly before the interrupt goes on. Not
            # when joining: an address where nothing answers keeps ray.init waiting for minutes, and an
            # interrupt must end that wait as it did.
            with deferred_interrupts() if not address else contextlib.nullcontext():
                _start_or_join(ray, address, num_cpus, num_gpus, include_dashboard, dashboard_host, log_to_driver)
        except KeyboardInterrupt:
            if ray.is_initialized():
                ray.shutdown()
            raise
    return ray


@contextlib.contextmanager
def _keeping_sigterm_handler() -> Iterator[None]:
    """ray.init replaces a driver's SIGTERM handler with one that exits at once (status 15, no message,
    interrupted work not described). Where the program has its own handler (hpcdyn's commands: SIGTERM
    as SIGINT), Ray's is not installed during the start (a signal in those seconds would meet it) and
    the program's is in place afterwards. Nor is Ray's C++ crash handler in the driver: installed while
    the core worker is made, it also takes SIGTERM, and a SIGTERM it met left the process to abort
    (SIGABRT) or hang on its way out; Ray's workers keep theirs."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    if not (main and callable(previous)):
        yield
        return
    import ray._private.ray_constants as ray_constants  # read when the driver's core worker is made
    import ray._private.utils as ray_utils  # the one place Ray's driver start sets its handler

    installer = getattr(ray_utils, "set_sigterm_handler", None)
    if installer is not None:
        ray_utils.set_sigterm_handler = lambda handler: None
    crash_handler = getattr(ray_constants, "RAY_DISABLE_FAILURE_SIGNAL_HANDLER", False)
    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    try:
        yield
    finally:
        ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = crash_handler
        if installer is not None:
            ray_utils.set_sigterm_handler = installer
        signal.signal(signal.SIGTERM, previous)


def _start_or_join(ray, address, num_cpus, num_gpus, include_dashboard, dashboard_host, log_to_driver) -> None:
    if address:
        if num_cpus is not None or num_gpus is not None:
            raise ConfigurationError("num_cpus: resources are set when a cluster starts, not when joining one at --address")
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        ray.init(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=include_dashboard,
            dashboard_host=dashboard_host,
            log_to_driver=log_to_driver,
        )

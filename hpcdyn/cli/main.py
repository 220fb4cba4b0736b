"""The ``hpcdyn`` command line: thin wrappers over library functions, one module per subcommand.

    hpcdyn simulate --system active --preset paper --t-final 100 --seed 1 --out run.zarr
    hpcdyn likelihood run.zarr
    hpcdyn info run.zarr
    hpcdyn train run.zarr --mode 2 --n-classes 4 --out runs/mode2
    hpcdyn evaluate runs/mode2 [other.zarr]
    hpcdyn sweep | ensemble | analyze | pipeline | slurm ...
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from typing import Any, Callable, Iterator, Sequence

from hpcdyn.cli import analyze, ensemble, evaluate, info, likelihood, locality, pipeline, rules, simulate, slurm, sweep, train
from hpcdyn.cli.options import CommandError, Parser
from hpcdyn.physics.systems import ConfigurationError

# The order of `hpcdyn --help`. Each module imports torch, ray or xarray only when its command runs.
COMMANDS = (simulate, likelihood, info, train, evaluate, rules, locality, sweep, ensemble, analyze, pipeline, slurm)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="hpcdyn",
        description="Learn stochastic dynamics of lattice many-body systems from one trajectory, "
        "and predict their emergent behaviour at scale.",
    )
    from hpcdyn import __version__

    parser.add_argument("--version", action="version", version=f"hpcdyn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(commands)
    return parser


def _emit(result: dict[str, Any] | str | None) -> None:
    """Print a command's result: text as it is, anything else as strict JSON (no NaN, no Infinity)."""
    from hpcdyn.storage import strict_json

    if result is None:
        return
    print(result if isinstance(result, str) else strict_json.dumps(result, indent=2))


def one_line(error: BaseException) -> str:
    """An error message on one line (a message that spans lines is joined with '; ')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def _os_error(error: OSError) -> str:
    where = error.filename if error.filename is not None else "output"
    return f"{where}: {error.strerror or one_line(error)}"


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[dict[str, str]]:
    """SIGTERM (what scancel, kill and job schedulers send) is handled like SIGINT (Ctrl-C) while a
    command runs: the same handler stops it, cleanly. Yields a dict whose "signal" says which came."""
    received = {"signal": "SIGINT"}
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def on_terminate(signum, frame) -> None:
        received["signal"] = "SIGTERM"
        interrupt = signal.getsignal(signal.SIGINT)
        if callable(interrupt) and interrupt is not signal.default_int_handler:
            # a library's graceful stop (Ray Tune), as on Ctrl-C; SIGTERM's own number lets a deferred
            # write (storage.signals) stop afterwards even where SIGINT is ignored
            interrupt(signal.SIGTERM, frame)
        else:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_terminate)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


OUT_OF_MEMORY = "memory: this machine ran out of memory; make the run smaller (lattice, replicas, times, model)"


def _out_of_memory(error: RuntimeError) -> bool:
    text = str(error)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def _interrupted(args: argparse.Namespace, received: dict[str, str]) -> int:
    describe: Callable[[argparse.Namespace], str] | None = getattr(args, "interrupted", None)
    try:
        left = describe(args) if describe else "nothing was written"
    except Exception as error:  # the message must not hide the interruption
        left = f"what is left could not be determined ({one_line(error)})"
    print(f"hpcdyn {args.command}: interrupted by {received['signal']}; {left}", file=sys.stderr)
    return 143 if received["signal"] == "SIGTERM" else 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], Any] = args.handler
    from hpcdyn.storage.trajectory_store import StoreError

    def refuse(message: str) -> int:
        print(f"hpcdyn {args.command}: error: {message}", file=sys.stderr)
        return 2

    with terminate_as_interrupt() as received:
        try:
            _emit(handler(args))
        except (ConfigurationError, StoreError, FileExistsError, CommandError) as error:
            return refuse(one_line(error))
        except KeyboardInterrupt:
            return _interrupted(args, received)
        except OSError as error:  # a path that cannot be read or written: named, one line
            return refuse(_os_error(error))
        except MemoryError:
            return refuse(OUT_OF_MEMORY)
        except RuntimeError as error:  # torch reports a failed allocation (CPU or GPU) as a RuntimeError
            if not _out_of_memory(error):
                raise
            return refuse(f"{OUT_OF_MEMORY} ({one_line(error)[:200]})")
    return 0

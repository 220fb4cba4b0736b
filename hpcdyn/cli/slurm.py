"""``hpcdyn slurm``: write sbatch scripts, and the two helpers those scripts call on the nodes.

    hpcdyn slurm ray --nodes 4 --gpus-per-node 4 --time 12:00:00 --out sweep.sbatch \\
        -- hpcdyn sweep ntheta --storage /shared/sweeps --name ntheta
    hpcdyn slurm array --density 0.124 0.3 0.5 --replicas 16 --t-final 1000 --snapshot-every 10 \\
        --seed 1 --out-dir /shared/original --out original.sbatch
    hpcdyn slurm port-block --job-id 1234        (inside a job: a free port block on this node)
    hpcdyn slurm wait-for-nodes --address HOST:PORT --nodes 4
"""

from __future__ import annotations

import argparse
import os
import shlex
from typing import Any, Sequence

from hpcdyn.cli.options import SYSTEM_OPTIONS, check_output_path, non_negative_int, positive_float, positive_int, positive_time
from hpcdyn.physics.systems import ConfigurationError


def _add_resources(parser: argparse.ArgumentParser, job_name: str, nodes: bool) -> None:
    group = parser.add_argument_group("allocation")
    group.add_argument("--job-name", default=job_name, help=f"SLURM job name (default {job_name})")
    if nodes:
        group.add_argument("--nodes", type=int, default=1, help="nodes; Ray head on the first, workers on the rest (default 1)")
    label = "node" if nodes else "task"
    group.add_argument("--cpus", type=int, help=f"CPUs per {label} (--cpus-per-task); default: the partition's default")
    group.add_argument("--gpus", type=int, default=0, help="GPUs per node (--gpus-per-node; default 0)")
    group.add_argument("--mem", help="memory per node, SLURM's --mem form, e.g. 64G (default: the partition's default)")
    group.add_argument("--time", default="04:00:00", help="time limit, e.g. 30, 04:00:00, 2-00:00:00 (default 04:00:00)")
    group.add_argument("--partition", help="partition (default: the cluster's default)")
    group.add_argument("--account", help="account to charge")
    default_output = "%x-%j.out" if nodes else "%x-%A_%a.out"
    group.add_argument("--log", default=default_output, help=f"job log file pattern (--output; default {default_output})".replace("%", "%%"))
    if nodes:  # an array task's simulation cannot resume mid-way, so only Ray jobs take the signal
        group.add_argument("--signal-seconds", type=int, default=300,
                           help="seconds before the time limit at which the job stops its driver and requeues itself; 0: never (default 300)")  # fmt: skip
    group.add_argument("--no-requeue", dest="requeue", action="store_false", help="do not let SLURM requeue the job after preemption or node failure")
    group.add_argument("--sbatch", metavar="OPTION", action="append", default=[], help="extra sbatch option, e.g. --sbatch=--qos=high (repeatable)")
    group.add_argument("--setup", metavar="LINE", action="append", default=[],
                       help="shell line run first, e.g. 'source /shared/hpcdyn/.venv/bin/activate' (repeatable)")  # fmt: skip
    parser.add_argument("--out", help="write the script here (default: print it)")


def _resources(args: argparse.Namespace, nodes: int) -> Any:
    from hpcdyn.distributed.slurm import JobResources

    return JobResources(
        job_name=args.job_name,
        nodes=nodes,
        cpus_per_node=args.cpus,
        gpus_per_node=args.gpus,
        memory=args.mem,
        time=args.time,
        partition=args.partition,
        account=args.account,
        output=args.log,
        signal_seconds=getattr(args, "signal_seconds", 0),
        requeue=args.requeue,
        sbatch_options=tuple(args.sbatch),
        setup=tuple(args.setup),
    )


def _emit_script(text: str, out: str | None) -> str | dict[str, Any]:
    if out is None:
        return text.rstrip("\n")
    from hpcdyn.distributed.slurm import write_script

    check_output_path(out)
    return {"script": str(write_script(text, out)), "submit": f"sbatch {shlex.quote(out)}"}


def _add_ray(commands) -> None:
    parser = commands.add_parser(
        "ray",
        help="sbatch script: a Ray cluster on the allocation running one driver",
        description="Write an sbatch script that starts a Ray head on the first node and workers on the others "
        "(srun ray start --block), waits until all nodes have joined, runs DRIVER with --address appended, and stops "
        "Ray by PID. Per-job Ray temp dir, spill dir and ports; explicit authentication (a fresh token per job by "
        "default); private dashboard; CPUs, GPUs and memory from the allocation; SIGUSR1 before the time limit stops "
        "the driver and requeues the job, which then resumes. Without DRIVER the script takes it as its arguments.",
    )
    _add_resources(parser, "hpcdyn-ray", nodes=True)
    ray = parser.add_argument_group("ray")
    ray.add_argument("--auth-mode", choices=("token", "disabled"), default="token",
                     help="token: a fresh Ray token per job (default); disabled: trusted networks only")  # fmt: skip
    ray.add_argument("--dashboard", action="store_true", help="start the Ray dashboard, bound to the head's 127.0.0.1")
    ray.add_argument("--ray-tmp-root", default="/tmp", help="node-local root of the per-job Ray temp dirs; keep it short (default /tmp)")
    ray.add_argument("--node-timeout", type=int, default=300, help="seconds for all nodes to join (default 300)")
    ray.add_argument("--stop-grace", type=int, default=60, help="seconds the driver gets to stop after SIGINT (default 60)")
    parser.add_argument("driver", nargs=argparse.REMAINDER, help="after --: the driver command, e.g. -- hpcdyn sweep ntheta --smoke")
    parser.set_defaults(handler=_ray)


def check_driver(driver: Sequence[str]) -> None:
    """An ``hpcdyn`` driver is parsed now, so a typo fails here and not after hours in the queue.

    It lives in the command line because only the command line knows its own parser."""
    if not driver or driver[0] != "hpcdyn":
        return
    import contextlib
    import io

    from hpcdyn.cli.main import build_parser

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args([*driver[1:], "--address", "127.0.0.1:1"])
    except SystemExit as error:
        message = errors.getvalue().strip().splitlines()[-1:] or ["--help is not a driver"]
        raise ConfigurationError(f"driver: {shlex.join(driver)!r} does not parse: {message[0]}") from error


def _ray(args: argparse.Namespace) -> str | dict[str, Any]:
    from hpcdyn.distributed.slurm import RaySettings, render_ray_job

    driver = args.driver[1:] if args.driver[:1] == ["--"] else args.driver
    settings = RaySettings(
        auth_mode=args.auth_mode,
        dashboard=args.dashboard,
        tmp_root=args.ray_tmp_root,
        node_timeout=args.node_timeout,
        stop_grace=args.stop_grace,
    )
    check_driver(driver)
    return _emit_script(render_ray_job(_resources(args, args.nodes), settings, driver), args.out)


def _add_array(commands) -> None:

    parser = commands.add_parser(
        "array",
        help="sbatch job array: ensembles of the original dynamics, no Ray",
        description="Write an sbatch job array with one exact simulation of the original active dynamics per "
        "(density, replica): task k runs density k // replicas, replica k %% replicas, seed SEED + k, into "
        "OUT_DIR/density-<value>/replica-<index>.zarr. A task whose store is complete does nothing, so the array "
        "can be requeued or resubmitted.",
    )
    _add_resources(parser, "hpcdyn-original", nodes=False)
    ensemble = parser.add_argument_group("ensemble")
    ensemble.add_argument("--density", type=float, nargs="+", required=True, help="densities to simulate")
    ensemble.add_argument("--replicas", type=int, required=True, help="replicas per density")
    ensemble.add_argument("--t-final", type=positive_time, required=True, help="simulated time T of each replica")
    ensemble.add_argument("--snapshot-every", type=positive_time, required=True, help="record the lattice every DT")
    ensemble.add_argument("--seed", type=int, default=0, help="seed of task 0; task k uses SEED + k (default 0)")
    ensemble.add_argument("--out-dir", required=True, help="directory of the trajectory stores (made absolute)")
    ensemble.add_argument("--preset", default="paper", help="active-model preset the options below change (default paper)")
    for option in ("--L", "--D", "--v-plus", "--v-other"):
        name, kind, text = SYSTEM_OPTIONS[option]
        ensemble.add_argument(option, dest=name, type=kind, help=text)
    ensemble.add_argument("--max-parallel", type=int, help="at most this many tasks at once (--array=...%%N)")
    parser.set_defaults(handler=_array)


def _array(args: argparse.Namespace) -> str | dict[str, Any]:
    from hpcdyn.distributed.slurm import OriginalEnsemble, render_array_job

    parameters = tuple((name, getattr(args, name)) for name in ("L", "D", "v_plus", "v_other") if getattr(args, name) is not None)
    ensemble = OriginalEnsemble(
        densities=tuple(args.density),
        replicas=args.replicas,
        t_final=args.t_final,
        snapshot_every=args.snapshot_every,
        seed=args.seed,
        out=os.path.abspath(args.out_dir),
        preset=args.preset,
        parameters=parameters,
        max_parallel=args.max_parallel,
    )
    return _emit_script(render_array_job(_resources(args, 1), ensemble), args.out)


def _add_port_block(commands) -> None:
    parser = commands.add_parser(
        "port-block",
        help="(inside a job) print the base of a free block of Ray ports on this node",
        description="Print the first port of a block of ports all free on this node, searched from the node's own "
        "block (job id plus node index, modulo the number of blocks), and with --claim mark it taken, so jobs "
        "sharing a node get disjoint ports even when they start at the same moment.",
    )
    parser.add_argument("--job-id", type=non_negative_int, required=True, help="the SLURM job id")
    parser.add_argument("--node-index", type=non_negative_int, default=0, help="this node's index in the job (default 0, the head)")
    parser.add_argument("--claim", metavar="DIR", help="claim the block for the job whose Ray temp dir on this node is DIR")
    parser.set_defaults(handler=_port_block)


def _port_block(args: argparse.Namespace) -> str:
    from hpcdyn.distributed.slurm import free_port_block

    return str(free_port_block(args.job_id, args.node_index, args.claim))


def _add_wait(commands) -> None:
    parser = commands.add_parser(
        "wait-for-nodes",
        help="(inside a job) wait until a Ray cluster has all its nodes",
        description="Connect to the Ray cluster at --address and wait until --nodes nodes are alive; fail early "
        "when the process --pid (the head's ray start) exits, or after --timeout seconds.",
    )
    parser.add_argument("--address", required=True, help="HOST:PORT of the Ray head")
    parser.add_argument("--nodes", type=int, required=True, help="number of nodes to wait for")
    parser.add_argument("--timeout", type=positive_float, default=300.0, help="seconds before giving up (default 300)")
    parser.add_argument("--pid", type=positive_int, help="give up as soon as this process (the head) exits")
    parser.set_defaults(handler=_wait)


def _wait(args: argparse.Namespace) -> dict[str, Any]:
    from hpcdyn.distributed.slurm import wait_for_nodes

    if args.nodes < 1:
        raise ConfigurationError(f"nodes: must be >= 1, got {args.nodes}")
    return wait_for_nodes(args.address, args.nodes, args.timeout, args.pid)


def add_parser(commands) -> None:
    """Register ``hpcdyn slurm`` and its subcommands."""
    parser = commands.add_parser(
        "slurm",
        help="write sbatch scripts for Ray clusters on SLURM and for job arrays",
        description="Write sbatch scripts (a Ray cluster running a sweep, ensemble or pipeline; a job array of "
        "original-dynamics simulations), and the helpers those scripts call inside a job.",
    )
    subcommands = parser.add_subparsers(dest="slurm_command", required=True, metavar="SUBCOMMAND")
    for add in (_add_ray, _add_array, _add_port_block, _add_wait):
        add(subcommands)

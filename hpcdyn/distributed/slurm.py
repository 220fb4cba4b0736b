"""SLURM job scripts: a Ray cluster on an allocation running one driver, and job arrays without Ray.

``render_ray_job`` writes an sbatch script that starts a Ray head on the first node and a Ray
worker on every other node (``srun ... ray start --block``), waits until all nodes have joined,
runs one driver (``hpcdyn sweep``, ``hpcdyn ensemble``, ``hpcdyn pipeline`` or any command that
takes ``--address``), and stops Ray by the PIDs it started. Each job gets its own Ray temp and
spill directories and its own block of ports, so two jobs on one node do not meet; Ray's
authentication is explicit (a fresh token per job by default) and its dashboard is private.
CPUs, GPUs and memory come from the allocation. Before the time limit (``--signal``) the driver
is stopped and the job requeues itself; a preempted or requeued job reruns the same driver,
which resumes (Tuner.restore for sweeps, the manifest for ensembles).

``render_array_job`` writes a job array of ``hpcdyn simulate`` runs of the original dynamics,
one (density, replica) per task: no Ray at all, and a requeued task whose store is already
complete does nothing.

The scripts call back into two helpers of this module, ``free_port_block`` and
``wait_for_nodes`` (``hpcdyn slurm port-block`` and ``hpcdyn slurm wait-for-nodes``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from hpcdyn.physics.systems import ConfigurationError, make_system

AUTH_MODES = ("token", "disabled")
# Port blocks sit below Linux's ephemeral range (32768+), so outgoing connections never take them.
PORT_RANGE = (10000, 30000)
PORT_BLOCK = 400
PORT_OFFSETS = {  # port of each Ray service = block base + offset; workers get the rest of the block
    "gcs": 0,
    "node_manager": 1,
    "object_manager": 2,
    "ray_client_server": 3,
    "dashboard": 4,
    "dashboard_agent_grpc": 5,
    "dashboard_agent_listen": 6,
    "metrics_export": 7,
    "runtime_env_agent": 8,
}
FIRST_WORKER_PORT_OFFSET = 10
# Claims on port blocks live in one place per node, whatever temp dirs the jobs use.
CLAIM_ROOT = "/tmp"
_TIME_PATTERN = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
_MEMORY_PATTERN = re.compile(r"^\d+[KMGT]?$")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")
_PATH_PATTERN = re.compile(r"^/[A-Za-z0-9._/-]*$")  # node-local roots: no spaces, quotes or shell characters
# sbatch reads #SBATCH lines itself (bash never runs them): one token each, no quoting to go wrong
_SBATCH_TOKEN = re.compile(r"^[^\s'\"`$\\;<>|&()]+$")


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigurationError(f"{field}: {message}")


def check_shell_syntax(text: str, field: str) -> None:
    """``bash -n`` on ``text``: a script (or a setup line) that does not parse is refused before it is written."""
    bash = shutil.which("bash")
    if bash is None:  # nowhere to check; sbatch runs bash, which will say the same
        return
    result = subprocess.run([bash, "-n"], input=text, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        problem = " ".join(result.stderr.strip().splitlines()[:1]) or f"bash -n exit status {result.returncode}"
        raise ConfigurationError(f"{field}: does not parse as bash ({problem})")


def time_limit_seconds(limit: str) -> int:
    """Seconds in a SLURM time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    _require(bool(_TIME_PATTERN.match(limit)), "time", f"{limit!r} is not a SLURM time limit; use e.g. 30, 04:00:00 or 2-00:00:00")
    days, _, clock = limit.rpartition("-")
    parts = [int(part) for part in clock.split(":")]
    if days:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (parts + [0, 0])[:3]
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if len(parts) == 1:  # minutes
        return parts[0] * 60
    if len(parts) == 2:  # MM:SS
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


@dataclasses.dataclass(frozen=True)
class JobResources:
    """What the job asks SLURM for, and how it handles the end of its time.

    ``cpus_per_node``/``gpus_per_node`` request the allocation; the script reads what SLURM
    actually granted from its variables. ``signal_seconds`` before the time limit the batch shell
    gets SIGUSR1, stops the driver and requeues the job (0: no signal). ``setup`` lines run before
    anything else, e.g. ``source /path/to/.venv/bin/activate`` or ``module load cuda``.
    """

    job_name: str = "hpcdyn"
    nodes: int = 1
    cpus_per_node: int | None = None
    gpus_per_node: int = 0
    memory: str | None = None
    time: str = "04:00:00"
    partition: str | None = None
    account: str | None = None
    output: str = "%x-%j.out"
    signal_seconds: int = 300
    requeue: bool = True
    sbatch_options: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _require(bool(_NAME_PATTERN.match(self.job_name)), "job_name", f"use letters, digits, '.', '_' or '-', got {self.job_name!r}")
        _require(isinstance(self.nodes, int) and self.nodes >= 1, "nodes", f"must be an integer >= 1, got {self.nodes!r}")
        _require(self.cpus_per_node is None or self.cpus_per_node >= 1, "cpus_per_node", f"must be >= 1, got {self.cpus_per_node!r}")
        _require(self.gpus_per_node >= 0, "gpus_per_node", f"must be >= 0, got {self.gpus_per_node!r}")
        _require(self.memory is None or bool(_MEMORY_PATTERN.match(self.memory)), "memory", f"use SLURM's --mem form, e.g. 64G or 4000 (MB), got {self.memory!r}")
        limit = time_limit_seconds(self.time)
        _require(limit > 0, "time", f"must be positive, got {self.time!r}")
        _require(0 <= self.signal_seconds <= 65535, "signal_seconds", f"must be in [0, 65535], got {self.signal_seconds}")
        _require(self.signal_seconds < limit, "signal_seconds", f"{self.signal_seconds} s is not before the time limit {self.time} ({limit} s); lower it")
        for name in ("partition", "account"):
            value = getattr(self, name)
            _require(value is None or bool(_NAME_PATTERN.match(value)), name, f"use letters, digits, '.', '_' or '-', got {value!r}")
        _require(bool(_SBATCH_TOKEN.match(self.output)), "output",
                 f"a file name pattern without spaces, quotes or shell characters, such as %x-%j.out, got {self.output!r}")  # fmt: skip
        for option in self.sbatch_options:
            _require(option.startswith("--") and bool(_SBATCH_TOKEN.match(option)), "sbatch_options",
                     f"each must be one long sbatch option such as --qos=high, without spaces, quotes or shell characters, got {option!r}")  # fmt: skip
        for line in self.setup:
            _require("\n" not in line and "\r" not in line and line.strip() != "", "setup", f"each entry is one shell line, got {line!r}")
            check_shell_syntax(line + "\n", f"setup: {line!r}")

    def header(self, ntasks_per_node: bool = True) -> list[str]:
        """The #SBATCH lines."""
        lines = [f"--job-name={self.job_name}", f"--nodes={self.nodes}"]
        if ntasks_per_node:
            lines.append("--ntasks-per-node=1")
        if self.cpus_per_node is not None:
            lines.append(f"--cpus-per-task={self.cpus_per_node}")
        if self.gpus_per_node:
            lines.append(f"--gpus-per-node={self.gpus_per_node}")
        if self.memory is not None:
            lines.append(f"--mem={self.memory}")
        lines.append(f"--time={self.time}")
        lines += [f"--{name}={getattr(self, name)}" for name in ("partition", "account") if getattr(self, name)]
        lines += [f"--output={self.output}", "--open-mode=append"]  # a requeued run appends to the same log
        if self.requeue:
            lines.append("--requeue")
        if self.signal_seconds:
            lines.append(f"--signal=B:USR1@{self.signal_seconds}")
        lines += list(self.sbatch_options)
        return [f"#SBATCH {line}" for line in lines]

    def setup_block(self) -> str:
        return "\n".join(self.setup) if self.setup else "# (no setup lines: the job uses the environment sbatch passes on)"


@dataclasses.dataclass(frozen=True)
class RaySettings:
    """Defaults baked into a Ray job script; each can be overridden by its variable at submission."""

    auth_mode: str = "token"
    dashboard: bool = False
    tmp_root: str = "/tmp"
    node_timeout: int = 300
    stop_grace: int = 60

    def __post_init__(self) -> None:
        _require(self.auth_mode in AUTH_MODES, "auth_mode", f"use one of {list(AUTH_MODES)}, got {self.auth_mode!r}")
        _require(bool(_PATH_PATTERN.match(self.tmp_root)) and os.path.normpath(self.tmp_root) == self.tmp_root
                 and len(self.tmp_root) <= 40, "tmp_root",
                 "an absolute, normalised node-local path of at most 40 characters from letters, digits, '.', '_', "
                 f"'-' and '/' (Ray's socket paths must stay short), got {self.tmp_root!r}")  # fmt: skip
        _require(isinstance(self.node_timeout, int) and 10 <= self.node_timeout <= 86400, "node_timeout",
                 f"must be 10 to 86400 seconds, got {self.node_timeout!r}")  # fmt: skip
        _require(isinstance(self.stop_grace, int) and 1 <= self.stop_grace <= 86400, "stop_grace",
                 f"must be 1 to 86400 seconds, got {self.stop_grace!r}")  # fmt: skip


def render_ray_job(resources: JobResources, settings: RaySettings, driver: Sequence[str] = ()) -> str:
    """An sbatch script: Ray on every node of the allocation, then ``driver --address HEAD:PORT``.

    Without ``driver`` the script takes the driver as its arguments: ``sbatch job.sbatch hpcdyn sweep ...``.
    """
    quoted = {
        "auth_mode": settings.auth_mode,
        "dashboard": "true" if settings.dashboard else "false",
        "tmp_root": settings.tmp_root,
        "node_timeout": str(settings.node_timeout),
        "stop_grace": str(settings.stop_grace),
    }
    values = {
        "header": "\n".join(resources.header()),
        **{name: shlex.quote(value) for name, value in quoted.items()},  # data, never code, wherever it lands
        "setup": resources.setup_block(),
        "driver": shlex.join(driver),
        "port_block": str(PORT_BLOCK),
        "first_worker_port": str(FIRST_WORKER_PORT_OFFSET),
        "claim_root": CLAIM_ROOT,
        **{f"port_{name}": str(offset) for name, offset in PORT_OFFSETS.items()},
    }
    return _checked(_fill(RAY_JOB_TEMPLATE, values))


@dataclasses.dataclass(frozen=True)
class OriginalEnsemble:
    """A grid of independent simulations of the original active dynamics: density x replica.

    Task k simulates density ``densities[k // replicas]``, replica ``k % replicas``, with seed
    ``seed + k``, into ``out/density-<value>/replica-<index>.zarr``.
    """

    densities: tuple[float, ...]
    replicas: int
    t_final: float
    snapshot_every: float
    seed: int
    out: str
    preset: str | None = "paper"
    parameters: tuple[tuple[str, Any], ...] = ()
    max_parallel: int | None = None

    def __post_init__(self) -> None:
        _require(len(self.densities) >= 1, "density", "give at least one density")
        _require(len(set(self.densities)) == len(self.densities), "density", f"densities repeat: {list(self.densities)}")
        _require(isinstance(self.replicas, int) and self.replicas >= 1, "replicas", f"must be an integer >= 1, got {self.replicas!r}")
        for name in ("t_final", "snapshot_every"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value > 0, name, f"must be a finite time > 0, got {value!r}")
        _require(self.snapshot_every <= self.t_final, "snapshot_every", f"{self.snapshot_every} is longer than t_final {self.t_final}")
        _require(os.path.isabs(self.out), "out", f"must be an absolute path (array tasks may start in another directory), got {self.out!r}")
        _require(self.max_parallel is None or self.max_parallel >= 1, "max_parallel", f"must be >= 1, got {self.max_parallel!r}")
        _require(isinstance(self.seed, int) and self.seed >= 0, "seed", f"must be an integer >= 0, got {self.seed!r}")
        _require(self.preset is None or bool(_NAME_PATTERN.match(self.preset)), "preset", f"must be a preset name, got {self.preset!r}")
        for density in self.densities:  # every system is built now: a density with N > L^2 fails here
            make_system("active", {**dict(self.parameters), "density": density}, preset=self.preset)

    @property
    def tasks(self) -> int:
        return len(self.densities) * self.replicas

    def simulate_options(self) -> list[str]:
        options = ["--system", "active"]
        if self.preset:
            options += ["--preset", self.preset]
        for name, value in self.parameters:
            options += ["--" + name.replace("_", "-"), str(value)]
        return options + ["--t-final", repr(self.t_final), "--snapshot-every", repr(self.snapshot_every)]


def render_array_job(resources: JobResources, ensemble: OriginalEnsemble) -> str:
    """An sbatch job array: one ``hpcdyn simulate`` of the original dynamics per (density, replica)."""
    _require(resources.nodes == 1, "nodes", f"an array task runs on one node, got {resources.nodes}")
    _require(resources.signal_seconds == 0, "signal_seconds", "an array task cannot resume a simulation mid-way; leave it 0")
    array = f"0-{ensemble.tasks - 1}" + (f"%{ensemble.max_parallel}" if ensemble.max_parallel else "")
    header = resources.header(ntasks_per_node=False) + [f"#SBATCH --array={array}"]
    values = {
        "header": "\n".join(header),
        "setup": resources.setup_block(),
        "densities": " ".join(shlex.quote(repr(float(density))) for density in ensemble.densities),
        "replicas": shlex.quote(str(ensemble.replicas)),
        "seed": shlex.quote(str(ensemble.seed)),
        "out": shlex.quote(ensemble.out),
        "simulate_options": shlex.join(ensemble.simulate_options()),
    }
    return _checked(_fill(ARRAY_JOB_TEMPLATE, values))


def _checked(script: str) -> str:
    """Every rendered script passes ``bash -n`` before anyone writes or submits it."""
    check_shell_syntax(script, "script")
    return script


def _fill(template: str, values: Mapping[str, str]) -> str:
    text = template
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", value)
    left = re.findall(r"\{\{(\w+)\}\}", text)
    assert not left, f"template placeholders without values: {left}"
    return text


# --- helpers the scripts call on the nodes -------------------------------------------------------


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port_block(
    job_id: int,
    node_index: int = 0,
    claim: str | os.PathLike | None = None,
    port_range: tuple[int, int] = PORT_RANGE,
    block: int = PORT_BLOCK,
    claim_root: str | os.PathLike = CLAIM_ROOT,
) -> int:
    """Base port of a block whose ports are all free on this node, searched from the job's own block.

    Each node of a job starts from its own block (job id plus the node's index in the job, modulo
    the number of blocks) and skips blocks in use. With ``claim`` (the node's per-job Ray temp dir,
    which exists while the job runs) the block is also claimed, by a symlink
    ``claim_root/hpcdyn-ray-ports-<base>`` pointing to that dir, so a job that probes before another
    has bound its ports still sees them taken. A claim whose dir is gone (its job ended) is stale
    and is taken over.
    """
    low, high = port_range
    count = (high - low) // block
    _require(count >= 1, "port_range", f"{port_range} holds no block of {block} ports")
    owner = None if claim is None else Path(os.path.abspath(claim))
    _require(owner is None or owner.is_dir(), "claim", f"{claim} is not a directory")
    if owner is not None:  # a node holds one block per job: drop claims left by a killed earlier run
        _release_claims(owner, Path(claim_root))
    for step in range(count):
        base = low + ((job_id + node_index + step) % count) * block
        link = Path(claim_root) / f"hpcdyn-ray-ports-{base}"
        if owner is not None and not _claim_block(link, owner):
            continue
        if all(_port_free(port) for port in range(base, base + block)):
            return base
        if owner is not None:
            link.unlink(missing_ok=True)
    raise ConfigurationError(f"ports: no free block of {block} ports in {low}-{high} on {socket.gethostname()}")


def _release_claims(owner: Path, claim_root: Path) -> None:
    for link in claim_root.glob("hpcdyn-ray-ports-*"):
        try:
            if Path(os.readlink(link)) == owner:
                link.unlink()
        except OSError:
            pass


def _claim_block(link: Path, owner: Path) -> bool:
    for _ in range(2):
        try:
            os.symlink(owner, link)  # atomic: of two jobs claiming at once, one wins
            return True
        except FileExistsError:
            try:
                target = Path(os.readlink(link))
            except OSError:  # released meanwhile; try again
                continue
            if target == owner:  # ours, from before a requeue
                return True
            if target.exists():
                return False
            try:
                link.unlink()  # stale: the job that claimed it has gone
            except OSError:
                return False  # another user's, in a sticky /tmp
    return False


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _port_open(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def wait_for_nodes(address: str, nodes: int, timeout: float, watch_pid: int | None = None) -> dict[str, Any]:
    """Block until ``nodes`` Ray nodes are alive in the cluster at ``address``.

    Fails early when ``watch_pid`` (the head's ``ray start``) exits, and after ``timeout`` seconds
    with the nodes that did join.
    """
    deadline = time.monotonic() + timeout

    def check(condition_met: bool, waiting_for: str) -> bool:
        if condition_met:
            return True
        if watch_pid is not None and not _process_alive(watch_pid):
            raise ConfigurationError(f"ray head: process {watch_pid} exited while waiting for {waiting_for}; see the Ray log above")
        if time.monotonic() > deadline:
            raise ConfigurationError(f"nodes: gave up after {timeout:g} s waiting for {waiting_for}")
        time.sleep(0.5)
        return False

    while not check(_port_open(address), f"the head at {address} to listen"):
        pass
    from hpcdyn.distributed.cluster import init_ray

    ray = init_ray(address, log_to_driver=False)
    try:
        while True:
            alive = [node for node in ray.nodes() if node["Alive"]]
            if check(len(alive) >= nodes, f"{nodes} nodes to join (have {len(alive)})"):
                resources = ray.cluster_resources()
                return {"address": address, "nodes": len(alive), "CPU": resources.get("CPU", 0), "GPU": resources.get("GPU", 0)}
    finally:
        ray.shutdown()


RAY_JOB_TEMPLATE = r"""#!/bin/bash
{{header}}
#
# A Ray cluster on this allocation, one driver, then a clean shutdown (written by `hpcdyn slurm ray`;
# slurm/README.md explains each step). The Ray head runs on the first node, a worker on every other
# node; the driver gets `--address HEAD:PORT` appended. Submit as it is, or give the driver as
# arguments: sbatch THIS_FILE hpcdyn sweep ntheta --storage /shared/sweeps --name ntheta
set -euo pipefail

# Settings: the defaults written into this script (quoted: a value is data, never code); override
# any at submission, for example HPCDYN_RAY_AUTH_MODE=disabled sbatch THIS_FILE (sbatch passes the
# environment on).
HPCDYN_RAY_AUTH_MODE=${HPCDYN_RAY_AUTH_MODE:-{{auth_mode}}}  # token: a fresh token per job; disabled: trusted networks only
HPCDYN_RAY_DASHBOARD=${HPCDYN_RAY_DASHBOARD:-{{dashboard}}}  # true: a dashboard on the head's 127.0.0.1 (reach it with ssh -L)
HPCDYN_RAY_TMP_ROOT=${HPCDYN_RAY_TMP_ROOT:-{{tmp_root}}}  # node-local and short: Ray's socket paths must fit 107 characters
HPCDYN_RAY_SPILL_ROOT=${HPCDYN_RAY_SPILL_ROOT:-${TMPDIR:-/tmp}}  # node-local scratch for objects spilled from memory
HPCDYN_RAY_HEAD_IP=${HPCDYN_RAY_HEAD_IP:-}  # default: the head's first address in `hostname -I`
HPCDYN_NODE_TIMEOUT=${HPCDYN_NODE_TIMEOUT:-{{node_timeout}}}  # seconds for every node to join
HPCDYN_STOP_GRACE=${HPCDYN_STOP_GRACE:-{{stop_grace}}}  # seconds the driver gets to stop after a signal
export HPCDYN_RAY_TMP_ROOT HPCDYN_RAY_SPILL_ROOT  # the workers make their own directories under them

{{setup}}

driver=({{driver}})
if [ "$#" -gt 0 ]; then driver=("$@"); fi

log() { printf '[hpcdyn-slurm %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
[ "${#driver[@]}" -gt 0 ] || { log "no driver: give one as arguments, e.g. hpcdyn sweep ntheta --smoke"; exit 2; }
command -v ray >/dev/null || { log "ray not found on PATH: add a setup line that activates the environment"; exit 2; }
command -v hpcdyn >/dev/null || { log "hpcdyn not found on PATH: add a setup line that activates the environment"; exit 2; }

export job_id=${SLURM_JOB_ID:?run this script with sbatch}
nodes=${SLURM_JOB_NUM_NODES:-1}
ray_tmp="" spill_dir=""  # made private below: mktemp -d, mode 700, owner checked
export RAY_AUTH_MODE=$HPCDYN_RAY_AUTH_MODE
case "$RAY_AUTH_MODE" in
    token) RAY_AUTH_TOKEN=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n'); export RAY_AUTH_TOKEN ;;  # kept in memory, passed to srun
    disabled) unset RAY_AUTH_TOKEN RAY_AUTH_TOKEN_PATH ;;
    *) log "HPCDYN_RAY_AUTH_MODE must be token or disabled, got '$RAY_AUTH_MODE'"; exit 2 ;;
esac

# What SLURM granted this node, as the task sees it.
node_cpus() { echo "${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}"; }
node_gpus() {
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then echo "$SLURM_GPUS_ON_NODE"
    elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .
    else echo 0; fi
}
# Ray sizes its object store from the whole machine; a shared node must use the allocation instead.
node_memory_options() {
    local megabytes=${SLURM_MEM_PER_NODE:-0} store
    if [ "$megabytes" = 0 ] && [ -n "${SLURM_MEM_PER_CPU:-}" ]; then megabytes=$((SLURM_MEM_PER_CPU * $(node_cpus))); fi
    [ "$megabytes" -gt 0 ] || return 0
    store=$((megabytes * 3 / 10)); [ "$store" -ge 100 ] || store=100
    echo "--object-store-memory=$((store * 1048576)) --memory=$(((megabytes - store) * 1048576))"
}
# This node's Ray ports: one free block, searched from the job's own, so jobs sharing a node differ.
node_port_options() {
    local base=$1
    echo "--node-manager-port=$((base + {{port_node_manager}})) --object-manager-port=$((base + {{port_object_manager}}))" \
        "--metrics-export-port=$((base + {{port_metrics_export}})) --runtime-env-agent-port=$((base + {{port_runtime_env_agent}}))" \
        "--dashboard-agent-grpc-port=$((base + {{port_dashboard_agent_grpc}})) --dashboard-agent-listen-port=$((base + {{port_dashboard_agent_listen}}))" \
        "--min-worker-port=$((base + {{first_worker_port}})) --max-worker-port=$((base + {{port_block}} - 1))"
}

# Per-job directories: unpredictable names (mktemp), mode 700, checked to be ours, under a root that
# other users cannot tamper with; directories of an earlier run of this job on this node are ours and stale.
private_dir() {  # ROOT NAME: prints a new private directory ROOT/NAME.XXXXXX
    local root=${1%/} name=$2 old dir
    mkdir -p "$root"
    if [ -n "$(find "$root" -maxdepth 0 -perm -0002 ! -perm -1000)" ]; then
        log "$root is writable by every user and not sticky: choose another HPCDYN_RAY_TMP_ROOT / HPCDYN_RAY_SPILL_ROOT"; return 1
    fi
    for old in "$root/$name".*; do
        if [ -d "$old" ] && [ ! -L "$old" ] && [ -O "$old" ]; then rm -rf "$old"; fi
    done
    dir=$(mktemp -d "$root/$name.XXXXXX") && chmod 700 "$dir" || { log "cannot create a directory under $root"; return 1; }
    if [ -L "$dir" ] || [ ! -O "$dir" ]; then log "$dir is not owned by $(id -un)"; return 1; fi
    printf '%s\n' "$dir"
}
# A claim on a port block covers the moment between finding the block free and Ray binding it.
release_ports() {  # BASE DIR: drop the claim on a port block if DIR's job holds it
    local link="{{claim_root}}/hpcdyn-ray-ports-$1"
    if [ -n "$1" ] && [ "$(readlink "$link" 2>/dev/null)" = "$2" ]; then rm -f "$link"; fi
}
wait_for_port() {  # PORT PID: until this node's PORT accepts connections, or PID has exited
    while kill -0 "$2" 2>/dev/null; do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 1
    done
}
# A worker node: runs under srun, stops its `ray start` on SIGINT (forwarded by srun) or SIGTERM, cleans up.
ray_worker() {
    # SLURM_NODEID counts from 0 within this step, which starts at the job's second node.
    local index=$((SLURM_NODEID + 1)) base dir spill pid
    dir=$(private_dir "$HPCDYN_RAY_TMP_ROOT" "hpcdyn-ray-$job_id-$index") || exit 1
    spill=$(private_dir "$HPCDYN_RAY_SPILL_ROOT" "hpcdyn-ray-spill-$job_id-$index") || exit 1
    base=$(hpcdyn slurm port-block --job-id "$job_id" --node-index "$index" --claim "$dir")
    # shellcheck disable=SC2046
    ray start --block --address="$ray_address" --temp-dir="$dir" --object-spilling-directory="$spill" \
        --num-cpus="$(node_cpus)" --num-gpus="$(node_gpus)" $(node_memory_options) $(node_port_options "$base") \
        --disable-usage-stats &
    pid=$!
    trap 'kill -TERM "$pid" 2>/dev/null || true' TERM INT
    wait_for_port $((base + {{port_node_manager}})) "$pid" || true
    release_ports "$base" "$dir"
    wait "$pid" || wait "$pid" || true
    rm -rf "$dir" "$spill"
}

head_base="" head_pid="" workers_pid="" driver_pid="" reaper_pid="" signals=0 requeue_at_end=0
stop_pid() {  # PID NAME [SIGNAL]: the signal (TERM), then SIGKILL after 30 s
    local pid=$1 name=$2 signal=${3:-TERM}
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    log "stopping $name (pid $pid)"
    kill -"$signal" "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then log "$name did not stop; killing it"; kill -KILL "$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
}
stop_ray() {
    # srun --disable-status hands a single SIGINT to every worker task (SIGTERM would make it kill them
    # at once); `ray start --block` stops the Ray processes it started when it gets SIGTERM.
    stop_pid "$workers_pid" "the Ray workers" INT
    stop_pid "$head_pid" "the Ray head"
    workers_pid="" head_pid=""
    release_ports "$head_base" "$ray_tmp"
    local dir
    for dir in "$ray_tmp" "$spill_dir"; do [ -z "$dir" ] || rm -rf "$dir"; done
}
stop_driver() {  # SIGINT first (Tune saves its state), SIGTERM then SIGKILL if it lingers
    signals=$((signals + 1))
    [ -n "$driver_pid" ] && kill -0 "$driver_pid" 2>/dev/null || return 0
    kill -INT "$driver_pid" 2>/dev/null || true
    if [ -z "$reaper_pid" ]; then
        ( sleep "$HPCDYN_STOP_GRACE"; kill -TERM "$driver_pid" 2>/dev/null && sleep 10 && kill -KILL "$driver_pid" 2>/dev/null ) &
        reaper_pid=$!
    fi
}
on_time_limit() { log "time limit near: stopping the driver; the job requeues itself and resumes"; requeue_at_end=1; stop_driver; }
on_terminate() { log "SIGTERM (scancel, preemption or requeue): stopping the driver"; stop_driver; }
trap on_time_limit USR1
trap on_terminate TERM
trap stop_ray EXIT

log "job $job_id (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-$(hostname)}: $nodes node(s), auth $RAY_AUTH_MODE"
head_ip=${HPCDYN_RAY_HEAD_IP:-$(hostname -I | awk '{print $1}')}
ray_tmp=$(private_dir "$HPCDYN_RAY_TMP_ROOT" "hpcdyn-ray-$job_id-0")
spill_dir=$(private_dir "$HPCDYN_RAY_SPILL_ROOT" "hpcdyn-ray-spill-$job_id-0")
head_base=$(hpcdyn slurm port-block --job-id "$job_id" --claim "$ray_tmp")
export ray_address="$head_ip:$((head_base + {{port_gcs}}))"
# shellcheck disable=SC2046
ray start --head --block --node-ip-address="$head_ip" --port="$((head_base + {{port_gcs}}))" \
    --ray-client-server-port="$((head_base + {{port_ray_client_server}}))" \
    --include-dashboard="$HPCDYN_RAY_DASHBOARD" --dashboard-host=127.0.0.1 --dashboard-port="$((head_base + {{port_dashboard}}))" \
    --temp-dir="$ray_tmp" --object-spilling-directory="$spill_dir" \
    --num-cpus="$(node_cpus)" --num-gpus="$(node_gpus)" $(node_memory_options) $(node_port_options "$head_base") \
    --disable-usage-stats &
head_pid=$!
if [ "$nodes" -gt 1 ]; then
    export -f ray_worker private_dir log release_ports wait_for_port node_cpus node_gpus node_memory_options node_port_options
    srun --nodes=$((nodes - 1)) --ntasks=$((nodes - 1)) --ntasks-per-node=1 --relative=1 --overlap \
        --kill-on-bad-exit=0 --disable-status bash -c ray_worker &
    workers_pid=$!
fi
hpcdyn slurm wait-for-nodes --address "$ray_address" --nodes "$nodes" --timeout "$HPCDYN_NODE_TIMEOUT" --pid "$head_pid"
release_ports "$head_base" "$ray_tmp"

if [ "$signals" = 0 ]; then
    log "driver: ${driver[*]} --address $ray_address"
    # A background command of a script ignores SIGINT unless told otherwise; the driver must not.
    ( trap - INT; RAY_ADDRESS=$ray_address exec "${driver[@]}" --address "$ray_address" ) &
    driver_pid=$!
    while :; do  # a trapped signal interrupts `wait`; keep waiting until the driver has exited
        signals_before=$signals
        wait "$driver_pid" && status=0 || status=$?
        [ "$signals" != "$signals_before" ] || break
    done
    [ -z "$reaper_pid" ] || kill "$reaper_pid" 2>/dev/null || true
    log "driver exited with status $status"
else
    status=143
    log "stopped before the driver started"
fi
stop_ray
trap - EXIT
# Requeue even when the driver exited 0: an interrupted Tune run returns normally. A driver that had
# in fact finished finds nothing left to do in the next run.
if [ "$requeue_at_end" = 1 ]; then
    log "requeueing job $job_id: the next run resumes where this one stopped"
    scontrol requeue "$job_id"
fi
exit "$status"
"""


ARRAY_JOB_TEMPLATE = r"""#!/bin/bash
{{header}}
#
# Ensembles of the original dynamics need no Ray: one exact simulation per array task (written by
# `hpcdyn slurm array`). Task k runs density densities[k / replicas], replica k % replicas, seed
# SEED + k. A store is written under a temporary name and renamed when complete, so a requeued
# or resubmitted task whose store exists has nothing left to do.
set -euo pipefail
export OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1

{{setup}}

densities=({{densities}})
replicas={{replicas}}
seed={{seed}}
out={{out}}

log() { printf '[hpcdyn-slurm %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
task=${SLURM_ARRAY_TASK_ID:?run this script with sbatch (it is a job array)}
density=${densities[task / replicas]}
replica=$((task % replicas))
store="$out/density-$density/replica-$(printf %04d "$replica").zarr"
if [ -e "$store" ]; then log "task $task: $store is complete already"; exit 0; fi
mkdir -p "$(dirname "$store")"
log "task $task (restart ${SLURM_RESTART_COUNT:-0}): density $density, replica $replica, seed $((seed + task))"
hpcdyn simulate {{simulate_options}} --density "$density" --seed "$((seed + task))" --out "$store"
"""


def write_script(text: str, path: str | os.PathLike) -> Path:
    """Write a rendered script (executable), replacing the file atomically; it must pass ``bash -n``."""
    check_shell_syntax(text, "script")
    target = Path(path)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        partial.write_text(text)
        partial.chmod(0o755)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target

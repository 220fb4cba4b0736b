"""The sbatch scripts against a real single-node SLURM started by slurm/testing/local_slurm.sh.

Every job is submitted when the module starts (the node runs two one-CPU jobs at a time), and each
test then polls squeue for its own: two Ray jobs of a small driver side by side (own temp dirs,
ports and tokens; CPUs and memory from the allocation; nothing left behind), the smoke N_theta
sweep, a smoke ensemble requeued once while running (it resumes from its manifest), and a job
array of the original dynamics without Ray. The cluster lives in a temporary directory and is
stopped by PID. Skipped, with the reason, only where SLURM cannot be installed (not root, no apt).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpcdyn.distributed.slurm import CLAIM_ROOT, JobResources, OriginalEnsemble, RaySettings, render_array_job, render_ray_job, write_script

pytestmark = pytest.mark.slow

REPOSITORY = Path(__file__).resolve().parents[1]
LOCAL_SLURM = REPOSITORY / "slurm" / "testing" / "local_slurm.sh"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
ENSEMBLE_UNITS = 8  # 2 densities x 4 replicas, one replica per unit


@dataclass
class Slurm:
    """A private SLURM and the environment its jobs run in."""

    directory: Path
    ray_root: Path
    env: dict

    def run(self, *command: str) -> str:
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
        return result.stdout

    def submit(self, script: Path, *arguments: str, options: tuple[str, ...] = ()) -> str:
        return self.run("sbatch", "--parsable", *options, str(script), *arguments).strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """scontrol's record of a job (kept for MinJobAge after it ends)."""
        line = self.run("scontrol", "show", "job", "--oneliner", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def in_queue(self, job_id: str) -> bool:
        return bool(self.run("squeue", "--noheader", "--jobs", job_id, "--format=%T").strip())

    def wait(self, job_id: str, timeout: float) -> dict:
        """Poll squeue until the job (every task of an array) has left the queue; its final record."""
        deadline = time.monotonic() + timeout
        while self.in_queue(job_id):
            assert time.monotonic() < deadline, f"job {job_id} still queued after {timeout} s: {self.job(job_id)}"
            time.sleep(1)
        return self.job(job_id)

    def log(self, job_id: str) -> str:
        path = self.directory / "jobs" / f"job-{job_id}.out"
        return path.read_text() if path.exists() else ""


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "SLURM integration needs Linux"
    install = subprocess.run(["bash", str(LOCAL_SLURM), "install"], capture_output=True, text=True, timeout=900)
    if install.returncode == 3:  # the installer's "cannot install here" status
        return f"SLURM cannot be installed here: {install.stderr.strip().splitlines()[-1]}"
    assert install.returncode == 0, install.stderr
    return None


@contextlib.contextmanager
def _cluster(nodes: int):
    """A private SLURM of ``nodes`` nodes on this machine, in its own temporary directories."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    # Not under pytest's private temp root: munged runs as the munge user and must reach its socket.
    directory = Path(tempfile.mkdtemp(prefix="hpcdyn-slurm-", dir="/tmp"))
    # Ray's socket paths must stay under 107 characters: a short per-session root in /tmp.
    ray_root = Path(tempfile.mkdtemp(prefix="hr", dir="/tmp"))
    started = subprocess.run(["bash", str(LOCAL_SLURM), "start", str(directory), str(nodes)],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    try:
        if started.returncode == 3:  # installed, but this machine cannot run it (slurmd needs root)
            pytest.skip(f"SLURM cannot run here: {started.stderr.strip().splitlines()[-1]}")
        assert started.returncode == 0, started.stderr
        env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "RAY_"))}
        env.update(
            SLURM_CONF=str(directory / "slurm.conf"),
            PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}:/usr/sbin:/sbin",
            HPCDYN_RAY_TMP_ROOT=str(ray_root),
            HPCDYN_RAY_SPILL_ROOT=str(ray_root),
            OMP_NUM_THREADS="1",
        )
        (directory / "jobs").mkdir()
        yield Slurm(directory, ray_root, env)
    finally:
        subprocess.run(["bash", str(LOCAL_SLURM), "stop", str(directory)], capture_output=True, timeout=120)
        shutil.rmtree(ray_root, ignore_errors=True)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm():
    """The cluster the issue asks for: one node named localhost."""
    with _cluster(1) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def slurm_pair():
    """Two nodes (two slurmd on this machine), so the srun path that starts Ray workers runs too."""
    with _cluster(2) as cluster:
        yield cluster


def _ray_script(slurm: Slurm) -> Path:
    resources = JobResources(job_name="ray", cpus_per_node=1, time="00:10:00", signal_seconds=60,
                             output=str(slurm.directory / "jobs" / "job-%j.out"))  # fmt: skip
    return write_script(render_ray_job(resources, RaySettings(node_timeout=120, stop_grace=30)), slurm.directory / "ray.sbatch")


@pytest.fixture(scope="module")
def jobs(slurm, slurm_pair):
    """Every job of the module, submitted at once in the order the tests need them, and the two
    interruptions (a requeue, a time-limit signal), each sent from its own thread once its job is
    part-way through, whichever test happens to be running then."""
    directory = slurm.directory
    ray_script = _ray_script(slurm)
    progress = [sys.executable, str(REPOSITORY / "tests" / "ray_progress_driver.py"), "--units", "4", "--seconds", "1"]
    submitted = {
        "two_nodes": slurm_pair.submit(_ray_script(slurm_pair), *progress[:-4], "--units", "8", "--seconds", "2",
                                       "--parallel", "2", "--out", str(slurm_pair.directory / "progress"),
                                       options=("--nodes=2",)),  # fmt: skip
        "progress_a": slurm.submit(ray_script, *progress, "--out", str(directory / "progress-a")),
        "progress_b": slurm.submit(ray_script, *progress, "--out", str(directory / "progress-b")),
        "ensemble": slurm.submit(
            ray_script, "hpcdyn", "ensemble", "--model", "original", "--density", "0.124", "0.3", "--replicas", "4",
            "--replicas-per-unit", "1", "--L", "16", "--t-final", "8000", "--snapshot-every", "100", "--seed", "3",
            "--out", str(directory / "ensemble.zarr"), "--no-progress",
        ),  # fmt: skip
        "sweep": slurm.submit(
            ray_script, "hpcdyn", "sweep", "ntheta", "--smoke", "--grid", "model.n_classes=1,2", "--grid", "training.seed=0",
            "--set", "training.epochs=1", "--storage", str(directory / "sweeps"), "--name", "ntheta-slurm", "--no-progress",
        ),  # fmt: skip
    }
    array_resources = JobResources(job_name="original", cpus_per_node=1, time="00:10:00", signal_seconds=0,
                                   output=str(directory / "jobs" / "job-%A_%a.out"))  # fmt: skip
    ensemble = OriginalEnsemble(densities=(0.124, 0.3), replicas=1, t_final=5.0, snapshot_every=1.0, seed=11,
                                out=str(directory / "original"), parameters=(("L", 12),))  # fmt: skip
    array_script = write_script(render_array_job(array_resources, ensemble), directory / "array.sbatch")
    submitted["array"] = slurm.submit(array_script)
    submitted["array_script"] = str(array_script)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as interrupter:
        submitted["ensemble_requeued"] = interrupter.submit(
            _when_part_done, slurm, submitted["ensemble"], directory / "ensemble.zarr" / ".manifest" / "done", "*.json",
            lambda: slurm.run("scontrol", "requeue", submitted["ensemble"]),
        )  # fmt: skip
        # What --signal=B:USR1@N does before the time limit: SIGUSR1 to the batch shell only.
        submitted["two_nodes_signalled"] = interrupter.submit(
            _when_part_done, slurm_pair, submitted["two_nodes"], slurm_pair.directory / "progress", "unit-*.json",
            lambda: slurm_pair.run("scancel", "--signal=USR1", "--batch", submitted["two_nodes"]),
        )  # fmt: skip
        yield submitted


def _when_part_done(slurm: Slurm, job_id: str, units: Path, pattern: str, interrupt, timeout: float = 240) -> int:
    """Once two units of the job are recorded (files ``units/pattern``) while it runs, interrupt it;
    returns the number of units done before."""
    deadline = time.monotonic() + timeout
    while len(list(units.glob(pattern))) < 2:
        assert slurm.in_queue(job_id), f"job {job_id} left the queue before it could be interrupted: {slurm.log(job_id)}"
        assert time.monotonic() < deadline, slurm.log(job_id)
        time.sleep(0.2)
    done = len(list(units.glob(pattern)))
    interrupt()
    return done


def _ray_leftovers(slurm: Slurm, job_id: str) -> list[str]:
    """Directories, port-block claims and processes of a job's Ray (head, workers) that outlived it."""
    # per-node private directories: hpcdyn-ray-<job>-<node index>.XXXXXX and hpcdyn-ray-spill-<job>-<node index>.XXXXXX
    prefixes = (f"hpcdyn-ray-{job_id}-", f"hpcdyn-ray-spill-{job_id}-")
    leftovers = [path.name for path in slurm.ray_root.iterdir() if path.name.startswith(prefixes)]
    markers = (f"{slurm.ray_root}/hpcdyn-ray-{job_id}-",)  # head (node 0) and worker dirs
    for link in Path(CLAIM_ROOT).glob("hpcdyn-ray-ports-*"):
        with contextlib.suppress(OSError):
            if (os.readlink(link) + "/").startswith(markers):
                leftovers.append(link.name)
    for process in Path("/proc").iterdir():
        try:
            command = (process / "cmdline").read_bytes().decode(errors="replace") if process.name.isdigit() else ""
        except OSError:
            continue
        if any(marker in command for marker in markers):
            leftovers.append(f"pid {process.name}")
    return leftovers


def _seconds(stamp: str) -> float:
    return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))


def test_two_ray_jobs_share_the_node_without_meeting(slurm, jobs):
    records = {name: slurm.wait(jobs[name], timeout=180) for name in ("progress_a", "progress_b")}
    clusters = {}
    for name, record in records.items():
        job_id = jobs[name]
        assert record["JobState"] == "COMPLETED", slurm.log(job_id)
        out = slurm.directory / name.replace("_", "-")
        assert sorted(path.name for path in out.glob("unit-*.json")) == [f"unit-{unit}.json" for unit in range(4)]
        cluster = json.loads((out / "cluster-0.json").read_text())
        clusters[name] = cluster
        assert cluster["job_id"] == job_id and cluster["nodes"] == 1
        # Ray's CPUs and object store come from the allocation: 1 CPU, 30 % of its memory.
        assert cluster["resources"]["CPU"] == 1.0
        allocated_mb = int(record["MinMemoryCPU"].rstrip("M"))
        assert cluster["resources"]["object_store_memory"] == pytest.approx(allocated_mb * 3 // 10 * 1048576)
        assert cluster["object_store_socket"].startswith(f"{slurm.ray_root}/hpcdyn-ray-{job_id}-0.")
        assert cluster["auth_mode"] == "token" and cluster["token_set"]
        assert _ray_leftovers(slurm, job_id) == [], slurm.log(job_id)
    a, b = records["progress_a"], records["progress_b"]
    assert _seconds(a["StartTime"]) < _seconds(b["EndTime"]) and _seconds(b["StartTime"]) < _seconds(a["EndTime"]), (
        "the two jobs did not run at the same time"
    )
    ports = {name: int(cluster["address"].rsplit(":", 1)[1]) for name, cluster in clusters.items()}
    assert abs(ports["progress_a"] - ports["progress_b"]) >= 400  # different port blocks


def test_smoke_ensemble_requeued_while_running_resumes(slurm, jobs):
    job_id = jobs["ensemble"]
    finished_before = jobs["ensemble_requeued"].result(timeout=300)
    assert finished_before < ENSEMBLE_UNITS, "the ensemble finished before the requeue; make its units longer"
    record = slurm.wait(job_id, timeout=200)
    log = slurm.log(job_id)
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", log
    assert "(restart 0)" in log and "(restart 1)" in log and "SIGTERM" in log
    import numpy as np

    from hpcdyn.storage.ensemble_store import finished_units, open_ensemble

    assert len(finished_units(slurm.directory / "ensemble.zarr")) == ENSEMBLE_UNITS
    dataset = open_ensemble(slurm.directory / "ensemble.zarr")  # refuses an incomplete store
    occupied = (dataset["occupancy"] > 0).sum(dim=("y", "x")).compute().values
    expected = np.array([round(density * 16 * 16) for density in (0.124, 0.3)])
    # Every snapshot of every replica holds its density's N particles: no hole, no half-written unit.
    assert (occupied == expected[None, :, None, None]).all()
    assert _ray_leftovers(slurm, job_id) == []


def test_smoke_sweep_runs_through_ray_on_slurm(slurm, jobs):
    job_id = jobs["sweep"]
    record = slurm.wait(job_id, timeout=300)
    log = slurm.log(job_id)
    assert record["JobState"] == "COMPLETED", log
    assert re.search(r"driver: hpcdyn sweep ntheta .* --address [\d.]+:\d+", log)
    assert "N* = " in log
    from hpcdyn.distributed.sweep_results import load_sweep_results

    results = load_sweep_results(slurm.directory / "sweeps" / "ntheta-slurm")
    assert int((results["status"] == "done").sum()) == 3  # Mode 2 with N_theta 1 and 2, Mode 1; seed 0
    assert _ray_leftovers(slurm, job_id) == []


def test_job_array_simulates_the_original_dynamics_without_ray(slurm, jobs):
    from hpcdyn.storage.trajectory_store import open_trajectory

    job_id = jobs["array"]
    slurm.wait(job_id, timeout=180)
    for task, density in enumerate((0.124, 0.3)):
        record = slurm.job(f"{job_id}_{task}")
        assert record["JobState"] == "COMPLETED", slurm.log(f"{job_id}_{task}")
        store = slurm.directory / "original" / f"density-{density!r}" / "replica-0000.zarr"
        trajectory = open_trajectory(store)
        assert trajectory.system.N == round(density * 144) and trajectory.seed == 11 + task
        assert "ray" not in slurm.log(f"{job_id}_{task}").lower()
    # Resubmitted, every task finds its store complete and does nothing.
    stamps = sorted(path.stat().st_mtime_ns for path in (slurm.directory / "original").rglob("*.json"))
    again = slurm.submit(Path(jobs["array_script"]))
    slurm.wait(again, timeout=120)
    assert all("is complete already" in slurm.log(f"{again}_{task}") for task in range(2))
    assert sorted(path.stat().st_mtime_ns for path in (slurm.directory / "original").rglob("*.json")) == stamps


def test_ray_job_across_two_nodes_requeues_itself_at_the_time_limit_signal(slurm_pair, jobs):
    job_id = jobs["two_nodes"]
    out = slurm_pair.directory / "progress"
    assert 2 <= jobs["two_nodes_signalled"].result(timeout=300) < 8
    record = slurm_pair.wait(job_id, timeout=240)
    log = slurm_pair.log(job_id)
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1" and record["NodeList"] == "node[1-2]", log
    assert "time limit near" in log and f"requeueing job {job_id}" in log
    units = [json.loads((out / f"unit-{unit}.json").read_text()) for unit in range(8)]
    before = [unit for unit in units if unit["restart"] == 0]
    assert 2 <= len(before) < 8 and f"restart 1: {len(before)} units done before, {8 - len(before)} to do" in log
    for restart in (0, 1):
        cluster = json.loads((out / f"cluster-{restart}.json").read_text())
        assert cluster["nodes"] == 2 and cluster["resources"]["CPU"] == 2.0  # one CPU from each node's allocation
    # Two units at a time, one CPU per node: the first run's units ran on both nodes.
    assert len({unit["node"] for unit in before}) == 2, "every unit ran on one node: the worker did not serve"
    assert "sending Ctrl-C to StepId" in log  # the workers were stopped through srun, then the head
    assert _ray_leftovers(slurm_pair, job_id) == [], log

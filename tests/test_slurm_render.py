"""sbatch scripts rendered by `hpcdyn slurm`, compared with golden files; their validation; the helpers.

Golden files live in tests/golden/; the example scripts in slurm/ are renderings too and are
checked the same way. After an intended change, rewrite both with
    HPCDYN_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_slurm_render.py
and read the diff before committing it.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcdyn.cli import main
from hpcdyn.distributed.slurm import (
    PORT_BLOCK,
    JobResources,
    OriginalEnsemble,
    RaySettings,
    free_port_block,
    render_ray_job,
    time_limit_seconds,
    wait_for_nodes,
)
from hpcdyn.physics.systems import ConfigurationError

REPOSITORY = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("HPCDYN_UPDATE_GOLDEN") == "1"

# file -> the `hpcdyn slurm` command line that renders it
GOLDEN_CASES = {
    "tests/golden/ray-defaults.sbatch": "ray",
    "tests/golden/ray-multinode-gpu.sbatch": (
        "ray --job-name ntheta --nodes 4 --cpus 16 --gpus 4 --mem 128G --time 1-12:00:00 --partition gpu "
        "--account physics --log /shared/logs/%x-%j.out --signal-seconds 600 --sbatch=--qos=high "
        "--sbatch=--exclusive --setup 'module load cuda/12.4' --setup 'source /shared/hpcdyn/.venv/bin/activate' "
        "--auth-mode disabled --dashboard --ray-tmp-root /dev/shm --node-timeout 600 --stop-grace 120 "
        "-- hpcdyn sweep ntheta --storage /shared/sweeps --name ntheta --gpus-per-trial 0.25"
    ),
    "tests/golden/ray-no-requeue.sbatch": (
        "ray --cpus 2 --time 30 --signal-seconds 0 --no-requeue -- hpcdyn ensemble --model original "
        "--density 0.124 0.3 --replicas 4 --t-final 10 --snapshot-every 1 --seed 1 --out /shared/ensemble.zarr"
    ),
    "tests/golden/array-original.sbatch": (
        "array --density 0.124 0.3 0.5 --replicas 8 --t-final 1000 --snapshot-every 10 --seed 7 "
        "--out-dir /shared/original --L 40 --v-plus 20 --cpus 1 --time 02:00:00 --max-parallel 16 "
        "--partition cpu --setup 'source /shared/hpcdyn/.venv/bin/activate'"
    ),
    "slurm/ray.sbatch": "ray --cpus 8 --time 04:00:00",
    "slurm/original-array.sbatch": (
        "array --density 0.1 0.2 0.3 0.4 0.5 0.6 --replicas 16 --t-final 1000 --snapshot-every 10 --seed 1 "
        "--out-dir /shared/hpcdyn/original --cpus 1 --time 02:00:00"
    ),
}


def render(command_line: str) -> str:
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert main(["slurm", *shlex.split(command_line)]) == 0
    return output.getvalue()


@pytest.mark.parametrize("path", sorted(GOLDEN_CASES))
def test_rendered_script_matches_its_golden_file(path):
    text = render(GOLDEN_CASES[path])
    target = REPOSITORY / path
    if UPDATE:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(0o755)
    assert target.exists(), f"{path} missing; create it with HPCDYN_UPDATE_GOLDEN=1"
    assert text == target.read_text(), f"{path} differs from `hpcdyn slurm {GOLDEN_CASES[path]}`; see the module docstring"


@pytest.mark.parametrize("path", sorted(GOLDEN_CASES))
def test_rendered_script_is_valid_bash(path):
    result = subprocess.run(["bash", "-n", str(REPOSITORY / path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if shutil.which("shellcheck"):  # stricter where it is installed
        lint = subprocess.run(["shellcheck", "--severity=warning", str(REPOSITORY / path)], capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout


def test_multinode_script_carries_allocation_isolation_and_requeue():
    text = (REPOSITORY / "tests/golden/ray-multinode-gpu.sbatch").read_text()
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=4", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@600",
                 "#SBATCH --qos=high", "#SBATCH --open-mode=append"):  # fmt: skip
        assert line + "\n" in text
    # Header lines must come before the first command, or sbatch ignores them.
    first_command = text.index("set -euo pipefail")
    assert all(text.index(line) < first_command for line in text.splitlines() if line.startswith("#SBATCH"))
    assert 'driver=(hpcdyn sweep ntheta --storage /shared/sweeps --name ntheta --gpus-per-trial 0.25)' in text
    assert "module load cuda/12.4\nsource /shared/hpcdyn/.venv/bin/activate\n" in text
    assert "--num-gpus=\"$(node_gpus)\"" in text and "--num-cpus=\"$(node_cpus)\"" in text
    assert "--dashboard-host=127.0.0.1" in text and "HPCDYN_RAY_AUTH_MODE=${HPCDYN_RAY_AUTH_MODE:-disabled}" in text
    assert "srun --nodes=$((nodes - 1))" in text and "ray stop" not in text


def test_array_script_maps_tasks_to_density_replica_and_seed():
    text = (REPOSITORY / "tests/golden/array-original.sbatch").read_text()
    assert "#SBATCH --array=0-23%16\n" in text  # 3 densities x 8 replicas
    assert "densities=(0.124 0.3 0.5)\nreplicas=8\nseed=7\nout=/shared/original\n" in text
    assert "ray" not in text.replace("array", "")
    assert "hpcdyn simulate --system active --preset paper --L 40 --v-plus 20.0 --t-final 1000.0 --snapshot-every 10.0" in text


def test_array_task_arithmetic_in_bash():
    # The task -> (density, replica, seed) lines of the script, run for every task of a 3 x 2 array.
    script = (
        "densities=(0.1 0.2 0.3); replicas=2; seed=5\n"
        'for task in 0 1 2 3 4 5; do echo "${densities[task / replicas]} $((task % replicas)) $((seed + task))"; done'
    )
    lines = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split("\n")[:-1]
    assert lines == ["0.1 0 5", "0.1 1 6", "0.2 0 7", "0.2 1 8", "0.3 0 9", "0.3 1 10"]


@pytest.mark.parametrize(
    "arguments, field",
    [
        (["ray", "--time", "4 hours"], "time"),
        (["ray", "--time", "00:05:00", "--signal-seconds", "300"], "signal_seconds"),
        (["ray", "--nodes", "0"], "nodes"),
        (["ray", "--mem", "lots"], "memory"),
        (["ray", "--job-name", "two words"], "job_name"),
        (["ray", "--ray-tmp-root", "relative/tmp"], "tmp_root"),
        (["ray", "--sbatch", "-N 2"], "sbatch_options"),
        (["ray", "--", "hpcdyn", "sweep", "ntheta", "--smokee"], "driver"),
        (["ray", "--", "hpcdyn", "simulate", "--t-final", "1", "--out", "x.zarr"], "driver"),
        (["array", "--density", "1.5", "--replicas", "2", "--t-final", "1", "--snapshot-every", "1", "--out-dir", "/x"], "density"),
        (["array", "--density", "0.3", "0.3", "--replicas", "2", "--t-final", "1", "--snapshot-every", "1", "--out-dir", "/x"], "density"),
        (["array", "--density", "0.3", "--replicas", "0", "--t-final", "1", "--snapshot-every", "1", "--out-dir", "/x"], "replicas"),
        (["array", "--density", "0.3", "--replicas", "1", "--t-final", "1", "--snapshot-every", "2", "--out-dir", "/x"], "snapshot_every"),
        (["array", "--density", "0.3", "--replicas", "1", "--t-final", "1", "--snapshot-every", "1", "--out-dir", "/x", "--nodes", "2"], None),
    ],
)
def test_bad_input_is_refused_with_the_field_named(arguments, field, capsys):
    if field is None:  # an option the array command does not have: argparse refuses it
        with pytest.raises(SystemExit):
            main(["slurm", *arguments])
        return
    assert main(["slurm", *arguments]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"hpcdyn slurm: error: {field}:"), error
    assert "\n" not in error


def test_written_script_is_executable_and_nothing_is_left_on_error(tmp_path, capsys):
    target = tmp_path / "job.sbatch"
    assert main(["slurm", "ray", "--out", str(target), "--", "hpcdyn", "sweep", "ntheta", "--smoke"]) == 0
    assert os.access(target, os.X_OK) and target.read_text().startswith("#!/bin/bash\n")
    assert main(["slurm", "ray", "--time", "bad", "--out", str(tmp_path / "other.sbatch")]) == 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["job.sbatch"]


def test_time_limits():
    assert time_limit_seconds("30") == 1800
    assert time_limit_seconds("05:30") == 330
    assert time_limit_seconds("04:00:00") == 14400
    assert time_limit_seconds("1-12") == 129600
    assert time_limit_seconds("2-00:30:15") == 174615
    with pytest.raises(ConfigurationError, match="time:"):
        time_limit_seconds("1:2:3:4")


def test_dataclasses_validate_on_construction():
    with pytest.raises(ConfigurationError, match="auth_mode:"):
        RaySettings(auth_mode="password")
    with pytest.raises(ConfigurationError, match="out: must be an absolute path"):
        OriginalEnsemble(densities=(0.3,), replicas=1, t_final=1.0, snapshot_every=1.0, seed=0, out="relative")
    with pytest.raises(ConfigurationError, match="gpus_per_node:"):
        JobResources(gpus_per_node=-1)
    script = render_ray_job(JobResources(), RaySettings())
    assert "driver=()" in script  # no driver: the script takes it as its arguments


def test_port_block_skips_a_block_in_use():
    job_id = 123457
    first = free_port_block(job_id)
    with socket.socket() as occupant:  # another job holds one port of this job's block
        occupant.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        occupant.bind(("0.0.0.0", first + 7))
        occupant.listen()
        second = free_port_block(job_id)
    assert second != first and abs(second - first) >= PORT_BLOCK
    assert free_port_block(job_id) == first  # free again once the other job has gone


def test_port_block_claims_keep_jobs_apart_before_they_bind(tmp_path):
    first, second, third = (tmp_path / f"hpcdyn-ray-{name}" for name in ("a", "b", "c"))
    for directory in (first, second, third):
        directory.mkdir()
    claimed = free_port_block(77, claim=first, claim_root=tmp_path)
    # A job whose search starts at the same block sees the claim although no port is bound yet.
    other = free_port_block(77, claim=second, claim_root=tmp_path)
    assert other != claimed
    assert free_port_block(77, claim=first, claim_root=tmp_path) == claimed  # its own: a requeued job keeps it
    os.symlink(first, tmp_path / "hpcdyn-ray-ports-99999")  # a claim of this job from a run killed before cleanup
    assert free_port_block(77, claim=first, claim_root=tmp_path) == claimed
    assert not (tmp_path / "hpcdyn-ray-ports-99999").exists()  # one block per job and node
    first.rmdir()  # the claiming job ended without cleaning up: its claim is stale
    assert free_port_block(77, claim=third, claim_root=tmp_path) == claimed
    assert os.readlink(tmp_path / f"hpcdyn-ray-ports-{claimed}") == str(third)


def test_nodes_of_one_job_start_from_different_blocks():
    assert free_port_block(5, node_index=1) == free_port_block(6)


def test_port_blocks_of_jobs_on_one_node_differ(tmp_path):
    claims = [tmp_path / f"hpcdyn-ray-{job}" for job in (1001, 1002)]
    for directory in claims:
        directory.mkdir()
    assert free_port_block(1001, claim=claims[0], claim_root=tmp_path) != free_port_block(1002, claim=claims[1], claim_root=tmp_path)


def test_wait_for_nodes_fails_fast_when_the_head_dies():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"  # nobody listens once closed
    head = subprocess.Popen([sys.executable, "-c", "pass"])
    head.wait()
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match=f"ray head: process {head.pid} exited"):
        wait_for_nodes(address, nodes=1, timeout=60, watch_pid=head.pid)
    assert time.monotonic() - started < 5


def test_wait_for_nodes_times_out_with_a_clear_error():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"
    with pytest.raises(ConfigurationError, match="nodes: gave up after 1 s waiting for the head at .* to listen"):
        wait_for_nodes(address, nodes=1, timeout=1)

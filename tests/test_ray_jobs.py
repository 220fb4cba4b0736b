"""Ray Jobs: `ray start --head` on private ports and a private temp dir, then `ray job submit` of the
smoke sweep, as the README's recipe does it; token authentication on; the head stopped by its PID.

Needs ray[default] (the `distributed` extra): the dashboard serves the Jobs API.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from hpcdyn.distributed.slurm import FIRST_WORKER_PORT_OFFSET, PORT_BLOCK, PORT_OFFSETS, free_port_block

pytest.importorskip("ray.dashboard", reason="ray job submit needs ray[default]: pip install 'hpcdyn[distributed]'")

BIN = Path(sys.executable).parent
REPOSITORY = Path(__file__).resolve().parents[1]


def _status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head of this test alone: its own ports, temp dir and token; stopped by PID, never `ray stop`."""
    base = free_port_block(os.getpid())
    ports = {name: base + offset for name, offset in PORT_OFFSETS.items()}
    temp_dir = Path(tempfile.mkdtemp(prefix="hrj", dir="/tmp"))  # short: Ray's socket paths must fit 107 characters
    token = secrets.token_hex(32)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "SLURM_"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, OMP_NUM_THREADS="1", PATH=f"{BIN}:{env.get('PATH', '')}")
    command = [
        str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={ports['gcs']}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
        f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}",
        f"--ray-client-server-port={ports['ray_client_server']}", f"--metrics-export-port={ports['metrics_export']}",
        f"--dashboard-agent-grpc-port={ports['dashboard_agent_grpc']}",
        f"--dashboard-agent-listen-port={ports['dashboard_agent_listen']}",
        f"--runtime-env-agent-port={ports['runtime_env_agent']}",
        f"--min-worker-port={base + FIRST_WORKER_PORT_OFFSET}", f"--max-worker-port={base + PORT_BLOCK - 1}",
        f"--temp-dir={temp_dir}", "--num-cpus=2", "--disable-usage-stats",
    ]  # fmt: skip
    log = open(temp_dir.parent / f"{temp_dir.name}.log", "w")
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{ports['dashboard']}"
    try:
        deadline = time.monotonic() + 180
        while _status(f"{dashboard}/api/jobs/", token) != 200:
            assert head.poll() is None, Path(log.name).read_text()
            assert time.monotonic() < deadline, "the Ray dashboard did not come up in 180 s"
            time.sleep(1)
        yield {"dashboard": dashboard, "env": env, "token": token, "temp_dir": temp_dir}
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        log.close()
        leftovers = _processes_using(temp_dir)
        for pid in leftovers:  # only ours: they name our private temp dir
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
        os.unlink(log.name)
        assert leftovers == [], f"Ray processes outlived the head: {leftovers}"


def _processes_using(path: Path) -> list[int]:
    marker = str(path).encode()
    found = []
    for process in Path("/proc").iterdir():
        try:
            if process.name.isdigit() and marker in (process / "cmdline").read_bytes():
                found.append(int(process.name))
        except OSError:
            pass
    return found


@pytest.mark.slow
def test_jobs_api_wants_the_token(ray_head):
    assert _status(f"{ray_head['dashboard']}/api/jobs/") == 401
    assert _status(f"{ray_head['dashboard']}/api/jobs/", "0" * 64) == 403
    assert _status(f"{ray_head['dashboard']}/api/jobs/", ray_head["token"]) == 200


@pytest.mark.slow
def test_ray_job_submit_runs_the_smoke_sweep(ray_head, tmp_path):
    storage = tmp_path / "sweeps"
    entrypoint = [
        "hpcdyn", "sweep", "ntheta", "--smoke", "--grid", "model.n_classes=1,2", "--grid", "training.seed=0",
        "--set", "training.epochs=1", "--storage", str(storage), "--name", "jobs", "--address", "auto", "--no-progress",
    ]  # fmt: skip
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head["dashboard"], "--submission-id", "hpcdyn-smoke-sweep",
         "--", *entrypoint],
        env=ray_head["env"], capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    output = submit.stdout + submit.stderr
    assert submit.returncode == 0, output
    assert "Job 'hpcdyn-smoke-sweep' succeeded" in output, output
    assert "N* = " in output  # the driver's own output, streamed back by `ray job submit`
    request = urllib.request.Request(f"{ray_head['dashboard']}/api/jobs/hpcdyn-smoke-sweep",
                                     headers={"Authorization": f"Bearer {ray_head['token']}"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.load(response)["status"] == "SUCCEEDED"
    from hpcdyn.distributed.sweep_results import load_sweep_results

    results = load_sweep_results(storage / "jobs")
    assert int((results["status"] == "done").sum()) == 3  # Mode 2 with N_theta 1 and 2, Mode 1; seed 0


def test_local_cluster_yaml_is_what_ray_up_accepts():
    """slurm/ray-cluster-local.yaml through the same preparation and schema check as `ray up`."""
    import yaml
    from ray.autoscaler._private.local.config import prepare_local
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((REPOSITORY / "slurm" / "ray-cluster-local.yaml").read_text()))
    validate_config(config)
    config, _ = prepare_local(config)
    assert config["provider"]["type"] == "local" and len(config["provider"]["worker_ips"]) == config["max_workers"]
    commands = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in command for command in commands)
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][0]
    assert not any("ray stop" in command for command in commands + config["setup_commands"])

"""The `ray up` route for real: Ray's cluster launcher against an SSH node on this machine.

slurm/testing/local_sshd.sh starts a private sshd (127.0.0.1 and 127.0.0.2, a free port, a throw-away
host key and user key) for a dedicated throw-away user and writes a cluster YAML for Ray's `local`
provider in the spirit of slurm/ray-cluster-local.yaml: head 127.0.0.1, one worker 127.0.0.2 (both
this machine, both that user), token authentication on. Then, as the README says:

    ray up -y CLUSTER.yaml                        head up; the head's autoscaler brings up the worker
    ray submit CLUSTER.yaml tests/ray_submit_driver.py -- ... -- hpcdyn ensemble ... --address auto
                                                  the driver joins with ray.init(address="auto"), sees
                                                  both nodes, runs a smoke ensemble on them
    ray exec CLUSTER.yaml 'ray status; hpcdyn ensemble ... --address auto'
                                                  the same ensemble again: every unit skipped
    ray down -y CLUSTER.yaml                      and nothing of the user is left running

The node's user is never the user running the tests: `ray down` runs a bare `ray stop` on the head,
which kills every Ray process of its user on the machine. Skipped, with the reason, only where the
node cannot be set up (not Linux, not root, no apt-get).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
LOCAL_SSHD = REPOSITORY / "slurm" / "testing" / "local_sshd.sh"
DRIVER = REPOSITORY / "tests" / "ray_submit_driver.py"
RAY = Path(sys.executable).parent / "ray"
DENSITIES, REPLICAS, L = (0.124, 0.3), 2, 16


@dataclass
class SSHNode:
    """A throw-away SSH node and the environment the `ray` commands run in here."""

    directory: Path
    user: str
    env: dict

    @property
    def cluster_yaml(self) -> Path:
        return self.directory / "cluster.yaml"

    @property
    def cluster_name(self) -> str:
        return re.search(r"^cluster_name: (\S+)$", self.cluster_yaml.read_text(), re.M).group(1)

    def ray(self, *arguments: str, timeout: float) -> str:
        """A `ray` command of the cluster launcher; its output, stdout and stderr together."""
        started = time.monotonic()
        result = subprocess.run([str(RAY), *arguments], env=self.env, cwd=self.directory, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=timeout)  # fmt: skip
        print(f"ray {arguments[0]}: {time.monotonic() - started:.1f} s", flush=True)
        assert result.returncode == 0, f"ray {' '.join(arguments)} failed:\n{result.stdout[-6000:]}"
        return result.stdout

    def processes(self) -> list[str]:
        found = subprocess.run(["pgrep", "-u", self.user, "-a"], capture_output=True, text=True)
        return found.stdout.splitlines()


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the SSH node needs Linux"
    if os.geteuid() != 0:
        return "the SSH node needs root (it creates a throw-away user and runs sshd)"
    if not RAY.exists():
        return f"no ray command beside {sys.executable}: pip install 'hpcdyn[distributed]'"
    install = subprocess.run(["bash", str(LOCAL_SSHD), "install"], capture_output=True, text=True, timeout=900)
    if install.returncode == 3:  # the installer's "cannot install here" status
        return f"sshd cannot be installed here: {install.stderr.strip().splitlines()[-1]}"
    assert install.returncode == 0, install.stderr
    return None


@pytest.fixture(scope="module")
def ssh_node():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    # Under /tmp, not pytest's private temp root (mode 700): the node's user must reach it (DIR/venv, the output).
    directory = Path(tempfile.mkdtemp(prefix="hsh", dir="/tmp"))
    started = subprocess.run(["bash", str(LOCAL_SSHD), "start", str(directory), sys.prefix],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    node = None
    try:
        if started.returncode == 3:
            pytest.skip(f"the SSH node cannot run here: {started.stderr.strip().splitlines()[-1]}")
        assert started.returncode == 0, started.stderr
        (directory / "local").mkdir()
        env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "SLURM_"))}
        # TMPDIR: the launcher's cluster state, lock and config cache stay in the directory.
        env.update(TMPDIR=str(directory / "local"), PATH=f"{RAY.parent}:{env.get('PATH', '/usr/bin:/bin')}",
                   RAY_USAGE_STATS_ENABLED="0")  # fmt: skip
        node = SSHNode(directory, (directory / "user").read_text().strip(), env)
        yield node
    finally:
        if node is not None and node.processes():  # the test stopped before its `ray down`
            subprocess.run([str(RAY), "down", "-y", str(node.cluster_yaml)], env=node.env, capture_output=True, timeout=120)
        subprocess.run(["bash", str(LOCAL_SSHD), "stop", str(directory)], capture_output=True, timeout=120)
        if node is not None:  # the launcher's SSH control sockets: /tmp/ray_ssh_<user hash>/<cluster hash>
            user_hash = hashlib.sha256(b"root").hexdigest()[:10]
            cluster_hash = hashlib.sha256(node.cluster_name.encode()).hexdigest()[:10]
            shutil.rmtree(Path("/tmp") / f"ray_ssh_{user_hash}" / cluster_hash, ignore_errors=True)
        shutil.rmtree(directory, ignore_errors=True)


def _summary(output: str) -> dict:
    """The JSON summary `hpcdyn ensemble` prints last."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", output)  # Ray colours what the node prints
    found = re.findall(r'^\{\n  "store".*?^\}', plain, re.M | re.S)
    assert found, output[-4000:]
    return json.loads(found[-1])


def _http_status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_public_yaml_has_what_the_ssh_node_needed():
    """slurm/ray-cluster-local.yaml carries what the cluster of the test below needed to work."""
    import yaml

    config = yaml.safe_load((REPOSITORY / "slurm" / "ray-cluster-local.yaml").read_text())
    # `ray up` turns autoscaler v2 on, which never starts the workers of the local provider.
    assert config["head_start_ray_commands"][0].startswith("RAY_enable_autoscaler_v2=0 ")
    # `ray submit` runs a plain python in a login shell: the venv's activation comes last.
    assert "/bin/activate" in config["setup_commands"][-1]
    assert any("export RAY_AUTH_MODE=token" in command for command in config["setup_commands"])  # ray status on a node
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    assert "ssh_proxy_command" not in config["auth"]  # a comment explains it: the head would not get it


@pytest.mark.slow
def test_ray_up_submit_exec_down_on_an_ssh_node(ssh_node):
    import xarray as xr
    import yaml
    import zarr

    node = ssh_node
    config = node.cluster_yaml.read_text()
    commands = yaml.safe_load(config)
    assert not any("ray stop" in command for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
                   for command in commands[key])  # fmt: skip
    out = node.directory / "out"
    out.mkdir()
    shutil.chown(out, node.user, node.user)  # the driver runs as the node's user
    store = out / "ensemble.zarr"
    ensemble = ["hpcdyn", "ensemble", "--model", "original", "--density", *map(str, DENSITIES), "--replicas", str(REPLICAS),
                "--replicas-per-unit", "1", "--L", str(L), "--t-final", "20", "--snapshot-every", "5", "--seed", "3",
                "--actors", "2", "--out", str(store), "--address", "auto", "--no-progress"]  # fmt: skip

    up = node.ray("up", "-y", "--no-config-cache", "--disable-usage-stats", str(node.cluster_yaml), timeout=240)
    assert "Ray runtime started" in up

    submitted = node.ray("submit", "--no-config-cache", str(node.cluster_yaml), str(DRIVER), "--",
                         "--out", str(out), "--nodes", "2", "--timeout", "150", "--", *ensemble, timeout=400)  # fmt: skip
    assert "joined: 2 nodes" in submitted, submitted[-4000:]
    cluster = json.loads((out / "cluster.json").read_text())
    # The worker joined at the address the local provider knows it by; the head's 127.0.0.1 is
    # rewritten by Ray to this machine's primary address.
    addresses = sorted(entry["address"] for entry in cluster["nodes"])
    assert "127.0.0.2" in addresses and len(addresses) == 2, cluster
    assert cluster["resources"]["CPU"] == 2.0
    assert len(cluster["tasks"]) == 2 and len({task["node_id"] for task in cluster["tasks"]}) == 2
    for process in (cluster["driver"], *cluster["tasks"]):
        assert process["user"] == node.user and process["auth_mode"] == "token", cluster
    assert _summary(submitted)["units_run"] == len(DENSITIES) * REPLICAS
    group = zarr.open_group(str(store), mode="r")
    assert group.attrs["complete"] is True
    occupied = (xr.open_zarr(str(store))["occupancy"] > 0).sum(dim=("y", "x")).compute().values
    expected = [round(density * L * L) for density in DENSITIES]
    # Every snapshot of every replica holds its density's N particles.
    assert (occupied == [[[[n]] for n in expected]]).all(), occupied

    # The README's `ray exec` of a driver: the login shell's python, the cluster found by --address auto.
    executed = node.ray("exec", "--no-config-cache", str(node.cluster_yaml), " ".join(ensemble), timeout=240)
    summary = _summary(executed)
    assert summary["units_skipped"] == len(DENSITIES) * REPLICAS and summary["units_run"] == 0

    # Token authentication: the dashboard (on the head's 127.0.0.1) refuses a request without the token.
    dashboard_port = re.search(r"--dashboard-port=(\d+)", config).group(1)
    token = (node.directory / "auth_token").read_text().strip()
    assert _http_status(f"http://127.0.0.1:{dashboard_port}/api/jobs/") == 401
    assert _http_status(f"http://127.0.0.1:{dashboard_port}/api/jobs/", token) == 200
    remote_token = Path(os.path.expanduser(f"~{node.user}")) / ".ray" / "auth_token"
    for path in (node.directory / "auth_token", remote_token):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert remote_token.read_text().strip() == token and remote_token.owner() == node.user

    node.ray("down", "-y", str(node.cluster_yaml), timeout=180)
    # ray down's `ray stop` on the head ends both nodes (same user, same machine); the SSH connection
    # the launcher keeps open (ControlPersist 10 s) ends a little later.
    deadline = time.monotonic() + 30
    while node.processes() and time.monotonic() < deadline:
        time.sleep(1)
    assert node.processes() == [], f"processes of {node.user} left after ray down: {node.processes()}"

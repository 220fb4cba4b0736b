"""The script tests/test_ray_up.py hands to `ray submit`: it runs on the head of a `ray up` cluster.

    ray submit CLUSTER.yaml tests/ray_submit_driver.py -- --out DIR --nodes 2 -- hpcdyn sweep ntheta ...

It joins the cluster the way the README says a script should, with ``ray.init(address="auto")``
(Ray's address file under the node's temp dir, the token from ~/.ray/auth_token), waits until
``--nodes`` nodes are alive (the autoscaler brings the workers up after `ray up` returns), runs one
task pinned to every node and records what it saw in DIR/cluster.json; then it leaves the cluster
and runs the command after the second ``--`` (an ``hpcdyn`` command through ``hpcdyn.cli.main`` in
this process, which has imported ray already), and exits with its status.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=0)
def where() -> dict:
    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "host": socket.gethostname(),
        "user": getpass.getuser(),
        "python": sys.executable,
        "auth_mode": os.environ.get("RAY_AUTH_MODE"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for cluster.json")
    parser.add_argument("--nodes", type=int, default=1, help="wait until this many nodes are alive")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for them")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND...: run after the check")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command

    started = time.monotonic()
    ray.init(address="auto", logging_level="WARNING")
    while len(alive := [node for node in ray.nodes() if node["Alive"]]) < args.nodes:
        if time.monotonic() - started > args.timeout:
            print(f"only {len(alive)} of {args.nodes} nodes alive after {args.timeout:.0f} s", file=sys.stderr)
            return 3
        time.sleep(1)
    pinned = [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote()
              for node in alive]  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "nodes": [{"address": node["NodeManagerAddress"], "node_id": node["NodeID"],
                   "cpus": node["Resources"].get("CPU", 0)} for node in alive],  # fmt: skip
        "tasks": ray.get(pinned),
        "resources": ray.cluster_resources(),
        "driver": {"user": getpass.getuser(), "python": sys.executable, "cwd": os.getcwd(),
                   "auth_mode": os.environ.get("RAY_AUTH_MODE"), "seconds_to_nodes": time.monotonic() - started},
    }  # fmt: skip
    (out / "cluster.json").write_text(json.dumps(record, indent=1))
    print(f"joined: {len(alive)} nodes at {sorted(node['NodeManagerAddress'] for node in alive)}", flush=True)
    ray.shutdown()
    if not command:
        return 0
    print(f"running: {' '.join(command)}", flush=True)
    if command[0] == "hpcdyn":  # in this process: python, torch and ray are imported already
        from hpcdyn.cli import main as hpcdyn

        return hpcdyn(command[1:])
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())

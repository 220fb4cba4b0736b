"""A small real Ray driver for the cluster tests: units of work as Ray tasks, progress in files, resume.

    python tests/ray_progress_driver.py --out DIR --units 6 --seconds 2 --address HOST:PORT

Each finished unit is recorded in DIR/unit-K.json (written under a temporary name and renamed),
with the SLURM restart count of the run that finished it; a rerun skips recorded units, so a
requeued job resumes. DIR/cluster-<restart>.json records what the driver saw of the cluster:
nodes, resources, the node's temp dir and the authentication mode.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from hpcdyn.distributed.cluster import init_ray


def write_json(path: Path, payload: dict) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(payload, indent=1))
    partial.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="progress directory")
    parser.add_argument("--units", type=int, default=4, help="units of work")
    parser.add_argument("--seconds", type=float, default=1.0, help="seconds of work per unit")
    parser.add_argument("--parallel", type=int, default=1, help="units in flight at once (default 1)")
    parser.add_argument("--address", required=True, help="Ray cluster address")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    ray = init_ray(args.address)
    nodes = [node for node in ray.nodes() if node["Alive"]]
    write_json(out / f"cluster-{restart}.json", {
        "address": args.address,
        "nodes": len(nodes),
        "resources": ray.cluster_resources(),
        "object_store_socket": nodes[0]["ObjectStoreSocketName"],
        "auth_mode": os.environ.get("RAY_AUTH_MODE"),
        "token_set": bool(os.environ.get("RAY_AUTH_TOKEN")),
        "job_id": os.environ.get("SLURM_JOB_ID"),
    })  # fmt: skip

    @ray.remote(num_cpus=1)
    def work(unit: int, seconds: float) -> dict:
        time.sleep(seconds)
        return {"unit": unit, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    todo = [unit for unit in range(args.units) if not (out / f"unit-{unit}.json").exists()]
    print(f"restart {restart}: {args.units - len(todo)} units done before, {len(todo)} to do", flush=True)
    # A few units at a time (one by default), so a requeue lands with some done and some not.
    running = []
    while todo or running:
        while todo and len(running) < args.parallel:
            running.append(work.remote(todo.pop(0), args.seconds))
        finished, running = ray.wait(running, num_returns=1)
        result = ray.get(finished[0])
        write_json(out / f"unit-{result['unit']}.json", {**result, "restart": restart})
        print(f"unit {result['unit']} done", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()

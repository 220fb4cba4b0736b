"""Benchmark: learned forward simulation in lock-step batches, against baselines measured in the same run.

    python benchmarks/bench_batched.py                                  # print the tables
    python benchmarks/bench_batched.py --write                          # and refresh benchmarks/RESULTS.md
    python benchmarks/bench_batched.py --device cuda --batches 1024 4096 --particles 112

1. Learned dynamics (transformer d_model 64, 4 heads, 2 layers, d_ff 128; weights as initialised,
   which costs the same as trained ones) in events per second against the batch size B, at N = 112
   (density 0.124) and N = 450 (density 0.5) on a 30 x 30 lattice.
2. Baselines in the same run: the true rates as a torch rate model through the same batched
   simulator, and the compiled n-fold-way simulator (one core).
3. Ray ensemble overhead: the same learned ensemble run by 2 Ray actors (1 CPU each) and in one
   process with 2 torch threads; the ratio of wall times (the Ray cluster is up before timing;
   its start-up is reported apart).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from results import write_section

from hpcdyn.simulation.batched import replica_streams, simulate_batched
from hpcdyn.physics.rates import true_rate_model
from hpcdyn.simulation.drivers import start
from hpcdyn.physics.systems import make_system
from hpcdyn.learning.transformer import TransformerConfig, TransformerRates

MODEL = TransformerConfig(lattice_size=30, d_model=64, n_heads=4, n_layers=2, d_ff=128)
DENSITIES = {112: 0.124, 450: 0.5}


def batch_start(system, replicas: int):
    streams = [replica_streams(0, 0, replica) for replica in range(replicas)]
    configurations = [system.initial_configuration(stream.configuration) for stream in streams]
    positions = np.stack([positions for positions, _ in configurations])
    states = np.stack([states for _, states in configurations]).astype(np.int64)
    return positions, states, np.array([stream.key for stream in streams])


def batched_rate(model, system, replicas: int, seconds: float, device: str) -> tuple[float, float]:
    """(draws per second, fraction applied, share of a step spent in the network) over about ``seconds``."""
    positions, states, keys = batch_start(system, replicas)
    with torch.inference_mode():
        escape = float(model(torch.as_tensor(positions[:1], device=device), torch.as_tensor(states[:1], device=device)).double().exp().sum())
    probe_steps = 2
    begin = time.perf_counter()  # also the warm-up
    simulate_batched(model, system, positions, states, keys, probe_steps / escape, device=device, sync_every=probe_steps)
    per_step = (time.perf_counter() - begin) / probe_steps
    steps = max(3, int(seconds / per_step))
    begin = time.perf_counter()
    result = simulate_batched(model, system, positions, states, keys, steps / escape, device=device)
    elapsed = time.perf_counter() - begin
    with torch.inference_mode():  # the network alone, to show what the simulator adds around it
        begin = time.perf_counter()
        model(torch.as_tensor(positions, device=device), torch.as_tensor(states, device=device)).sum().item()
        network = (time.perf_counter() - begin) / (elapsed / result.steps)
    return result.draws.sum() / elapsed, result.events.sum() / max(result.draws.sum(), 1), network


def compiled_rate(system, seconds: float) -> float:
    warm, _, _ = start(system, 1.0, seed=0)
    for _ in warm.chunks():
        pass
    probe, _, _ = start(system, 10.0, seed=0)
    per_time = sum(len(chunk.moves) for chunk in probe.chunks()) / 10.0
    simulator, _, _ = start(system, seconds * 5e6 / per_time, seed=1)
    begin = time.perf_counter()
    events = sum(len(chunk.moves) for chunk in simulator.chunks())
    return events / (time.perf_counter() - begin)


def ray_overhead(seconds_per_unit: float, units: int) -> dict[str, float]:
    """Wall time of one learned ensemble on 2 Ray actors and in one process with 2 threads."""
    from hpcdyn.learning.checkpoint import save_checkpoint
    from hpcdyn.distributed.cluster import init_ray
    from hpcdyn.distributed.ensemble import EnsembleConfig, Placement, run_ensemble
    from hpcdyn.learning.training import TrainingConfig

    system = make_system("active", {"density": DENSITIES[112]}, preset="paper")
    model = TransformerRates(MODEL).eval()
    block = 16
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "model"
        run.mkdir()
        state = {"format": "hpcdyn.checkpoint/1", "model_config": MODEL.as_dict(), "model_state": model.state_dict(),
                 "optimizer_state": {}, "training_config": TrainingConfig(model=MODEL).as_dict(), "metrics": [],
                 "store": {"params": system.params()}}  # fmt: skip
        save_checkpoint(state, run / "best.pt")
        torch.set_num_threads(1)
        draws_per_second, _, _ = batched_rate(model, system, block, 2.0, "cpu")
        escape = 6 * system.N  # the untrained model's rates are all about 1
        t_final = seconds_per_unit * draws_per_second / block / escape
        config = EnsembleConfig(models=(str(run),), densities=(DENSITIES[112],), replicas=block * units,
                                replicas_per_unit=block, t_final=t_final, snapshot_every=t_final / 10, seed=1)  # fmt: skip
        torch.set_num_threads(2)
        begin = time.perf_counter()
        run_ensemble(config, Path(folder) / "local.zarr", Placement(in_process=True))
        in_process = time.perf_counter() - begin
        torch.set_num_threads(1)
        begin = time.perf_counter()
        ray = init_ray(num_cpus=2)
        ray_start = time.perf_counter() - begin
        begin = time.perf_counter()
        run_ensemble(config, Path(folder) / "ray.zarr", Placement(actors=2, cpus_per_actor=1))
        on_ray = time.perf_counter() - begin
        ray.shutdown()
    return {"in_process": in_process, "ray": on_ray, "ray_start": ray_start, "units": units, "block": block,
            "t_final": t_final}  # fmt: skip


def rate_text(value: float) -> str:
    return f"{value / 1e6:.2f} M" if value >= 1e6 else f"{value / 1e3:.1f} k" if value >= 1e3 else f"{value:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 128, 1024], help="lock-step batch sizes B")
    parser.add_argument("--particles", type=int, nargs="+", default=[112, 450], choices=sorted(DENSITIES))
    parser.add_argument("--seconds", type=float, default=6.0, help="time per measurement")
    parser.add_argument("--max-tokens", type=int, default=1 << 17, help="skip batches with B x N above this (CPU time)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the batched runs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ray-units", type=int, default=4, help="units of the Ray overhead ensemble (0: skip)")
    parser.add_argument("--ray-seconds-per-unit", type=float, default=8.0)
    parser.add_argument("--write", action="store_true", help="write the section into benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = TransformerRates(MODEL).to(args.device).eval()
    rows = []
    for particles in args.particles:
        system = make_system("active", {"density": DENSITIES[particles]}, preset="paper")
        for batch in args.batches:
            if batch * particles > args.max_tokens:
                rows.append(f"| learned (transformer) | {particles} | {batch} | skipped: B x N > --max-tokens | | |")
                continue
            rate, applied, network = batched_rate(model, system, batch, args.seconds, args.device)
            rows.append(f"| learned (transformer) | {particles} | {batch} | {rate_text(rate)} | {applied:.2f} | {network:.0%} |")
            print(rows[-1], flush=True)
    paper = make_system("active", {"density": DENSITIES[112]}, preset="paper")
    true_rate, _, network = batched_rate(true_rate_model(paper).to(args.device), paper, 128, args.seconds, args.device)
    compiled = compiled_rate(paper, args.seconds)
    rows.append(f"| true rates (torch) | 112 | 128 | {rate_text(true_rate)} | 1.00 | {network:.0%} |")
    rows.append(f"| compiled n-fold way (baseline) | 112 | 1 | {rate_text(compiled)} | 1.00 | |")
    print("\n".join(rows[-2:]), flush=True)
    overhead = ray_overhead(args.ray_seconds_per_unit, args.ray_units) if args.ray_units else None
    body = report(args, rows, overhead)
    print(body)
    if args.write:
        write_section(f"batched-{args.device}", body)


def report(args, rows, overhead) -> str:
    command = "python benchmarks/bench_batched.py " + " ".join(
        [f"--batches {' '.join(map(str, args.batches))}", f"--particles {' '.join(map(str, args.particles))}",
         f"--seconds {args.seconds:g}", f"--max-tokens {args.max_tokens}", f"--threads {args.threads}", f"--device {args.device}",
         f"--ray-units {args.ray_units}", f"--ray-seconds-per-unit {args.ray_seconds_per_unit:g}", "--write"]
    )  # fmt: skip
    load = os.getloadavg()[0]
    lines = [
        f"## Learned forward simulation in lock-step batches ({args.device})",
        "",
        f"Command: `{command}`",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (load average {load:.1f} at the end, "
        f"shared), torch {torch.__version__} with {args.threads} thread(s), Python {platform.python_version()}; "
        f"{time.strftime('%Y-%m-%d')}. Model: d_model 64, 4 heads, 2 layers, d_ff 128 on a 30 x 30 lattice.",
        "Events per second count every draw of the chain (an applied move, or a move onto an occupied site that is",
        "rejected: the untrained network puts rate on those); 'applied' is the fraction applied; 'network' is the",
        "share of a lock-step step spent in the rate model's forward pass (the rest is the simulator).",
        "DESIGN anchor on CPU: about 4 k events/s at N = 112, B = 128.",
        "",
        "| rate model | N | B | events/s | applied | network |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
    ]
    if overhead:
        ratio = overhead["ray"] / overhead["in_process"]
        lines += [
            "",
            "### Ray ensemble overhead",
            "",
            f"{overhead['units']} units of {overhead['block']} replicas (learned model, N = 112, t_final "
            f"{overhead['t_final']:.3g}): 2 Ray actors with 1 CPU each took {overhead['ray']:.1f} s, the same units in "
            f"one process with 2 torch threads {overhead['in_process']:.1f} s: ratio {ratio:.2f} (goal <= 1.15). "
            f"Starting the local Ray took {overhead['ray_start']:.1f} s more (once per cluster).",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

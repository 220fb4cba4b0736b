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

    python benchmarks/bench_batched.py --attention --write   # only section 4, into its own section

4. The attention kernels before and after (in the same run; the "before" code is kept below, as it
   was): the sink-channel path without offset scores with v unpadded (q, k one channel wider: the
   slow kernel) against v padded to the same width; the offset-score mask gathered batch-major and
   rebuilt every event against the mask gathered head-major and updated one row and one column per
   event (``AttentionMasks``); and whole lock-step simulations with both.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import math

import numpy as np
import torch
import torch.nn.functional as functional
from results import write_section

from hpcdyn.simulation.batched import replica_streams, simulate_batched
from hpcdyn.physics.rates import true_rate_model
from hpcdyn.simulation.drivers import start
from hpcdyn.physics.systems import make_system
from hpcdyn.learning.transformer import OFFSET_BIAS_SCALE, TransformerConfig, TransformerRates, relative_offsets, rotate

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


# ----------------------------------------------------------------------------- 4. attention before / after
def legacy_attention(attention, h, rotation=None, offsets=None):
    """SelfAttention.forward as it was before v was padded and the mask gathered head-major."""
    batch, tokens, width = h.shape
    q, k, v = attention.qkv(h).view(batch, tokens, 3, attention.n_heads, width // attention.n_heads).permute(2, 0, 3, 1, 4)
    if rotation is not None:
        q, k = rotate(q, rotation), rotate(k, rotation)
    scale = 1.0 / math.sqrt(q.shape[-1])
    bias = None
    if attention.offset_bias is not None and offsets is not None:
        table = attention.offset_bias * OFFSET_BIAS_SCALE
        if attention.sink_logit is not None:
            table = torch.cat([table, attention.sink_logit[:, None]], dim=1)
        bias = table.t().to(q.dtype)[offsets].permute(0, 3, 1, 2)  # batch-major gather, then a permuted view
    if attention.sink_logit is not None:
        v = torch.cat([v, attention.sink_value.to(v.dtype).expand(batch, -1, -1, -1)], dim=2)
        if bias is not None:
            k = torch.cat([k, k.new_zeros(batch, attention.n_heads, 1, k.shape[-1])], dim=2)
        else:  # q and k one channel wider than v: not the fused kernel
            sink_key = functional.pad(k.new_zeros(attention.n_heads, 1, k.shape[-1]), (0, 1))
            sink_key[..., -1] = attention.sink_logit.to(q.dtype).view(-1, 1) / scale
            q = functional.pad(q, (0, 1), value=1.0)
            k = torch.cat([functional.pad(k, (0, 1)), sink_key.expand(batch, -1, -1, -1)], dim=2)
    attended = functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    return attention.out(attended.transpose(1, 2).reshape(batch, tokens, width))


class LegacyRates(torch.nn.Module):
    """The same weights run as before: offsets and masks rebuilt by every forward pass (no attention_masks)."""

    def __init__(self, model: TransformerRates):
        super().__init__()
        self.model, self.n_moves, self.config = model, model.n_moves, model.config

    def forward(self, positions, states):
        model, config = self.model, self.config
        positions, states = positions.long(), states.long()
        h = model.embed_x(positions[..., 0]) + model.embed_y(positions[..., 1]) + model.embed_state(states)
        rotation = None
        if config.rotary:
            from hpcdyn.learning.transformer import rotary_angles

            angles = rotary_angles(positions, config.lattice_size, config.d_model // config.n_heads)
            rotation = (angles.cos().to(h.dtype), angles.sin().to(h.dtype))
        offsets = relative_offsets(positions, config.lattice_size, sink=config.attention_sink) if config.relative_bias else None
        for block in model.blocks:
            h = h + legacy_attention(block.attention, block.attention_norm(h), rotation, offsets)
            h = h + block.feed_forward(block.feed_forward_norm(h))
        return model.head(model.final_norm(h))


def best_time(function, repeats: int) -> float:
    """Least wall time of ``repeats`` calls (after one warm-up): the figure least disturbed by a shared machine."""
    function()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        function()
        times.append(time.perf_counter() - begin)
    return min(times)


def attention_block_times(model, positions, repeats: int) -> dict[str, float]:
    """Seconds per lock-step step spent on the attention of every layer (mask, then the kernel)."""
    config = model.config
    h = torch.randn(positions.shape[0], positions.shape[1], config.d_model)
    tokens = torch.zeros(positions.shape[0], dtype=torch.long)
    masks = model.attention_masks(positions)

    def before():
        offsets = relative_offsets(positions, config.lattice_size, sink=config.attention_sink)
        for block in model.blocks:
            legacy_attention(block.attention, h, None, offsets)

    def after():
        masks.update(positions, tokens)  # the one row and one column an event changes
        for layer, block in enumerate(model.blocks):
            block.attention(h, None, masks.layer(layer))

    with torch.inference_mode():
        return {"before": best_time(before, repeats), "after": best_time(after, repeats)}


def sink_channel_forward_times(particles: int, batch: int, repeats: int) -> dict[str, float]:
    """A model without offset scores (--no-relative-bias): whole forward pass, v unpadded vs padded."""
    config = TransformerConfig(lattice_size=30, d_model=64, n_heads=4, n_layers=2, d_ff=128, relative_bias=False)
    model = TransformerRates(config).eval()
    with torch.no_grad():  # a read-out that is not zero, so the check below compares something
        model.head.weight.normal_(0.0, 0.3)
    system = make_system("active", {"density": particles / 900}, preset="paper")
    positions, states, _ = batch_start(system, batch)
    positions, states = torch.as_tensor(positions), torch.as_tensor(states)
    legacy = LegacyRates(model)
    with torch.inference_mode():
        difference = float((legacy(positions, states) - model(positions, states)).abs().max())
        return {"before": best_time(lambda: legacy(positions, states), repeats),
                "after": best_time(lambda: model(positions, states), repeats), "difference": difference}  # fmt: skip


def lock_step_times(particles: int, batch: int, steps: int, repeats: int) -> dict[str, float]:
    """Least wall time of the same lock-step simulation (same draws) with the legacy and the new attention,
    the two alternated ``repeats`` times (a shared machine's load then weighs on both alike)."""
    model = TransformerRates(MODEL).eval()
    with torch.no_grad():  # offset scores around 0 (a trained model's have risen from -8): every token matters
        for block in model.blocks:
            block.attention.offset_bias.normal_(0.0, 0.1)
    system = make_system("active", {"density": particles / 900}, preset="paper")
    positions, states, keys = batch_start(system, batch)
    t_final = steps / (6.0 * particles)  # untrained rates are about 1 per move: about `steps` steps
    runs = {"before": LegacyRates(model), "after": model}
    times = {name: math.inf for name in runs}
    results = {}
    for name, rates in runs.items():  # warm-up
        simulate_batched(rates, system, positions, states, keys, 2 / (6.0 * particles), sync_every=2)
    for _ in range(repeats):
        for name, rates in runs.items():
            begin = time.perf_counter()
            results[name] = simulate_batched(rates, system, positions, states, keys, t_final, sync_every=8)
            times[name] = min(times[name], time.perf_counter() - begin)
    same = np.array_equal(results["before"].final_positions, results["after"].final_positions)
    return {**times, "steps": results["after"].steps, "same_trajectories": same}


def attention_section(args) -> str:
    torch.manual_seed(0)
    repeats = 5
    lines = [
        "## Attention kernels before and after: padded v, head-major masks updated per event",
        "",
        f"Command: `python benchmarks/bench_batched.py --attention --threads {args.threads} --write`",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs "
        f"(load average {os.getloadavg()[0]:.1f} at the start), torch {torch.__version__} with {args.threads} thread(s); "
        f"{time.strftime('%Y-%m-%d')}. Model d_model 64, 4 heads, 2 layers, d_ff 128, L 30. 'Before' is the code as it "
        "was (kept in this script), 'after' the library's; both in the same run, least of "
        f"{repeats} timings each (lock-step: 3, alternated; the machine is shared, so absolute times are several "
        "times too slow and only the ratios carry over). Lock-step: untrained weights with offset scores around 0.",
        "",
        "| what | N | B | before (ms) | after (ms) | speed-up | check |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for particles, batch in ((112, 128), (450, 16)):
        result = sink_channel_forward_times(particles, batch, repeats)
        lines.append(f"| forward, no offset scores (v padded) | {particles} | {batch} | {result['before'] * 1e3:.1f} | "
                     f"{result['after'] * 1e3:.1f} | {result['before'] / result['after']:.2f}x | "
                     f"max abs difference of log-rates {result['difference']:.1e} |")  # fmt: skip
        print(lines[-1], flush=True)
    config = MODEL
    model = TransformerRates(config).eval()
    for particles, batch in ((112, 128), (450, 16)):
        system = make_system("active", {"density": particles / 900}, preset="paper")
        positions = torch.as_tensor(batch_start(system, batch)[0])
        result = attention_block_times(model, positions, repeats)
        lines.append(f"| attention block per step, both layers (mask + kernel) | {particles} | {batch} | "
                     f"{result['before'] * 1e3:.1f} | {result['after'] * 1e3:.1f} | {result['before'] / result['after']:.2f}x | |")  # fmt: skip
        print(lines[-1], flush=True)
    for particles, batch, steps in ((112, 128, 40), (450, 16, 40)):
        result = lock_step_times(particles, batch, steps, repeats=3)
        rate = lambda seconds: result["steps"] * batch / seconds  # noqa: E731
        lines.append(f"| lock-step simulation, {result['steps']} steps | {particles} | {batch} | "
                     f"{result['before'] * 1e3:.0f} ({rate_text(rate(result['before']))} events/s) | "
                     f"{result['after'] * 1e3:.0f} ({rate_text(rate(result['after']))} events/s) | "
                     f"{result['before'] / result['after']:.2f}x | same trajectories: {result['same_trajectories']} |")  # fmt: skip
        print(lines[-1], flush=True)
    return "\n".join(lines)


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
    parser.add_argument("--attention", action="store_true", help="only the attention kernels, before and after (section 4)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.attention:
        body = attention_section(args)
        print(body)
        if args.write:
            write_section("attention-kernels", body)
        return
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

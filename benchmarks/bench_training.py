"""Benchmark: training throughput (events per second) of the transformer rate model.

    python benchmarks/bench_training.py                          # CPU, writes nothing
    python benchmarks/bench_training.py --write                  # refresh the section in RESULTS.md
    python benchmarks/bench_training.py --device cuda --bf16 --compile --segments 1024 4096

One gradient step scores one segment of consecutive events (its configurations rebuilt on the
device), so events/s = segment length / step time. d_model 64, 4 heads, 2 layers, paper preset
(N = 112 on a 30 x 30 torus) unless told otherwise. Each attention variant is measured in the same
run: the default (learned offset scores, sink, rotary), without offset scores, plain (neither
offset scores nor rotary), and the hard-local model attending within the vn1 stencil. Needs only numpy, numba and torch.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from results import write_section

from hpcdyn.learning.likelihood import iter_segments, segment_terms
from hpcdyn.simulation.drivers import simulate
from hpcdyn.physics.systems import make_system
from hpcdyn.learning.transformer import TransformerConfig, TransformerRates


# attention variants (TransformerConfig switches): what each costs
VARIANTS = {
    "default": {},
    "no offset scores": {"relative_bias": False},
    "plain": {"relative_bias": False, "rotary": False},
    "hard-local vn1": {"attention_stencil": "vn1", "rotary": False},  # same dense kernel, mask -inf outside the stencil
}


def throughput(events, model, segment_events: int, device: str, bf16: bool, steps: int) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    segments = [segment for _, segment in zip(range(steps + 2), iter_segments(events, segment_events, device))]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.startswith("cuda"))

    def step(segment):
        with autocast:
            terms = segment_terms(model, events.system, *segment)
        loss = -terms.log_likelihood() / terms.dwell.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for segment in segments[:2]:  # warm-up (and compilation)
        step(segment)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    begin = time.perf_counter()
    for segment in segments[2:]:
        step(segment)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return sum(len(segment[2]) for segment in segments[2:]) / (time.perf_counter() - begin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--segments", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--density", type=float, default=0.124)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="refresh the training section of benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    system = make_system("active", {"density": args.density}, preset="paper")
    events = simulate(system, 20.0 * max(args.segments) * (args.steps + 2) / 30_000 + 1.0, seed=1).events
    rows = []
    for segment_events in args.segments:
        rates = []
        for variant in VARIANTS.values():
            model = TransformerRates(TransformerConfig(d_model=64, n_heads=4, n_layers=2, d_ff=128, **variant)).to(args.device)
            scored = torch.compile(model, dynamic=True) if args.compile else model
            rates.append(throughput(events, scored, segment_events, args.device, args.bf16, args.steps))
        rows.append((segment_events, rates))
        print(f"segment {segment_events:6d}: " + ", ".join(f"{name} {rate:8.0f}" for name, rate in zip(VARIANTS, rates)) + " events/s")
    if args.write:
        command = "python benchmarks/bench_training.py " + " ".join(
            f"--{key.replace('_', '-')} {' '.join(map(str, value)) if isinstance(value, list) else value}"
            for key, value in vars(args).items()
            if key != "write" and value not in (False, None)
        )
        lines = [
            f"## Training throughput ({args.device}{', bf16' if args.bf16 else ''}{', compiled' if args.compile else ''})",
            "",
            f"Command: `{command} --write`",
            f"Model d_model 64, 4 heads, 2 layers, d_ff 128; active model N = {system.N} on 30 x 30; "
            f"{args.threads} threads; torch {torch.__version__}, Python {platform.python_version()}; "
            f"{time.strftime('%Y-%m-%d')}. Anchor for CPU: about 1.1 k events/s.",
            "",
            "| events per segment (one step) | " + " | ".join(f"events/s, {name}" for name in VARIANTS) + " |",
            "|---:|" + "---:|" * len(VARIANTS),
            *[f"| {segment_events} | " + " | ".join(f"{rate:,.0f}" for rate in rates) + " |" for segment_events, rates in rows],
            "",
            f"The learned offset scores cost {100 * (1 - sum(r[0] / r[1] for _, r in rows) / len(rows)):.0f} % of the "
            "throughput in this run (mean over segment lengths). They are the default because they lower the held-out "
            "gap several-fold (benchmarks/TRAINING.md); their score mask [segment, heads, tokens, tokens] is gathered "
            "from the table and scattered back in the backward pass, and a mask that needs a gradient keeps "
            "scaled_dot_product_attention on its math kernel.",
        ]
        write_section(f"training-{args.device}", "\n".join(lines))


if __name__ == "__main__":
    main()

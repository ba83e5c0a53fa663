"""Where greedy decoding's time goes: PEFT LoRA against moela's uniform plan, operator by operator.

``speed.py``'s model and generation (Llama hidden 512, 8 layers, all seven projections adapted; greedy, KV cache,
16-token prompt), one generation of each variant under ``torch.profiler`` after a warm-up. For every ATen
operator that takes at least 0.5 µs per adapted module and forward in either variant, it prints its calls per
forward and adapted module and their self CPU µs, side by side, and the difference; then the totals per forward:
the self CPU time of all ATen operators and the wall-clock time. The wall-clock total also holds the Python
between operators, which the profiler does not attribute.

Run: ``python benchmarks/decode_profile.py`` (about a minute; ``--gen-batches 8`` for batch 8). The profiler
adds its own overhead to every operator, so compare the rows with each other, not with ``speed.py``'s tokens/s.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (benchmarks/speed.py: model, variants and generation)

VARIANTS = ("peft", "uniform")


def op_table(name: str, args, batch_size: int) -> tuple[dict, float, int]:
    """({operator: (calls, self µs)}, wall ms, forwards) of one profiled generation of ``name``."""
    model = speed.build(name, args)[0].eval()
    run = speed.generate_fn(model, args, batch_size)
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    ops = {e.key: (e.count, e.self_cpu_time_total) for e in prof.key_averages() if e.key.startswith("aten::")}
    return ops, 1e3 * wall, args.new_tokens


def main(argv: list[str] | None = None) -> None:
    args = speed.parse(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    modules = len(speed.PROJECTIONS) * args.layers
    for size in args.gen_batches:
        tables = {name: op_table(name, args, size) for name in VARIANTS}
        print(f"# decode profile: batch {size}, {args.new_tokens} forwards (the prompt's and {args.new_tokens - 1} "
              f"decoding steps), {modules} adapted modules, {args.threads} threads, torch {torch.__version__}; "
              f"per module = per adapted module and forward")
        per_module = {}  # operator -> variant -> (calls, self µs) per adapted module and forward
        for name, (ops, _, n) in tables.items():
            for op, (count, us) in ops.items():
                per_module.setdefault(op, {v: (0.0, 0.0) for v in VARIANTS})[name] = (count / (modules * n),
                                                                                       us / (modules * n))
        print(f"{'operator':<40}" + "".join(f" {v + ' calls':>13} {'µs':>7}" for v in VARIANTS) + f" {'Δ µs':>7}")
        for op, cells in sorted(per_module.items(), key=lambda kv: -max(us for _, us in kv[1].values())):
            if max(us for _, us in cells.values()) < 0.5:
                continue
            line = "".join(f" {cells[v][0]:13.2f} {cells[v][1]:7.2f}" for v in VARIANTS)
            print(f"{op[:40]:<40}{line} {cells['uniform'][1] - cells['peft'][1]:+7.2f}")
        for name, (ops, wall_ms, n) in tables.items():
            self_us = sum(us for _, us in ops.values())
            print(f"{name}: ATen self CPU {self_us / 1e3 / n:.2f} ms per forward ({self_us / (modules * n):.1f} µs "
                  f"per module), wall {wall_ms / n:.2f} ms per forward under the profiler")


if __name__ == "__main__":
    main()

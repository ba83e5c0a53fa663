"""Training-step time of a compiled moela model (``train.compile``: ``torch.compile`` of the model's forward,
its backward compiled through AOTAutograd, AdamW eager) against the same model eager.

The model, plan, batch and step are ``benchmarks/speed.py``'s (same flags, same defaults: Llama hidden 512,
8 layers, 4×256 tokens, float32, 2 CPU threads), for the ``uniform`` plan (4 experts of rank 4, top-2) and PEFT
LoRA at its budget. The first compiled step (compilation included) is timed on its own; then eager and compiled
steps are interleaved round by round and the ratio is the median of per-round ratios. The first step's losses
of the eager and compiled model are printed side by side (same weights, same batch).

Run: ``python benchmarks/compile_speed.py`` (inductor on CPU needs a C++ compiler); ``--backend aot_eager``
captures and differentiates the graph without generating code; ``--device cuda --dtype bfloat16`` on a GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (benchmarks/speed.py: model, plan, batch and step)

VARIANTS = ("uniform", "peft")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=False)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: uniform, peft")
    own, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    args = speed.parse(rest)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows = {}
    for name in own.variants.split(","):
        eager, _ = speed.build(name, args)
        compiled, _ = speed.build(name, args)  # same seed: the same weights
        compiled = torch.compile(compiled, backend=own.backend)
        ids = speed.batch(args)
        with torch.no_grad():
            losses = [m(input_ids=ids, labels=ids).loss.item() for m in (eager, compiled)]
        steps = {"eager": speed.train_step_fn(name, eager, ids), "compiled": speed.train_step_fn(name, compiled, ids)}
        first = speed.timed(steps["compiled"], args.device)  # compiles forward and backward
        for kind in steps:  # warm-up
            speed.timed(steps[kind], args.device)
        times = {kind: [] for kind in steps}
        for _ in range(args.rounds):
            for kind in steps:
                times[kind].append(speed.timed(steps[kind], args.device))
        rows[name] = {"first_s": first, "losses": losses, **times}
    report(args, own, rows, (load_before, os.getloadavg()[0]))
    return rows


def report(args, own, rows, load: tuple[float, float]) -> None:
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {args.threads} threads"
    print(f"# compile_speed: {device}, torch {torch.__version__}, {args.dtype}, backend {own.backend}; Llama hidden "
          f"{args.hidden}, {args.layers} layers, {args.batch}x{args.seq} tokens; {args.rounds} interleaved rounds; "
          f"load average {load[0]:.2f} before, {load[1]:.2f} after")
    print(f"{'variant':<8} {'first compiled step s':>21} {'eager ms':>9} {'compiled ms':>11} {'compiled/eager':>14} "
          f"{'loss eager':>11} {'loss compiled':>13}")
    for name, row in rows.items():
        ratio = statistics.median(c / e for c, e in zip(row["compiled"], row["eager"]))
        print(f"{name:<8} {row['first_s']:21.1f} {1e3 * statistics.median(row['eager']):9.1f} "
              f"{1e3 * statistics.median(row['compiled']):11.1f} {ratio:14.3f} {row['losses'][0]:11.6f} "
              f"{row['losses'][1]:13.6f}")


if __name__ == "__main__":
    main()

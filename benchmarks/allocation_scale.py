"""Cost (time, peak memory) of the data-driven allocators per transformer block, on real 7B-shaped Llama blocks
with random weights, extrapolated to Llama-2-7B and Llama-2-70B.

Each configuration runs in a fresh process: a ``LlamaForCausalLM`` of 1 or 2 blocks (hidden 4096, intermediate
11008, 32 heads, vocabulary 32000, float32; ``--width`` scales hidden and intermediate together), random token
ids of ``--seq`` tokens, all seven projections of every block as targets, then ``moela.allocate``:

- ``sensitivity``: the probe (one forward and backward per example, batch 1, as the public code), N examples;
- ``gradspec``: the same probe pass (batch 1) accumulating a float64 mean gradient per target, then its squared
  singular values (the eigenvalues of its Gram matrix), N examples;
- ``guilomo``: the bilevel search (first-order, batch 1, experts 8, rank 8), S steps;
- ``prune``: S warm-up steps of a rank-4 LoRA (batch 1), then one round of held-out ablation (one validation
  example; ``drop=keep=0.5``), S refit steps and the survivors' final ablation;
- ``lora``, the reference: N AdamW steps of rank-8 LoRA training on every target (batch 1), what the plan will
  later cost to train; sensitivity's peak memory is compared with its.

Time is wall-clock around ``moela.allocate``; memory the growth of the peak resident set (VmHWM, reset after
the model is built, glibc mapping every block ≥ 64 KiB on its own) over the built model.

Extrapolation (``cost = a + L·b``, fitted per method on the 1- and 2-block runs of the same N or S): ``b`` is
one block's cost, ``a`` the rest (embedding, norm, 32000-word head, allocator bookkeeping). A Llama-2-7B block has
P₇ = 4·4096² + 3·4096·11008 = 202 M weights; a Llama-2-70B block (hidden 8192, 8 KV heads, intermediate 28672)
P₇₀ = 2·8192² + 2·8192·1024 + 3·8192·28672 = 856 M, 4.23 × P₇: matmul work per token grows with the weights, so
    time(7B)  ≈ a + 32·b,        time(70B) ≈ 2·a + 80·4.23·b     (the head's work doubles with the width);
    memory(7B) ≈ a_m + 32·b_m,   memory(70B) ≈ 2·a_m + 80·2·b_m  (activations grow with the width, 8192/4096),
except gradspec's, whose per-block memory is its float64 accumulators, as many as the weights: 2·a_m + 80·4.23·b_m;
per N examples (probe) or S steps (search) of ``--seq`` tokens; time is linear in N·seq (or S·seq) at short
sequences. The base weights themselves (7B: 27 GB float32, 13.5 GB bf16) come on top of the memory figures.

``--shape 70b`` builds Llama-2-70B-shaped blocks instead (hidden 8192, intermediate 28672, 64 heads, 8 key-value
heads), so that ``b`` is measured at 70B's width rather than scaled from 7B's by P₇₀/P₇: then
time(70B) ≈ a + 80·b and memory(70B) ≈ a_m + 80·b_m. Two such blocks and the 32000-word embedding and head hold
9 GB of float32 weights; ``gradspec``'s float64 accumulators would add 7 GB per block.

``prune`` does not fit that form: each round runs one held-out pass per remaining module, and a pass costs all
L blocks, so its ablation grows with L². Its run of S steps and one round costs ``(3·2S + P_L)·F(L)``
forward-pass equivalents, ``P_L`` its held-out passes over 7L targets (:func:`prune_passes` with
``drop=keep=0.5``), taking a LoRA training step as three forward passes (forward, and a backward that
computes input gradients through the frozen weights, ≈ 2×); ``F(L) = a_f + L·b_f``, one batch-1 forward, is
fitted by least squares on the four runs. The defaults (``warmup=100``, ``refit=20`` in batches of 16,
``examples=256`` of which 64 held out, ``drop=0.25``, ``keep=0.2``) then cost
    3·16·(100 + 20·R) + 64·(Σ_r (alive_r + 1) + keep + 1)   forward passes of one example,
with ``R`` rounds, ``alive_r`` modules at round r and ``keep`` survivors (7B: 224 targets, 70B: 560), which the
report computes.

``--taylor`` measures ``prune``'s ``estimate="taylor"`` instead: on 1 and 2 blocks, with a rank-4 adapter on every
target, one held-out example, alternately (``--rounds`` times, medians) a forward pass ``F(L)`` and one Taylor
estimate of every adapter's importance ``T(L)`` (a forward, a backward that keeps its graph and ``--probes``
Hessian-vector products); also the peak memory growth of a Taylor estimate and of a LoRA training step's forward
and backward on the same example. A round then costs ``ρ = T/F`` forward passes per held-out example whatever the
number of modules, so the defaults cost
    3·16·(100 + 20·R) + 64·(R + 1)·ρ   forward passes of one example
against the ablation's count above; both are printed for 7B and 70B with ``F(L)`` fitted on the two depths.

    .venv/bin/python benchmarks/allocation_scale.py                # about 30 min on 2 loaded CPU cores
    .venv/bin/python benchmarks/allocation_scale.py --taylor --seq 64
    .venv/bin/python benchmarks/allocation_scale.py --seq 64 --examples 1 --steps 1 --methods lora sensitivity \
        guilomo --shape 70b                                                                          # 4 min
    .venv/bin/python benchmarks/allocation_scale.py --width 0.0625 --seq 16 --examples 1,2 --steps 1,2 \
        --prune-steps 1,2                                                                            # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
import transformers

import moela

P7 = 4 * 4096**2 + 3 * 4096 * 11008
P70 = 2 * 8192**2 + 2 * 8192 * 1024 + 3 * 8192 * 28672
METHODS = ("lora", "sensitivity", "gradspec", "guilomo", "prune")


# Llama-2 block shapes: hidden, intermediate, attention heads, key-value heads.
SHAPES = {"7b": (4096, 11008, 32, 32), "70b": (8192, 28672, 64, 8)}


def llama_config(width: float, layers: int, shape: str = "7b") -> transformers.LlamaConfig:
    hidden, intermediate, heads, kv_heads = SHAPES[shape]
    return transformers.LlamaConfig(hidden_size=int(hidden * width) // heads * heads,
                                    intermediate_size=int(intermediate * width), num_hidden_layers=layers,
                                    num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=32000,
                                    max_position_embeddings=4096)


def build(width: float, layers: int, shape: str = "7b") -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = llama_config(width, layers, shape)
    return transformers.LlamaForCausalLM(config).eval()


def examples(n: int, seq: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 32000, (seq,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * seq, "labels": ids})
    return out


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def allocator_options(method: str, amount: int, seq: int) -> dict:
    """``moela.allocate``'s options for one configuration (module docstring)."""
    if method in ("sensitivity", "gradspec"):
        extra = {"mode": "proportional"} if method == "sensitivity" else {}
        return dict(data=examples(amount, seq), examples=amount, batch_size=1, **extra)
    if method == "prune":  # amount = warm-up (and refit) steps; one held-out example, one round
        return dict(data=examples(amount + 1, seq), examples=amount + 1, batch_size=1, val_fraction=0.01,
                    warmup=amount, refit=amount, drop=0.5, keep=0.5)
    # guilomo: amount = search steps, as many training and validation examples
    return dict(data=examples(2 * amount, seq), max_steps=amount, batch_size=1, val_fraction=0.5, experts=8,
                rank=8, check_every=10**6)


def measure_one(method: str, width: float, layers: int, amount: int, seq: int, shape: str = "7b") -> dict:
    """Seconds and peak-memory growth (MiB) of one allocation (or of the reference LoRA training), in this
    process."""
    model = build(width, layers, shape)
    if method == "lora":
        data = examples(amount, seq)
        run = partial(train_lora, model, data)
    else:
        options = allocator_options(method, amount, seq)
        run = partial(moela.allocate, method, model, targets="all-linear", **options)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    loaded = status_kib("VmRSS")
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "growth_mib": (status_kib("VmHWM") - loaded) / 1024,
            "model_mib": loaded / 1024}


def train_lora(model: torch.nn.Module, data: list[dict]) -> None:
    """One AdamW step of rank-8 LoRA on every linear map per example (batch 1)."""
    moela.inject(model, moela.AllocationPlan.uniform(model, "all-linear", experts=1, rank=8, top_k=1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    for example in data:
        batch = {k: torch.tensor([v]) for k, v in example.items()}
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def measure_taylor(width: float, layers: int, seq: int, rounds: int, probes: int) -> dict:
    """Median seconds of a forward pass and of a Taylor estimate over all 7L adapters on one example, and the
    peak memory growth (MiB) of a LoRA training step's forward and backward and of a Taylor estimate, in this
    process (module docstring)."""
    from moela.allocators.probe import collate, swapped
    from moela.allocators.prune import held_out_loss, taylor_importance
    from moela.layer import LoraMoELinear
    from moela.plan import find_targets

    model = build(width, layers)
    names, val, cpu = find_targets(model, "all-linear"), [collate(examples(1, seq))], torch.device("cpu")
    with swapped(model, names, lambda base: LoraMoELinear(base, [4], top_k=1), 0) as adapters:
        for layer in adapters.values():  # the frozen base, trainable adapters, as in prune's search
            torch.nn.init.normal_(layer.lora_B.weight, std=1e-3)
        growth = {}
        for label, step in (("train", lambda: model(**val[0]).loss.backward()),
                            ("taylor", lambda: taylor_importance(model, adapters, names, val, cpu, probes,
                                                                 torch.Generator()))):
            Path("/proc/self/clear_refs").write_text("5")
            loaded = status_kib("VmRSS")
            step()
            growth[label] = (status_kib("VmHWM") - loaded) / 1024
        model.zero_grad(set_to_none=True)
        forward, taylor = [], []
        for _ in range(rounds):
            start = time.perf_counter()
            held_out_loss(model, val, cpu)
            forward.append(time.perf_counter() - start)
            start = time.perf_counter()
            taylor_importance(model, adapters, names, val, cpu, probes, torch.Generator())
            taylor.append(time.perf_counter() - start)
    return {"layers": layers, "forward_s": statistics.median(forward), "taylor_s": statistics.median(taylor),
            "ratios": [t / f for f, t in zip(forward, taylor)], "train_mib": growth["train"],
            "taylor_mib": growth["taylor"]}


def report_taylor(runs: list[dict], args, load: tuple[float, float]) -> None:
    """``ρ = T/F`` per depth, and the defaults' forward passes and hours at 7B and 70B, ablation against Taylor."""
    print(f"\n# prune estimate='taylor': cpu, {args.threads} threads, torch {torch.__version__}, float32; Llama "
          f"blocks of hidden {int(4096 * args.width) // 32 * 32}; {args.seq} tokens, one held-out example, "
          f"{args.probes} probes, {args.rounds} rounds; load average {load[0]:.2f} before, {load[1]:.2f} after")
    print(f"{'blocks':>6} {'forward s':>9} {'taylor s':>9} {'rho':>6} {'rho per round':>30} {'train MiB':>9} "
          f"{'taylor MiB':>10}")
    for r in runs:
        print(f"{r['layers']:>6} {r['forward_s']:9.3f} {r['taylor_s']:9.3f} {r['taylor_s'] / r['forward_s']:6.1f} "
              f"{' '.join(f'{x:.1f}' for x in r['ratios']):>30} {r['train_mib']:9.0f} {r['taylor_mib']:10.0f}")
    rho = max(r["taylor_s"] / r["forward_s"] for r in runs)
    b_f = runs[1]["forward_s"] - runs[0]["forward_s"]
    a_f = runs[0]["forward_s"] - b_f
    print(f"F(L) = {a_f:.3f} + L·{b_f:.3f} s; ρ = {rho:.1f} (the larger of the two depths)")
    for label, blocks, forward in (("7B", 32, a_f + 32 * b_f), ("70B", 80, 2 * a_f + 80 * (P70 / P7) * b_f)):
        rounds, held_out = prune_passes(7 * blocks)
        training = 3 * 16 * (100 + 20 * rounds)
        for estimate, total in (("ablation", training + 64 * held_out),
                                ("taylor", training + 64 * (rounds + 1) * rho)):
            print(f"prune defaults at {label}, {estimate}: {total:,.0f} forward passes × {forward:.2f} s = "
                  f"{total * forward / 3600:.1f} h (training {training / total:.0%})")


def in_subprocess(spec: list, threads: int, flag: str = "--one") -> dict:
    """The row of ``measure_one(*spec)`` (``flag="--one-taylor"``: ``measure_taylor``) in a fresh process."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    spec = json.dumps(spec)
    done = subprocess.run([sys.executable, __file__, flag, spec, "--threads", str(threads)], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{spec}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=float, default=1.0, help="hidden and intermediate size / 7B's (4096, 11008)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per example")
    parser.add_argument("--examples", default="2,4",
                        help="probe sizes N (lora, sensitivity, gradspec), comma-separated")
    parser.add_argument("--steps", default="1,3", help="search steps S (guilomo), comma-separated")
    parser.add_argument("--prune-steps", default="1,3", help="warm-up steps S (prune), comma-separated")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--half-width", action="store_true", help="also probe 1 block at half the width")
    parser.add_argument("--shape", choices=list(SHAPES), default="7b",
                        help="block shape; 70b measures the per-block cost that 7b's runs extrapolate (docstring)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--taylor", action="store_true", help="measure prune's estimate='taylor' (docstring)")
    parser.add_argument("--rounds", type=int, default=5, help="--taylor: timed rounds")
    parser.add_argument("--probes", type=int, default=4, help="--taylor: Hutchinson vectors")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--one-taylor", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.taylor and args.shape != "7b":
        parser.error("--taylor measures 7B-shaped blocks only")
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure_one(*json.loads(args.one))))
        return {}
    if args.one_taylor:
        print(json.dumps(measure_taylor(*json.loads(args.one_taylor))))
        return {}
    load_before = os.getloadavg()[0]
    if args.taylor:
        runs = []
        for layers in (1, 2):
            runs.append(in_subprocess([args.width, layers, args.seq, args.rounds, args.probes], args.threads,
                                      "--one-taylor"))
            print(json.dumps(runs[-1]), flush=True)
        report_taylor(runs, args, (load_before, os.getloadavg()[0]))
        return {"taylor": runs}
    runs = []
    amounts = {"lora": args.examples, "sensitivity": args.examples, "gradspec": args.examples, "guilomo": args.steps,
               "prune": args.prune_steps}
    plan = [(method, int(n)) for method in args.methods for n in amounts[method].split(",")]
    for method, amount in plan:
        for layers in (1, 2):
            row = {"method": method, "amount": amount, "layers": layers, "width": args.width, "shape": args.shape,
                   **in_subprocess([method, args.width, layers, amount, args.seq, args.shape], args.threads)}
            print(json.dumps(row), flush=True)
            runs.append(row)
    if args.half_width:
        amount = int(args.examples.split(",")[-1])
        row = {"method": "sensitivity", "amount": amount, "layers": 1, "width": args.width / 2, "shape": args.shape,
               **in_subprocess(["sensitivity", args.width / 2, 1, amount, args.seq, args.shape], args.threads)}
        print(json.dumps(row), flush=True)
        runs.append(row)
    report(args, runs, (load_before, os.getloadavg()[0]))
    return {"runs": runs}


def report(args, runs: list[dict], load: tuple[float, float]) -> None:
    config = llama_config(args.width, 0, args.shape)
    print(f"\n# allocation_scale: cpu, {args.threads} threads, torch {torch.__version__}, float32; Llama-2-"
          f"{args.shape.upper()}-shaped blocks of hidden {config.hidden_size}, intermediate "
          f"{config.intermediate_size}, {config.num_key_value_heads} key-value heads, vocabulary 32000; {args.seq} "
          f"tokens per example, batch 1; load average {load[0]:.2f} before, {load[1]:.2f} after")
    print(f"{'method':<12} {'N or S':>6} {'blocks':>6} {'width':>6} {'seconds':>8} {'peak growth MiB':>15} "
          f"{'model MiB':>9}")
    for r in runs:
        print(f"{r['method']:<12} {r['amount']:>6} {r['layers']:>6} {r['width']:>6g} {r['seconds']:8.1f} "
              f"{r['growth_mib']:15.0f} {r['model_mib']:9.0f}")
    print(f"\n{'method':<12} {'N or S':>6} {'a s':>7} {'b s/block':>9} {'7B s':>8} {'70B s':>8} {'a_m MiB':>8} "
          f"{'b_m MiB/block':>13} {'7B MiB':>8} {'70B MiB':>8}")
    scale = P70 / P7
    for method in [m for m in METHODS if m != "prune" and any(r["method"] == m for r in runs)]:
        growth = scale if method == "gradspec" else 2  # memory per block ∝ weights (gradspec) or ∝ width
        for amount in sorted({r["amount"] for r in runs if r["method"] == method}):
            one, two = ([r for r in runs if (r["method"], r["amount"], r["layers"], r["width"]) ==
                         (method, amount, layers, args.width)][0] for layers in (1, 2))
            b, bm = two["seconds"] - one["seconds"], two["growth_mib"] - one["growth_mib"]
            a, am = one["seconds"] - b, one["growth_mib"] - bm
            if args.shape == "70b":  # measured at 70B's shape: no extrapolation in width
                t7, t70, m7, m70 = math.nan, a + 80 * b, math.nan, am + 80 * bm
            else:
                t7, t70, m7, m70 = a + 32 * b, 2 * a + 80 * scale * b, am + 32 * bm, 2 * am + 80 * growth * bm
            print(f"{method:<12} {amount:>6} {a:7.1f} {b:9.1f} {t7:8.0f} {t70:8.0f} {am:8.0f} {bm:13.0f} {m7:8.0f} "
                  f"{m70:8.0f}")
    if args.shape == "70b":
        print(f"(70B-shaped blocks: 70B = a + 80·b, a_m + 80·b_m; 7B-shaped runs predict b = {scale:.2f} × their b; "
              f"per N examples or S steps of {args.seq} tokens; base weights not included)")
    else:
        print(f"(7B: a + 32·b; 70B: 2·a + 80·{scale:.2f}·b for time, 2·a_m + 80·2·b_m for memory (gradspec: "
              f"80·{scale:.2f}·b_m); per N examples or S steps of {args.seq} tokens; base weights not included)")
    prune = [r for r in runs if r["method"] == "prune" and r["width"] == args.width]
    if prune and args.shape == "7b":
        report_prune(prune, scale, args.seq)


def prune_passes(targets: int, drop: float = 0.25, keep: float = 0.2) -> tuple[int, int]:
    """(rounds, held-out passes) of ``prune``'s search over ``targets`` modules (its round logic, and the final
    ablation of the survivors)."""
    alive, floor, rounds, passes = targets, max(1, round(keep * targets)), 0, 0
    while alive > floor:
        passes += alive + 1
        alive -= min(alive - floor, max(1, int(drop * alive)))
        rounds += 1
    return rounds, passes + alive + 1


def report_prune(runs: list[dict], scale: float, seq: int) -> None:
    """``F(L) = a_f + L·b_f`` fitted on the runs (module docstring), and the defaults' cost at 7B and 70B."""
    import numpy as np

    design = np.array([[1.0, r["layers"]] for r in runs])
    passes = np.array([6 * r["amount"] + prune_passes(7 * r["layers"], drop=0.5, keep=0.5)[1] for r in runs],
                      dtype=float)
    (a_f, b_f), *_ = np.linalg.lstsq(design, np.array([r["seconds"] for r in runs]) / passes, rcond=None)
    print(f"\nprune: one batch-1 forward of {seq} tokens F(L) = {a_f:.3f} + L·{b_f:.3f} s (least squares on "
          f"{len(runs)} runs; a training step taken as 3 forwards)")
    for label, blocks, forward in (("7B", 32, a_f + 32 * b_f), ("70B", 80, 2 * a_f + 80 * scale * b_f)):
        rounds, held_out = prune_passes(7 * blocks)
        total = 3 * 16 * (100 + 20 * rounds) + 64 * held_out
        print(f"prune defaults at {label}: {rounds} rounds, {held_out} held-out passes of 64 examples, "
              f"{total:,} forward passes × {forward:.2f} s = {total * forward / 3600:.1f} h "
              f"(training {3 * 16 * (100 + 20 * rounds) / total:.0%}, ablation {64 * held_out / total:.0%})")


if __name__ == "__main__":
    main()

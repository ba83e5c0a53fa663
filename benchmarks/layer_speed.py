"""Forward+backward time of one packed LoRA-MoE layer against PEFT LoRA and a per-expert Python loop.

Every variant wraps the same frozen ``nn.Linear`` and runs the same tokens; the input requires grad (as inside
a network), so backward computes the input gradient through the frozen base too. Variants:

- ``base``: the frozen linear layer alone;
- ``peft``: ``peft.tuners.lora.Linear`` of rank ``R = Σ r_i`` (the same number of LoRA weights);
- ``packed``: :class:`moela.LoraMoELinear` (METHODS.md §2.2: two GEMMs, gates expanded to rank columns);
- ``loop``: :func:`moela.reference.loop_forward`, a Python loop over experts gathering each expert's tokens
  as public LoRA-MoE code (MoLA, GuiLoMo, MixLoRA) does, with the same trainable weights.

Run: ``python benchmarks/layer_speed.py`` (defaults: 2 CPU threads, d=768, 2048 tokens, ranks 2,4,6,8,2,4,6,8,
top-2, float32; about 40 s). On a GPU: ``--device cuda --dtype bfloat16`` (the adapters follow the base dtype,
moela's router stays float32). Each round times every variant in turn and keeps its fastest step; the table
gives the best and the median round.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from torch import nn
from torch.utils import benchmark

from moela.layer import LoraMoELinear
from moela.reference import loop_forward

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VARIANTS = ("base", "peft", "packed", "loop")


def build(d: int, ranks: list[int], top_k: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, nn.Module]:
    """The four variants around one frozen base layer; B is random so that no variant is a no-op."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    torch.manual_seed(seed)
    base = nn.Linear(d, d, device=device, dtype=dtype).requires_grad_(False)
    rank = sum(ranks)
    peft_layer = PeftLinear(base, "default", LoraConfig(r=rank, lora_alpha=16), r=rank, lora_alpha=16)
    packed = LoraMoELinear(base, ranks, top_k=top_k)
    for layer in (peft_layer.lora_B["default"], packed.lora_B):
        nn.init.normal_(layer.weight, std=0.02)
    return {"base": base, "peft": peft_layer, "packed": packed, "loop": packed}


def step_fn(name: str, module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """A closure running one forward + backward of ``name`` and dropping the gradients (like zero_grad)."""
    forward = (lambda: loop_forward(module, x)) if name == "loop" else (lambda: module(x))
    params = [p for p in module.parameters() if p.requires_grad] + [x]

    def step():
        forward().backward(grad)
        for p in params:
            p.grad = None
    return step


def measure(steps: dict, rounds: int, min_run_time: float, device: str) -> dict[str, list[float]]:
    """Seconds per step of each variant in each round: the fastest step of a ``blocked_autorange`` block of
    about ``min_run_time``. The variants are interleaved round by round, so drift and other processes on
    the machine hit all of them alike, and the fastest step of a round is the one least disturbed."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for step in steps.values():  # warm-up (allocator, kernels, autograd caches)
        for _ in range(3):
            step()
        sync()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            timer = benchmark.Timer("step(); sync()", globals={"step": step, "sync": sync},
                                    num_threads=torch.get_num_threads())
            times[name].append(min(timer.blocked_autorange(min_run_time=min_run_time).times))
    return times


def ratio(times: dict[str, list[float]], num: str, den: str) -> tuple[float, float]:
    """(ratio of the best rounds, median of the per-round ratios)."""
    return min(times[num]) / min(times[den]), statistics.median(a / b for a, b in zip(times[num], times[den]))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--ranks", default="2,4,6,8,2,4,6,8", help="comma-separated expert ranks")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per measurement")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 0.2 s per variant")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.min_run_time = 2, 0.2
    torch.set_num_threads(args.threads)
    ranks = [int(r) for r in args.ranks.split(",")]
    dtype = DTYPES[args.dtype]

    modules = build(args.d, ranks, args.top_k, dtype, args.device)
    x = torch.randn(args.tokens, args.d, device=args.device, dtype=dtype, requires_grad=True)
    grad = torch.randn(args.tokens, args.d, device=args.device, dtype=dtype)
    steps = {name: step_fn(name, modules[name], x, grad) for name in VARIANTS}
    load_before = os.getloadavg()[0]
    times = measure(steps, args.rounds, args.min_run_time, args.device)

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {args.threads} threads"
    print(f"# layer_speed: {device}, torch {torch.__version__}, d={args.d}, tokens={args.tokens}, "
          f"ranks={ranks} (R={sum(ranks)}), top-{args.top_k}, {args.dtype}, forward+backward, "
          f"{args.rounds} rounds of >= {args.min_run_time} s per variant; load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    print(f"{'variant':<8} {'best ms':>8} {'median ms':>10}")
    for name in VARIANTS:
        print(f"{name:<8} {1e3 * min(times[name]):8.2f} {1e3 * statistics.median(times[name]):10.2f}")
    for (num, den), target in {("packed", "peft"): "<= 1.2", ("loop", "packed"): ">= 1.5"}.items():
        best, paired = ratio(times, num, den)
        print(f"{num} / {den} = {best:.3f} (best rounds), {paired:.3f} (median of per-round ratios); target {target}")
    return times


if __name__ == "__main__":
    main()

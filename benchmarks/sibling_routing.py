"""Decode cost of one block's sibling modules at one token: PEFT LoRA, moela routing each module alone, and moela
routing the group in one pass (:mod:`moela.siblings`, the default in inference).

In a Llama block q, k and v read the same hidden state, and so do gate and up. Alone, moela routes each module on
its own: per module one GEMM for ``A``, one for the router ``G``, top-k, softmax, the scatter into the slot gates
and the gate-to-column GEMM. With sibling routing the first module called computes the group: one GEMM for
``[A_q; A_k; A_v; G_q; G_k; G_v]``, the routing once over (tokens, modules, experts), one gate expansion, each
module's ``B``; the others take their outputs. Times: µs per call of a whole group (block 0 of ``speed.py``'s
model, uniform plan, PEFT LoRA at equal budget, eval mode without autograd), medians of interleaved rounds; ratios
are medians of per-round ratios; the last column is the largest difference between the two moela paths.

    PYTHONPATH=. python benchmarks/sibling_routing.py           # ≈ 1 min; speed.py's size options apply
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (benchmarks/speed.py: model and variants)

ROUNDS = 15
GROUPS = {"q,k,v": ("self_attn", ("q_proj", "k_proj", "v_proj")), "gate,up": ("mlp", ("gate_proj", "up_proj"))}


def group(model: torch.nn.Module, name: str) -> list[torch.nn.Module]:
    """Block 0's adapted modules of sibling group ``name`` (:data:`GROUPS`)."""
    parent, children = GROUPS[name]
    block = next(m for path, m in model.named_modules() if path.endswith(f"layers.0.{parent}"))
    return [getattr(block, child) for child in children]


def variants(args) -> dict[str, dict[str, Callable]]:
    """{group: {variant: x ↦ outputs}} for ``peft``, ``alone`` and ``siblings``; moela's ``B`` random so that the
    adapters contribute."""
    peft_model = speed.build("peft", args)[0].eval()
    moela_model = speed.build("uniform", args)[0].eval()
    with torch.no_grad():
        for p in (p for n, p in moela_model.named_parameters() if "lora_B" in n):
            p.normal_(0, 0.02)
    out = {}
    for name in GROUPS:
        peft_layers, moela_layers = group(peft_model, name), group(moela_model, name)
        out[name] = {"peft": lambda x, ls=peft_layers: [l(x) for l in ls],
                     "alone": lambda x, ls=moela_layers: alone(ls, x),
                     "siblings": lambda x, ls=moela_layers: [l(x) for l in ls]}
    return out


def alone(layers: list, x: torch.Tensor) -> list[torch.Tensor]:
    """The group's outputs with sibling routing off for the call."""
    layers[0].siblings.enabled = False
    try:
        return [layer(x) for layer in layers]
    finally:
        layers[0].siblings.enabled = True


def timings(fns: dict[str, Callable], x: torch.Tensor, rounds: int, calls: int) -> dict[str, list[float]]:
    """µs per call of each variant, one value per round, variants interleaved."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn(x)
            times[name].append(1e6 * (time.perf_counter() - start) / calls)
    return times


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    rounds = ROUNDS
    args = speed.parse(argv)
    torch.set_num_threads(args.threads)
    print(f"# one token, batch {args.gen_batches}, hidden {args.hidden}, {args.threads} threads, torch "
          f"{torch.__version__}; µs per group call, median of {rounds} rounds")
    print("| batch | group | PEFT LoRA | moela alone | moela siblings | alone / PEFT | siblings / PEFT "
          "| max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    groups = variants(args)
    with torch.no_grad():
        for size in args.gen_batches:
            x = torch.randn(size, 1, args.hidden, device=args.device, dtype=speed.DTYPES[args.dtype])
            for name, fns in groups.items():
                diff = max(float((a - b).abs().max()) for a, b in zip(fns["alone"](x), fns["siblings"](x)))
                timings(fns, x, 1, 200)  # warm-up
                t = timings(fns, x, rounds, 1000)
                med = {k: statistics.median(v) for k, v in t.items()}
                ratio = {k: statistics.median(a / b for a, b in zip(t[k], t["peft"])) for k in ("alone", "siblings")}
                print(f"| {size} | {name} | {med['peft']:.1f} | {med['alone']:.1f} | {med['siblings']:.1f} | "
                      f"{ratio['alone']:.3f} | {ratio['siblings']:.3f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()

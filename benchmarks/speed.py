"""Training-step time, peak memory and generation speed of moela plans against PEFT LoRA and a per-expert loop.

The model is a randomly initialised Llama built from ``LlamaConfig`` (default hidden 512, intermediate 1376,
8 layers, 8 heads, vocabulary 8000), all seven projections of every block adapted. Variants:

- ``peft``: PEFT LoRA of the rank whose trainable count is closest to the ``uniform`` plan's;
- ``uniform``: moela, 4 experts of rank 4 per module, top-2;
- ``hetero``: moela, HiLo/MoLA-like: 2, 4, 6, 8 experts of ranks 2 and 4 growing with depth, top-2, about the
  same budget;
- ``loop``: the ``uniform`` plan computed by the per-expert Python loop (:class:`moela.reference.LoopLoraMoELinear`).

A training step is forward + backward + AdamW step; every routed variant trains with 1e-3 × the balance loss
once: moela's layers add it to the router gradients themselves (``inject(balance_coef=1e-3)``, as in any
training), the loop adds ``moela.balance_loss`` to its loss (:func:`step_loss`). Step times are interleaved over
rounds so that machine drift hits every variant alike; the ratio columns are medians of per-round ratios, and the
summary line gives the geometric mean of the per-round ratios with its 95% t-interval. Peak memory is measured in a
fresh subprocess per variant over two training steps: on CPU the growth of the peak resident set (VmHWM, reset
after loading) over the loaded model, on CUDA the growth of ``max_memory_allocated``. Generation is greedy
``generate`` with the KV cache at each batch size of ``--gen-batches`` (default 1 and 8), interleaved over rounds
like the steps; its ratio to PEFT is the median of per-round ratios of tokens/s.

Run: ``python benchmarks/speed.py`` (about 3 minutes on 2 idle CPU threads; ``--quick`` for a 2-layer smoke run);
``--dtype bfloat16`` loads the model (and so the adapters; moela's router stays float32) in bf16; on a GPU:
``python benchmarks/speed.py --device cuda --dtype bfloat16``.
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
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import moela
from moela.plan import AllocationPlan, ModulePlan, find_targets, layer_index
from moela.reference import LoopLoraMoELinear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from intervals import ci  # noqa: E402  (benchmarks/intervals.py)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VARIANTS = ("peft", "uniform", "hetero", "loop")
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HETERO = [[4, 4], [2, 2, 4, 4], [2, 2, 4, 4, 4, 4], [2, 2, 2, 2, 4, 4, 4, 4]]  # ranks by depth quarter
BALANCE_COEF = 1e-3


def base_model(args) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                         max_position_embeddings=max(args.seq, args.prompt + args.new_tokens))
    return LlamaForCausalLM(config).to(args.device, DTYPES[args.dtype])


def plan_for(name: str, model) -> AllocationPlan:
    if name in ("uniform", "loop"):
        return AllocationPlan.uniform(model, PROJECTIONS, experts=4, rank=4, top_k=2)
    layers = model.config.num_hidden_layers
    return AllocationPlan({path: ModulePlan(HETERO[4 * layer_index(path) // layers], top_k=2)
                           for path in find_targets(model, PROJECTIONS)}, {"method": "hetero (benchmark)"})


def peft_rank(model) -> int:
    """The LoRA rank whose trainable count is closest to the ``uniform`` plan's."""
    per_rank = sum(d_in + d_out for d_in, d_out in plan_for("uniform", model).validate(model).values())
    return max(1, round(plan_for("uniform", model).num_trainable(model) / per_rank))


def build(name: str, args):
    """(model, trainable parameter count) for one variant, adapters on, in train mode."""
    model = base_model(args)
    if name == "peft":
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(r=peft_rank(model), lora_alpha=16, lora_dropout=0.0, target_modules=PROJECTIONS)
        model = get_peft_model(model, config, autocast_adapter_dtype=False)
    else:
        moela.inject(model, plan_for(name, model), alpha=16.0, balance_coef=BALANCE_COEF)
        if name == "loop":
            for _, layer in moela.moela_layers(model):
                layer.__class__ = LoopLoraMoELinear
    return model.train(), moela.count_parameters(model)[0]


def batch(args) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, args.vocab, (args.batch, args.seq), generator=g).to(args.device)


def step_loss(name: str, model, ids: torch.Tensor) -> torch.Tensor:
    """The loss a training step backpropagates: the language-model loss, plus ``BALANCE_COEF`` × the balance loss
    for the loop, whose layers do not add it to the router gradients as moela's do."""
    loss = model(input_ids=ids, labels=ids).loss
    return loss + BALANCE_COEF * moela.balance_loss(model) if name == "loop" else loss


def train_step_fn(name: str, model, ids: torch.Tensor):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        step_loss(name, model, ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def generate_fn(model, args, batch_size: int = 1):
    generator = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, args.vocab, (batch_size, args.prompt), generator=generator).to(args.device)

    def run():
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           do_sample=False, use_cache=True, pad_token_id=0)
    return run


def peak_memory(name: str, args) -> dict[str, float]:
    """Run in a fresh process: MiB of the loaded model and the peak growth over it during training steps."""
    model, _ = build(name, args)
    step = train_step_fn(name, model, batch(args))
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set (Linux)
        loaded = _status_kib("VmRSS") * 1024
    for _ in range(2):
        step()
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
    return {"loaded_mib": loaded / 2**20, "peak_mib": peak / 2**20, "growth_mib": (peak - loaded) / 2**20}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_in_subprocess(name: str, argv: list[str]) -> dict[str, float]:
    """:func:`peak_memory` in a fresh process. glibc's malloc there maps every block of 64 KiB or more on its
    own (``MALLOC_MMAP_THRESHOLD_``), so that the resident set follows live memory, not the allocator's cache."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, __file__, *argv, "--memory-of", name], check=True, env=env,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5, help="timed training steps per variant (interleaved)")
    parser.add_argument("--gen-rounds", type=int, default=6, help="timed generations per variant and batch size")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--gen-batches", default="1,8", help="comma-separated generation batch sizes")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="2 layers, batch 2×128, 2 rounds, 16 new tokens")
    parser.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.gen_batches = [int(b) for b in args.gen_batches.split(",")]
    if args.quick:
        args.layers, args.batch, args.seq, args.rounds, args.gen_rounds, args.new_tokens = 2, 2, 128, 2, 2, 16
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps(peak_memory(args.memory_of, args)))
        return {}
    load_before = os.getloadavg()[0]
    built = {name: build(name, args) for name in VARIANTS}
    ids = batch(args)
    steps = {name: train_step_fn(name, model, ids) for name, (model, _) in built.items()}
    step_s = {name: [] for name in VARIANTS}
    for name in VARIANTS:  # warm-up
        for _ in range(2):
            timed(steps[name], args.device)
    for _ in range(args.rounds):
        for name in VARIANTS:
            step_s[name].append(timed(steps[name], args.device))
    generate_s = {}  # (variant, batch size) -> seconds per round
    for size in args.gen_batches:
        gens = {name: generate_fn(model.eval(), args, size) for name, (model, _) in built.items()}
        for name in VARIANTS:
            gens[name]()  # warm-up
            generate_s[name, size] = []
        for _ in range(args.gen_rounds):
            for name in VARIANTS:
                generate_s[name, size].append(timed(gens[name], args.device))
    memory = {name: memory_in_subprocess(name, argv) for name in VARIANTS}
    report(args, built, step_s, generate_s, memory, (load_before, os.getloadavg()[0]))
    return {"step_s": step_s, "generate_s": generate_s, "memory": memory}


def paired(times: dict, num, den) -> float:
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def interval(times: dict, num, den) -> str:
    """The geometric mean of the per-round ratios ``num / den`` with its 95% t-interval (over rounds; nan for
    one round)."""
    mean, half = ci([math.log(a / b) for a, b in zip(times[num], times[den])])
    return f"{math.exp(mean):.3f} [{math.exp(mean - half):.3f}, {math.exp(mean + half):.3f}]"


def report(args, built, step_s, generate_s, memory, load: tuple[float, float]) -> None:
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {args.threads} threads"
    memory_kind = "max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (VmHWM)"
    print(f"# speed: {device}, torch {torch.__version__}, {args.dtype}; Llama hidden {args.hidden}, intermediate "
          f"{args.intermediate}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}; 7 projections adapted; "
          f"load average {load[0]:.2f} before, {load[1]:.2f} after")
    print(f"# training step = forward + backward + AdamW on {args.batch}x{args.seq} tokens, best and median of "
          f"{args.rounds} interleaved rounds, ratios = medians of per-round ratios; generation: greedy, KV cache, "
          f"batch {' and '.join(map(str, args.gen_batches))}, {args.prompt}-token prompt, {args.new_tokens} new "
          f"tokens, tokens/s = batch x new tokens / median time, 'vs peft' = median per-round ratio of tokens/s")
    print(f"# PEFT LoRA rank {built['peft'][0].peft_config['default'].r}; memory: {memory_kind}, growth over the "
          f"loaded model during 2 training steps")
    gen_header = "".join(f" {f'gen b{size} tok/s':>14} {'vs peft':>8}" for size in args.gen_batches)
    print(f"{'variant':<8} {'trainable':>10} {'best ms':>8} {'step ms':>8} {'vs peft':>8} {'vs loop':>8}{gen_header} "
          f"{'loaded MiB':>10} {'peak MiB':>9} {'growth MiB':>10} {'vs peft':>8}")
    for name in VARIANTS:
        mem = memory[name]
        gen = "".join(f" {size * args.new_tokens / statistics.median(generate_s[name, size]):14.1f} "
                      f"{paired(generate_s, ('peft', size), (name, size)):8.3f}" for size in args.gen_batches)
        print(f"{name:<8} {built[name][1]:>10,} {1e3 * min(step_s[name]):8.1f} "
              f"{1e3 * statistics.median(step_s[name]):8.1f} {paired(step_s, name, 'peft'):8.3f} "
              f"{paired(step_s, name, 'loop'):8.3f}{gen} "
              f"{mem['loaded_mib']:10.1f} {mem['peak_mib']:9.1f} {mem['growth_mib']:10.1f} "
              f"{mem['growth_mib'] / memory['peft']['growth_mib']:8.3f}")
    generation = ", ".join(f"batch {size} {interval(generate_s, ('peft', size), ('uniform', size))}"
                           for size in args.gen_batches)
    print(f"geometric means of per-round ratios [95% interval]: uniform step / peft = "
          f"{interval(step_s, 'uniform', 'peft')} (target <= 1.05 CPU, 1.10 GPU); loop / uniform = "
          f"{interval(step_s, 'loop', 'uniform')} (target >= 1.6 CPU, 3 GPU); uniform memory growth / peft = "
          f"{memory['uniform']['growth_mib'] / memory['peft']['growth_mib']:.3f} (target <= 1.10); uniform "
          f"generation tokens/s / peft: {generation} (target >= 1)")


if __name__ == "__main__":
    main()

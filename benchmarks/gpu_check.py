"""The GPU acceptance check behind ``benchmarks/gpu_check.sh``: the layer and training-step benchmarks in bf16,
a short bf16 training run of the built-in demo, and the same run under ``configs/accelerate/fsdp.yaml`` on one
GPU, and the time of AlphaLoRA's spectra at Llama-2-7B's shapes on the GPU (``alphalora_speed.py``); one summary
table against the targets; exit status 1 if a target is missed or a run fails.

Targets (README, Performance): the per-expert loop at least 3× slower than moela (layer and training step), a
moela training step at most 1.10× PEFT LoRA's at the same budget, activation memory at most 1.10× PEFT's, greedy
generation at least as many tokens/s as PEFT LoRA's (batch 1 and 8), AlphaLoRA's float64 spectra of a 7B model in
at most 5 minutes (issue 15's targets; the last estimated from two shapes).

``--device cpu --quick`` runs every command on CPU with tiny sizes to check the commands and their flags, not
the numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import alphalora_speed  # noqa: E402
import layer_speed  # noqa: E402
import speed  # noqa: E402

TINY_LLAMA = ["--hidden", "64", "--intermediate", "128", "--layers", "2", "--heads", "4", "--vocab", "256",
              "--batch", "2", "--seq", "32", "--rounds", "2", "--prompt", "4", "--new-tokens", "4"]


def moela(args: list[str], launcher: list[str] | None = None) -> tuple[float, str]:
    """(seconds, combined output) of one ``moela`` command; raises with its output's tail if it fails."""
    command = [sys.executable, "-m", *launcher, "-m", "moela.cli", *args] if launcher else \
        [sys.executable, "-m", "moela.cli", *args]
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"failed ({done.returncode}): {' '.join(command)}\n{(done.stdout + done.stderr)[-3000:]}")
    return time.perf_counter() - started, done.stdout + done.stderr


def accuracy(run_dir: Path) -> float:
    return json.loads((run_dir / "metrics.json").read_text())["accuracy"]


def max_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file
    first, second = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (a, b))
    return max((first[k].float() - second[k].float()).abs().max().item() for k in first)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the commands, not the numbers")
    parser.add_argument("--out", default="runs/gpu_check", help="folder of the training runs")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of each training run")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); "
              f"this check needs an NVIDIA GPU", file=sys.stderr)
        return 2
    out = (ROOT / args.out).resolve()
    bench = ["--device", args.device, "--dtype", "bfloat16"]
    rows: list[tuple[str, str, str, bool | None]] = []  # (what, value, target, met; None: not judged)

    def judged(met: bool) -> bool | None:
        return None if args.quick else met

    print("## layer_speed", flush=True)
    layer = layer_speed.main(bench + (["--quick", "--d", "64", "--tokens", "128"] if args.quick else []))
    paired = layer_speed.ratio(layer, "loop", "packed")[1]
    rows.append(("layer: loop / packed (median of rounds)", f"{paired:.2f}", ">= 3", judged(paired >= 3)))
    paired = layer_speed.ratio(layer, "packed", "peft")[1]
    rows.append(("layer: packed / PEFT LoRA", f"{paired:.3f}", "(info)", None))

    print("## speed", flush=True)
    result = speed.main(bench + (TINY_LLAMA if args.quick else []))
    step = speed.paired(result["step_s"], "uniform", "peft")
    loop = speed.paired(result["step_s"], "loop", "uniform")
    memory = result["memory"]["uniform"]["growth_mib"] / result["memory"]["peft"]["growth_mib"]
    rows += [("training step: loop / moela uniform", f"{loop:.2f}", ">= 3", judged(loop >= 3)),
             ("training step: moela uniform / PEFT LoRA", f"{step:.3f}", "<= 1.10", judged(step <= 1.10)),
             ("activation memory: moela uniform / PEFT LoRA", f"{memory:.3f}", "<= 1.10", judged(memory <= 1.10))]
    for size in sorted({size for _, size in result["generate_s"]}):  # tokens/s ratio = PEFT's time / moela's
        tokens = speed.paired(result["generate_s"], ("peft", size), ("uniform", size))
        rows.append((f"greedy generation, batch {size}: moela uniform / PEFT LoRA tokens/s", f"{tokens:.3f}",
                     ">= 1", judged(tokens >= 1)))

    print("## alphalora_speed", flush=True)
    minutes = alphalora_speed.main(["--device", args.device, "--no-svdvals", "--no-real"]
                                   + (["--scale", "0.03", "--rounds", "1"] if args.quick else ["--rounds", "2"]))
    rows += [("AlphaLoRA spectra of Llama-2-7B, float64: minutes", f"{minutes['float64']:.1f}", "<= 5",
              judged(minutes["float64"] <= 5)),
             ("AlphaLoRA spectra of Llama-2-7B, float32: minutes", f"{minutes['float32']:.1f}", "(info)", None)]

    demo = ["run", "adapter.method=uniform", "train.precision=bf16", f"train.max_steps={args.steps}",
            "train.progress=false", "--overwrite"] + (["data.max_eval_samples=32"] if args.quick else [])
    print("## demo, one process", flush=True)
    seconds, _ = moela(demo + [f"output_dir={out / 'demo'}"])
    rows.append((f"demo (bf16, {args.steps} steps): accuracy, seconds", f"{accuracy(out / 'demo'):.3f}, "
                 f"{seconds:.0f}", "runs", True))
    print("## demo under configs/accelerate/fsdp.yaml, one process", flush=True)
    fsdp = ["accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml"),
            "--num_processes", "1"]
    seconds, log = moela(demo + [f"output_dir={out / 'fsdp'}"], launcher=fsdp)
    sharded = json.loads((out / "fsdp" / "train_log.json").read_text())["sharded"]
    rows.append(("demo under FSDP2: accuracy, seconds", f"{accuracy(out / 'fsdp'):.3f}, {seconds:.0f}", "runs",
                 True))
    rows.append(("demo under FSDP2: trained sharded", str(sharded), "True" if args.device == "cuda" else "(CPU: DDP)",
                 sharded if args.device == "cuda" else None))
    rows.append(("demo: max |adapter FSDP2 - adapter one process|", f"{max_difference(out / 'demo', out / 'fsdp'):.2e}",
                 "(info)", None))

    print(f"\n# gpu_check summary: {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu (dry run)'}, "
          f"torch {torch.__version__}{', --quick: not a measurement' if args.quick else ''}")
    width = max(len(r[0]) for r in rows)
    print(f"{'check':<{width}}  {'value':>14}  {'target':>10}  result")
    for what, value, target, met in rows:
        print(f"{what:<{width}}  {value:>14}  {target:>10}  {'-' if met is None else 'PASS' if met else 'FAIL'}")
    return 1 if any(met is False for *_, met in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

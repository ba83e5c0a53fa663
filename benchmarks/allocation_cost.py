"""Cost of the data-driven allocators against one epoch of final training, on a real model and task.

Model: ../shared/models/stories260k (a tiny real Llama); data: the first N BoolQ training examples of
../shared/data/llm-adapters (Alpaca prompt, loss on the response). Times, on the same examples:
  - ``sensitivity`` allocation (single-example probe, as the public code),
  - ``guilomo`` allocation (defaults: first-order, one pass over the 90% training split, batch 8), and the
    same with the second-order update,
  - one epoch of training a uniform E=4, r=8 LoRA-MoE with AdamW (batch 8, balance loss 1e-3).

    .venv/bin/python benchmarks/allocation_cost.py [--examples 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers

import moela
from moela.data import load_records, make_loader, tokenize

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def load(n: int):
    model = transformers.AutoModelForCausalLM.from_pretrained(SHARED / "models" / "stories260k").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(SHARED / "models" / "stories260k")
    records = load_records(SHARED / "data" / "llm-adapters" / "boolq" / "train.json", "instruction", limit=n)
    return model, tokenizer, tokenize(records, tokenizer, "instruction", cutoff_len=256)


def train_epoch(model, features, pad_id: int, batch_size: int) -> tuple[float, int]:
    """Seconds and steps of one epoch of uniform E=4, r=8 LoRA-MoE training (all linear layers)."""
    moela.inject(model, moela.allocate("uniform", model, experts=4, rank=8))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4)
    model.train()
    start, steps = time.perf_counter(), 0
    for batch in make_loader(features, pad_id, batch_size=batch_size, keep_task=False):
        loss = model(**batch).loss + 1e-3 * moela.balance_loss(model, batch["attention_mask"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
    return time.perf_counter() - start, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, features = load(args.examples)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens = sum(len(f["input_ids"]) for f in features)
    results = {"examples": len(features), "tokens": tokens, "threads": args.threads}

    start = time.perf_counter()
    moela.allocate("sensitivity", model, data=features, examples=len(features))
    results["sensitivity_s"] = time.perf_counter() - start

    start = time.perf_counter()
    plan = moela.allocate("guilomo", model, data=features, batch_size=args.batch_size)
    results["guilomo_s"] = time.perf_counter() - start
    results["guilomo_steps"] = plan.meta["cost"]["steps"]

    start = time.perf_counter()
    moela.allocate("guilomo", model, data=features, batch_size=args.batch_size, second_order=True)
    results["guilomo_second_order_s"] = time.perf_counter() - start

    seconds, steps = train_epoch(model, features, pad_id, args.batch_size)
    results.update(epoch_s=seconds, epoch_steps=steps)
    results["sensitivity_per_epoch"] = results["sensitivity_s"] / seconds
    results["guilomo_per_epoch"] = results["guilomo_s"] / seconds
    results["guilomo_second_order_per_epoch"] = results["guilomo_second_order_s"] / seconds
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()

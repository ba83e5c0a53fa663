"""Adaptation to new text: held-out loss per token of stories260k, every allocator at one budget.

The base is stories260k (../shared/models: a real 260k-parameter Llama trained on TinyStories). Each method's
LoRA-MoE plan on all 35 linear maps, at the budget of ``uniform:E=4,r=2`` (57,360 parameters), is trained to
predict the next token of a kind of text the model has not seen:
  - ``sst2``: movie-review sentences, SST-2 ``train.tsv`` → held-out ``dev.tsv`` (../shared/data/sst2);
  - ``questions``: the ``instruction`` field (question, options, answer format) of LLM-Adapters BoolQ, ARC-Easy and
    OpenBookQA, ``train.json`` → held-out ``test.json`` (piqa has no ``train.json`` there, so it is left out).
Every text is BOS + text cut to ``--length`` tokens; each task uses ``--train`` training and ``--val`` held-out
texts, picked once with a fixed seed (1234); held-out texts equal to a training text are dropped.

Training: AdamW (no weight decay) on the adapter, ``--steps`` steps of ``--batch`` texts, linear warm-up over
``--warmup`` steps then linear decay to 0. The loss is the mean next-token cross-entropy plus the layers' built-in
balance loss (``moela.inject``'s default, 1e-3 per routed module). A seed fixes the adapter's initial weights,
the order of the training texts (the same permutation every epoch), and the allocator's randomness and probe
sample (the first ``--probe`` texts of that order). The held-out texts are the same for every seed and method.
The learning rate 7.5e-3 was the best for uniform of 5e-3, 7.5e-3, 1e-2, 2e-2 at 300 steps (sst2, seed 0:
held-out 2.625, 2.614, 2.627, 2.715 nats/token), so any tuning favours uniform. 300 steps (4,800 texts, 2.4
epochs) do not reach a plateau: uniform's loss still falls in the last fifth, and 600 steps at 5e-3 reached
2.577. The comparison is at a fixed training budget, sized so that the whole benchmark runs in about 45 minutes
on one idle core; the rows keep each run's learning curve (:func:`train`).

Metric: held-out loss per token ``L = Σ_i ℓ_i / Σ_i n_i`` (nats), where ``ℓ_i`` is the summed cross-entropy of
text i's ``n_i`` predicted tokens. The results keep every ``ℓ_i``, so methods can be compared text by text.
Statistics per task, over S seeds × N held-out texts (a crossed design: every seed is scored on the same texts):
  - paired difference to uniform, ``D = (1/S) Σ_s Σ_i (ℓ^m_si − ℓ^uniform_si) / Σ_i n_i``;
  - its 95% interval: percentile interval of a two-way bootstrap (2,000 replicates). Each replicate draws S seeds
    and, independently, N texts, with replacement, and recomputes ``D`` from the same draws for the method and
    uniform, so the pairing is kept. Resampling both factors of a crossed design (Owen's pigeonhole bootstrap)
    errs on the wide side; its seed part is coarse with 3 seeds (resampling 3 values gives 2/3 of the usual
    variance estimate of their mean), and with one seed the interval covers text sampling only. The per-seed
    ``D`` are listed too (the spread between seeds);
  - detectable difference: ``(1.96 + 0.84) ×`` the bootstrap standard error of ``D``, the true difference found
    at the two-sided 5% level with 80% power;
  - loss per token ± the half-width of its 95% interval, from the same replicates.

    PYTHONPATH=. python benchmarks/adaptation.py                # both tasks, every method, seeds 0 1 2
    PYTHONPATH=. python benchmarks/adaptation.py --tasks sst2   # one task; a later run adds the other to the file
    PYTHONPATH=. python benchmarks/adaptation.py --report-only  # BENCHMARKS.md again from results/adaptation.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers

import moela
from moela.allocators import allocate
from moela.allocators.budget import parse_budget
from moela.io import atomic_write_text
from moela.plan import layer_index
from recovery import MODEL, ROOT, SHARED, VARIANTS, load_base, run_arguments

RESULTS = ROOT / "benchmarks" / "results" / "adaptation.json"
LLM = SHARED / "data" / "llm-adapters"
QUESTIONS = ["boolq", "ARC-Easy", "openbookqa"]
TASKS = ("sst2", "questions")
METHODS = ["uniform", "lora", "mola", "hilo", "alphalora", "sensitivity", "guilomo", "guilomo-published", "gradspec",
           "prune", "prune-keep0.6"]
BUDGET = "uniform:E=4,r=2"
# Fixed-rank methods get experts of uniform's rank 2, so that they differ from it only in where the experts go;
# hilo, guilomo (experts ≤ 8 of rank ≤ 8, ranks rescaled to the budget) and gradspec keep their own defaults.
OPTIONS = {"uniform": {"experts": 4, "rank": 2}, "mola": {"rank": 2}, "alphalora": {"rank": 2},
           "sensitivity": {"rank": 2}}
SETUP = ("budget", "steps", "batch", "lr", "warmup", "length", "train", "val", "probe")  # what results depend on
REPLICATES = 2000
CURVE = 100  # held-out texts of the learning curve
Z = 1.96 + 0.84  # two-sided 5% test with 80% power


def read_texts(task: str) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) of ``task``, in file order."""
    if task == "sst2":
        def read(name: str) -> list[str]:
            return [line.rsplit("\t", 1)[0] for line in (SHARED / "data" / "sst2" / name).read_text().splitlines()
                    if line.strip()]
        return read("train.tsv"), read("dev.tsv")

    def questions(split: str) -> list[str]:
        return [r["instruction"] for name in QUESTIONS for r in json.loads((LLM / name / f"{split}.json").read_text())]
    return questions("train"), questions("test")


def token_sets(task: str, train: int, val: int, length: int) -> tuple[list[list[int]], list[list[int]]]:
    """``train`` training and ``val`` held-out token sequences (BOS + text, first ``length`` tokens, at least 2),
    each set in an order fixed by seed 1234; held-out texts that are also training texts are skipped."""
    tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    train_texts, held_texts = read_texts(task)
    seen = set(train_texts)

    def pick(texts: list[str], count: int) -> list[list[int]]:
        out = []
        for i in np.random.default_rng(1234).permutation(len(texts)):
            ids = tok(texts[i])["input_ids"][:length]
            if len(ids) >= 2:
                out.append(ids)
            if len(out) == count:
                return out
        raise ValueError(f"{task}: only {len(out)} usable texts, {count} wanted")

    return pick(train_texts, train), pick([t for t in held_texts if t not in seen], val)


def padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), right-padded with token 0."""
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
    return ids, mask


def text_losses(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ℓ_i: each row's summed next-token cross-entropy over its real tokens (float64), in the model's mode."""
    width = int(mask.sum(1).max())
    ids, mask = ids[:, :width], mask[:, :width]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    ce = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return (ce * mask[:, 1:]).sum(1, dtype=torch.float64)


@torch.no_grad()
def held_out(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, batch: int = 100) -> np.ndarray:
    model.eval()
    return torch.cat([text_losses(model, ids[i:i + batch], mask[i:i + batch])
                      for i in range(0, len(ids), batch)]).numpy()


def train(plan: moela.AllocationPlan, ids: torch.Tensor, mask: torch.Tensor, val: tuple[torch.Tensor, torch.Tensor],
          seed: int, args: argparse.Namespace) -> tuple[torch.nn.Module, np.ndarray, list[float]]:
    """Inject ``plan`` into a fresh base and train it (module docstring); returns the model, its held-out ℓ_i
    and the learning curve: loss per token on the first :data:`CURVE` held-out texts after every fifth of the
    steps."""
    torch.manual_seed(seed)
    model = moela.inject(load_base(), plan)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * max(0.0, 1 - s / args.steps))
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    head = val[0][:CURVE], val[1][:CURVE]
    tokens = float(head[1].sum() - len(head[1]))
    curve, every = [], max(1, args.steps // 5)
    for step in range(args.steps):
        rows = order[(step * args.batch + torch.arange(args.batch)) % len(ids)]
        model.train()
        loss = text_losses(model, ids[rows], mask[rows]).sum() / (mask[rows].sum() - len(rows))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % every == 0 or step + 1 == args.steps:
            losses = held_out(model, *(val if step + 1 == args.steps else head))
            curve.append(round(float(losses[:CURVE].sum()) / tokens, 5))
    return model, losses, curve


def make_plan(method: str, data: list[dict], seed: int, budget: int) -> tuple[moela.AllocationPlan, float]:
    name, variant = VARIANTS.get(method, (method, {}))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = allocate(name, load_base(), targets="all-linear", budget=budget, data=data, seed=seed,
                        **OPTIONS.get(name, {}), **variant)
    return plan, time.perf_counter() - start


def shape(plan: moela.AllocationPlan) -> dict:
    """Experts and total rank per block (summed over its maps)."""
    blocks: dict[int, list[int]] = {}
    for name, spec in plan.items():
        block = blocks.setdefault(layer_index(name), [0, 0])
        block[0] += len(spec.ranks)
        block[1] += sum(spec.ranks)
    return {"experts_per_block": [blocks[b][0] for b in sorted(blocks)],
            "rank_per_block": [blocks[b][1] for b in sorted(blocks)]}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def run(args: argparse.Namespace) -> dict:
    setup = {key: getattr(args, key) for key in SETUP}
    results = {"setup": setup, "rows": []}
    if args.out.exists() and not args.fresh:
        results = load(args.out)
        if results["setup"] != setup:
            sys.exit(f"adaptation: {args.out} holds runs of another setup ({results['setup']}); "
                     f"pass --fresh or another --out")
    rows = results["rows"]
    done = {(r["task"], r["method"], r["seed"]) for r in rows}
    results["machine"] = f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)"

    def save(row: dict) -> None:
        rows.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(results, indent=None, separators=(",", ":")) + "\n")

    budget = parse_budget(args.budget, load_base(), "all-linear")
    sets = {}
    for task in args.tasks:
        train_seqs, val_seqs = token_sets(task, args.train, args.val, args.length)
        sets[task] = train_seqs, padded(train_seqs), padded(val_seqs)
        if (task, "base", None) not in done:
            val_ids, val_mask = sets[task][2]
            losses = held_out(load_base(), val_ids, val_mask)
            save({"task": task, "method": "base", "seed": None, "text_loss": losses.round(4).tolist(),
                  "tokens": (val_mask.sum(1) - 1).tolist(), "trainable": 0})
    for seed in args.seeds:  # seed-major, so that an interrupted run has every task and method at the first seeds
        for task in args.tasks:
            train_seqs, (ids, mask), val = sets[task]
            order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
            data = [{"input_ids": train_seqs[i], "attention_mask": [1] * len(train_seqs[i]),
                     "labels": train_seqs[i]} for i in order[:args.probe].tolist()]
            for method in args.methods:
                if (task, method, seed) in done:
                    continue
                try:
                    plan, seconds = make_plan(method, data, seed, budget)
                except ValueError as err:  # e.g. a read-out whose smallest plan costs more than the budget
                    save({"task": task, "method": method, "seed": seed, "error": str(err)})
                    print(f"{task:10s} {method:18s} seed {seed}: {err}", flush=True)
                    continue
                start = time.perf_counter()
                model, losses, curve = train(plan, ids, mask, val, seed, args)
                train_s = time.perf_counter() - start
                row = {"task": task, "method": method, "seed": seed, "text_loss": losses.round(4).tolist(),
                       "curve": curve, "trainable": moela.count_parameters(model)[0], "alloc_s": round(seconds, 2),
                       "train_s": round(train_s, 1), **shape(plan)}
                if "unmoved" in plan.meta:
                    row["unmoved"] = plan.meta["unmoved"]
                save(row)
                per_token = losses.sum() / float(val[1].sum() - len(val[1]))
                print(f"{task:10s} {method:18s} seed {seed}: loss/token {per_token:.4f} (curve {curve}) trainable "
                      f"{row['trainable']:,} alloc {seconds:.1f}s train {train_s:.0f}s", flush=True)
    return results


def merged(files: list[Path]) -> dict:
    """One results dict from several files of the same setup (e.g. one per task)."""
    parts = [load(f) for f in files]
    for f, part in zip(files[1:], parts[1:]):
        if part["setup"] != parts[0]["setup"]:
            sys.exit(f"adaptation: {f} has another setup than {files[0]}")
    return {**parts[0], "rows": [r for part in parts for r in part["rows"]]}


def bootstrap(losses: np.ndarray, tokens: np.ndarray, seeds: int, rng_seed: int = 0) -> tuple[float, np.ndarray]:
    """Loss per token of ``losses`` (S, N) and its two-way bootstrap replicates (module docstring); the same
    ``rng_seed`` and shape give the same draws, so replicates of two methods on the same seeds are paired."""
    rng = np.random.default_rng(rng_seed)
    n = losses.shape[1]
    texts = rng.multinomial(n, np.full(n, 1 / n), size=REPLICATES)
    draws = rng.multinomial(seeds, np.full(seeds, 1 / seeds), size=REPLICATES)
    return (float(losses.sum() / (seeds * tokens.sum())),
            ((draws @ losses) * texts).sum(1) / (seeds * (texts @ tokens)))


def report(results: dict) -> str:
    """The setup line, one table per task and a summary line per task (statistics: module docstring)."""
    rows, setup = results["rows"], results["setup"]
    seeds = sorted({r["seed"] for r in rows if r["seed"] is not None and "error" not in r})
    lines = [f"{results['machine']}; seeds {', '.join(map(str, seeds))}; budget `{setup['budget']}` on all 35 linear "
             f"maps of stories260k; {setup['steps']} steps of {setup['batch']} texts (lr {setup['lr']}, "
             f"{setup['warmup']}-step warm-up, linear decay); texts cut to {setup['length']} tokens, "
             f"{setup['train']:,} training and {setup['val']} held-out texts per task; data-driven allocators probe "
             f"{setup['probe']} training texts. Loss in nats per token; intervals 95%, two-way bootstrap over seeds "
             f"and held-out texts; *detectable* = 2.8 × the bootstrap standard error of the paired difference.", ""]
    summary = []
    for task in [t for t in TASKS if any(r["task"] == t for r in rows)]:
        mine = [r for r in rows if r["task"] == task]
        base = next(r for r in mine if r["method"] == "base")
        tokens = np.asarray(base["tokens"], dtype=float)
        get = {(r["method"], r["seed"]): r for r in mine if "error" not in r}
        base_loss, base_reps = bootstrap(np.asarray([base["text_loss"]]), tokens, 1)
        lo, hi = np.percentile(base_reps, [2.5, 97.5])
        lines += [f"**{task}** ({len(tokens)} held-out texts, {int(tokens.sum()):,} tokens)", "",
                  "| method | loss/token | vs uniform (paired) [95% CI] | per seed | detectable | trainable "
                  "| alloc s | train s |", "|---|---|---|---|---|---|---|---|",
                  f"| base (no adapter) | {base_loss:.4f} ± {(hi - lo) / 2:.4f} | | | | 0 | | |"]
        uniform = [s for s in seeds if ("uniform", s) in get]

        def matrix(method: str, ss: list[int]) -> np.ndarray:
            return np.asarray([get[method, s]["text_loss"] for s in ss])

        ref_trainable = np.mean([get["uniform", s]["trainable"] for s in uniform]) if uniform else np.nan
        detectable, resolved = [], []
        for method in [m for m in METHODS if any(r["method"] == m for r in mine)]:
            have = [s for s in seeds if (method, s) in get]
            errors = {r["error"].split(" (")[0] for r in mine if r["method"] == method and "error" in r}
            if not have:
                lines.append(f"| {method} | no plan: {'; '.join(sorted(errors))} | | | | | | |")
                continue
            loss, reps = bootstrap(matrix(method, have), tokens, len(have))
            lo, hi = np.percentile(reps, [2.5, 97.5])
            cells = ["", "", ""]
            common = [s for s in have if s in uniform]
            if method != "uniform" and common:
                d, d_reps = (a - b for a, b in zip(bootstrap(matrix(method, common), tokens, len(common)),
                                                   bootstrap(matrix("uniform", common), tokens, len(common))))
                d_lo, d_hi = np.percentile(d_reps, [2.5, 97.5])
                per_seed = [(sum(get[method, s]["text_loss"]) - sum(get["uniform", s]["text_loss"])) / tokens.sum()
                            for s in common]
                detectable.append(Z * d_reps.std(ddof=1))
                cells = [f"{d:+.4f} [{d_lo:+.4f}, {d_hi:+.4f}]", ", ".join(f"{x:+.4f}" for x in per_seed),
                         f"{detectable[-1]:.4f}"]
                if d_hi < 0 or d_lo > 0:
                    resolved.append(f"`{method}` {'better' if d_hi < 0 else 'worse'} by {abs(d):.4f}")
            counts = [get[method, s]["trainable"] for s in have]
            off = max(abs(c / ref_trainable - 1) for c in counts) if uniform else np.nan
            failed = f" ({len(errors)} seed(s) without a plan)" if errors else ""
            lines.append(f"| {method} | {loss:.4f} ± {(hi - lo) / 2:.4f} ({len(have)}){failed} | {cells[0]} "
                         f"| {cells[1]} | {cells[2]} | {int(np.mean(counts)):,} ({100 * off:.1f}%) "
                         f"| {np.mean([get[method, s]['alloc_s'] for s in have]):.1f} "
                         f"| {np.mean([get[method, s]['train_s'] for s in have]):.0f} |")
        lines.append("")
        if detectable and uniform:
            gain = base_loss - bootstrap(matrix("uniform", uniform), tokens, len(uniform))[0]
            curve = np.mean([get["uniform", s]["curve"] for s in uniform], axis=0)
            share = f"{100 * min(detectable) / gain:.2f}–{100 * max(detectable) / gain:.2f}%"
            summary.append(f"{task}: detectable {min(detectable):.4f}–{max(detectable):.4f} nats/token "
                           f"({share} of uniform's gain over the base, {gain:.4f}); beyond the interval: "
                           + ("; ".join(resolved) if resolved else "none")
                           + f"; uniform's learning curve (first {CURVE} held-out texts, after each fifth of the "
                           "steps): " + " → ".join(f"{c:.3f}" for c in curve))
    lines += ["(n): seeds trained. Trainable: mean count (largest deviation from uniform's). alloc s, train s: "
              "means over seeds (train s includes the learning-curve evaluations).", "",
              *[f"- {s}." for s in summary]]
    return "\n".join(lines)


def write_section(text: str) -> None:
    """Put ``text`` between the section's table markers in BENCHMARKS.md (the section is added after the accuracy
    section when missing)."""
    path = ROOT / "BENCHMARKS.md"
    doc = path.read_text()
    block = f"<!-- adaptation:tables:begin -->\n{text}\n<!-- adaptation:tables:end -->"
    if "<!-- adaptation:tables:begin -->" in doc:
        doc = re.sub(r"<!-- adaptation:tables:begin -->.*?<!-- adaptation:tables:end -->", lambda _: block, doc,
                     flags=re.S)
    else:
        section = (f"<!-- adaptation:begin -->\n## Adaptation to new text: `benchmarks/adaptation.py`\n\n{block}\n"
                   "<!-- adaptation:end -->\n\n")
        at = doc.find("## Allocation recovery")
        doc = doc[:at] + section + doc[at:] if at >= 0 else doc.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, doc)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", default=BUDGET)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=7.5e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--length", type=int, default=64, help="tokens per text (BOS included)")
    parser.add_argument("--train", type=int, default=2000, help="training texts per task")
    parser.add_argument("--val", type=int, default=500, help="held-out texts per task")
    parser.add_argument("--probe", type=int, default=256, help="training texts the data-driven allocators see")
    run_arguments(parser, RESULTS)
    args = parser.parse_args(argv)
    if not MODEL.is_dir():
        sys.exit(f"adaptation: {MODEL} not found; this benchmark reads stories260k and its texts from {SHARED}")
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    results = merged(args.report_only or [args.out]) if args.report_only is not None else run(args)
    text = report(results)
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()

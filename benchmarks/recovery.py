"""Allocation recovery: does an allocator put capacity where a known update was planted?

Teacher = stories260k (../shared/models) with low-rank updates ``ΔW_m = γ ‖W_m‖_2 · U_m V_mᵀ`` of known
rank ``k_m`` (``U, V`` random orthonormal columns, so all k singular values equal ``γ ‖W_m‖_2``) added to a known subset of its
linear maps. Inputs are real text (LLM-Adapters questions, ../shared/data). The student is the base model with
a LoRA-MoE of the plan under test, trained by distillation: the loss is ``KL(teacher ‖ student)`` of the
next-token distributions, averaged over tokens. Every plan gets the same budget (``--budget``). Allocators see
what a user would give them: the texts with labels sampled from the teacher (so ``model(**batch).loss`` is an
unbiased estimate of the cross-entropy to the teacher). ``--students sampled`` trains the students on such labels
too (cross-entropy, stopped early on 64 of their texts) and gives the allocators those same examples.

Reported per scenario and method, over seeds (a seed fixes the student's initial weights, the data order, the
allocator's randomness and its probe sample; the teacher and the texts are the same for every seed):
  - held-out distillation loss (mean, 95% t-interval over seeds) and its paired difference to ``uniform``;
  - planted share: fraction of the plan's trainable parameters on planted modules;
  - rank correlation (Spearman) between a module's total rank ``Σ r_i`` and its planted rank (0 if none);
  - gap closure ``(L_uniform − L_method) / (L_uniform − L_oracle)``, the losses summed over the seeds that the
    method, uniform and the oracle share.
``oracle``: one expert on every planted module, ranks ∝ planted ranks, scaled to the budget.

    python benchmarks/recovery.py                               # every scenario and method, 3 seeds
    python benchmarks/recovery.py --scenarios deep --seeds 0 --methods uniform oracle gradspec
    python benchmarks/recovery.py --report-only A.json B.json   # BENCHMARKS.md again from results files
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import re
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers

import moela
from moela.allocators import allocate
from moela.allocators.budget import apportion, finish, parse_budget, routed, target_dims
from moela.distillation import kl_to_teacher as kl  # mean over tokens of KL(teacher ‖ student)
from moela.io import atomic_write_text
from moela.plan import AllocationPlan, find_targets, layer_index

from intervals import ci  # benchmarks/intervals.py (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "stories260k"
RESULTS = ROOT / "benchmarks" / "results" / "recovery.json"
TEXTS = ["boolq/train.json", "ARC-Easy/train.json", "openbookqa/train.json"]
METHODS = ["uniform", "oracle", "mola", "hilo", "alphalora", "sensitivity", "guilomo", "guilomo-published",
           "gradspec", "prune"]
# Per-method options for a budget of rank-2 LoRA: fixed-rank methods use rank 1 (rank 8 experts on every
# module would cost 4x the budget); GuiLoMo's supernet has 4 experts and no floor on the count, so that its
# read-out (at least one rank-1 expert per module and expert) fits.
OPTIONS = {"mola": {"rank": 1}, "alphalora": {"rank": 1}, "sensitivity": {"rank": 2},
           "guilomo": {"experts": 4, "min_experts": 1}}
# GuiLoMo with the public code's mechanics (moela's defaults changed them; see moela/allocators/guilomo.py)
VARIANTS = {"guilomo-published": ("guilomo", dict(estimator="selected", init_scale=1.0, gsv_lr=3e-3, b_std=0.02,
                                                  expert_mask="logits", rank_leak=1e-4, settle=None)),
            # the search held to the budget (a price on parameters, row-wise Adam; 3 epochs), modules may be off
            "guilomo-budget": ("guilomo", dict(budget_search=True, min_experts=0, epochs=3)),
            "prune-importance": ("prune", dict(ranks="importance")),  # survivors' ranks ∝ their importance
            "prune-restarts": ("prune", dict(restarts=3)),  # the survivors of three searches most often kept
            "prune-taylor": ("prune", dict(estimate="taylor")),  # all importances of a round from one backward
            "prune-restarts-taylor": ("prune", dict(restarts=3, estimate="taylor")),
            "prune-keep0.6": ("prune", dict(keep=0.6))}  # three fifths of the maps survive, for a broad change
BUDGET = "uniform:E=1,r=2"
PROBE = 256  # texts the data-driven allocators see (rows of other sizes are reported as NAME@N)
# The balance loss's coefficient in the students' training (summed over routed modules, moela's default
# reduction). 2e-3: until 2026-11-29 the loop added 1e-3 · balance_loss on top of inject's built-in 1e-3, and
# the published tables were measured so; the same total is now stated once.
BALANCE_COEF = 2e-3
ATTN, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")

# scenario → {(block, module type): planted rank}
SCENARIOS: dict[str, dict[tuple[int, str], int]] = {
    "shallow": {(b, t): 8 for b in (0, 1) for t in ("q_proj", "o_proj", "up_proj")},
    "middle": {(2, t): 8 for t in ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")},
    "deep": {(b, t): 8 for b in (3, 4) for t in ("v_proj", "o_proj", "down_proj")},
    "one-type": {(b, "down_proj"): 8 for b in range(5)},
    "mixed-ranks": {(0, "v_proj"): 2, (1, "up_proj"): 4, (2, "o_proj"): 16, (3, "q_proj"): 8, (4, "down_proj"): 12,
                    (4, "gate_proj"): 4},
}


def load_base() -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(MODEL).eval()


def texts(count: int, length: int) -> torch.Tensor:
    """``count`` token sequences of ``length`` tokens (BOS + text), from the LLM-Adapters training questions,
    in a fixed order."""
    tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    rows = []
    for name in TEXTS:
        rows += [r["instruction"] for r in json.loads((SHARED / "data" / "llm-adapters" / name).read_text())]
    rng = np.random.default_rng(1234)
    out = []
    for i in rng.permutation(len(rows)):
        ids = tok(rows[i])["input_ids"]
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == count:
            break
    return torch.tensor(out)


def split_texts(train: int, val: int, probe: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The students' training and held-out texts and the allocators' probe texts: the first ``probe`` training
    texts, and beyond ``train`` texts that come after the held-out ones (seen by no student)."""
    all_ids = texts(train + val + max(0, probe - train), length)
    ids = all_ids[:train]
    return ids, all_ids[train:train + val], torch.cat([ids[:probe], all_ids[train + val:]])


def scenario_key(path: str) -> tuple[int, str]:
    """``(block, map name)`` of a module path, as :data:`SCENARIOS` names planted maps."""
    return layer_index(path), path.rsplit(".", 1)[-1]


def planted_paths(model: torch.nn.Module, scenario: str) -> dict[str, int]:
    """``{module path: planted rank}``."""
    wanted = SCENARIOS[scenario]
    return {n: wanted[scenario_key(n)] for n in find_targets(model, "all-linear") if scenario_key(n) in wanted}


def make_teacher(scenario: str, gamma: float) -> tuple[torch.nn.Module, dict[str, int]]:
    """The base model with ``ΔW = γ ‖W‖_2 U Vᵀ`` (rank k, orthonormal U, V; fixed seed) on the planted maps."""
    teacher = load_base()
    planted = planted_paths(teacher, scenario)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, k in planted.items():
            w = teacher.get_submodule(name).weight
            u = torch.linalg.qr(torch.randn(w.shape[0], k, generator=g))[0]
            v = torch.linalg.qr(torch.randn(w.shape[1], k, generator=g))[0]
            w.add_(gamma * torch.linalg.matrix_norm(w, 2) * u @ v.T)
    return teacher, planted


@torch.no_grad()
def teacher_targets(teacher: torch.nn.Module, ids: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Teacher log-probabilities (N, T, V) at every position."""
    return torch.cat([teacher(input_ids=ids[i:i + batch]).logits.log_softmax(-1) for i in range(0, len(ids), batch)])


def sampled_examples(ids: torch.Tensor, teacher_logp: torch.Tensor, seed: int, samples: int = 1) -> list[dict]:
    """Tokenised examples whose labels are tokens sampled from the teacher (label t+1 ~ teacher(· | ids ≤ t)):
    ``samples`` examples per text with independent draws, text-major."""
    g = torch.Generator().manual_seed(10_000 + seed)
    draws = torch.multinomial(teacher_logp.exp().flatten(0, 1), samples, replacement=samples > 1, generator=g)
    out = []
    for i, d in zip(ids, draws.view(*ids.shape, samples).unbind(0)):
        labels = torch.cat([torch.full((1, samples), -100), d[:-1]]).T
        out += [{"input_ids": i.tolist(), "attention_mask": [1] * len(i), "labels": l.tolist()} for l in labels]
    return out


SOFT = ("all", "fit", "measure")
SOFT_LABEL = {None: "", "all": "/soft", "fit": "/soft-fit", "measure": "/soft-measure"}
TEACHER_LABEL = {None: "", "inputs": "/teacher", "labels": "/teacher-labels"}


def soft_probe(model: torch.nn.Module, examples: list[dict], teacher_logp: torch.Tensor, where: str = "all"
               ) -> list[dict]:
    """``examples`` (one per text, in the order of ``teacher_logp``) with a ``row`` index, and ``model``'s forward
    replaced, on this instance, by one whose ``loss`` is ``kl`` to the teacher's distributions at those rows:
    the allocators see the students' objective instead of sampled labels (``moela.teacher_loss`` with the teacher's
    distributions computed once, every position scored). ``where``: ``"all"`` every forward;
    ``"fit"`` only forwards with gradients on (what an allocator trains or differentiates; the losses it only
    measures, under ``no_grad``, stay the sampled labels' cross-entropy); ``"measure"`` the other way round."""
    if where not in SOFT:
        raise ValueError(f"where must be one of {SOFT}, got {where!r}")
    forward = model.forward

    def distill(input_ids=None, attention_mask=None, labels=None, row=None, **kwargs):
        if where != "all" and torch.is_grad_enabled() != (where == "fit"):
            return forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        out = forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        out["loss"] = kl(out.logits, teacher_logp[row.to(teacher_logp.device)])
        return out

    model.forward = distill
    return [{**e, "row": i} for i, e in enumerate(examples)]


def oracle_plan(model: torch.nn.Module, planted: dict[str, int], budget: int) -> AllocationPlan:
    """One expert per planted module, ranks ∝ planted ranks, total rank chosen so the cost is closest to the
    budget."""
    from moela.allocators.budget import fit

    names = list(planted)
    dims = target_dims(model, names)

    def build(total: int) -> dict:
        return {n: routed([r], 1) for n, r in zip(names, apportion([planted[n] for n in names], total, lo=1))}

    modules, _ = fit(build, budget, dims, lo=len(names))
    return finish(modules, dims, "oracle", {"planted": planted}, budget)


def plan_for(method: str, model: torch.nn.Module, planted: dict[str, int], data: list[dict], seed: int,
             budget: int) -> tuple[AllocationPlan, float]:
    start = time.perf_counter()
    if method == "oracle":
        plan = oracle_plan(model, planted, budget)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            name, options = VARIANTS.get(method, (method, {}))
            if "examples" in moela.allocator(name).options:  # every probe example (several draws per text)
                options = {**options, "examples": len(data)}
            plan = allocate(name, model, targets="all-linear", budget=budget, data=data, seed=seed,
                            **{**OPTIONS.get(name, {}), **options})
    return plan, time.perf_counter() - start


STOP_TEXTS, STOP_EVERY, STOP_PATIENCE = 64, 25, 4  # --students sampled: early stopping on the user's own data


def sampled_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of sampled ``labels`` (transformers' shift: the logits at t predict label t + 1)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def probe_default(students: str, train: int) -> int:
    """The probe size rows are not labelled with: ``PROBE`` texts, or all the students' texts when they train on
    the sampled labels the allocators probe."""
    return train if students == "sampled" else PROBE


def train_student(plan: AllocationPlan, ids: torch.Tensor, targets: torch.Tensor, val_ids: torch.Tensor,
                  val_targets: torch.Tensor, seed: int, steps: int, batch: int, lr: float,
                  labels: torch.Tensor | None = None) -> float:
    """Inject ``plan`` into a fresh base, AdamW on the adapter + ``BALANCE_COEF`` · balance loss (the layers'
    built-in auxiliary gradient); held-out KL. The loss is the KL to ``targets``, or, given sampled ``labels``,
    their cross-entropy on all but the last ``STOP_TEXTS`` texts (or the last quarter, if that is fewer), whose
    labels' cross-entropy (every ``STOP_EVERY`` steps) picks the adapter kept and stops the training after
    ``STOP_PATIENCE`` checks without a new best: what a user with only such data does."""
    torch.manual_seed(seed)
    student = moela.inject(load_base(), plan, balance_coef=BALANCE_COEF)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / steps))
    fit = len(ids) - (min(STOP_TEXTS, len(ids) // 4) if labels is not None else 0)
    order = torch.randperm(fit, generator=torch.Generator().manual_seed(seed))
    best, best_params, misses = math.inf, None, 0
    student.train()
    for step in range(steps):
        rows = order[(step * batch + torch.arange(batch)) % fit]
        logits = student(input_ids=ids[rows]).logits
        loss = kl(logits, targets[rows]) if labels is None else sampled_ce(logits, labels[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if labels is not None and (step + 1) % STOP_EVERY == 0:
            student.eval()
            with torch.no_grad():
                stop_loss = sampled_ce(student(input_ids=ids[fit:]).logits, labels[fit:]).item()
            student.train()
            if stop_loss < best:
                best, best_params, misses = stop_loss, [p.detach().clone() for p in params], 0
            elif (misses := misses + 1) >= STOP_PATIENCE:
                break
    if best_params is not None:
        with torch.no_grad():
            for p, b in zip(params, best_params):
                p.copy_(b)
    student.eval()
    with torch.no_grad():
        return float(np.mean([kl(student(input_ids=val_ids[i:i + 64]).logits, val_targets[i:i + 64]).item()
                              for i in range(0, len(val_ids), 64)]))


def plan_stats(plan: AllocationPlan, model: torch.nn.Module, planted: dict[str, int]) -> dict:
    from scipy.stats import spearmanr

    dims = target_dims(model, find_targets(model, "all-linear"))
    cost = {n: spec.cost(*dims[n]) for n, spec in plan.items()}
    names = list(dims)
    rank = [sum(plan[n].ranks) if n in plan.modules else 0 for n in names]
    truth = [planted.get(n, 0) for n in names]
    rho = spearmanr(rank, truth).statistic if len(set(rank)) > 1 else 0.0
    return {"planted_share": sum(c for n, c in cost.items() if n in planted) / sum(cost.values()),
            "spearman": float(rho), "trainable": sum(cost.values()),
            "ranks": {n: list(plan[n].ranks) for n in plan.modules}}


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    rows = json.loads(args.out.read_text()) if args.out.exists() and not args.fresh else []
    done = {(r["scenario"], r["method"], r["seed"]) for r in rows}
    ids, val_ids, probe_ids = split_texts(args.train, args.val, args.probe, args.length)
    base = load_base()
    budget = parse_budget(args.budget, base, "all-linear")
    setups = {}
    for scenario in args.scenarios:  # the teacher and its targets are the same for every seed
        teacher, planted = make_teacher(scenario, args.gamma)
        targets, val_targets = teacher_targets(teacher, ids), teacher_targets(teacher, val_ids)
        probe_targets = (torch.cat([targets, teacher_targets(teacher, probe_ids[args.train:])])
                         if args.probe > args.train else targets[:args.probe])
        with torch.no_grad():
            base_kl = kl(base(input_ids=val_ids).logits, val_targets).item()
        setups[scenario] = planted, targets, val_targets, base_kl, teacher, probe_targets
    default_probe = probe_default(args.students, args.train)  # rows of other probe sizes are NAME@N
    for seed in args.seeds:  # seed-major, so that an interrupted run has every scenario at the first seeds
        for scenario in args.scenarios:
            planted, targets, val_targets, base_kl, teacher, probe_targets = setups[scenario]
            if args.students == "sampled":  # the students' own examples; the allocators see the first --probe
                student_data = sampled_examples(ids, targets, seed)
                labels, data = torch.tensor([e["labels"] for e in student_data]), student_data[:args.probe]
            else:
                labels, data = None, sampled_examples(probe_ids, probe_targets, seed, args.samples)
            for method in args.methods:
                label = (method + (f"×{args.samples}" if args.samples > 1 else "") + SOFT_LABEL[args.soft]
                         + TEACHER_LABEL[args.teacher] + (f"@{args.probe}" if args.probe != default_probe else ""))
                if (scenario, label, seed) in done:
                    continue
                try:
                    model = load_base()
                    probe = soft_probe(model, data, probe_targets, args.soft) if args.soft else data
                    with (moela.teacher_loss(model, teacher, positions=args.teacher) if args.teacher
                          else contextlib.nullcontext()):
                        plan, seconds = plan_for(method, model, planted, probe, seed, budget)
                except ValueError as err:  # e.g. a read-out whose smallest plan costs more than the budget
                    rows.append({"scenario": scenario, "method": label, "seed": seed, "error": str(err)})
                    print(f"{scenario:12s} {label:12s} seed {seed}: {err}", flush=True)
                    save(args.out, rows)
                    continue
                t0 = time.perf_counter()
                loss = (train_student(plan, ids, targets, val_ids, val_targets, seed, args.steps, args.batch, args.lr,
                                      labels) if method not in args.plan_only else None)
                row = {"scenario": scenario, "method": label, "seed": seed, "students": args.students,
                       "loss": loss, "base_kl": base_kl,
                       "alloc_s": round(seconds, 3), "train_s": round(time.perf_counter() - t0, 3),
                       **plan_stats(plan, base, planted)}
                if "unmoved" in plan.meta:
                    row["unmoved"] = plan.meta["unmoved"]
                rows.append(row)
                print(f"{scenario:12s} {label:12s} seed {seed}: KL {loss or math.nan:.4f} (base {base_kl:.4f}) planted share "
                      f"{row['planted_share']:.2f} rho {row['spearman']:+.2f} alloc {seconds:.1f}s "
                      f"train {row['train_s']:.1f}s", flush=True)
                save(args.out, rows)
    return rows


def save(path: Path, rows: list[dict]) -> None:
    """Write the results so far (failed plans included), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(rows, indent=1) + "\n")


def fmt(value: float, half: float, spec: str) -> str:
    """``value ± half`` (just ``value`` without an interval, blank without a value)."""
    if math.isnan(value):
        return ""
    return f"{value:{spec}}" + ("" if math.isnan(half) else f" ± {half:.4f}")


def report(rows: list[dict], args: argparse.Namespace) -> str:
    scenarios = [s for s in SCENARIOS if any(r["scenario"] == s for r in rows)]
    labels = list(dict.fromkeys(r["method"] for r in rows))
    methods = [m for m in METHODS if m in labels] + [m for m in labels if m not in METHODS]
    seeds = sorted({r["seed"] for r in rows if "error" not in r})
    students = {r.get("students", "kl") for r in rows if "error" not in r}
    if len(students) > 1:
        raise SystemExit("recovery: the results mix students trained on KL and on sampled labels; report them apart")
    on = (f"one sampled label per position, stopped early on {STOP_TEXTS} of their {args.train} texts (every "
          f"{STOP_EVERY} steps, patience {STOP_PATIENCE})" if students == {"sampled"}
          else "KL to the teacher's distributions")
    failed = {(r["scenario"], r["method"]): r["error"] for r in rows if "error" in r}
    get = {(r["scenario"], r["method"], r["seed"]): r for r in rows if "error" not in r}
    lines = [f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s) per process; seeds "
             f"{', '.join(map(str, seeds))}; budget "
             f"`{args.budget}` on all 35 linear maps of stories260k; students trained "
             f"{'at most ' if students == {'sampled'} else ''}{args.steps} steps of "
             f"{args.batch} × {args.length} tokens (lr {args.lr}) on {on}; held-out KL on {args.val} texts.", ""]
    for scenario in scenarios:
        planted = {k: v for k, v in SCENARIOS[scenario].items()}
        desc = ", ".join(f"{b}.{t}:{k}" for (b, t), k in planted.items())
        base_kl = next(r["base_kl"] for r in rows if r["scenario"] == scenario)
        lines += [f"**{scenario}** (planted block.map:rank — {desc}; KL(teacher ‖ base) = {base_kl:.4f})", "",
                  "| method | held-out KL ± 95% CI (seeds trained) | vs uniform (paired) ± 95% CI | planted share | Spearman ρ "
                  "| gap closure | alloc s |", "|---|---|---|---|---|---|---|"]
        for m in methods:
            have = [s for s in seeds if (scenario, m, s) in get]
            if not have:
                if (scenario, m) in failed:
                    lines.append(f"| {m} | no plan: {failed[scenario, m].split(' (')[0]} | | | | | |")
                continue
            trained = [s for s in have if get[scenario, m, s]["loss"] is not None]
            loss, half = ci([get[scenario, m, s]["loss"] for s in trained]) if trained else (math.nan, math.nan)
            paired = [get[scenario, m, s]["loss"] - get[scenario, "uniform", s]["loss"] for s in trained
                      if (scenario, "uniform", s) in get]
            d, dh = ci(paired) if len(paired) > 1 and m != "uniform" else (math.nan, math.nan)
            share = statistics.fmean(get[scenario, m, s]["planted_share"] for s in have)
            rho = statistics.fmean(get[scenario, m, s]["spearman"] for s in have)
            closure = gap_closure(get, scenario, m, trained)
            alloc = statistics.fmean(get[scenario, m, s]["alloc_s"] for s in have)
            lines.append(f"| {m} | {fmt(loss, half, '.4f')} ({len(trained)}) | {fmt(d, dh, '+.4f')} | {share:.2f} | "
                         f"{rho:+.2f} | {'' if math.isnan(closure) else f'{closure:+.2f}'} | {alloc:.1f} |")
        lines.append("")
    return "\n".join(lines + following(get, methods, seeds) + paired_differences(get, scenarios, args.pairs, seeds))


def paired_differences(get: dict, scenarios: list[str], pairs: list[str], seeds: list[int]) -> list[str]:
    """For each ``A:B`` of ``pairs``, held-out KL of A minus B per scenario, mean ± 95% CI over their shared
    seeds."""
    if not pairs:
        return []
    lines = ["", "**Paired differences** (held-out KL, A − B, mean ± 95% CI over the seeds both have)", "",
             "| A − B | " + " | ".join(scenarios) + " |", "|---|" + "---|" * len(scenarios)]
    for pair in pairs:
        a, b = pair.split(":")
        cells = []
        for scenario in scenarios:
            both = [s for s in seeds if all((scenario, m, s) in get and get[scenario, m, s]["loss"] is not None
                                            for m in (a, b))]
            diffs = [get[scenario, a, s]["loss"] - get[scenario, b, s]["loss"] for s in both]
            cells.append(f"{fmt(*ci(diffs), '+.4f')} ({len(both)})" if len(both) > 1 else "")
        lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    return lines


def rank_share(ranks: dict[str, list[int]], scenario: str) -> float:
    """Share of a plan's total rank (``{module path: ranks}``) on the maps planted in ``scenario``."""
    planted = SCENARIOS[scenario]
    total = {n: sum(r) for n, r in ranks.items()}
    return sum(t for n, t in total.items() if scenario_key(n) in planted) / sum(total.values())


def following(get: dict, methods: list[str], seeds: list[int]) -> list[str]:
    """Does a plan follow its data? Per seed, the rank share on scenario S's planted maps of S's own plan minus its
    mean over the other scenarios' plans, averaged over S: 0 for a plan that ignores the data (the model and the
    texts are the same in every scenario, only the teacher differs). Mean and 95% t-interval over the seeds on
    which a method planned every scenario."""
    rows = []
    for m in methods:
        per_seed = []
        for seed in seeds:
            plans = {s: get[s, m, seed]["ranks"] for s in SCENARIOS if (s, m, seed) in get}
            if len(plans) == len(SCENARIOS):
                per_seed.append(statistics.fmean(
                    rank_share(plans[s], s) - statistics.fmean(rank_share(plans[t], s) for t in plans if t != s)
                    for s in plans))
        if per_seed:
            rows.append(f"| {m} | {fmt(*ci(per_seed), '+.3f')} ({len(per_seed)}) |")
    if not rows:
        return []
    return ["**Does the plan follow the data?** Rank share on a scenario's planted maps under its own plan minus "
            "under the other scenarios' plans (same seed), averaged over the scenarios; mean ± 95% CI over seeds "
            "(seeds with a plan in every scenario).", "", "| method | own − others' rank share |", "|---|---|",
            *rows, ""]


def gap_closure(get: dict, scenario: str, method: str, seeds: list[int]) -> float:
    """``Σ (L_uniform − L_method) / Σ (L_uniform − L_oracle)`` over the ``seeds`` that uniform and the oracle were
    trained on too (the same seeds in numerator and denominator); NaN without such a seed."""
    common = [s for s in seeds if all((scenario, m, s) in get and get[scenario, m, s]["loss"] is not None
                                      for m in ("uniform", "oracle", method))]
    loss = {m: sum(get[scenario, m, s]["loss"] for s in common) for m in ("uniform", "oracle", method)}
    gap = loss["uniform"] - loss["oracle"]
    return (loss["uniform"] - loss[method]) / gap if common and gap else math.nan


def write_section(text: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    doc = path.read_text()
    block = f"<!-- recovery:begin -->\n{text}\n<!-- recovery:end -->"
    if "<!-- recovery:begin -->" in doc:
        doc = re.sub(r"<!-- recovery:begin -->.*?<!-- recovery:end -->", lambda _: block, doc, flags=re.S)
    else:
        doc = doc.rstrip("\n") + "\n\n## Allocation recovery: `benchmarks/recovery.py`\n\n" + block + "\n"
    atomic_write_text(path, doc)


def run_arguments(parser: argparse.ArgumentParser, results: Path) -> None:
    """The options every results-file benchmark shares: threads, resume/fresh, output, report-only."""
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fresh", action="store_true", help="ignore earlier results in --out")
    parser.add_argument("--out", type=Path, default=results, help="results file (finished runs are kept)")
    parser.add_argument("--report-only", nargs="*", type=Path, metavar="RESULTS",
                        help="the tables from these results files (default: --out), nothing trained")
    parser.add_argument("--no-write", action="store_true", help="print the tables, leave BENCHMARKS.md alone")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", default=BUDGET)
    parser.add_argument("--gamma", type=float, default=0.3, help="planted spectral norm relative to ‖W‖_2")
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--val", type=int, default=128)
    parser.add_argument("--probe", type=int,
                        help="texts the data-driven allocators see: the first of the students' --train texts, "
                             "then (beyond --train) texts that neither the students nor the held-out set use "
                             f"(default {PROBE}; with --students sampled, all --train texts)")
    parser.add_argument("--samples", type=int, default=1,
                        help="labels drawn from the teacher per probe text (methods are reported as NAME×S when > 1)")
    parser.add_argument("--soft", nargs="?", const="all", choices=SOFT,
                        help="the allocators' loss is the KL to the teacher's distributions (what the students "
                             "train on) instead of the sampled labels' cross-entropy: in every forward (no value or "
                             "'all', reported as NAME/soft), only where the allocator takes gradients ('fit', "
                             "NAME/soft-fit) or only where it does not ('measure', NAME/soft-measure)")
    parser.add_argument("--teacher", nargs="?", const="inputs", choices=("inputs", "labels"),
                        help="the allocators probe inside moela.teacher_loss(model, teacher, positions=…), the "
                             "library's way to --soft's KL, the teacher run on every probe batch: every position "
                             "(no value or 'inputs', NAME/teacher, as --soft and the students) or those with a "
                             "label, which leaves out the last one ('labels', NAME/teacher-labels)")
    parser.add_argument("--students", choices=("kl", "sampled"), default="kl",
                        help="what the students train on: the teacher's next-token distributions (KL, default) or "
                             "one label per position sampled from the teacher, the allocators' probe then being "
                             "the first --probe of those same examples (a user's one dataset; keep its rows in "
                             "their own --out file)")
    parser.add_argument("--length", type=int, default=48)
    parser.add_argument("--steps", type=int,
                        help="student training steps (default 600; --students sampled: at most 1000, stopped early)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, help="student learning rate (default 1.5e-2; --students sampled: 2e-3)")
    parser.add_argument("--pairs", nargs="*", default=[], metavar="A:B",
                        help="also report the paired differences of these rows' held-out KL (row labels)")
    parser.add_argument("--plan-only", nargs="*", default=[], metavar="METHOD",
                        help="methods whose plans are scored (planted share, ρ) but not trained")
    run_arguments(parser, RESULTS)
    args = parser.parse_args(argv)
    if args.soft and args.samples > 1:
        parser.error("--soft replaces the sampled labels: give it without --samples")
    if args.soft and args.teacher:
        parser.error("--soft and --teacher are two ways to the same probe loss: give one")
    rows = ([r for f in (args.report_only or [args.out]) for r in json.loads(Path(f).read_text())]
            if args.report_only is not None else None)
    if rows and all(r.get("students") == "sampled" for r in rows):
        args.students = "sampled"  # the report's defaults are those of the rows' runs
    sampled = args.students == "sampled"
    args.probe = args.probe or probe_default(args.students, args.train)
    args.steps = args.steps or (1000 if sampled else 600)  # sampled: an upper bound, early stopping ends it
    args.lr = args.lr or (2e-3 if sampled else 1.5e-2)
    if sampled and (args.samples > 1 or args.probe > args.train):
        parser.error("--students sampled: the probe is part of the students' data (--probe ≤ --train, one sample)")
    if rows is None:
        rows = run(args)
    text = report(rows, args)
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()

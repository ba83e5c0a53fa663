"""GuiLoMo: does the plan come from the data? Read-outs on the recovery benchmark's teacher data.

For one scenario of ``benchmarks/recovery.py`` this runs GuiLoMo's search (no budget, so the plan is the raw
read-out) with real labels (tokens sampled from the teacher) and with shuffled labels (the same label
sequences assigned to other texts), for several seeds, with moela's defaults and with the public code's
mechanics. Reported per mechanics: the share of expert counts and ranks equal to their random start
(``plan.meta["unmoved"]``), and the mean per-module difference of total rank ``|Σr_a − Σr_b|`` between plans
of two seeds (same labels) and between real and shuffled labels (same seed), with the difference of their means
(real-vs-shuffled minus seed-vs-seed) and its 95% bootstrap interval over seeds (:func:`label_effect`); the same
for the plans' shapes (``shape_*``: every plan scaled to the real plans' mean total rank first,
:func:`shape_distance`; a real-vs-shuffled pair shares its seed's random start, a seed-vs-seed pair does not, so
this comparison favours the labels' pairs). A fair test of the shape is :func:`shape_shift`: whether the average
shape under real labels differs from the average under shuffled ones beyond what swapping the two within seeds
gives (``shape_shift``: observed, null mean, permutation p). Also the mean total rank of the real and shuffled
plans, the planted modules' share of the rank (``planted_share``: real, shuffled, the modules' share of the
count, and the paired difference with its 95% t-interval), and every plan's total rank per module (``plans``).
Search cost is in ``search_s``.

    python benchmarks/guilomo_control.py --scenario middle --seeds 0 1 2
    python benchmarks/guilomo_control.py --gsv-lr 3e-2 --out /tmp/g.json   # moela's mechanics at another lr
    python benchmarks/guilomo_control.py --from results/g.json --out results/g.json   # statistics again, no search
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import recovery as R
from intervals import ci
from moela.allocators import allocate
from moela.io import atomic_write_text

MECHANICS = {"moela defaults": {}, "published": R.VARIANTS["guilomo-published"][1]}


def shuffled(examples: list[dict], seed: int) -> list[dict]:
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(500 + seed)).tolist()
    return [{**ex, "labels": examples[j]["labels"]} for ex, j in zip(examples, order)]


def distance(a: dict[str, int], b: dict[str, int]) -> float:
    """Mean over the modules of ``|Σr_a − Σr_b|``, the difference of their total ranks in two plans."""
    return statistics.fmean(abs(a[n] - b[n]) for n in a)


def shape_distance(a: dict[str, int], b: dict[str, int], total: float) -> float:
    """:func:`distance` after scaling both plans to the total rank ``total`` (one value for every pair compared):
    what differs between them once a budget has rescaled their ranks together, as GuiLoMo's read-out is under one."""
    total_a, total_b = sum(a.values()), sum(b.values())
    return statistics.fmean(abs(a[n] * total / total_a - b[n] * total / total_b) for n in a)


def label_effect(seed_vs_seed: dict[tuple[int, int], float], real_vs_shuffled: dict[int, float],
                 resamples: int = 10_000) -> tuple[float, float, float]:
    """``mean(real vs shuffled) − mean(seed vs seed)`` and its 95% percentile-bootstrap interval: the seeds are
    drawn with replacement, and a draw's seed-vs-seed mean is over its pairs of two different draws whose seeds
    differ (a seed drawn twice is not compared with itself)."""
    seeds = sorted(real_vs_shuffled)
    pair = np.full((len(seeds), len(seeds)), np.nan)
    for (a, b), d in seed_vs_seed.items():
        pair[seeds.index(a), seeds.index(b)] = pair[seeds.index(b), seeds.index(a)] = d
    label = np.array([real_vs_shuffled[s] for s in seeds])

    def effect(draw: np.ndarray) -> float:
        return float(label[draw].mean() - np.nanmean(pair[np.ix_(draw, draw)]))

    rng = np.random.default_rng(0)
    draws = [rng.integers(len(seeds), size=len(seeds)) for _ in range(resamples)]
    boot = [effect(d) for d in draws if len(set(d.tolist())) > 1]
    low, high = np.percentile(boot, [2.5, 97.5])
    return effect(np.arange(len(seeds))), float(low), float(high)


def shape_shift(real: list[dict[str, int]], shuffled: list[dict[str, int]], total: float,
                resamples: int = 5000) -> tuple[float, float, float]:
    """Does the average shape of the plans follow the labels? The mean over modules of the difference between the
    seeds' mean rank shares (each plan's ranks over its total) under real and under shuffled labels, in ranks at
    the total rank ``total``; its mean under the null that labels do not matter (real and shuffled swapped within
    each seed, at random), and the one-sided permutation p-value. Plans ``i`` of both lists share seed ``i``."""
    names = list(real[0])
    shares = [np.array([[p[n] for n in names] for p in plans], dtype=float) for plans in (real, shuffled)]
    a, b = (s / s.sum(1, keepdims=True) for s in shares)

    def stat(x: np.ndarray, y: np.ndarray) -> float:
        return float(np.abs(x.mean(0) - y.mean(0)).mean() * total)

    rng = np.random.default_rng(0)
    null = []
    for _ in range(resamples):
        flip = rng.random(len(a))[:, None] < 0.5
        null.append(stat(np.where(flip, b, a), np.where(flip, a, b)))
    observed = stat(a, b)
    return observed, float(np.mean(null)), float((1 + sum(n >= observed for n in null)) / (1 + resamples))


def planted_share(plans: list[dict[str, int]], planted: dict[str, int]) -> list[float]:
    """Each plan's share of its total rank on the planted modules."""
    return [sum(r for n, r in plan.items() if n in planted) / sum(plan.values()) for plan in plans]


def summarise(plans: dict[tuple[str, int], dict[str, int]], seeds: list[int], planted: dict[str, int]) -> dict:
    """Total ranks, distances between plans (raw and shape) with the labels' effect, the shape shift test and the
    planted maps' share of the rank, for real and shuffled labels (module docstring)."""
    real, fake = [plans["real", s] for s in seeds], [plans["shuffled", s] for s in seeds]
    out = {"total_rank": {"real": statistics.fmean(sum(p.values()) for p in real),
                          "shuffled": statistics.fmean(sum(p.values()) for p in fake)}}
    shape = functools.partial(shape_distance, total=out["total_rank"]["real"])
    for key, measure in (("", distance), ("shape_", shape)):
        seed_pairs = {(a, b): measure(plans["real", a], plans["real", b]) for a, b in itertools.combinations(seeds, 2)}
        label_pairs = {s: measure(plans["real", s], plans["shuffled", s]) for s in seeds}
        out.update({f"{key}seed_vs_seed": list(seed_pairs.values()),
                    f"{key}real_vs_shuffled": list(label_pairs.values()),
                    f"{key}label_effect": label_effect(seed_pairs, label_pairs) if len(seeds) > 2 else None})
    if len(seeds) > 2:
        shift = shape_shift(real, fake, out["total_rank"]["real"])
        out["shape_shift"] = dict(zip(("observed", "null_mean", "p"), shift))
        share = {"real": planted_share(real, planted), "shuffled": planted_share(fake, planted)}
        paired = [x - y for x, y in zip(share["real"], share["shuffled"])]
        out["planted_share"] = {"real": statistics.fmean(share["real"]),
                                "shuffled": statistics.fmean(share["shuffled"]),
                                "modules": len(planted) / len(real[0]), "real_minus_shuffled": ci(paired)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="middle", choices=list(R.SCENARIOS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default=str(R.RESULTS.parent / "guilomo-control.json"))
    parser.add_argument("--gsv-lr", type=float, help="outer learning rate of moela's mechanics (default: its own)")
    parser.add_argument("--epochs", type=float, help="search passes of moela's mechanics (default: its own)")
    parser.add_argument("--no-published", action="store_true", help="skip the public code's mechanics")
    parser.add_argument("--from", dest="source", metavar="RESULTS",
                        help="recompute the statistics from the plans in a results file of this script (no search)")
    args = parser.parse_args()
    if args.source:
        saved = json.loads(Path(args.source).read_text())
        planted = R.planted_paths(R.load_base(), saved["scenario"])
        for label, row in saved.items():
            if isinstance(row, dict) and "plans" in row:
                plans = {(kind, s): p for kind in ("real", "shuffled")
                         for s, p in zip(saved["seeds"], row["plans"][kind])}
                row.update(summarise(plans, saved["seeds"], planted))
                print(label, json.dumps({k: v for k, v in row.items() if k != "plans"}), flush=True)
        atomic_write_text(Path(args.out), json.dumps(saved, indent=1))  # --out may be the file read
        return
    torch.set_num_threads(1)
    ids = R.texts(512, 48)
    teacher, planted = R.make_teacher(args.scenario, 0.3)
    targets = R.teacher_targets(teacher, ids)
    out = {}
    mechanics = dict(MECHANICS)
    if args.no_published:
        del mechanics["published"]
    for option in ("gsv_lr", "epochs"):
        if getattr(args, option) is not None:
            mechanics["moela defaults"] = {**mechanics["moela defaults"], option: getattr(args, option)}
    for label, options in mechanics.items():
        plans, unmoved, seconds = {}, [], []
        for seed in args.seeds:
            real = R.sampled_examples(ids, targets, seed)[:256]
            for kind, data in (("real", real), ("shuffled", shuffled(real, seed))):
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    plan = allocate("guilomo", R.load_base(), targets="all-linear", data=data, seed=seed,
                                    **{**R.OPTIONS["guilomo"], **options})
                seconds.append(time.perf_counter() - start)
                plans[kind, seed] = {n: sum(s.ranks) for n, s in plan.items()}
                unmoved.append(plan.meta["unmoved"])

        out[label] = {"unmoved_experts": statistics.fmean(u["experts"] for u in unmoved),
                      "unmoved_ranks": statistics.fmean(u["ranks"] for u in unmoved),
                      **summarise(plans, args.seeds, planted), "search_s": statistics.fmean(seconds)}
        out[label]["plans"] = {kind: [plans[kind, s] for s in args.seeds] for kind in ("real", "shuffled")}
        print(label, json.dumps({k: v for k, v in out[label].items() if k != "plans"}), flush=True)
    atomic_write_text(Path(args.out), json.dumps({"scenario": args.scenario, "seeds": args.seeds, **out}, indent=1))


if __name__ == "__main__":
    main()

"""How well ``prune``'s warm-up adapters learn the teacher from sampled labels and from its distributions.

On the recovery benchmark (``recovery.py``: stories260k with planted low-rank updates, 256 probe texts of 48
tokens) ``prune`` finds the planted maps when it trains on the teacher's next-token distributions and mostly
fails with one label sampled per position. This script measures what the search's adapters learn from each: it
trains ``prune``'s warm-up as the search does (a rank-4 LoRA on all 35 maps, AdamW lr 2e-3, batches of 16 of
the same 75% training split, eval mode) and goes on, without dropping adapters, for as many steps as the whole
search trains (``100 + 6 × 20``), printing every ``--every`` steps the held-out ``KL(teacher ‖ adapted model)``
on the search's own validation split, and the share of the adapters' update norm ``Σ_m ‖B_m A_m‖_F`` on planted
maps. ``sampled``: cross-entropy to the sampled labels (what the search sees on ``recovery.py``'s default rows);
``soft``: the KL itself (its ``/soft`` rows). Mean over seeds.

``--maps planted`` trains the same adapters on the planted maps only, ``--maps other`` on as many maps drawn at
random (seeded by the seed) from the others: whether the planted set fits the probe better than all maps because it
is the right set or only because it is a small one. ``--probe N`` sets the number of probe texts
(``recovery.texts``' first N).

    PYTHONPATH=. python benchmarks/prune_fit.py --seeds 0 1 2 --out benchmarks/results/prune-fit.json  # ≈ 10 min
    PYTHONPATH=. python benchmarks/prune_fit.py --maps all planted --probe 256 2048 --scenarios middle deep \
        --out benchmarks/results/prune-fit-maps.json                                          # ≈ 25 min
    PYTHONPATH=. python benchmarks/prune_fit.py --maps other --labels sampled --probe 256 2048 \
        --scenarios middle deep --out benchmarks/results/prune-fit-other.json                  # ≈ 8 min
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recovery  # noqa: E402  (benchmarks/recovery.py: teacher, texts, probe)

import moela  # noqa: E402
from moela.allocators.probe import holdout, pad_id, swapped  # noqa: E402
from moela.layer import LoraMoELinear  # noqa: E402
from moela.plan import find_targets  # noqa: E402

LABELS = ("sampled", "soft")
PRUNE = moela.allocator("prune").options  # the search's defaults: rank, lr, batch size, held-out share


def fit_curve(scenario: str, seed: int, label: str, *, steps: int, every: int, probe: int = recovery.PROBE,
              length: int = 48, maps: str = "all") -> list[dict]:
    """``[{step, kl, planted}]`` every ``every`` steps (and at ``steps``) of one warm-up (module docstring) with
    adapters on ``maps``: ``"all"`` targets, the ``"planted"`` ones, or as many ``"other"`` maps (module docstring)."""
    ids = recovery.texts(probe, length)
    teacher, planted = recovery.make_teacher(scenario, 0.3)
    logp = recovery.teacher_targets(teacher, ids)
    data = [{**e, "row": i} for i, e in enumerate(recovery.sampled_examples(ids, logp, seed))]
    model = recovery.load_base()
    train, val = holdout(data, PRUNE["val_fraction"], PRUNE["batch_size"], seed, pad_id(model), probe)
    points = []
    with swapped(model, adapted_maps(find_targets(model, "all-linear"), planted, maps, seed),
                 lambda base: LoraMoELinear(base, [PRUNE["rank"]], top_k=1), seed) as layers:
        params = [p for layer in layers.values() for p in (layer.lora_A.weight, layer.lora_B.weight)]
        optimizer = torch.optim.AdamW(params, lr=PRUNE["lr"], weight_decay=0.0)
        for step in range(steps + 1):
            if step % every == 0 or step == steps:
                with torch.no_grad():
                    kl = np.mean([recovery.kl(model(input_ids=b["input_ids"]).logits, logp[b["row"]]).item()
                                  for b in val])
                    norms = {n: float(torch.linalg.matrix_norm(l.lora_B.weight @ l.lora_A.weight))
                             for n, l in layers.items()}
                total = sum(norms.values())
                points.append({"step": step, "kl": float(kl),
                               "planted": sum(v for n, v in norms.items() if n in planted) / total if total else 0.0})
            if step == steps:
                break
            batch = train[step % len(train)]
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=None if label == "soft" else batch["labels"])
            loss = recovery.kl(out.logits, logp[batch["row"]]) if label == "soft" else out.loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return points


def adapted_maps(names: list[str], planted: dict[str, int], maps: str, seed: int) -> list[str]:
    """The maps that get adapters: every one, the planted ones, or as many of the others drawn with ``seed``."""
    if maps == "all":
        return names
    if maps == "planted":
        return [n for n in names if n in planted]
    others = [n for n in names if n not in planted]
    drawn = set(np.random.default_rng(seed).choice(len(others), len(planted), replace=False).tolist())
    return [n for i, n in enumerate(others) if i in drawn]


def column(row: dict) -> str:
    """A curve's column name: scenario and label, then the maps and probe size where they are not the defaults."""
    maps = {"all": "", "planted": " planted-only", "other": " other"}[row.get("maps", "all")]
    probe = "" if row.get("probe", recovery.PROBE) == recovery.PROBE else f" @{row['probe']}"
    return f"{row['scenario']} {row['label']}{maps}{probe}"


def table(rows: list[dict]) -> str:
    """Markdown: one row per step, KL and planted norm share per curve (:func:`column`), means over seeds."""
    steps = sorted({p["step"] for r in rows for p in r["points"]})
    head = list(dict.fromkeys(column(r) for r in rows))
    lines = ["| step | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for step in steps:
        cells = []
        for name in head:
            pts = [p for r in rows if column(r) == name for p in r["points"] if p["step"] == step]
            cells.append(f"{np.mean([p['kl'] for p in pts]):.3f} ({np.mean([p['planted'] for p in pts]):.2f})"
                         if pts else "")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=list(recovery.SCENARIOS), choices=list(recovery.SCENARIOS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=220, help="prune's defaults: 100 warm-up + 6 rounds × 20 refit")
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--labels", nargs="+", default=list(LABELS), choices=LABELS)
    parser.add_argument("--maps", nargs="+", default=["all"], choices=("all", "planted", "other"),
                        help="adapters on every map, on the planted ones, or on as many others")
    parser.add_argument("--probe", nargs="+", type=int, default=[recovery.PROBE], help="probe texts")
    parser.add_argument("--out", type=Path, help="also write the curves as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [{"scenario": s, "seed": seed, "label": label, "maps": maps, "probe": probe,
             "points": fit_curve(s, seed, label, steps=args.steps, every=args.every, probe=probe, maps=maps)}
            for s in args.scenarios for seed in args.seeds for probe in args.probe for maps in args.maps
            for label in args.labels]
    if args.out:
        recovery.save(args.out, rows)
    print(f"Held-out KL(teacher ‖ model) (planted share of the update norm), mean over seeds {args.seeds}")
    print(table(rows))


if __name__ == "__main__":
    main()

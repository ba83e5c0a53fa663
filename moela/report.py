"""What a run or a comparison means: baselines and warnings next to the metrics, ``report.md``, the allocation
heatmap (experts and total rank per depth × module type, the same module order for every plan) and the
expert-load plot; and ``moela plan show`` (:func:`show`), which reads plan files and run folders without
loading a model.

Baselines (:func:`annotate`), per task of the evaluation data: the *majority-class rate* (the accuracy of always
answering the task's most frequent gold answer) and the *chance rate* (the mean of 1/number of options, where
the options are known). A method's result on a task is flagged as *degenerate* when it gave one answer to
every example, or is not above the majority-class rate (:func:`warnings_of`).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from . import demo
from .io import atomic_file, atomic_write_text
from .plan import AllocationPlan, layer_index, module_type

if TYPE_CHECKING:
    from torch import nn

_INDEX_FREE = -1
NO_ADAPTER = "lightgrey"  # colour of heatmap cells whose module has no adapter
# Module types in the order of a transformer block (attention in, attention out, MLP in, MLP out), matched as
# the whole type or its last components; a type not listed comes after these, alphabetically.
TYPE_ORDER = ("q_proj", "query", "attention.self.query", "k_proj", "key", "attention.self.key", "v_proj", "value",
              "attention.self.value", "c_attn", "qkv_proj", "query_key_value", "Wqkv", "o_proj", "out_proj",
              "attention.output.dense", "attn.c_proj", "self_attention.dense", "dense", "gate_proj", "w1", "up_proj",
              "w3", "fc1", "c_fc", "intermediate.dense", "dense_h_to_4h", "down_proj", "w2", "fc2", "mlp.c_proj",
              "output.dense", "dense_4h_to_h")


# --- module order -----------------------------------------------------------------------------------------------
def _type_key(kind: str) -> tuple[int, str]:
    for position, known in enumerate(TYPE_ORDER):
        if kind == known or kind.endswith("." + known):
            return position, kind
    return len(TYPE_ORDER), kind


def module_order(kinds) -> list[str]:
    """``kinds`` (module types, :func:`moela.plan.module_type`) in block order: attention before MLP, inputs
    before outputs; unknown types last, alphabetically. The same set gives the same order whatever the plan's."""
    return sorted(set(kinds), key=_type_key)


def _depth(name: str) -> int:
    try:
        return layer_index(name)
    except ValueError:
        return _INDEX_FREE


def _depth_rows(found: set[int]) -> list[int]:
    """Every depth from the shallowest to the deepest found (none skipped), after the modules outside blocks."""
    blocks = found - {_INDEX_FREE}
    return sorted((found & {_INDEX_FREE}) | (set(range(min(blocks), max(blocks) + 1)) if blocks else set()))


# --- allocation heatmap -----------------------------------------------------------------------------------------
def plan_grid(plan: AllocationPlan, kinds: Sequence[str] | None = None
              ) -> tuple[list[int], list[str], np.ndarray, np.ndarray]:
    """(depths, module types, experts grid, total-rank grid): every depth from the shallowest to the deepest
    planned block; module types in :func:`module_order` (or the given ``kinds``, so that several plans share
    columns); cells of modules not in the plan are NaN; modules outside any block sit on row -1."""
    depths = _depth_rows({_depth(n) for n in plan})
    kinds = list(kinds) if kinds is not None else module_order(module_type(n) for n in plan)
    experts = np.full((len(depths), len(kinds)), np.nan)
    ranks = np.full_like(experts, np.nan)
    for name, spec in plan.items():
        kind = module_type(name)
        if kind not in kinds:
            raise ValueError(f"plan module {name!r} is of type {kind!r}, which is not among the columns {kinds}")
        row, col = depths.index(_depth(name)), kinds.index(kind)
        experts[row, col], ranks[row, col] = spec.num_experts, sum(spec.ranks)
    return depths, kinds, experts, ranks


def _save_figure(fig, path: str | Path) -> Path:
    """``fig`` saved atomically in the format ``path``'s suffix names (``.pdf``, ``.svg``, …), else PNG."""
    suffix = Path(path).suffix.lower().lstrip(".")
    with atomic_file(Path(path)) as tmp:
        fig.savefig(tmp, format=suffix if suffix in fig.canvas.get_supported_filetypes() else "png", dpi=120)
    return Path(path)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _no_adapter_legend(fig, label: str = "no adapter") -> None:
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(facecolor=NO_ADAPTER, edgecolor="grey", label=label)], loc="outside lower right",
               fontsize=9, frameon=False)


def plot_plan(plan: AllocationPlan, path: str | Path, model: nn.Module | None = None,
              kinds: Sequence[str] | None = None) -> Path:
    """Save side-by-side heatmaps of experts and total rank per layer × module type as a PNG (atomically).
    Columns in :func:`module_order` (or ``kinds``); grey cells: the module has no adapter."""
    import matplotlib

    depths, kinds, experts, ranks = plan_grid(plan, kinds)
    fig = _figure(max(7.0, 2 * (1.6 + 0.55 * len(kinds))), 2.8 + 0.32 * len(depths))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=NO_ADAPTER)
    for ax, grid, label in zip(fig.subplots(1, 2), (experts, ranks), ("experts per module", "total rank per module")):
        image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, origin="lower")
        ax.set_xticks(range(len(kinds)), kinds, rotation=40, ha="right", fontsize=9)
        ax.set_yticks(range(len(depths)), ["other" if d == _INDEX_FREE else d for d in depths], fontsize=9)
        ax.set_xlabel("module type", fontsize=10)
        ax.set_ylabel("layer (0: input side)", fontsize=10)
        ax.set_title(label, fontsize=11)
        fig.colorbar(image, ax=ax, shrink=0.8)
        if grid.size <= 400 and not np.isnan(grid).all():
            middle = (np.nanmin(grid) + np.nanmax(grid)) / 2
            for (row, col), value in np.ndenumerate(grid):
                if not np.isnan(value):
                    ax.text(col, row, int(value), ha="center", va="center", fontsize=8,
                            color="black" if value > middle else "white")
    if np.isnan(experts).any():
        _no_adapter_legend(fig)
    title = plan.meta.get("method", "plan")
    if model is not None:
        title += f" — {plan.num_trainable(model):,} trainable parameters"
    fig.suptitle(title, fontsize=12)
    return _save_figure(fig, path)


def plot_expert_load(routing: dict[str, Any], path: str | Path, title: str = "expert load") -> Path | None:
    """Share of the routing slots each expert received, measured on the evaluation data: one panel per module
    type (rows: layers, columns: experts, null experts last), grey where the module has no such expert. An
    evenly used module of E experts shows 1/E everywhere. Returns None when no module is routed."""
    import matplotlib

    routed = {n: m for n, m in routing["modules"].items() if len(m["load"]) > 1}
    if not routed:
        return None
    kinds = module_order(module_type(n) for n in routed)
    depths = _depth_rows({_depth(n) for n in routed})
    width = max(len(m["load"]) for m in routed.values())
    grids = {k: np.full((len(depths), width), np.nan) for k in kinds}
    for name, module in routed.items():
        grids[module_type(name)][depths.index(_depth(name)), :len(module["load"])] = module["load"]
    top = max(float(np.nanmax(g)) for g in grids.values())
    columns = min(len(kinds), 4)
    rows = math.ceil(len(kinds) / columns)
    fig = _figure(1.2 + columns * (1.0 + 0.32 * width), 1.0 + rows * (0.9 + 0.26 * len(depths)))
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=NO_ADAPTER)
    image = None
    for i, ax in enumerate(axes):
        if i >= len(kinds):
            ax.set_axis_off()
            continue
        image = ax.imshow(np.ma.masked_invalid(grids[kinds[i]]), aspect="auto", cmap=cmap, vmin=0, vmax=top,
                          origin="lower")
        ax.set_title(kinds[i], fontsize=10)
        ax.set_xticks(range(width), [str(e) for e in range(width)], fontsize=9)
        ax.set_yticks(range(len(depths)), ["other" if d == _INDEX_FREE else d for d in depths], fontsize=9)
        if i % columns == 0:
            ax.set_ylabel("layer", fontsize=10)
        if i // columns == rows - 1:
            ax.set_xlabel("expert", fontsize=10)
    fig.colorbar(image, ax=list(axes), label="share of routing slots", shrink=0.9)
    if any(np.isnan(g).any() for g in grids.values()):
        _no_adapter_legend(fig, "no such expert / module not routed")
    fig.suptitle(title, fontsize=12)
    return _save_figure(fig, path)


# --- baselines and warnings ---------------------------------------------------------------------------------------
def _is_number(text: Any) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


def annotate(metrics: dict[str, Any], predictions: Sequence[dict], records: Sequence[dict] | None = None) -> dict:
    """Add the baselines and what the predictions look like to ``metrics`` (in place; also returned).

    Per task: ``majority`` (share of the most frequent gold answer, ``majority_answer``), ``chance`` (mean of
    1/options over the examples, None where the options are unknown, e.g. numbers), ``distinct_predictions``,
    ``top_prediction`` and its ``top_prediction_share``. Overall: ``baseline = {"majority", "chance"}``.
    ``predictions`` are the per-example rows of :func:`moela.evaluate.evaluate_accuracy` (``task``, ``answer``,
    ``prediction``), ``records`` the evaluated records in the same order (for their ``choices``/``options``).
    """
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(predictions):
        by_task[row["task"]].append(i)
    tasks = metrics.setdefault("tasks", {})
    majority_hits, chance_sum, chance_known = 0, 0.0, True
    for task, index in by_task.items():
        answers = Counter(str(predictions[i]["answer"]) for i in index)
        said = Counter("(none)" if predictions[i]["prediction"] is None else str(predictions[i]["prediction"])
                       for i in index)
        majority_answer, count = answers.most_common(1)[0]
        top, top_count = said.most_common(1)[0]
        options = []
        for i in index:
            record = records[i] if records is not None and i < len(records) else {}
            known = record.get("choices") or record.get("options")
            options.append(len(known) if known else None)
        if all(options) and min(options) > 1:
            chance = sum(1 / k for k in options) / len(options)
        elif len(answers) > 1 and not all(isinstance(predictions[i]["answer"], str)
                                          and _is_number(predictions[i]["answer"]) for i in index):
            chance = 1 / len(answers)  # class labels, or words: the task's label set, as seen in its gold answers
        else:
            chance = None
        entry = tasks.setdefault(task, {"n": len(index)})
        entry.update(majority=count / len(index), majority_answer=majority_answer, chance=chance,
                     distinct_predictions=len(said), top_prediction=top, top_prediction_share=top_count / len(index))
        majority_hits += count
        if chance is None:
            chance_known = False
        else:
            chance_sum += chance * len(index)
    n = len(predictions)
    if n:
        metrics["baseline"] = {"majority": majority_hits / n, "chance": chance_sum / n if chance_known else None}
    return metrics


def warnings_of(metrics: dict[str, Any]) -> dict[str, str]:
    """``{task: why}`` for the tasks where the result is degenerate: one answer given to every example, or an
    accuracy not above the task's majority-class rate (needs :func:`annotate`'s fields)."""
    out = {}
    for task, entry in sorted(metrics.get("tasks", {}).items()):
        if "majority" not in entry or entry.get("accuracy") is None:
            continue
        if entry["distinct_predictions"] == 1 and entry["n"] > 1:
            out[task] = (f"answered {entry['top_prediction']!r} for all {entry['n']} examples"
                         if entry["top_prediction"] != "(none)" else
                         f"answered nothing readable for all {entry['n']} examples")
        elif entry["accuracy"] <= entry["majority"] + 1e-9:
            out[task] = (f"{100 * entry['accuracy']:.1f}% is not above the majority-class rate "
                         f"{100 * entry['majority']:.1f}%")
    return out


ONE_ANSWER, AT_MAJORITY = "one answer to every example", "not above the majority class"


def flagged_briefly(metrics: dict[str, Any]) -> str:
    """:func:`warnings_of` in one short phrase: ``one answer to every example: a, b; not above the majority
    class: c`` (empty when nothing is flagged)."""
    kinds: dict[str, list[str]] = {}
    for task, why in warnings_of(metrics).items():
        kinds.setdefault(ONE_ANSWER if why.startswith("answered") else AT_MAJORITY, []).append(task)
    return "; ".join(f"{kind}: {', '.join(tasks)}" for kind, tasks in kinds.items())


# --- tables -------------------------------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def run_row(method: str, metrics: dict, routing: dict, trainable: int) -> dict[str, Any]:
    return {"method": method, "metrics": metrics, "trainable": trainable,
            "active": routing["active_params_per_token"], "seed": metrics.get("seed")}


def _groups(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows by method, in first-seen order (several rows of a method: several seeds)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["method"], []).append(row)
    return groups


def _mean_sd(values: Sequence[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return ""
    if len(values) == 1:
        return _pct(values[0])
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def protocol_of(rows: Sequence[dict[str, Any]]) -> str:
    return "/".join(dict.fromkeys(r["metrics"].get("protocol", "?") for r in rows))


def metrics_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table, one row per method (mean ± standard deviation over seeds when it ran several): trainable
    and active parameters, accuracy overall and per task, ``⚠`` on a degenerate result (:func:`warnings_of`);
    then the majority-class and chance rows of the evaluation data when they are known."""
    tasks = sorted({t for r in rows for t in r["metrics"].get("tasks", {})})
    groups = _groups(rows)
    several = any(len(g) > 1 for g in groups.values())
    head = (["method"] + (["seeds"] if several else []) + ["trainable params", "active params/token",
            f"accuracy % ({protocol_of(rows)})"] + tasks)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, group in groups.items():
        flagged = {t for r in group for t in warnings_of(r["metrics"])}
        cells = [method] + ([",".join(str(r.get("seed")) for r in group)] if several else [])
        cells += [f"{round(statistics.mean(r['trainable'] for r in group)):,}",
                  f"{statistics.mean(r['active'] for r in group):,.0f}",
                  _mean_sd([r["metrics"].get("accuracy") for r in group])
                  + (" ⚠" if flagged and flagged >= set(group[0]["metrics"].get("tasks", {})) else "")]
        cells += [_mean_sd([r["metrics"]["tasks"].get(t, {}).get("accuracy") for r in group])
                  + (" ⚠" if t in flagged else "") for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    first = rows[0]["metrics"] if rows else {}
    if first.get("baseline"):
        for key, label in (("majority", "majority class"), ("chance", "chance")):
            values = [first["tasks"].get(t, {}).get(key) for t in tasks]
            if first["baseline"].get(key) is None and all(v is None for v in values):
                continue
            cells = [f"*{label}*"] + ([""] if several else []) + ["", "", _pct(first["baseline"].get(key))]
            lines.append("| " + " | ".join(cells + [_pct(v) for v in values]) + " |")
    return "\n".join(lines)


def sampling_interval(accuracy: float, n: int) -> float:
    """Half-width of the 95% normal interval of an accuracy near ``accuracy`` measured on ``n`` examples (as a
    fraction; the accuracy is kept one example away from 0 and 1, where the normal interval would vanish)."""
    n = max(n, 1)
    p = min(max(accuracy, 1 / n), 1 - 1 / n) if n > 1 else 0.5
    return 1.96 * math.sqrt(p * (1 - p) / n)


def summary(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A few plain sentences on what the table says: which method leads and whether that is beyond noise,
    how the parameters differ, and which results are degenerate."""
    groups = _groups(rows)
    means = {m: statistics.mean(r["metrics"]["accuracy"] for r in g) for m, g in groups.items()
             if all(r["metrics"].get("accuracy") is not None for r in g)}
    if not means:
        return []
    n = rows[0]["metrics"].get("n") or 0
    lines = []
    warned = {m: {t: w for r in g for t, w in warnings_of(r["metrics"]).items()} for m, g in groups.items()}
    all_tasks = {t for r in rows for t in r["metrics"].get("tasks", {})}
    if all(set(w) >= all_tasks for w in warned.values()) and all_tasks:
        lines.append("No method learned anything measurable: every result is at or below the majority-class "
                     "rate, or one answer repeated. The comparison says nothing about allocation; train longer or "
                     "with a higher learning rate, or check the data (predictions.json in each run folder).")
    best, worst = max(means, key=means.get), min(means, key=means.get)
    spread = means[best] - means[worst]
    seeds = max(len(g) for g in groups.values())
    if len(means) > 1:
        if seeds > 1:
            sd = max(statistics.stdev(r["metrics"]["accuracy"] for r in g) for g in groups.values() if len(g) > 1)
            noise, what = sd * 2, f"twice the largest seed-to-seed standard deviation ({100 * sd:.1f} points)"
        else:
            noise = sampling_interval(statistics.mean(means.values()), n) if n else 0.0
            what = f"the 95% sampling interval of one accuracy on {n} examples (±{100 * noise:.1f} points)"
        verdict = ("within" if spread <= noise else "beyond")
        if spread < 0.0005:
            lines.append(f"Every method scores {100 * means[best]:.1f}%.")
        else:
            lines.append(f"Best: {best} {100 * means[best]:.1f}%, worst: {worst} {100 * means[worst]:.1f}%; the "
                         f"{100 * spread:.1f}-point spread is {verdict} {what}"
                         + ("; at this size the methods are not distinguishable." if verdict == "within" else "."))
    trainable = {m: statistics.mean(r["trainable"] for r in g) for m, g in groups.items()}
    active = {m: statistics.mean(r["active"] for r in g) for m, g in groups.items()}
    target = next((r["metrics"]["budget"].get("target") for r in rows
                   if isinstance(r["metrics"].get("budget"), dict)), None)
    if len(groups) > 1:
        low, high = min(active, key=active.get), max(active, key=active.get)
        text = f"Trainable adapter parameters: {min(trainable.values()):,.0f} to {max(trainable.values()):,.0f}"
        if target:
            off = {m: t / target - 1 for m, t in trainable.items() if abs(t / target - 1) > 0.02}
            text += f" for a budget of {target:,}" + (
                " (" + ", ".join(f"{m} {100 * abs(d):.1f}% {'under' if d < 0 else 'over'} it"
                                 for m, d in off.items()) + ")" if off else
                " (all within ±2%)")
        lines.append(f"{text}; active per token: {active[low]:,.0f} ({low}) to {active[high]:,.0f} ({high}).")
    for method, group in groups.items():
        brief = "; ".join(dict.fromkeys(b for r in group if (b := flagged_briefly(r["metrics"]))))
        if brief:
            lines.append(f"⚠ {method}: {brief}.")
    if seeds == 1:
        lines.append("One seed only: seed-to-seed variation is not measured, and it can exceed the sampling "
                     "interval (moela compare … --seeds 0,1,2).")
    return lines


def reading_guide(rows: Sequence[dict[str, Any]]) -> list[str]:
    """How to read the table (for report.md and the terminal)."""
    protocol = protocol_of(rows)
    how = {"classification": "the classifier's arg-max label", "multiple_choice":
           "the classifier's best-scored choice among each question's own choices", "generation":
           "the answer read from generated text", "loglik": "the option with the highest log-likelihood",
           "lm_eval": "lm-evaluation-harness's acc"}
    said = "; ".join(f"{p}: {how.get(p, p)}" for p in protocol.split("/"))
    return [f"Accuracy is the share of evaluation examples answered right ({said}); protocols give numbers that "
            "are not comparable with each other.",
            "Every method gets the same number of trainable adapter parameters; it differs in where it puts them "
            "(the heatmaps) and in how many it uses per token (active params/token, measured on the evaluation "
            "data).",
            "The *majority class* row is what always giving each task's most frequent answer scores, *chance* what "
            "guessing among the options scores; ⚠ marks a result that is not above the majority class or that "
            "gave one answer to every example."]


def progress_line(row: dict[str, Any], seed: int | None = None) -> str:
    """The line ``compare`` prints when a run ends: accuracy next to the majority-class rate, and warnings."""
    metrics = row["metrics"]
    label = row["method"] + (f" seed {seed}" if seed is not None else "")
    text = f"[{label}] accuracy {_pct(metrics.get('accuracy'))}%"
    if metrics.get("baseline"):
        text += f" (majority class {_pct(metrics['baseline']['majority'])}%)"
    if row.get("seconds") is not None:
        text += f" in {row['seconds']} s"
    flagged = flagged_briefly(metrics)
    return text + (f" ⚠ {flagged}" if flagged else "")


def _sources(spec: Any) -> str:
    items = spec if isinstance(spec, list) else [spec]
    names = []
    for item in items:
        path = item.get("path") if isinstance(item, dict) else item
        names.append("the built-in generated dataset (moela/demo.py)" if path == "moela:demo" else f"`{path}`")
    return ", ".join(dict.fromkeys(names)) or "none"


def describe_setup(settings: Any, rows: Sequence[dict[str, Any]], seeds: Sequence[int] = ()) -> list[str]:
    """Markdown lines saying what a comparison ran: model, data and sizes, methods, seeds, training."""
    first = rows[0]["metrics"] if rows else {}
    train, data = settings.train, settings.data
    tasks = sorted(first.get("tasks", {}))
    steps = f"{train.max_steps} steps" if train.max_steps > 0 else f"{train.epochs:g} epochs"
    seeds = list(seeds) or [train.seed]
    lines = [f"- Model: `{settings.model.name_or_path}`.",
             f"- Training data: {_sources(data.train)}" + (f", {first['train_examples']:,} examples"
                                                           if first.get("train_examples") else "") + ".",
             f"- Evaluation data: {_sources(data.eval) if data.eval is not None else 'held out of the training data'}"
             + (f", {first['n']:,} examples in {len(tasks)} task(s): {', '.join(tasks)}" if first.get("n") else "") + ".",
             f"- Methods: {', '.join(_groups(rows))}; seed(s): {', '.join(map(str, seeds))}.",
             f"- Training: {steps}, batch {train.batch_size} × {train.grad_accum}, learning rate {train.lr:g}."]
    sources = data.train if isinstance(data.train, list) else [data.train]
    if [s.get("path") if isinstance(s, dict) else s for s in sources] == [demo.SOURCE]:
        lines += [f"  - {task}: {demo.QUESTIONS[task]!r}: {note}" for task, note in demo.TASK_NOTES.items()]
    return lines


# --- report.md ------------------------------------------------------------------------------------------------------
def write_run_report(run_dir: str | Path, method: str, plan: AllocationPlan, metrics: dict, routing: dict,
                     trainable: int, model=None) -> Path:
    """``report.md`` for one run, with ``plan.png`` and ``expert_load.png`` beside it."""
    run_dir = Path(run_dir)
    rows = [run_row(method, metrics, routing, trainable)]
    lines = [f"# moela run: {method}", "", metrics_table(rows), "",
             f"Protocol: {metrics['protocol']} on {metrics['n']} examples; seed {metrics.get('seed', '?')}. Trainable "
             f"adapter parameters {trainable:,}; measured active adapter parameters per token "
             f"{routing['active_params_per_token']:,.0f} over {routing['tokens']:,} evaluation tokens.", ""]
    lines += [f"- ⚠ {task}: {why}." for task, why in warnings_of(metrics).items()] + [""]
    lines += ["## Allocation", "",
              "Experts and total rank of each adapted module, by layer (rows) and module type (columns); grey "
              "cells have no adapter.", ""]
    plot_plan(plan, run_dir / "plan.png", model)
    lines.append("![allocation heatmap](plan.png)")
    lines += ["", "```", plan.summary(model) if model is not None else plan.summary(), "```", "", "## Expert load", ""]
    load = plot_expert_load(routing, run_dir / "expert_load.png", f"expert load: {method}")
    lines.append("Share of the routing slots each expert received on the evaluation data (1/E each when the "
                 "router spreads evenly).\n\n![expert load](expert_load.png)" if load
                 else "No routed module (every module has one expert).")
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def describe_tasks(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One Markdown line per evaluation task: its size, majority answer and chance rate."""
    first = rows[0]["metrics"] if rows else {}
    out = []
    for task, entry in sorted(first.get("tasks", {}).items()):
        text = f"- **{task}**: {entry['n']} evaluation examples"
        if "majority" in entry:
            text += (f"; the most frequent answer ({entry['majority_answer']}) is {100 * entry['majority']:.1f}% "
                     "of them" + (f"; chance {100 * entry['chance']:.1f}%" if entry.get("chance") else ""))
        out.append(text)
    return out


def next_steps(out_dir: str | Path, rows: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines: what to run after a comparison."""
    methods = list(_groups(rows))
    seeds = max((len(g) for g in _groups(rows).values()), default=1)
    lines = [f"One method's plan, module by module: `moela plan show {Path(out_dir) / methods[-1]}`."]
    if seeds == 1:
        lines.append("Seed-to-seed spread: run the same comparison with `--seeds 0,1,2` (mean ± sd per method).")
    more = ",".join(dict.fromkeys(methods + ["mola", "alphalora"]))
    lines += [f"Other allocators at the same budget: `--methods {more}`; a larger "
              "or smaller budget: `adapter.budget=uniform:E=8,r=8`.",
              "Your own data or model: a config like those in `configs/` (each says which data layout it expects; "
              "`moela data` prepares the LLM-Adapters and ScienceQA ones)."]
    return lines


def write_compare_report(out_dir: str | Path, rows: Sequence[dict[str, Any]], budget: Any,
                         about: Sequence[str] = ()) -> Path:
    """``report.md`` of a comparison: what was compared (``about``: lines describing it), the table, what it
    says, how to read it, the tasks, then each method's heatmaps (from its run folder)."""
    out_dir = Path(out_dir)
    lines = ["# moela compare", ""] + list(about) + ([""] if about else [])
    lines += [f"Budget: {budget} (each allocator's plan is matched to it, METHODS.md §5).", "", metrics_table(rows), ""]
    lines += ["## What the table says", ""] + [f"- {line}" for line in summary(rows)] + [""]
    lines += ["## How to read it", ""] + [f"- {line}" for line in reading_guide(rows)] + [""]
    tasks = describe_tasks(rows)
    if tasks:
        lines += ["## Tasks", ""] + tasks + [""]
    lines += ["## What to try next", ""] + [f"- {line}" for line in next_steps(out_dir, rows)] + [""]
    for method, group in _groups(rows).items():
        lines += [f"## {method}", ""]
        for row in group:
            sub = Path(row.get("run_dir", out_dir / method))
            sub = sub.relative_to(out_dir) if sub.is_absolute() and sub.is_relative_to(out_dir) else Path(method)
            seed = f" (seed {row['seed']})" if len(group) > 1 else ""
            if (out_dir / sub / "plan.png").is_file():
                lines.append(f"![allocation: {method}{seed}]({sub.as_posix()}/plan.png)")
            if (out_dir / sub / "expert_load.png").is_file():
                lines.append(f"![expert load: {method}{seed}]({sub.as_posix()}/expert_load.png)")
            lines += [f"Run folder: [{sub.as_posix()}/]({sub.as_posix()}/report.md)", ""]
            if len(group) > 1:
                break  # one seed's pictures; the others are in their folders
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


# --- moela plan show ----------------------------------------------------------------------------------------------
def adapter_dims(adapter_dir: str | Path) -> dict[str, tuple[int, int]]:
    """``{module: (d_in, d_out)}`` read from the header of an adapter's ``adapter_model.safetensors`` (its
    ``lora_A`` is r × d_in, ``lora_B`` d_out × r); empty when the file is absent. No tensor is loaded."""
    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        return {}
    with path.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    d_in, d_out = {}, {}
    for key, info in header.items():
        module, _, rest = key.partition(".experts.")
        if rest.endswith(".lora_A"):
            d_in[module] = info["shape"][1]
        elif rest.endswith(".lora_B"):
            d_out[module] = info["shape"][0]
    return {m: (d_in[m], d_out[m]) for m in d_in if m in d_out}


def _runs_of(folder: Path) -> list[dict[str, Any]]:
    """The runs of a compare folder: ``compare.json``'s rows, else every sub-folder holding a plan."""
    listing = folder / "compare.json"
    if listing.is_file():
        rows = json.loads(listing.read_text())["rows"]
        for row in rows:  # the folder may have moved since: find each run inside it
            stored = Path(row.get("run_dir") or row["method"])
            inside = folder / row["method"] / stored.name if stored.name.startswith("seed-") else folder / row["method"]
            row["run_dir"] = str(stored if (stored / "plan.json").is_file() else inside)
        return rows
    rows = []
    for plan in sorted(folder.glob("*/plan.json")) + sorted(folder.glob("*/seed-*/plan.json")):
        metrics_file = plan.parent / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        rows.append({"method": metrics.get("method") or json.loads(plan.read_text()).get("meta", {}).get("method", "?"),
                     "metrics": metrics, "trainable": metrics.get("adapter_params"),
                     "active": metrics.get("active_params_per_token"), "run_dir": str(plan.parent)})
    return rows


def show(path: str | Path, model: nn.Module | None = None, plot: str | Path | None = None,
         overwrite: bool = False) -> str:
    """What ``moela plan show`` prints: a plan file's table; a run folder's plan with its parameters per module
    (from the adapter's shapes, or ``model``); a compare folder's list of runs. ``plot``: also write the
    heatmap (a compare folder: one per run, ``<plot>-<method>.png``), each checked first
    (:func:`moela.run_folder.check_output_file`: an existing file only with ``overwrite``). ValueError when
    ``path`` is none of these."""
    if plot:  # (run_folder imports torch, which listing plans does not need)
        from .run_folder import check_output_file
    path = Path(path)
    if path.is_dir() and not (path / "plan.json").is_file():
        runs = _runs_of(path)
        if not runs:
            raise ValueError(f"{path} is not a plan file, a run folder (with plan.json) or a compare folder "
                             "(with compare.json or run folders inside)")
        targets = []
        for row in runs if plot else []:
            stem = Path(plot)
            name = row["method"] + (f"-seed{row['seed']}" if row.get("seed") not in (None, "") and
                                    sum(r["method"] == row["method"] for r in runs) > 1 else "")
            targets.append(stem.with_name(f"{stem.stem}-{name}{stem.suffix or '.png'}"))
            check_output_file(targets[-1], overwrite, "--plot")
        width = max(len(r["method"]) for r in runs) + 2
        lines = [f"compare folder {path}: {len(runs)} run(s)", "",
                 f"{'method':<{width}}{'seed':>5}{'trainable':>12}{'active/token':>14}{'accuracy':>10}  run folder"]
        for i, row in enumerate(runs):
            metrics = row.get("metrics") or {}
            accuracy = metrics.get("accuracy")
            lines.append(f"{row['method']:<{width}}{str(row.get('seed', metrics.get('seed', ''))):>5}"
                         f"{'' if row.get('trainable') is None else format(row['trainable'], ','):>12}"
                         f"{'' if row.get('active') is None else format(round(row['active']), ','):>14}"
                         f"{'' if accuracy is None else f'{100 * accuracy:.1f}%':>10}  {row['run_dir']}")
            if plot:
                target = targets[i]
                plot_plan(AllocationPlan.load(Path(row["run_dir"]) / "plan.json"), target, kinds=_shared_kinds(runs))
                lines.append(f"{'':<{width}}heatmap: {target}")
        lines += ["", f"One run's plan: moela plan show {runs[0]['run_dir']}"]
        return "\n".join(lines)
    run_dir = path if path.is_dir() else None
    plan_file = path / "plan.json" if run_dir else path
    if not plan_file.is_file():
        raise ValueError(f"{path}: no such plan file or folder")
    plan = AllocationPlan.load(plan_file)
    if plot:
        check_output_file(plot, overwrite, "--plot")
    lines = []
    if run_dir is not None:
        metrics_file = run_dir / "metrics.json"
        about = f"run folder {run_dir}"
        if metrics_file.is_file():
            metrics = json.loads(metrics_file.read_text())
            if metrics.get("accuracy") is not None:
                about += f": accuracy {100 * metrics['accuracy']:.1f}% ({metrics.get('protocol')}, n={metrics.get('n')})"
        lines += [about]
    dims = adapter_dims(run_dir / "adapter") if run_dir is not None and model is None else {}
    lines.append(plan.summary(model) if model is not None else plan.summary(dims=dims))
    if model is None and not dims:
        lines.append("(per-module parameters: add --model NAME_OR_PATH)")
    if plot:
        lines.append(f"heatmap: {plot_plan(plan, plot, model)}")
    return "\n".join(lines)


def _shared_kinds(runs: Sequence[dict[str, Any]]) -> list[str]:
    kinds = set()
    for row in runs:
        kinds |= {module_type(n) for n in AllocationPlan.load(Path(row["run_dir"]) / "plan.json")}
    return module_order(kinds)

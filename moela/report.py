"""``report.md`` of a run or a comparison: the metrics table, the allocation heatmap (experts and total rank per
depth × module type) and the expert-load plot."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from .io import atomic_write_text
from .plan import AllocationPlan, layer_index, module_type


_INDEX_FREE = -1


def plan_grid(plan: AllocationPlan) -> tuple[list[int], list[str], np.ndarray, np.ndarray]:
    """(depths, module types, experts grid, total-rank grid): every depth from the shallowest to the deepest
    planned block; cells of modules not in the plan are NaN; modules outside any block sit on row -1."""
    def depth(name: str) -> int:
        try:
            return layer_index(name)
        except ValueError:
            return _INDEX_FREE

    found = {depth(n) for n in plan}
    blocks = found - {_INDEX_FREE}
    depths = sorted((found & {_INDEX_FREE}) | (set(range(min(blocks), max(blocks) + 1)) if blocks else set()))
    kinds = list(dict.fromkeys(module_type(n) for n in plan))
    experts = np.full((len(depths), len(kinds)), np.nan)
    ranks = np.full_like(experts, np.nan)
    for name, spec in plan.items():
        row, col = depths.index(depth(name)), kinds.index(module_type(name))
        experts[row, col], ranks[row, col] = spec.num_experts, sum(spec.ranks)
    return depths, kinds, experts, ranks


def plot_plan(plan: AllocationPlan, path: str | Path, model: nn.Module | None = None) -> Path:
    """Save side-by-side heatmaps of experts and total rank per layer × module type as a PNG (atomically)."""
    depths, kinds, experts, ranks = plan_grid(plan)
    height = 1.5 + 0.3 * len(depths)
    fig = Figure(figsize=(2 * (2 + 0.6 * len(kinds)), height), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, grid, label in zip(fig.subplots(1, 2), (experts, ranks), ("experts", "total rank")):
        image = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
        ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(depths)), depths, fontsize=8)
        ax.set_xlabel("module type")
        ax.set_ylabel("layer")
        ax.set_title(label)
        fig.colorbar(image, ax=ax, shrink=0.8)
        if grid.size <= 400:
            middle = (np.nanmin(grid) + np.nanmax(grid)) / 2
            for (row, col), value in np.ndenumerate(grid):
                if not np.isnan(value):
                    ax.text(col, row, int(value), ha="center", va="center", fontsize=7,
                            color="black" if value > middle else "white")
    title = plan.meta.get("method", "plan")
    if model is not None:
        title += f" — {plan.num_trainable(model):,} trainable parameters"
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def plot_expert_load(routing: dict[str, Any], path: str | Path, title: str = "expert load") -> Path | None:
    """Heatmap of the fraction of routing slots per expert (columns, null experts last) per routed module
    (rows), measured on the evaluation data. Returns None when no module is routed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    routed = {n: m for n, m in routing["modules"].items() if len(m["load"]) > 1}
    if not routed:
        return None
    width = max(len(m["load"]) for m in routed.values())
    grid = np.full((len(routed), width), np.nan)
    for row, module in enumerate(routed.values()):
        grid[row, :len(module["load"])] = module["load"]
    fig, ax = plt.subplots(figsize=(2 + 0.5 * width, 1 + 0.18 * len(routed)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=float(np.nanmax(grid)))
    ax.set_yticks(range(len(routed)), list(routed), fontsize=5)
    ax.set_xticks(range(width), [str(i) for i in range(width)])
    ax.set_xlabel("expert (null experts last)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="fraction of routing slots")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def metrics_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table, one row per run: method, trainable and active parameters, accuracy overall and per task."""
    tasks = sorted({t for r in rows for t in r["metrics"].get("tasks", {})})
    head = ["method", "trainable params", "active params/token", f"accuracy ({rows[0]['metrics']['protocol']})"] + tasks
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        per_task = [_pct(r["metrics"]["tasks"].get(t, {}).get("accuracy")) for t in tasks]
        lines.append("| " + " | ".join([r["method"], f"{r['trainable']:,}", f"{r['active']:,.0f}",
                                        _pct(r["metrics"]["accuracy"])] + per_task) + " |")
    return "\n".join(lines)


def run_row(method: str, metrics: dict, routing: dict, trainable: int) -> dict[str, Any]:
    return {"method": method, "metrics": metrics, "trainable": trainable,
            "active": routing["active_params_per_token"]}


def write_run_report(run_dir: str | Path, method: str, plan: AllocationPlan, metrics: dict, routing: dict,
                     trainable: int, model=None) -> Path:
    """``report.md`` for one run, with ``plan.png`` and ``expert_load.png`` beside it."""
    run_dir = Path(run_dir)
    lines = [f"# moela run: {method}", "", metrics_table([run_row(method, metrics, routing, trainable)]), "",
             f"Protocol: {metrics['protocol']} on {metrics['n']} examples. Trainable adapter parameters "
             f"{trainable:,}; measured active adapter parameters per token {routing['active_params_per_token']:,.0f} "
             f"over {routing['tokens']:,} evaluation tokens.", "", "## Allocation", ""]
    plot_plan(plan, run_dir / "plan.png", model)
    lines.append("![allocation heatmap](plan.png)")
    lines += ["", "```", plan.summary(model) if model is not None else plan.summary(), "```", "", "## Expert load", ""]
    load = plot_expert_load(routing, run_dir / "expert_load.png", f"expert load: {method}")
    lines.append("![expert load](expert_load.png)" if load else "No routed module (every module has one expert).")
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def write_compare_report(out_dir: str | Path, rows: Sequence[dict[str, Any]], budget: Any) -> Path:
    """``report.md`` of a comparison: the table, then each method's heatmaps (from its run folder)."""
    out_dir = Path(out_dir)
    lines = ["# moela compare", "", f"Budget: {budget} (each allocator's plan is matched to it, METHODS.md §5).", "",
             metrics_table(rows), ""]
    for row in rows:
        sub = row["method"]
        lines += [f"## {sub}", ""]
        if (out_dir / sub / "plan.png").is_file():
            lines.append(f"![allocation: {sub}]({sub}/plan.png)")
        if (out_dir / sub / "expert_load.png").is_file():
            lines.append(f"![expert load: {sub}]({sub}/expert_load.png)")
        lines += [f"Run folder: [{sub}/]({sub}/report.md)", ""]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path

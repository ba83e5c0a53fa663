"""Heatmaps of a plan: experts and total rank per depth (rows) × module type (columns)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

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

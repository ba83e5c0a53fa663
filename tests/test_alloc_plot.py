"""plot_plan: the heatmap grid holds the plan's numbers, and a PNG is written."""

from __future__ import annotations

import numpy as np
import pytest

from moela.allocators import allocate
from moela.report import plan_grid, plot_plan
from tests.helpers import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops run faster on one thread


def test_grid_and_png(tmp_path):
    model = tiny_model("llama")
    plan = allocate("hilo", model, experts="1234", ranks="2468")
    depths, kinds, experts, ranks = plan_grid(plan)
    assert depths == [0, 1, 2, 3] and kinds[0] == "self_attn.q_proj" and len(kinds) == 7
    assert experts[:, 0].tolist() == [1, 2, 3, 4] and ranks[:, 0].tolist() == [2, 8, 18, 32]
    partial = allocate("mola", model, targets=["q_proj"], pattern="2468")
    partial.modules.pop("model.layers.1.self_attn.q_proj")
    assert np.isnan(plan_grid(partial)[2][1, 0])
    out = plot_plan(plan, tmp_path / "figs" / "plan.png", model=model)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["plan.png"]

"""What reports say: baselines, degenerate-result flags, seeds, the summary, stable heatmap columns with a
"no adapter" legend, and ``plan show`` on plan files, run folders and compare folders (no training here)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from moela import report
from moela.allocators import allocate
from moela.plan import AllocationPlan, ModulePlan, module_type
from moela.report import annotate, metrics_table, module_order, plan_grid, summary, warnings_of
from tests.helpers import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def rows_of(answers, predictions, task="t"):
    return [{"task": task, "answer": a, "prediction": p, "correct": a == p} for a, p in zip(answers, predictions)]


def metrics_of(rows, protocol="classification", records=None):
    by_task = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r["correct"])
    metrics = {"protocol": protocol, "n": len(rows), "accuracy": sum(r["correct"] for r in rows) / len(rows),
               "tasks": {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in by_task.items()}}
    return annotate(metrics, rows, records)


def row(method, metrics, trainable=1000, active=500.0, seed=0):
    return {"method": method, "metrics": {**metrics, "seed": seed}, "trainable": trainable, "active": active,
            "seed": seed}


def test_baselines_and_the_degenerate_flag():
    # 6 of 10 gold labels are 1; a model answering 1 everywhere scores exactly the majority rate
    answers = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    constant = metrics_of(rows_of(answers, [1] * 10))
    entry = constant["tasks"]["t"]
    assert entry["majority"] == pytest.approx(0.6) and entry["majority_answer"] == "1"
    assert entry["chance"] == pytest.approx(0.5) and entry["distinct_predictions"] == 1
    assert constant["baseline"] == {"majority": pytest.approx(0.6), "chance": pytest.approx(0.5)}
    assert "answered '1' for all 10 examples" in warnings_of(constant)["t"]
    # two classes predicted but no better than the majority class: flagged too
    weak = metrics_of(rows_of(answers, [1, 1, 1, 1, 0, 0, 1, 0, 0, 1]))
    assert weak["tasks"]["t"]["accuracy"] == pytest.approx(0.6)
    assert "not above the majority-class rate 60.0%" in warnings_of(weak)["t"]
    good = metrics_of(rows_of(answers, [1, 1, 1, 1, 1, 1, 0, 0, 0, 1]))
    assert warnings_of(good) == {}
    # numeric answers (generation) have no chance rate; multiple choice: the mean of 1/choices
    numeric = metrics_of(rows_of(["5.0", "3.0", "5.0"], ["5", None, None]), "generation")
    assert numeric["tasks"]["t"]["chance"] is None and numeric["baseline"]["chance"] is None
    assert numeric["tasks"]["t"]["majority"] == pytest.approx(2 / 3)
    unread = metrics_of(rows_of(["true", "false"], [None, None]), "generation")
    assert warnings_of(unread)["t"] == "answered nothing readable for all 2 examples"
    choices = [{"choices": ["a", "b"]}, {"choices": ["a", "b", "c", "d"]}]
    mc = metrics_of(rows_of([0, 1], [0, 0]), "multiple_choice", choices)
    assert mc["tasks"]["t"]["chance"] == pytest.approx((1 / 2 + 1 / 4) / 2)


def test_table_has_baseline_rows_flags_and_seed_spread():
    answers = [1, 0] * 10
    good = metrics_of(rows_of(answers, answers))
    stuck = metrics_of(rows_of(answers, [1] * 20))
    table = metrics_table([row("uniform", good), row("lora", stuck)])
    lines = table.splitlines()
    assert lines[0].startswith("| method |") and "accuracy % (classification)" in lines[0]
    assert "| uniform | 1,000 | 500 | 100.0 | 100.0 |" in table
    assert "| lora | 1,000 | 500 | 50.0 ⚠ | 50.0 ⚠ |" in table
    assert "| *majority class* |  |  | 50.0 | 50.0 |" in table and "| *chance* |  |  | 50.0 | 50.0 |" in table
    # several seeds: one row per method with mean ± sd and the seeds
    half = metrics_of(rows_of(answers, answers[:10] + [1] * 10))
    table = metrics_table([row("uniform", good, seed=0), row("uniform", half, seed=1)])
    assert "| uniform | 0,1 |" in table and "87.5 ± 17.7" in table and "seeds" in table.splitlines()[0]
    lines = summary([row("uniform", good, seed=0), row("uniform", half, seed=1), row("lora", good, seed=0),
                     row("lora", good, seed=1)])
    assert any("seed-to-seed standard deviation" in line for line in lines)


def test_summary_says_when_nothing_was_learned_and_when_differences_are_noise():
    answers = [1, 0, 0] * 20
    stuck = metrics_of(rows_of(answers, [0] * 60))
    lines = summary([row("lora", stuck), row("uniform", stuck)])
    assert lines[0].startswith("No method learned anything measurable")
    assert any(line.startswith("⚠ lora: one answer to every example: t") for line in lines)
    assert any("One seed only" in line for line in lines)
    a = metrics_of(rows_of(answers, answers[:55] + [1] * 5))
    b = metrics_of(rows_of(answers, answers[:58] + [1] * 2))
    lines = summary([row("lora", a), row("uniform", b, active=250.0)])
    said = " ".join(lines)
    assert "Best: uniform" in said and "within the 95% sampling interval of one accuracy on 60 examples" in said
    assert "not distinguishable" in said and "250 (uniform) to 500 (lora)" in said
    assert report.progress_line(row("lora", stuck) | {"seconds": 1.5}).endswith(
        "(majority class 66.7%) in 1.5 s ⚠ one answer to every example: t")


def test_heatmap_columns_are_in_block_order_whatever_the_plan_order():
    model = tiny_model("llama")
    plan = allocate("hilo", model, experts="1234", ranks="2468")
    names = list(plan)
    random.Random(0).shuffle(names)
    shuffled = AllocationPlan({n: plan[n] for n in names}, plan.meta)
    first, again = plan_grid(plan), plan_grid(shuffled)
    assert first[1] == again[1] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert np.array_equal(first[2], again[2])
    assert module_order(["output.dense", "intermediate.dense", "attention.output.dense", "attention.self.value",
                         "attention.self.query", "attention.self.key"]) == [
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense"]
    assert module_order(["mlp.c_proj", "mlp.c_fc", "attn.c_proj", "attn.c_attn"]) == [
        "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert module_order(["zeta", "mlp.down_proj", "alpha"]) == ["mlp.down_proj", "alpha", "zeta"]


def test_empty_cells_get_a_no_adapter_legend(tmp_path, monkeypatch):
    model = tiny_model("llama")
    plan = allocate("uniform", model, experts=2, rank=2)
    legends = []
    real = report._no_adapter_legend
    monkeypatch.setattr(report, "_no_adapter_legend", lambda fig, *a: legends.append(a) or real(fig, *a))
    report.plot_plan(plan, tmp_path / "full.png", model)
    assert legends == []
    plan.modules.pop("model.layers.2.mlp.up_proj")
    report.plot_plan(plan, tmp_path / "holes.png", model)
    assert len(legends) == 1 and (tmp_path / "holes.png").read_bytes()[:4] == b"\x89PNG"
    # a shared column list keeps a column the plan lacks entirely
    kinds = module_order(module_type(n) for n in allocate("uniform", model, experts=2, rank=2))
    lora_q = AllocationPlan({n: ModulePlan([4]) for n in plan if n.endswith("q_proj")})
    depths, columns, experts, _ = plan_grid(lora_q, kinds)
    assert columns == kinds and np.isnan(experts[:, 1:]).all() and (experts[:, 0] == 1).all()


def test_expert_load_plot_has_one_panel_per_module_type(tmp_path):
    routing = {"modules": {f"model.layers.{d}.{k}": {"load": [0.5, 0.25, 0.25]}
                           for d in range(3) for k in ("self_attn.q_proj", "mlp.up_proj")}}
    routing["modules"]["model.layers.0.mlp.down_proj"] = {"load": [1.0]}  # one expert: not routed, not drawn
    path = report.plot_expert_load(routing, tmp_path / "load.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert report.plot_expert_load({"modules": {"a.0.b": {"load": [1.0]}}}, tmp_path / "none.png") is None


def fake_run(folder, method, plan, model, accuracy, seed=0):
    folder.mkdir(parents=True)
    plan.save(folder / "plan.json")
    dims = plan.validate(model)
    tensors = {}
    for name, spec in plan.items():
        d_in, d_out = dims[name]
        for i, r in enumerate(spec.ranks):
            tensors[f"{name}.experts.{i}.lora_A"] = torch.zeros(r, d_in)
            tensors[f"{name}.experts.{i}.lora_B"] = torch.zeros(d_out, r)
    (folder / "adapter").mkdir()
    save_file(tensors, folder / "adapter" / "adapter_model.safetensors")
    metrics = {"method": method, "accuracy": accuracy, "protocol": "classification", "n": 10, "seed": seed,
               "adapter_params": plan.num_trainable(model), "active_params_per_token": 1.0, "tasks": {}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return {"method": method, "metrics": metrics, "trainable": metrics["adapter_params"], "active": 1.0,
            "seed": seed, "run_dir": str(folder)}


def test_plan_show_reads_plan_files_run_folders_and_compare_folders(tmp_path):
    model = tiny_model("llama")
    out = tmp_path / "cmp"
    rows = [fake_run(out / "lora", "lora", allocate("lora", model, rank=4), model, 0.5),
            fake_run(out / "uniform", "uniform", allocate("uniform", model, experts=2, rank=2), model, 0.75)]
    listing = report.show(out)  # no compare.json yet (an interrupted comparison): the sub-folders
    assert "2 run(s)" in listing and "uniform" in listing and "75.0%" in listing
    (out / "compare.json").write_text(json.dumps({"budget": "x", "rows": rows}))
    moved = tmp_path / "moved"
    out.rename(moved)  # the folder was moved: its runs are found inside it
    listing = report.show(moved, plot=tmp_path / "heat.png")
    assert str(moved / "lora") in listing and (tmp_path / "heat-lora.png").is_file()
    assert (tmp_path / "heat-uniform.png").is_file()
    one = report.show(moved / "uniform")
    assert "accuracy 75.0%" in one and f"total trainable parameters: {rows[1]['trainable']:,}" in one
    assert "total trainable parameters" not in report.show(moved / "uniform" / "plan.json")
    with pytest.raises(ValueError, match="not a plan file, a run folder"):
        report.show(tmp_path / "moved" / "lora" / "adapter")

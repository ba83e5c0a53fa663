"""The demo narrates: what it compares before it runs, then the table with its baselines, warnings and what to
do next; run here on a tiny BERT instead of MiniLM (the same code path as `make demo`)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from moela import demo, evaluate
from moela.cli import main
from moela.data import first_per_task

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["data.max_train_samples=48", "data.max_eval_samples=30", "train.max_steps=1", "train.progress=false",
        "adapter.method=[lora, uniform]"]


def test_demo_narration_baseline_flag_and_protocol(tmp_path, tiny_bert, capsys, monkeypatch):
    # every method answers 1 to every example: the comparison must say it learned nothing, not rank the methods
    monkeypatch.setattr(evaluate, "classify", lambda model, features, *a, **k: [1] * len(features))
    out = tmp_path / "demo"
    assert main(["run", f"model.name_or_path={tiny_bert}", *TINY, "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    intro, rest = printed.split("[lora] plan:", 1)
    # before: the model, the data (tasks and sizes), the methods, the budget
    assert "moela demo:" in intro and str(tiny_bert) in intro and "(bert, 2 layers, width 32)" in intro
    assert all(task in intro for task in demo.GENERATORS) and "48 train / 30 test examples" in intro
    assert "lora " in intro and "uniform " in intro and "budget  uniform:E=4,r=4" in intro
    # after: per-run lines next to the majority class, the table, what it says, what to do next
    eval_records = first_per_task(demo.records("test"), 30)
    majority = sum(Counter(r["label"] for r in eval_records if r["task"] == t).most_common(1)[0][1]
                   for t in demo.GENERATORS) / 30
    assert f"(majority class {100 * majority:.1f}%)" in rest and "⚠ one answer to every example" in rest
    assert "| *majority class* |" in rest and "accuracy % (classification)" in rest
    assert "No method learned anything measurable" in rest
    assert "How to read it" in rest and "Next:" in rest and f"moela plan show {out}/uniform" in rest
    # the files: metrics with the baselines and the protocol, report.md with the same story
    metrics = json.loads((out / "lora" / "metrics.json").read_text())
    assert metrics["protocol"] == "classification" and metrics["baseline"]["majority"] == pytest.approx(majority)
    assert metrics["baseline"]["chance"] == pytest.approx(0.5) and metrics["seed"] == 0
    assert all(t["distinct_predictions"] == 1 and t["top_prediction"] == "1" for t in metrics["tasks"].values())
    text = (out / "report.md").read_text()
    for needle in ("- Model: ", "- Training data: the built-in generated dataset (moela/demo.py), 48 examples",
                   "30 examples in 3 task(s)", "## What the table says", "No method learned anything measurable",
                   "## How to read it", "## Tasks", "| *majority class* |", "⚠", "lexical: 'animal?'"):
        assert needle in text, needle
    assert "⚠ lexical:" in (out / "lora" / "report.md").read_text()

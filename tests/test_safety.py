"""Users' files are sacred: each guarantee of README's reliability list, tried through the ``moela`` command.

Every refusal is one line ``moela: error: …`` (exit 1) naming what is at fault, and every file that was there
before is still there, byte for byte. Classes: ownership (what ``--overwrite`` and ``export`` may delete), run
names, consistent resumes (record, lock, processes), validation before work, errors that name the file,
faults (failure mark on a full disk, a crash between the renames of a folder replacement, stale temporary
files, umask), bounded memory; and a property-based test over generated settings, overrides and options.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformers
import yaml
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from safetensors.torch import load_file, save_file

from moela import AllocationPlan, cli, inject, io, pipeline, report, run_folder, save_adapter
from moela.cli import main
from moela.data import text_bound
from moela.settings import load_settings
from tests.helpers import classification_files, instruction_records, lm_config, tiny_model

ROOT = Path(__file__).resolve().parents[1]


# --- helpers ----------------------------------------------------------------------------------------------------
def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("moela: error: "), err
    return err


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (a file itself: just it), by relative path."""
    root = Path(root)
    if root.is_file():
        return {"": root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def assert_kept(before: dict[str, bytes], root: Path) -> None:
    for name, data in before.items():
        path = Path(root) / name if name else Path(root)
        assert path.is_file(), f"{path} was deleted"
        assert path.read_bytes() == data, f"{path} was changed"


class ModelLoaded(BaseException):
    """Raised if a run loads its base model's weights (not caught by the command's error handler)."""


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise ModelLoaded("the base model was loaded before the input was refused")

    monkeypatch.setattr(pipeline, "load_base", refuse)


def user_project(folder: Path) -> Path:
    """A user's folder: a config.yaml of theirs, notes, a nested data file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text("my: own settings\n")
    (folder / "notes.txt").write_text("do not delete\n")
    (folder / "data").mkdir(exist_ok=True)
    (folder / "data" / "big.bin").write_bytes(os.urandom(256))
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_lm) -> tuple[Path, Path]:
    """(config, run folder) of one finished ``moela train`` (plain LoRA, one step), copied by the tests."""
    folder = tmp_path_factory.mktemp("trained")
    config = lm_config(folder, tiny_lm, adapter={"method": "lora", "options": {"rank": 2}, "dropout": 0.0},
                       train={"max_steps": 1, "progress": False}, eval={"max_new_tokens": 1})
    assert main(["train", str(config)]) == 0
    return config, folder / "run"


def unfinished_copy(trained, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the trained run as a killed run leaves it (no FINISHED), and its config pointing there."""
    config, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / run_folder.FINISHED).unlink()
    text = yaml.safe_load(config.read_text())
    text["output_dir"] = str(copy)
    new = tmp_path / "config.yaml"
    new.write_text(yaml.safe_dump(text))
    return new, copy


def started_run(config: Path, *overrides: str) -> Path:
    """A run folder as ``moela train`` leaves it once started (claimed, record and settings written), with no
    training done: what ``--resume`` checks."""
    settings = load_settings(config, list(overrides))
    prepared = pipeline.prepare(settings)
    settings = settings.updated({"model": {"num_labels": prepared.num_labels}})
    run_dir = Path(settings.output_dir)
    run_folder.claim(run_dir, settings=settings)
    try:
        run_folder.start_run(run_dir, settings, records=(prepared.train_records, prepared.eval_records))
    finally:
        run_folder.release(run_dir)
    return run_dir


# --- ownership: --overwrite and export delete only what moela created ------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--overwrite"], "is not a moela run folder (it has no .moela marker: moela did not create it); refusing to "
                      "delete it"),
    ([], "refusing to write into it"),
    (["--resume"], "refusing to write into it"),
])
def test_a_folder_moela_did_not_create_is_never_deleted_or_written(tmp_path, tiny_lm, capsys, no_model_load,
                                                                    flags, message):
    project = user_project(tmp_path / "project")
    before = snapshot(project)
    config = lm_config(tmp_path, tiny_lm)
    assert main(["train", str(config), f"output_dir={project}", *flags]) == 1
    assert message in one_line_error(capsys)
    assert_kept(before, project)
    assert sorted(p.name for p in project.iterdir()) == ["config.yaml", "data", "notes.txt"]


def test_overwrite_never_deletes_the_current_folder_or_its_parents(tmp_path, tiny_lm, capsys, monkeypatch,
                                                                   no_model_load):
    config = lm_config(tmp_path, tiny_lm)
    work = user_project(tmp_path / "work")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    assert main(["train", str(config), "output_dir=.", "--overwrite"]) == 1
    assert "not a moela run folder" in one_line_error(capsys)
    # even a folder that carries moela's marker is not deleted when it is the current folder or a parent of it
    run_folder.mark_owned(work, "run")
    run_folder.mark_owned(tmp_path, "run")
    assert main(["train", str(config), "output_dir=.", "--overwrite"]) == 1
    assert "refusing to delete . for --overwrite: it is the current folder" in one_line_error(capsys)
    assert main(["train", str(config), f"output_dir={tmp_path}", "--overwrite"]) == 1
    assert "it is a parent of the current folder" in one_line_error(capsys)
    assert_kept(before, tmp_path)


def test_overwrite_refuses_a_run_folder_that_holds_the_runs_own_data(tmp_path, tiny_lm, capsys, no_model_load):
    run = tmp_path / "run"
    run.mkdir()
    run_folder.mark_owned(run, "run")
    (run / "FINISHED").write_text("{}")
    data = run / "mine.json"
    data.write_text(json.dumps(instruction_records(8)))
    before = snapshot(run)
    assert main(["train", str(lm_config(tmp_path, tiny_lm)), f"data.train={data}", "--overwrite"]) == 1
    assert f"it holds {data}, which this run reads" in one_line_error(capsys)
    assert_kept(before, run)


def test_overwrite_refuses_a_run_folder_holding_files_moela_did_not_write(tmp_path, trained, capsys, no_model_load):
    config, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for mine in (copy / "my_notes.txt", copy / "adapter" / "README.md", copy / "checkpoints" / "mine" / "a.txt"):
        mine.parent.mkdir(exist_ok=True)
        mine.write_text("mine\n")
        before = snapshot(copy)
        assert main(["train", str(config), f"output_dir={copy}", "--overwrite"]) == 1
        named = mine if mine.parent.name != "mine" else mine.parent
        assert f"it holds {named}, which moela did not write (move it out first)" in one_line_error(capsys)
        assert_kept(before, copy)
        if named.is_dir():
            shutil.rmtree(named)
        else:
            named.unlink()
    from moela.adapter import ADAPTER_FILES

    assert run_folder.WRITTEN_INSIDE["adapter"] == ADAPTER_FILES
    for trainers in ("runs/Dec07/events.out", ".checkpoint-1.old/x", "emissions.csv"):  # trackers', a replacement's
        (copy / "checkpoints" / trainers).parent.mkdir(parents=True, exist_ok=True)
        (copy / "checkpoints" / trainers).write_text("x")
    run_folder.check_run_dir(copy, overwrite=True, resume=False)


def test_overwrite_checks_the_new_data_before_it_deletes_the_finished_run(tmp_path, trained, capsys, no_model_load):
    """Bad data is refused before --overwrite empties the folder (the finished run stays whole), and a new
    folder is not even created for it."""
    config, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(instruction_records(1)[0]) + "\n{oops\n")
    before = snapshot(copy)
    assert main(["train", str(config), f"output_dir={copy}", f"data.train={bad}", "--overwrite"]) == 1
    assert f"{bad}: line 2: not valid JSON" in one_line_error(capsys)
    assert_kept(before, copy)
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in run.iterdir())
    assert main(["train", str(config), f"output_dir={tmp_path / 'new'}", f"data.train={bad}"]) == 1
    assert "line 2: not valid JSON" in one_line_error(capsys) and not (tmp_path / "new").exists()
    compared = tmp_path / "compared"  # a finished comparison
    compared.mkdir()
    run_folder.mark_owned(compared, "compare")
    (compared / "FINISHED").write_text("{}")
    shutil.copytree(run, compared / "lora")
    before = snapshot(compared)
    assert main(["compare", str(config), "--methods", "lora,uniform", f"output_dir={compared}",
                 f"data.train={bad}", "--overwrite"]) == 1
    assert "line 2: not valid JSON" in one_line_error(capsys)
    assert_kept(before, compared)
    shutil.copytree(run, compared / "uniform" / "seed-1")  # what --seeds writes: still all moela's
    run_folder.check_run_dir(compared, overwrite=True, resume=False, kind="compare")
    for mine in (compared / "uniform" / "seed-1" / "mine.txt", compared / "uniform" / "report.md",
                 compared / "nested" / run_folder.MARKER):
        mine.parent.mkdir(exist_ok=True)
        if mine.name == run_folder.MARKER:  # a comparison inside the comparison: not one of its runs
            run_folder.mark_owned(mine.parent, "compare")
        else:
            mine.write_text("mine\n")
        named = mine.parent if mine.name == run_folder.MARKER else mine
        with pytest.raises(run_folder.Refused, match=f"it holds {named}, which moela did not write"):
            run_folder.check_run_dir(compared, overwrite=True, resume=False, kind="compare")
        if named.is_dir():
            shutil.rmtree(named)
        else:
            named.unlink()


def test_an_output_file_of_the_users_is_never_replaced(tmp_path, tiny_lm, trained, capsys, no_model_load):
    """``allocate -o``, ``evaluate -o`` and ``plan show --plot`` replace an existing file only with
    ``--overwrite``, write nothing inside a folder moela manages, and refuse a path that cannot be written, before
    the model loads."""
    config, run = str(lm_config(tmp_path, tiny_lm)), trained[1]
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "notes"}\n')
    cases = [(["allocate", config, "-o", str(mine)], f"-o {mine}: the file exists; pass --overwrite to replace it"),
             (["evaluate", str(run), "-o", str(mine)], "the file exists; pass --overwrite"),
             (["plan", "show", str(run), "--plot", str(mine)], f"--plot {mine}: the file exists; pass --overwrite"),
             (["allocate", config, "-o", str(tmp_path)], "is a folder; give a file name"),
             (["allocate", config, "-o", str(mine / "plan.json")], f"{mine} is a file, not a folder"),
             (["evaluate", str(run), "-o", str(run / "metrics.json"), "--overwrite"],
              f"it is inside the moela run folder {run}"),
             (["plan", "show", str(run), "--plot", str(run / "x.png")], "it is inside the moela run folder"),
             (["allocate", config, "-o", str(tmp_path / "data" / "new.json"), "--overwrite"],
              "it is inside the moela data-llm-adapters folder")]
    (tmp_path / "data").mkdir()
    run_folder.mark_owned(tmp_path / "data", "data-llm-adapters")
    for args, message in cases:
        before = snapshot(run)
        assert main(args) == 1
        assert message in one_line_error(capsys)
        assert_kept(before, run)
    assert mine.read_text() == '{"my": "notes"}\n'
    plan = tmp_path / "plan.json"
    assert main(["allocate", config, "--dry-run", "adapter.method=lora", "-o", str(plan)]) == 0
    assert main(["allocate", config, "--dry-run", "adapter.method=lora", "-o", str(plan), "--overwrite"]) == 0


def test_moela_data_writes_only_into_its_own_folder(tmp_path, shared, capsys):
    """`moela data` refuses a folder of the user's, a missing source and a source with none of the tasks, and
    replaces only what it wrote itself."""
    source = str(shared / "data" / "llm-adapters")
    project = user_project(tmp_path / "project")
    before = snapshot(project)
    out = tmp_path / "out"
    for args, message in (
            (["--source", source, "--out", str(project)], "it is not empty and `moela data llm-adapters` did not"),
            (["--source", str(tmp_path / "nowhere"), "--out", str(out)], "no such folder"),
            (["--source", source, "--out", str(out), "--tasks", "nosuchtask"], "holds none of the tasks' files")):
        assert main(["data", "llm-adapters", *args]) == 1
        assert message in one_line_error(capsys)
    assert_kept(before, project)
    assert not out.exists()
    for _ in range(2):  # its own folder is written again
        assert main(["data", "llm-adapters", "--source", source, "--out", str(out), "--tasks", "boolq"]) == 0
    assert run_folder.owner(out) == "data-llm-adapters"
    assert len(json.loads((out / "boolq" / "test.json").read_text())) == 3270
    sample = str(shared / "data" / "scienceqa-sample")
    for folder in (project, out):  # ScienceQA replaces its folder whole: never the user's or the other layout
        assert main(["data", "scienceqa", "--source", sample, "--out", str(folder)]) == 1
        assert "`moela data scienceqa` did not create it" in one_line_error(capsys)
    assert_kept(before, project)
    science = tmp_path / "science"
    for _ in range(2):
        assert main(["data", "scienceqa", "--source", sample, "--out", str(science)]) == 0
    (science / "mine.txt").write_text("mine\n")
    assert main(["data", "scienceqa", "--source", sample, "--out", str(science)]) == 1
    assert f"it holds {science / 'mine.txt'}, which `moela data` did not write" in one_line_error(capsys)


def test_refusals_name_the_file_option_or_key_at_fault(tmp_path, tiny_lm, capsys, no_model_load):
    config = str(lm_config(tmp_path, tiny_lm))
    broken_yaml, model, afile = tmp_path / "bad.yaml", tmp_path / "model", tmp_path / "afile"
    broken_yaml.write_text("a: 1\n  b: [\n")
    shutil.copytree(tiny_lm, model)
    (model / "config.json").write_text("{not json")
    afile.write_text("x")
    cases = [
        (["run", str(broken_yaml)], f"moela: error: {broken_yaml}: line 2, column 4: not valid YAML ("),
        (["run", config, f"model.name_or_path={model}"], f"{model / 'config.json'}: not a model config transformers"),
        (["run", config, f"output_dir={afile / 'sub'}"],
         f"output_dir {afile / 'sub'}: {afile} is a file, not a folder"),
        (["compare", config, "--methods", "lora,uniform", "--seeds", "0,x"], "--seeds '0,x': give integers"),
        (["allocate", config, "--dry-run", "--model-config", str(tmp_path / "nope.json")],
         f"--model-config {tmp_path / 'nope.json'}: cannot read the model's config"),
        (["run", config, "adapter.method=sensitivity", f"adapter.teacher={tmp_path / 'gone'}"],
         f"adapter.teacher {tmp_path / 'gone'}: no such folder (moved or deleted? give its new location, e.g. "
         "adapter.teacher=...)"),
    ]
    weightless = tmp_path / "weightless"
    shutil.copytree(tiny_lm, weightless, ignore=shutil.ignore_patterns("*.safetensors"))
    cases.append((["run", config, f"model.name_or_path={weightless}"],
                  f"{weightless}: no model weights in this folder"))
    for args, message in cases:
        assert main(args) == 1
        assert message in one_line_error(capsys), args
    assert not (tmp_path / "run").exists()


def test_evaluate_checks_the_adapter_files_before_the_model_loads(tmp_path, trained, capsys, no_model_load):
    run = tmp_path / "run"
    shutil.copytree(trained[1], run)
    weights, config = run / "adapter" / "adapter_model.safetensors", run / "adapter" / "adapter_config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "alpha": "x"}))
    assert main(["evaluate", str(run)]) == 1
    assert f"{config}: 'alpha' must be a number, got 'x'" in one_line_error(capsys)
    config.write_text(json.dumps(data))
    weights.write_bytes(weights.read_bytes()[:50])
    assert main(["evaluate", str(run)]) == 1
    assert str(weights) in one_line_error(capsys)


def test_save_pretrained_into_a_folder_of_the_users_writes_only_the_adapter_files(tmp_path, monkeypatch):
    """PEFT users keep a tokenizer beside the adapter: saving there (or into the current folder) replaces the
    adapter's own files and nothing else; a folder of only an adapter's files is replaced whole."""
    from moela import MoelaModel, get_moela_model

    project = user_project(tmp_path / "project")
    before = snapshot(project)
    model = get_moela_model(tiny_model("llama"), AllocationPlan.uniform(tiny_model("llama"), ["q_proj"], experts=2,
                                                                        rank=2))
    for _ in range(2):
        model.save_pretrained(project)
    assert_kept(before, project)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in project.iterdir()}
    assert not [p for p in project.iterdir() if p.name.startswith(".")]  # no temporary left
    again = MoelaModel.from_pretrained(tiny_model("llama"), project)
    for key, value in again.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    monkeypatch.chdir(project)
    model.save_pretrained(".")
    assert_kept(before, project)


def test_overwrite_and_resume_exclude_each_other(tmp_path, tiny_lm, capsys, no_model_load):
    assert main(["train", str(lm_config(tmp_path, tiny_lm)), "--overwrite", "--resume"]) == 1
    assert "--overwrite and --resume exclude each other" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_export_replaces_only_its_own_earlier_export(tmp_path, trained, capsys, monkeypatch):
    pytest.importorskip("peft")
    _, run = trained
    run = Path(shutil.copytree(run, tmp_path / "run"))
    mine = user_project(tmp_path / "mine")
    (tmp_path / "a-file").write_text("mine")
    before = snapshot(tmp_path)
    refused = {
        str(run): "it is the folder being exported",
        str(tmp_path): f"it is a parent of {run}",
        str(run / "adapter"): "it is the folder being exported",  # the adapter folder itself
        str(run / "adapter" / "peft"): "it is inside the adapter folder",
        str(mine): "it is not empty and moela's export did not create it",
        str(tmp_path / "a-file"): "is a file",
    }
    for out, message in refused.items():
        assert main(["export", "--to", "peft", str(run), out]) == 1, out
        assert message in one_line_error(capsys), out
    monkeypatch.chdir(mine)
    assert main(["export", "--to", "peft", str(run), "."]) == 1
    assert "it is the current folder" in one_line_error(capsys)
    assert_kept(before, tmp_path)
    # a new folder is created and marked; exporting there again replaces moela's own export
    assert main(["export", "--to", "peft", str(run), str(tmp_path / "peft")]) == 0
    assert run_folder.owner(tmp_path / "peft") == "export"
    mask = io.umask()
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask for f in (tmp_path / "peft").iterdir())
    first = snapshot(tmp_path / "peft")
    assert main(["export", "--to", "peft", str(run), str(tmp_path / "peft")]) == 0
    assert snapshot(tmp_path / "peft").keys() == first.keys()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".peft")]  # no temporary or old folder left
    assert_kept(before, tmp_path)
    (tmp_path / "peft" / "notes.md").write_text("mine\n")  # a file of the user's in moela's export
    assert main(["export", "--to", "peft", str(run), str(tmp_path / "peft")]) == 1
    assert f"it holds {tmp_path / 'peft' / 'notes.md'}, which the export did not write" in one_line_error(capsys)


# --- paths: a run name is one folder name -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../x", "/tmp/moela-escape", "a/b", "..", "."])
def test_run_name_is_a_single_folder_name(tmp_path, tiny_lm, capsys, monkeypatch, no_model_load, name):
    config = lm_config(tmp_path, tiny_lm)
    work = tmp_path / "deep" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before = sorted(p for p in tmp_path.rglob("*"))
    assert main(["train", str(config), f"name={name}", "output_dir="]) == 1
    assert "config key 'name' must be a single folder name" in one_line_error(capsys)
    assert sorted(p for p in tmp_path.rglob("*")) == before and not Path("/tmp/moela-escape").exists()


# --- consistent runs: --resume refuses any change; one process per folder ----------------------------------------
@pytest.mark.parametrize("overrides, listed", [
    (["train.lr=0.01"], ["train.lr 0.001 -> 0.01"]),
    (["train.seed=3", "train.batch_size=2"], ["train.batch_size 4 -> 2", "train.seed 0 -> 3"]),
    (["adapter.method=uniform", "adapter.options={}"], ['adapter.method "lora" -> "uniform"',
                                                        'adapter.options {"rank": 2} -> {}']),
    (["data.max_train_samples=8"], ["data.max_train_samples null -> 8", "the data"]),
])
def test_resume_refuses_changed_settings_listing_them(tmp_path, trained, capsys, no_model_load, overrides, listed):
    config, run = unfinished_copy(trained, tmp_path)
    before = snapshot(run)
    assert main(["train", str(config), "--resume", *overrides]) == 1
    err = one_line_error(capsys)
    assert f"{run}: cannot resume: the run was started differently: " in err
    assert all(item in err for item in listed), err
    assert_kept(before, run)
    assert not (run / "FAILED").exists()  # a refused request marks nothing


def test_resume_refuses_changed_data_and_another_number_of_processes(tmp_path, tiny_lm, capsys, monkeypatch):
    config = lm_config(tmp_path, tiny_lm, train={"max_steps": 1, "progress": False})
    monkeypatch.setattr(run_folder, "process_count", lambda: 2)  # started under two processes
    run = started_run(config)
    monkeypatch.setattr(run_folder, "process_count", lambda: 1)
    before = snapshot(run)
    assert main(["train", str(config), "--resume"]) == 1
    err = one_line_error(capsys)
    assert "number of processes 2 -> 1" in err and "the data" not in err
    records = json.loads((tmp_path / "train.json").read_text())
    records[0]["output"] += " (edited)"
    (tmp_path / "train.json").write_text(json.dumps(records))
    assert main(["train", str(config), "--resume"]) == 1
    assert "the data (its records or files differ)" in one_line_error(capsys)
    assert_kept(before, run)


def test_resume_with_the_same_settings_continues(tmp_path, tiny_lm):
    config = lm_config(tmp_path, tiny_lm, train={"max_steps": 1, "progress": False})
    run = started_run(config)
    assert main(["train", str(config), "--resume"]) == 0
    assert run_folder.is_finished(run) and json.loads((run / "run.json").read_text())["plan"]


def test_resume_from_the_last_steps_checkpoint_trains_nothing_more(tmp_path, tiny_lm):
    """A run killed after its checkpoint at the last step ends, resumed, with the uninterrupted run's adapter
    (transformers 5 would take one more step)."""
    config = lm_config(tmp_path, tiny_lm, train={"max_steps": 2, "save_steps": 2, "progress": False})
    assert main(["train", str(config)]) == 0
    run = tmp_path / "run"
    finished = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    (run / run_folder.FINISHED).unlink()
    shutil.rmtree(run / "adapter")
    assert main(["train", str(config), "--resume"]) == 0
    assert json.loads((run / "train_log.json").read_text())["global_step"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2"]
    resumed = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(resumed[key], value) for key, value in finished.items())


def test_compare_resume_refuses_a_changed_budget_methods_or_seeds(tmp_path, tiny_lm, capsys, no_model_load):
    config = lm_config(tmp_path, tiny_lm)
    settings = load_settings(config, ["adapter.method=[lora, uniform]", "adapter.budget=uniform:E=4,r=4"])
    out = Path(settings.output_dir)
    run_folder.claim(out, kind="compare", settings=settings)  # an interrupted comparison at budget E=4, r=4
    try:
        run_folder.start_compare(out, settings, [settings.train.seed])
    finally:
        run_folder.release(out)
    before = snapshot(out)
    assert main(["compare", str(config), "--methods", "lora,uniform", "adapter.budget=uniform:E=2,r=2", "--resume"]) == 1
    err = one_line_error(capsys)
    assert "cannot resume: the comparison was started differently: adapter.budget" in err
    assert '"uniform:E=4,r=4" -> "uniform:E=2,r=2"' in err
    assert main(["compare", str(config), "--methods", "lora,hilo", "adapter.budget=uniform:E=4,r=4", "--resume"]) == 1
    assert 'adapter.method ["lora", "uniform"] -> ["lora", "hilo"]' in one_line_error(capsys)
    assert main(["compare", str(config), "--methods", "lora,uniform", "adapter.budget=uniform:E=4,r=4", "--seeds",
                 "0,1", "--resume"]) == 1
    assert "seeds null -> [0, 1]" in one_line_error(capsys)
    assert_kept(before, out)


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_process_is_kept_out_of_a_run_folder(tmp_path, trained, capsys, no_model_load):
    config, run = unfinished_copy(trained, tmp_path)
    before = snapshot(run)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run / run_folder.LOCK)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for flags in (["--resume"], ["--overwrite"]):
            assert main(["train", str(config), *flags]) == 1
            assert f"{run} is in use by another moela process" in one_line_error(capsys)
    finally:
        holder.kill()
        holder.wait()
    assert_kept(before, run)


def test_overwrite_of_a_comparison_is_refused_while_one_of_its_runs_is_in_use(tmp_path, trained, capsys,
                                                                              no_model_load):
    config, run = trained
    compared = tmp_path / "compared"
    compared.mkdir()
    run_folder.mark_owned(compared, "compare")
    shutil.copytree(run, compared / "lora" / "seed-1")
    before = snapshot(compared)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(compared / "lora" / "seed-1" / run_folder.LOCK)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["compare", str(config), "--methods", "lora,uniform", f"output_dir={compared}", "--overwrite"]) == 1
        assert f"its run {compared / 'lora' / 'seed-1'} is in use by another moela process" in one_line_error(capsys)
    finally:
        holder.kill()
        holder.wait()
    assert_kept(before, compared)


# --- validation before work: one line naming key, value and what is allowed; no model loaded, no folder made -----
@pytest.mark.parametrize("overrides, message", [
    (["train.epochs=0"], "config key 'train.epochs' must be > 0, got 0"),
    (["train.lr=.nan"], "config key 'train.lr' must be a finite number, got nan"),
    (["train.lr=0"], "config key 'train.lr' must be > 0, got 0"),
    (["train.batch_size=0"], "config key 'train.batch_size' must be >= 1, got 0"),
    (["train.seed=-1"], "config key 'train.seed' must be >= 0, got -1"),
    (["train.seed=4294967296"], "config key 'train.seed' must be <= 4294967295"),
    (["train.warmup_ratio=2"], "config key 'train.warmup_ratio' must be <= 1"),
    (["train.grad_accum=-2"], "config key 'train.grad_accum' must be >= 1"),
    (["train.scheduler=cosine_with_min_lr"], "config key 'train.scheduler' must be one of linear, cosine"),
    (["data.cutoff_len=0"], "config key 'data.cutoff_len' must be >= 1"),
    (["data.val_size=-0.5"], "config key 'data.val_size' must be >= 0"),
    (["data.val_size=1.5"], "config key 'data.val_size' must be a fraction below 1 or a whole count"),
    (["adapter.dropout=1"], "config key 'adapter.dropout' must be < 1"),
    (["adapter.alpha=-1"], "config key 'adapter.alpha' must be > 0"),
    (["eval.num_beams=0"], "config key 'eval.num_beams' must be >= 1"),
    (["eval.batch_size=.inf"], "config key 'eval.batch_size' must be a finite number"),
    (["model.num_labels=1"], "config key 'model.num_labels' must be >= 2"),
    (["model.num_labels=1000000000000"], "config key 'model.num_labels' must be <= 100000"),
    (["eval.protocol=classification"], "config key 'eval.protocol': classification does not apply to a causal_lm model"),
    (["eval.protocol=lm_eval"], "config key 'eval.lm_eval_tasks' must name the harness tasks"),
    (["adapter.targets=[no_such_module]"], "targets ['no_such_module'] match no linear module"),
    (["adapter.targets=(unclosed"], "config key 'adapter.targets': '(unclosed' is not all-linear"),
    (["adapter.budget=100"], "budget 100 is below the minimum of 928 parameters for lora"),
    (["adapter.budget=[1]"], "config key 'adapter.budget' must be a positive parameter count"),
    (["adapter.budget=uniform:E=x"], "cannot read 'E=x'"),
    (["adapter.method=[]"], "config key 'adapter.method' names no allocator"),
    (["adapter.method=[lora, lora]"], "config key 'adapter.method' names a method twice"),
    (["adapter.method=nope"], "unknown allocation method 'nope'"),
    (["adapter.modules_to_save=[nothing]"], "config key 'adapter.modules_to_save': LlamaForCausalLM has no module 'nothing'"),
    (["adapter.options={lora: {rank: 0}}"], "adapter.options: lora option rank=0 must be an integer >= 1 and <= 4096"),
    (["adapter.options={lora: {rank: 2.5}}"], "lora option rank=2.5 must be an integer"),
    (["adapter.method=uniform", "adapter.options={uniform: {experts: 1000000000}}"],
     "uniform option experts=1000000000 must be an integer >= 1 and <= 256"),
    (["adapter.method=uniform", "adapter.options={uniform: {top_k: x}}"], "uniform option top_k='x' must be an integer"),
    (["adapter.method=uniform", "adapter.options={uniform: {experts: 2, top_k: 3}}"],
     "uniform: top_k=3 is larger than the number of experts (2)"),
    (["adapter.method=uniform", "adapter.options={uniform: {top_p: 2}}"], "uniform option top_p=2 must be a number > 0 and <= 1"),
    (["adapter.method=hilo", "adapter.options={hilo: {experts: abc}}"], "hilo option experts='abc' must be digits like '2468'"),
    (["adapter.method=mola", "adapter.options={mola: {pattern: [2, 0]}}"], "mola option pattern=[2, 0] must be digits"),
    (["adapter.method=sensitivity", "adapter.options={sensitivity: {mode: sometimes}}"],
     "sensitivity option mode='sometimes' must be one of auto, vote, proportional"),
    (["adapter.method=guilomo", "adapter.options={guilomo: {lr: -1}}"], "guilomo option lr=-1 must be a number > 0"),
    (["adapter.method=guilomo", "adapter.options={guilomo: {second_order: maybe}}"],
     "guilomo option second_order='maybe' must be true or false"),
    (["adapter.method=alphalora", "adapter.options={alphalora: {beta: .nan}}"], "alphalora option beta=nan must be a number"),
    (["adapter.options={bogus: 1}"], "adapter.options: unknown option 'bogus'"),
    (["data.train=[{path: 3}]"], "config key 'data.train': source {'path': 3} needs a 'path'"),
    (["data.train=[{path: x.json, colour: red}]"], "config key 'data.train': unknown source field(s) ['colour']"),
    (["data.train=no_such_file.json"], "config key 'data.train': no_such_file.json: no such data file"),
    ([f"data.train={ROOT / 'pyproject.toml'}"], "pyproject.toml: unknown data format '.toml'; use .json, .jsonl"),
    (["train.report_to=[tensorbored]"], "train.report_to: unknown tracker 'tensorbored'; transformers knows"),
    (["data.eval=[{path: x.json, limit: 0}]"], "source field 'limit' must be an integer >= 1"),
    (["model.name_or_path=/no/such/model"], "model.name_or_path='/no/such/model': cannot read the model's config"),
])
def test_bad_settings_are_refused_before_any_work(tmp_path, tiny_lm, capsys, no_model_load, overrides, message):
    config = lm_config(tmp_path, tiny_lm, adapter={"method": "lora", "options": {}})
    assert main(["run", str(config), *overrides]) == 1
    assert message in one_line_error(capsys)
    assert not (tmp_path / "run").exists()  # refused before the run folder was even made


def test_a_tracker_that_is_not_installed_is_refused_before_any_work(tmp_path, tiny_lm, capsys, no_model_load,
                                                                      monkeypatch):
    from transformers.integrations import integration_utils

    monkeypatch.setattr(integration_utils, "get_available_reporting_integrations", lambda: ["tensorboard"])
    config = lm_config(tmp_path, tiny_lm, adapter={"method": "lora", "options": {}})
    assert main(["run", str(config), "train.report_to=[tensorboard, wandb]"]) == 1
    assert "train.report_to: 'wandb' is not installed here (pip install wandb)" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()
    assert main(["allocate", str(config), "--dry-run", "train.report_to=[wandb]"]) == 0  # planning trains nothing


def numeric_keys() -> list[str]:
    import dataclasses
    import typing

    from moela.settings import SECTIONS

    out = []
    for name, section in SECTIONS.items():
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            args = typing.get_args(hints[f.name]) or (hints[f.name],)
            if (int in args or float in args) and bool not in args:
                out.append(f"{name}.{f.name}")
    return out


ZERO_ALLOWED = {"train.max_steps", "train.weight_decay", "train.warmup_ratio", "train.balance_coef",
                "train.save_steps", "train.seed", "data.val_size", "adapter.dropout"}
NEGATIVE_ALLOWED = {"train.max_steps"}  # -1: train for train.epochs


@pytest.mark.parametrize("key", numeric_keys())
def test_every_numeric_setting_refuses_nan_infinity_and_meaningless_values(tmp_path, tiny_lm, capsys,
                                                                         no_model_load, key):
    config = lm_config(tmp_path, tiny_lm)
    bad = [".nan", ".inf", "-.inf"] + ([] if key in NEGATIVE_ALLOWED else ["-1"]) + \
        ([] if key in ZERO_ALLOWED else ["0"])
    for value in bad:
        assert main(["run", str(config), f"{key}={value}"]) == 1, (key, value)
        assert f"config key {key!r} must be" in one_line_error(capsys), (key, value)
    assert not (tmp_path / "run").exists()


def test_epochs_zero_in_a_settings_file_names_the_file(tmp_path, tiny_lm, capsys, no_model_load):
    config = lm_config(tmp_path, tiny_lm, train={"epochs": 0})
    assert main(["run", str(config)]) == 1
    assert one_line_error(capsys) == f"moela: error: {config}: config key 'train.epochs' must be > 0, got 0"


def test_absurd_label_is_refused_naming_the_record_before_the_model(tmp_path, tiny_bert, capsys, no_model_load):
    train, dev = classification_files(tmp_path, 8, 4)
    train.write_text(train.read_text() + "\nc a huge label\t1000000000000")
    config = tmp_path / "cls.yaml"
    config.write_text(f"model: {{name_or_path: {tiny_bert}, task: sequence_classification}}\n"
                      f"data: {{train: {train}, eval: {dev}}}\nadapter: {{method: lora}}\n")
    assert main(["train", str(config), f"output_dir={tmp_path / 'run'}"]) == 1
    assert (f"{train}: line 9: label 'label' is 1000000000000, beyond the largest supported label 99999"
            in one_line_error(capsys))


def test_a_cutoff_that_leaves_nothing_to_learn_is_refused_before_the_model(tmp_path, tiny_lm, capsys, no_model_load):
    assert main(["train", str(lm_config(tmp_path, tiny_lm)), "data.cutoff_len=8"]) == 1
    assert "data.cutoff_len=8 leaves no response token to learn in any training record" in one_line_error(capsys)


def nan_adapter_run(tmp_path: Path, tiny_lm: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(load_settings(lm_config(tmp_path, tiny_lm)).to_dict()))
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm)
    save_adapter(inject(model, AllocationPlan.uniform(model, ["q_proj"], experts=1, rank=2)), run / "adapter")
    return run


def test_an_adapter_with_non_finite_weights_is_refused_naming_the_tensor(tmp_path, tiny_lm, capsys):
    run = nan_adapter_run(tmp_path, tiny_lm)
    weights = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = "model.layers.1.self_attn.q_proj.experts.0.lora_B"
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(weights))
    assert main(["evaluate", str(run)]) == 1
    assert one_line_error(capsys) == (f"moela: error: {weights}: tensor {key!r} holds non-finite values (NaN or "
                                      "infinity); refusing a corrupt adapter")


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_an_unreadable_safetensors_file_is_named(tmp_path, tiny_lm, capsys, damage):
    run = nan_adapter_run(tmp_path, tiny_lm)
    weights = run / "adapter" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": os.urandom(64)}[damage])
    assert main(["evaluate", str(run)]) == 1
    assert f"moela: error: {weights}: not a readable safetensors file" in one_line_error(capsys)


# --- every file error names the file (and line or record) -------------------------------------------------------
GOOD = json.dumps(instruction_records(1)[0])


@pytest.mark.parametrize("name, content, message", [
    ("bad.json", b'[{"instruction": "q",\n "output": "caf\xe9"}]', "bad.json: line 2: not UTF-8 text (invalid continuation byte"),
    ("bad.jsonl", (GOOD + "\n" + GOOD + "\n").encode() + b'{"instruction": "\xff"}\n', "bad.jsonl: line 3: not UTF-8 text"),
    ("bad.tsv", b"fine\t0\nbad \xc3\x28\t1\n", "bad.tsv: line 2: not UTF-8 text"),
    ("deep.json", b"[" * 200_000 + b"]" * 200_000, "deep.json: JSON nested too deeply to read"),
    ("deep.jsonl", b"[" * 200_000 + b"]" * 200_000 + b"\n", "deep.jsonl: line 1: JSON nested too deeply to read"),
    ("surrogate.json", b'[{"instruction": "ab\\ud800", "output": "x"}]',
     "surrogate.json: record 0: field 'instruction' is not valid Unicode text (a lone surrogate '\\ud800' at character 2)"),
    ("huge.json", b'[{"instruction": "q", "output": "a", "n": ' + b"1" * 5000 + b"}]", "huge.json: cannot read the JSON"),
    ("empty.json", b"", "empty.json: line 1: not valid JSON"),
])
def test_unreadable_data_files_are_named(tmp_path, tiny_lm, capsys, no_model_load, name, content, message):
    (tmp_path / name).write_bytes(content)
    assert main(["train", str(lm_config(tmp_path, tiny_lm)), f"data.train={tmp_path / name}"]) == 1
    assert f"moela: error: {tmp_path / name}" in (err := one_line_error(capsys)) and message in err


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe{}", "line 1: not UTF-8 text"),
    (b"[" * 200_000, "nested too deeply"),
])
def test_unreadable_plan_and_config_files_are_named(tmp_path, tiny_lm, capsys, no_model_load, content, message):
    plan = tmp_path / "plan.json"
    plan.write_bytes(content)
    assert main(["train", str(lm_config(tmp_path, tiny_lm)), f"adapter.plan={plan}"]) == 1
    assert f"moela: error: {plan}: " in (err := one_line_error(capsys)) and message in err
    config = tmp_path / "c.yaml"
    config.write_bytes(content if content[:1] == b"\xff" else b"a: " + b"[" * 5000 + b"]" * 5000)
    assert main(["train", str(config)]) == 1
    assert f"moela: error: {config}: " in one_line_error(capsys)


# --- faults ----------------------------------------------------------------------------------------------------
def test_the_original_error_survives_a_full_disk_when_marking_failed(tmp_path, tiny_lm, capsys, monkeypatch):
    real = run_folder.atomic_write_text

    def full_disk(path, text):
        if Path(path).name == run_folder.FAILED:
            raise OSError(28, "No space left on device")
        return real(path, text)

    monkeypatch.setattr(run_folder, "atomic_write_text", full_disk)
    (tmp_path / "bad.json").write_text("[1, 2")
    assert main(["train", str(lm_config(tmp_path, tiny_lm)), f"data.train={tmp_path / 'bad.json'}"]) == 1
    assert one_line_error(capsys) == f"moela: error: {tmp_path / 'bad.json'}: line 1: not valid JSON (Expecting ',' delimiter)"


KILL_BETWEEN_RENAMES = """
import os, signal, sys
from moela import io
io.EXCHANGE = False  # the two-rename fallback, killed between its renames
real, calls = os.rename, []
def rename(a, b):
    calls.append((a, b))
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    real(a, b)
os.rename = rename
io.replace_dir(sys.argv[1], sys.argv[2])
"""


def test_a_crash_between_the_renames_of_a_replacement_is_recovered(tmp_path, trained, capsys):
    config, run = unfinished_copy(trained, tmp_path)
    adapter = snapshot(run / "adapter")
    new = run / ".adapter.k1ll3d00.tmp"
    shutil.copytree(run / "adapter", new)
    (new / "adapter_config.json").write_text("{}")
    stale_file = run / ".config.yaml.abcd1234.tmp"
    stale_file.write_text("half")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(new), str(run / "adapter")], env=env)
    assert killed.returncode == -signal.SIGKILL
    assert not (run / "adapter").exists() and (run / ".adapter.old").is_dir()  # neither name, until recovered
    # the next start (here a resume, refused for another reason) restores the folder and removes the leftovers
    assert main(["train", str(config), "--resume", "train.lr=0.5"]) == 1
    assert "cannot resume" in one_line_error(capsys)
    assert snapshot(run / "adapter") == adapter
    assert not new.exists() and not stale_file.exists() and not (run / ".adapter.old").exists()


def test_a_reader_recovers_the_adapter_left_as_old(tmp_path, trained, capsys):
    _, run = trained
    run = Path(shutil.copytree(run, tmp_path / "run"))
    adapter = snapshot(run / "adapter")
    os.rename(run / "adapter", run / ".adapter.old")  # what a crash between the two renames leaves
    assert main(["evaluate", str(run), "eval.max_new_tokens=1", "data.max_eval_samples=2"]) == 0
    assert snapshot(run / "adapter") == adapter


def test_replace_dir_exchanges_atomically_where_it_can(tmp_path, monkeypatch):
    dest, src = tmp_path / "adapter", tmp_path / ".adapter.abcdefgh.tmp"
    dest.mkdir()
    (dest / "w").write_text("old")
    src.mkdir()
    (src / "w").write_text("new")
    renames = []
    monkeypatch.setattr(os, "rename", lambda *a: renames.append(a))  # the exchange is one system call, no rename
    io.replace_dir(src, dest)
    assert (dest / "w").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert renames == []


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_written_files_and_folders_follow_the_umask(tmp_path, tiny_lm, mask):
    old = os.umask(mask)
    try:
        plan = tmp_path / "plan.json"
        assert main(["allocate", str(lm_config(tmp_path, tiny_lm)), "--dry-run", "adapter.method=lora",
                     "-o", str(plan)]) == 0
        with io.atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "f").write_text("x")
        figure = report.plot_plan(AllocationPlan.load(plan), tmp_path / "plan.png")
        vector = report.plot_plan(AllocationPlan.load(plan), tmp_path / "plan.pdf")
        model = tiny_model("llama")
        save_adapter(inject(model, AllocationPlan.uniform(model, ["q_proj"], experts=1, rank=2)), tmp_path / "a")
    finally:
        os.umask(old)
    for file in (plan, figure, *(tmp_path / "a").iterdir()):  # PNGs and safetensors are written 0600 by default
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~mask, file.name
    assert figure.read_bytes()[:4] == b"\x89PNG" and vector.read_bytes()[:4] == b"%PDF"  # the suffix's format
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o777 & ~mask


# --- resources ---------------------------------------------------------------------------------------------------
def test_a_huge_record_is_cut_before_tokenisation(tmp_path, tiny_lm, monkeypatch):
    records = instruction_records(12)
    records[3]["instruction"] = "word " * 1_000_000  # 5 MB in one record
    (tmp_path / "big.json").write_text(json.dumps(records))
    longest = []
    real = pipeline.tokenize

    def tokenize(records, *args, **kwargs):
        longest.append(max((len(v) for r in records for v in r.values() if isinstance(v, str)), default=0))
        return real(records, *args, **kwargs)

    monkeypatch.setattr(pipeline, "tokenize", tokenize)
    config = lm_config(tmp_path, tiny_lm, train={"max_steps": 1, "progress": False})
    assert main(["train", str(config), f"data.train={tmp_path / 'big.json'}"]) == 0
    assert max(longest) <= text_bound(64) < 5_000


# --- property: any settings, overrides and options end in success or one moela error -----------------------------
def bad_or_small(valid, invalid):
    return st.sampled_from(valid) | st.sampled_from(invalid)


NUMBERS = [0, -1, 1.5, ".nan", ".inf", "-.inf", "x", "true", "[1]", "{a: 1}", "", "1e400", 10**30]
OPTION_VALUES = st.sampled_from([0, 1, 2, -3, 2.5, "2468", "abc", None, True, [2, 4], [0], 10**9, ".nan", "vote"])
OVERRIDES = {
    "train.epochs": bad_or_small([1], NUMBERS), "train.max_steps": bad_or_small([1, 2], NUMBERS),
    "train.lr": bad_or_small([0.001, "1e-3"], NUMBERS), "train.batch_size": bad_or_small([2, 4, 10**12], NUMBERS),
    "train.seed": bad_or_small([0, 7, 4294967295], NUMBERS + [4294967296]),
    "train.scheduler": st.sampled_from(["cosine", "constant", "nope", "reduce_lr_on_plateau", 3]),
    "train.warmup_ratio": bad_or_small([0, 0.5], NUMBERS), "train.grad_accum": bad_or_small([1, 2], NUMBERS),
    "data.cutoff_len": bad_or_small([48, 64, 10**9], NUMBERS + [4]), "data.val_size": bad_or_small([0, 0.2, 3], NUMBERS),
    "data.max_train_samples": bad_or_small([8, None], NUMBERS),
    "data.train": st.sampled_from(["missing.json", "[{path: 3}]", "{path: train.json, extra: 1}", "mine/notes.txt",
                                   "bad.jsonl", "deep.json", "[]", "mine"]),
    "adapter.method": st.sampled_from(["lora", "uniform", "hilo", "mola", "[lora, uniform]", "[]", "nope", "[[a]]",
                                       "{a: 1}", "sensitivity"]),
    "adapter.budget": st.sampled_from(["100", "uniform:E=2,r=2", "uniform:E=0", "-5", "[1]", "abc", "5000", "1.5"]),
    "adapter.targets": st.sampled_from(["all-linear", "[q_proj]", "[nope]", "(", "''", "3", "[]"]),
    "adapter.dropout": bad_or_small([0.0, 0.1], NUMBERS), "adapter.alpha": bad_or_small([8], NUMBERS),
    "adapter.modules_to_save": st.sampled_from(["[lm_head]", "[nothing]", "[3]", "x"]),
    "eval.protocol": st.sampled_from(["auto", "loglik", "classification", "lm_eval", "nope"]),
    "eval.num_beams": bad_or_small([1], NUMBERS), "model.num_labels": bad_or_small([2, None], NUMBERS),
    "name": st.sampled_from(["ok", "../../escape", "/abs", "a/b", "..", "", "x y"]),
    "output_dir": st.sampled_from(["run", "mine", ".", "..", "marked", "mine/notes.txt", ""]),
}
option_maps = st.dictionaries(st.sampled_from(["experts", "rank", "top_k", "pattern", "top_p", "mode", "bogus",
                                               "num_null", "ranks"]), OPTION_VALUES, max_size=3)
options = option_maps | st.dictionaries(st.sampled_from(["lora", "uniform", "hilo", "mola"]), option_maps, max_size=2)


def yaml_value(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


class ValidationPassed(Exception):
    """Stands in for loading the model: the generated settings passed every check."""


def sandbox(root: Path, tiny_lm: Path, in_file, opts) -> tuple[Path, dict[str, bytes]]:
    """A settings file (with ``in_file`` keys and allocator options ``opts``), a user's folder, bad data files and
    a finished moela run (``marked``) in ``root``; returns the settings file and the user's files."""
    config = lm_config(root, tiny_lm, train={"max_steps": 1, "progress": False}, eval={"max_new_tokens": 1},
                       adapter={"method": "lora", "options": {}}, output_dir="run")
    data = yaml.safe_load(config.read_text())
    for key, value in in_file:  # some keys written in the settings file itself
        section, _, sub = key.partition(".")
        parsed = yaml.safe_load(yaml_value(value))
        if sub:
            data.setdefault(section, {})[sub] = parsed
        else:
            data[section] = parsed
    if opts is not None:
        data["adapter"]["options"] = opts
    config.write_text(yaml.safe_dump(data))
    user_project(root / "mine")
    (root / "bad.jsonl").write_bytes(b'{"instruction": "\xff"}\n')
    (root / "deep.json").write_text("[" * 100_000)
    (root / "marked").mkdir()
    run_folder.mark_owned(root / "marked", "run")  # a finished moela run: --overwrite may delete it
    (root / "marked" / "FINISHED").write_text("{}")
    user = {**{f"mine/{k}": v for k, v in snapshot(root / "mine").items()},
            "train.json": (root / "train.json").read_bytes(), "config.yaml": config.read_bytes()}
    return config, user


def run_cli(capsys, args: list[str]) -> tuple[int, str, list[BaseException]]:
    """(exit status, stderr, the exception the command raised) of ``moela ARGS``."""
    raised: list[BaseException] = []
    real = cli.cmd_train

    def recording(ns):
        try:
            real(ns)
        except Exception as err:
            raised.append(err)
            raise

    capsys.readouterr()
    with mock.patch.object(cli, "cmd_train", recording):
        code = main(args)
    return code, capsys.readouterr().err, raised


GENERATED = dict(
    overrides=st.lists(st.sampled_from(sorted(OVERRIDES)).flatmap(
        lambda key: OVERRIDES[key].map(lambda value: f"{key}={yaml_value(value)}")), max_size=3),
    in_file=st.lists(st.sampled_from(sorted(OVERRIDES)).flatmap(
        lambda key: OVERRIDES[key].map(lambda value: (key, value))), max_size=2),
    opts=st.none() | options, flags=st.sampled_from([[], ["--overwrite"], ["--resume"], ["--overwrite", "--resume"]]))


@hsettings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(**GENERATED)
def test_any_settings_end_in_success_or_one_moela_error(tiny_lm, capsys, overrides, in_file, opts, flags):
    """Generated settings files, overrides, allocator options and flags against a folder holding a user's files:
    each either passes every check (the model load is stubbed here; real runs below) or ends in one line
    ``moela: error:`` from a ValueError or OSError (no traceback, no TypeError from deep inside), and no file of
    the user's is deleted or changed."""
    def stop(*args, **kwargs):
        raise ValidationPassed("passed")

    with tempfile.TemporaryDirectory() as folder, contextlib.chdir(folder), \
            mock.patch.object(pipeline, "load_base", stop):
        root = Path(folder)
        config, user = sandbox(root, tiny_lm, in_file, opts)
        code, err, raised = run_cli(capsys, ["train", str(config), *overrides, *flags])
        assert not run_folder._HELD  # every lock released
        assert code == 1, err
        err = err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("moela: error: "), err
        assert raised and (isinstance(raised[0], ValidationPassed) or isinstance(raised[0], (ValueError, OSError))
                           and not isinstance(raised[0], UnicodeError)), f"{type(raised[0]).__name__}: {raised[0]}"
        for name, content in user.items():  # nothing of the user's deleted or changed
            assert (root / name).is_file() and (root / name).read_bytes() == content, name


VALID = {
    "train.lr": st.sampled_from([1e-3, "5e-3"]), "train.batch_size": st.sampled_from([1, 4, 10**12]),
    "train.seed": st.sampled_from([0, 4294967295]), "train.scheduler": st.sampled_from(["cosine", "constant"]),
    "data.cutoff_len": st.sampled_from([64, 10**9]), "data.max_train_samples": st.sampled_from([2, 8]),
    "adapter.method": st.sampled_from(["lora", "uniform", "hilo", "mola"]),
    # budgets every method above can meet on the tiny model (mola's rank-8 experts need ≥ 7,424 parameters there)
    "adapter.budget": st.sampled_from([None, "uniform:E=2,r=8", 8000]), "adapter.dropout": st.sampled_from([0.0, 0.3]),
    "output_dir": st.sampled_from(["run", "marked", "fresh/deeper"]), "name": st.sampled_from(["x y", "n"]),
}


@hsettings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(overrides=st.lists(st.sampled_from(sorted(VALID)).flatmap(
    lambda key: VALID[key].map(lambda value: f"{key}={yaml_value(value)}")), min_size=2, max_size=4))
def test_valid_generated_settings_train_to_the_end(tiny_lm, capsys, overrides):
    """Settings drawn from valid values only run to the end for real (training, adapter, FINISHED)."""
    with tempfile.TemporaryDirectory() as folder, contextlib.chdir(folder):
        root = Path(folder)
        config, user = sandbox(root, tiny_lm, [], None)
        code, err, raised = run_cli(capsys, ["train", str(config), *overrides, "--overwrite"])
        assert code == 0, err
        run = Path(load_settings(config, overrides).output_dir)
        assert run_folder.is_finished(run) and (run / "adapter" / "adapter_model.safetensors").is_file()
        for name, content in user.items():
            assert (root / name).read_bytes() == content, name


def test_checks_demand_only_what_the_command_reads(tmp_path, tiny_lm, capsys):
    """A dry-run plan reads no data: its data files need not exist (a 7B config on a laptop without the data)."""
    config = lm_config(tmp_path, tiny_lm)
    assert main(["allocate", str(config), "--dry-run", f"data.train={tmp_path / 'absent.json'}"]) == 0
    assert main(["train", str(config), f"data.train={tmp_path / 'absent.json'}"]) == 1
    assert f"{tmp_path / 'absent.json'}: no such data file" in one_line_error(capsys)

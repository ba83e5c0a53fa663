"""Data readers, their error messages, prompts, tokenisation and batching."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from moela import demo
from moela.data import (Collator, first_per_task, format_prompt, load_records, make_loader, split_validation, task_ids,
                        tokenize)
from tests.helpers import byte_tokenizer

GOOD = {"instruction": "is it true?\n\nAnswer format: true/false", "input": "", "output": "the correct answer is true",
        "answer": "true"}


def write(path, text):
    path.write_text(text)
    return path


def test_llm_adapters_json_and_jsonl(tmp_path):
    (tmp_path / "boolq").mkdir()
    source = write(tmp_path / "boolq" / "train.json", json.dumps([GOOD, {**GOOD, "answer": "false", "output": ""}]))
    records = load_records(source, "instruction")
    assert [r["task"] for r in records] == ["boolq", "boolq"]  # generic file names take the folder's name
    assert records[0]["options"] == ["true", "false"]
    assert records[1]["output"] == "false"  # the answer is the target when output is empty
    lines = write(tmp_path / "mix.jsonl", json.dumps({**GOOD, "kind": "a"}) + "\n\n" + json.dumps({**GOOD, "kind": "b"}))
    records = load_records(lines, "instruction", task_column="kind")
    assert [r["task"] for r in records] == ["a", "b"]


ARC = {"instruction": "Please choose the correct answer to the question: Which is a gas?\n\nAnswer1: ice Answer2: steam "
              "Answer3: rock\n\nAnswer format: answer1/answer2/answer3", "input": "", "output": "", "answer": "answer2"}
WINO = {"instruction": "Please choose the correct answer to fill in the blank: Ann beat Bo so _ won.\n\n"
               "Option1: Ann Option2: Bo Answer format: option1/option2", "input": "", "output": "", "answer": "option1"}


def test_llm_adapters_records_read_as_encoder_records(tmp_path):
    source = write(tmp_path / "mc.json", json.dumps([ARC, WINO]))
    arc, wino = load_records(source, "multiple_choice")
    assert arc == {"text": "Which is a gas?", "choices": ["ice", "steam", "rock"], "label": 1, "task": "mc"}
    assert wino["text"] == "Ann beat Bo so _ won." and wino["choices"] == ["Ann", "Bo"] and wino["label"] == 0
    boolq = load_records(write(tmp_path / "b.json", json.dumps([GOOD, {**GOOD, "answer": "false"}])), "classification")
    assert [(r["text"], r["label"]) for r in boolq] == [("is it true?", 0), ("is it true?", 1)]


@pytest.mark.parametrize("row, kind, message", [
    ({**ARC, "answer": "answer7"}, "multiple_choice", "record 0: answer 'answer7' is not one of"),
    ({**ARC, "instruction": ARC["instruction"].replace("Answer3: rock", "")}, "multiple_choice",
     "record 0: found 2 choices"),
    ({**GOOD, "answer": "maybe"}, "classification", "record 0: answer 'maybe'"),
])
def test_bad_llm_adapters_encoder_records(tmp_path, row, kind, message):
    with pytest.raises(ValueError, match=message):
        load_records(write(tmp_path / "bad.json", json.dumps([row])), kind)


def test_tsv_and_save_to_disk(tmp_path):
    records = load_records(write(tmp_path / "sst.tsv", "it 's good\t1\nbad\t0"), "classification")
    assert [(r["text"], r["label"], r["task"]) for r in records] == [("it 's good", 1, "sst"), ("bad", 0, "sst")]
    folder = tmp_path / "disk"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD] * 3),
                          "test": datasets.Dataset.from_list([GOOD])}).save_to_disk(str(folder))
    assert len(load_records(folder, "instruction", split="train")) == 3
    with pytest.raises(ValueError, match="name one with 'split'"):
        load_records(folder, "instruction", split="nope")


BAD_CASES = [
    ("a.json", "[1, 2", r"a\.json: line 1: not valid JSON"),
    ("a.json", '{"x": 1}', r"a\.json: expected a JSON list"),
    ("a.json", json.dumps([GOOD, "text"]), r"a\.json: record 1: expected an object"),
    ("a.json", json.dumps([GOOD, {"input": "", "output": "x"}]), r"a\.json: record 1: field 'instruction' is missing"),
    ("a.json", json.dumps([{**GOOD, "instruction": 3}]), r"a\.json: record 0: field 'instruction' must be a string"),
    ("a.json", json.dumps([{**GOOD, "instruction": " "}]), r"record 0: field 'instruction' is empty"),
    ("a.json", json.dumps([{**GOOD, "output": "", "answer": None}]), r"record 0: the record has neither 'output'"),
    ("a.json", json.dumps([{**GOOD, "output": 5}]), r"record 0: field 'output' must be a string"),
    ("a.jsonl", json.dumps(GOOD) + "\n{oops\n", r"a\.jsonl: line 2: not valid JSON"),
    ("a.jsonl", json.dumps(GOOD) + "\n[1]\n", r"a\.jsonl: line 2: expected an object"),
]


@pytest.mark.parametrize("name, text, message", BAD_CASES)
def test_bad_instruction_records_name_file_and_record(tmp_path, name, text, message):
    with pytest.raises(ValueError, match=message):
        load_records(write(tmp_path / name, text), "instruction")


@pytest.mark.parametrize("text, message", [
    ("good\t1\nno label here\n", r"s\.tsv: line 2: expected 'sentence<TAB>label' \(2 fields\), got 1"),
    ("good\t1\ntoo\tmany\t1\n", r"s\.tsv: line 2: expected .* got 3"),
    ("good\t1\n\nbad\tpositive\n", r"s\.tsv: line 3: label 'label' must be an integer >= 0, got 'positive'"),
    ("good\t-1\n", r"s\.tsv: line 1: label 'label' must be an integer >= 0"),
    ("\t1\n", r"s\.tsv: line 1: field 'sentence' is empty"),
])
def test_bad_tsv_records_name_file_and_line(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_records(write(tmp_path / "s.tsv", text), "classification")


@pytest.mark.parametrize("row, message", [
    ({"question": "q", "choices": ["a"], "answer": "A"}, "field 'choices' must be a list of at least two strings"),
    ({"question": "q", "choices": ["a", 3], "answer": "A"}, "field 'choices' must be a list"),
    ({"question": "q", "choices": ["a", "b"], "answer": "C"}, "must name one of the 2 choices .* got 'C'"),
    ({"question": "q", "choices": ["a", "b"]}, "must name one of the 2 choices .* got None"),
    ({"choices": ["a", "b"], "answer": 0}, "field 'question' is missing"),
])
def test_bad_multiple_choice_records(tmp_path, row, message):
    path = write(tmp_path / "mc.jsonl", json.dumps({"question": "q", "choices": ["a", "b"], "answer": 1}) + "\n"
                 + json.dumps(row))
    with pytest.raises(ValueError, match=rf"mc\.jsonl: line 2: .*{message}"):
        load_records(path, "multiple_choice", text_column="question", label_column="answer")


def test_multiple_choice_records_and_features(tmp_path):
    path = write(tmp_path / "mc.jsonl", json.dumps({"hint": "ctx", "question": "q?", "choices": ["a", "b", "c"],
                                                    "answer": "C"}) + "\n"
                 + json.dumps({"hint": "", "question": "r?", "choices": ["x", "y"], "answer": 0}))
    records = load_records(path, "multiple_choice", text_column="question", text_pair_column="hint",
                           label_column="answer")
    assert [(r["text"], r["label"]) for r in records] == [("ctx\nq?", 2), ("r?", 0)]
    tok = byte_tokenizer()
    features = tokenize(records, tok, "multiple_choice")
    assert [len(f["input_ids"]) for f in features] == [3, 3]  # padded to the most choices with empty ones
    assert tok.decode(features[1]["input_ids"][2]) == "r?"
    batch = Collator(tok.pad_token_id)(features)
    assert batch["input_ids"].shape[:2] == (2, 3) and batch["labels"].tolist() == [2, 0]


def test_missing_task_column_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"line 1: task column 'kind' is missing"):
        load_records(write(tmp_path / "a.jsonl", json.dumps(GOOD)), "instruction", task_column="kind")
    with pytest.raises(FileNotFoundError, match="no such data file"):
        load_records(tmp_path / "absent.json", "instruction")
    with pytest.raises(ValueError, match="unknown data format"):
        load_records(write(tmp_path / "a.csv", "x"), "instruction")


def test_alpaca_template_and_response_only_labels():
    tok = byte_tokenizer()
    record = {**GOOD, "task": "t"}
    prompt = format_prompt(record)
    assert prompt.startswith("Below is an instruction") and prompt.endswith("### Response:\n")
    assert "### Input:" not in prompt and "### Input:" in format_prompt({**record, "input": "ctx"})
    (item,) = tokenize([record], tok, "instruction")
    n_prompt = len(tok(prompt)["input_ids"])
    assert item["labels"][:n_prompt] == [-100] * n_prompt
    assert item["labels"][n_prompt:] == item["input_ids"][n_prompt:]
    assert item["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(item["input_ids"][n_prompt:-1]) == record["output"]
    (full,) = tokenize([record], tok, "instruction", train_on_inputs=True)
    assert full["labels"] == full["input_ids"]
    (cut,) = tokenize([record], tok, "instruction", cutoff_len=20)
    assert len(cut["input_ids"]) == 20 and cut["labels"] == [-100] * 20


def test_loader_batches_feed_the_model_with_task_ids():
    tok = byte_tokenizer()
    records = [{**GOOD, "task": t} for t in ("a", "b", "a")]
    features = tokenize(records, tok, "instruction", template="plain", tasks=task_ids(records))
    batch = next(iter(make_loader(features, tok.pad_token_id, batch_size=3)))
    assert batch["task"].tolist() == [0, 1, 0]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    left = Collator(0, padding_side="left", keep_task=False)([{"input_ids": [5], "attention_mask": [1], "labels": 1},
                                                              {"input_ids": [5, 6], "attention_mask": [1, 1], "labels": 0}])
    assert left["input_ids"].tolist() == [[0, 5], [5, 6]] and left["labels"].tolist() == [1, 0] and "task" not in left
    assert left["input_ids"].dtype == torch.long


def test_validation_split_is_a_seeded_partition():
    records = [{"i": i} for i in range(20)]
    train, val = split_validation(records, 0.25, seed=3)
    assert len(val) == 5 and sorted(r["i"] for r in train + val) == list(range(20))
    assert split_validation(records, 0.25, seed=3) == (train, val)
    with pytest.raises(ValueError, match="leaves no training"):
        split_validation(records, 1.0)


def test_demo_dataset_is_deterministic_balanced_and_not_solved_by_length():
    train, test = demo.records("train"), demo.records("test")
    assert train == demo.records("train") and train != test
    assert len(train) == 3 * demo.SIZES["train"]
    for task in demo.GENERATORS:
        rows = [r for r in train if r["task"] == task]
        assert sum(r["label"] for r in rows) * 2 == len(rows)
        # the word count carries no information about the label
        lengths = {label: sorted({len(r["text_pair"].split()) for r in rows if r["label"] == label}) for label in (0, 1)}
        assert lengths[0] == lengths[1]
    order = [r["text_pair"].split() for r in train if r["task"] == "order"]
    # word order, not word identity, decides: the animal is the subject (2nd word … 3rd) iff label 1
    for words, row in zip(order, [r for r in train if r["task"] == "order"]):
        assert (words[2] in demo.ANIMALS) == bool(row["label"])
    with pytest.raises(ValueError, match="splits"):
        demo.records("dev")


def test_an_evaluation_cap_is_taken_evenly_across_tasks():
    """``data.max_eval_samples`` over a multi-task evaluation keeps every task (it kept only the first task's)."""
    records = [{"task": "a", "i": i} for i in range(5)] + [{"task": "b", "i": i} for i in range(5, 7)]
    assert [r["i"] for r in first_per_task(records, 4)] == [0, 1, 5, 6]
    assert [r["i"] for r in first_per_task(records, 5)] == [0, 1, 2, 5, 6]
    assert first_per_task(records, 100) == records
    assert first_per_task(records[:5], 3) == records[:3]  # one task: its first records

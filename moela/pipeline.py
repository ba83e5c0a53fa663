"""One run, top to bottom: prepare the data → plan → inject → train → evaluate → report, and ``compare``.

Launched on several processes (``accelerate launch``, ``torchrun``), every process allocates and trains; the
plan is the main process's (broadcast; the data-driven allocators share their probe data across processes);
only the main process writes files and evaluates, and the others return None once the adapter is saved. A
process that fails marks the folder ``FAILED``.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import transformers
from torch import nn

from . import checks, demo, run_folder
from .adapter import load_adapter, read_adapter
from .allocators import allocate, allocator, options_for
from .allocators.probe import progress_bars
from .base_model import DATA_KINDS, load_model, load_tokenizer, model_task
from .config import MoelaConfig
from .data import first_per_task, load_records, make_loader, split_validation, task_ids, text_bound, tokenize
from .distillation import teacher_loss
from .distributed import broadcast, on_main, process_state
from .evaluate import RoutingCounter, evaluate_accuracy, lm_eval_harness, routing_statistics
from .io import recover_dir
from .model import default_modules_to_save, inject
from .plan import AllocationPlan
from . import report
from .report import metrics_table, run_row, write_compare_report, write_run_report
from .settings import DataSettings, Settings, load_settings, parse_override
from .train import check_report_to, check_trainer_args, train_adapter


# --- data -------------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """What a run reads before it loads the model: the task, the tokenizer, the records and their features."""

    task: str
    kind: str
    tokenizer: Any
    num_labels: int | None
    tasks: dict[str, int]
    train_records: list[dict]
    eval_records: list[dict]
    train_features: list[dict]
    eval_features: list[dict]


def read_sources(spec: Any, kind: str, data: DataSettings, split: str | None, limit: int | None,
                 num_labels: int | None = None) -> list[dict]:
    """Records of one source or a list of them (``path`` or ``{path, task, split, limit}``; ``moela:demo``
    is the built-in dataset). Classification labels outside ``0..num_labels-1`` are a ValueError naming the
    file and record."""
    records: list[dict] = []
    for item in spec if isinstance(spec, list) else [spec]:
        item = {"path": item} if isinstance(item, str) else dict(item)
        if "path" not in item:
            raise ValueError(f"data source {item!r} has no 'path'")
        if item["path"] == demo.SOURCE:
            records += demo.records(item.get("split", split or "train"))
            continue
        loaded = load_records(item["path"], kind, split=item.get("split", split), task=item.get("task"),
                              task_column=data.task_column, text_column=data.text_column,
                              text_pair_column=data.text_pair_column, label_column=data.label_column,
                              choices_column=data.choices_column, limit=item.get("limit"),
                              max_chars=text_bound(data.cutoff_len))
        if kind == "classification" and num_labels is not None:
            for i, record in enumerate(loaded):
                if not 0 <= record["label"] < num_labels:
                    raise ValueError(f"{item['path']}: record {i}: label {record['label']} is outside the label "
                                     f"set 0..{num_labels - 1} (model.num_labels={num_labels})")
        records += loaded
    return records[:limit] if limit else records


def prepare(settings: Settings, *, need_train: bool = True) -> Prepared:
    """The task, tokenizer, records and features of a run (without ``need_train`` the training data is read
    only to hold the validation split out of it)."""
    model, data = settings.model, settings.data
    task = model_task(model.name_or_path, model.task)
    kind = DATA_KINDS[task]
    if data.train is None and need_train:
        raise ValueError("data.train is not set")
    read_train = data.train is not None and (need_train or data.eval is None)
    num_labels = model.num_labels
    train_records = read_sources(data.train, kind, data, data.split, data.max_train_samples,
                                 num_labels) if read_train else []
    if data.eval is not None:
        eval_records = read_sources(data.eval, kind, data, data.eval_split, None, num_labels)
    elif train_records and data.val_size:
        train_records, eval_records = split_validation(train_records, data.val_size, settings.train.seed)
    else:
        eval_records = []
    if data.max_eval_samples:
        eval_records = first_per_task(eval_records, data.max_eval_samples)
    if need_train and not train_records:
        raise ValueError(f"data.train gives no training records (data.train={data.train!r})")
    tasks = task_ids(train_records + eval_records)
    if kind == "classification" and num_labels is None:
        num_labels = max(r["label"] for r in train_records + eval_records) + 1
    tokenizer = load_tokenizer(model.name_or_path)
    opts = dict(template=data.template, cutoff_len=data.cutoff_len, train_on_inputs=data.train_on_inputs,
                tasks=tasks)
    return Prepared(task, kind, tokenizer, num_labels, tasks, train_records, eval_records,
                    tokenize(train_records, tokenizer, kind, **opts), tokenize(eval_records, tokenizer, kind, **opts))


def load_base(settings: Settings, prepared: Prepared, meta: bool = False) -> tuple[nn.Module, list[str]]:
    """The base model of a run and the names of its newly initialised parameters."""
    return load_model(settings.model.name_or_path, prepared.task, num_labels=prepared.num_labels,
                      dtype=settings.model.dtype, meta=meta)


# --- allocation -------------------------------------------------------------------------------------------------
def make_plan(settings: Settings, model: nn.Module, prepared: Prepared | None, method: str) -> AllocationPlan:
    """The plan: ``adapter.plan`` if given, else ``moela.allocate`` with the run's method, targets, budget and
    options (and data for data-driven allocators, probed with ``adapter.teacher``'s distributions if set)."""
    adapter = settings.adapter
    if adapter.plan:
        return checks.given_plan(settings, model)
    data = None
    if prepared is not None and prepared.train_features:
        sample = prepared.train_features[:adapter.alloc_samples]
        data = make_loader(sample, prepared.tokenizer.pad_token_id, batch_size=settings.train.batch_size,
                           seed=settings.train.seed)
    elif allocator(method).needs_data:
        raise ValueError(f"allocator {method!r} is data-driven: it needs data.train")
    probe = contextlib.nullcontext()
    if adapter.teacher and allocator(method).needs_data:
        teacher, untrained = load_model(adapter.teacher, prepared.task, num_labels=prepared.num_labels,
                                        dtype=settings.model.dtype)
        if untrained:
            raise ValueError(f"adapter.teacher={adapter.teacher!r}: its checkpoint has no weights for "
                             f"{', '.join(untrained[:3])}{' …' if len(untrained) > 3 else ''} (a teacher must be "
                             f"trained for the run's task: a classifier needs its head)")
        probe = teacher_loss(model, teacher.to(next(model.parameters()).device))
    with probe, progress_bars(settings.train.progress):
        return allocate(method, model, targets=adapter.targets, budget=adapter.budget, data=data,
                        seed=settings.train.seed, **options_for(method, adapter.options or {}, settings.methods))


def check_methods(settings: Settings, evaluate: bool = True, data: bool = True,
                  model_config: str | Path | None = None, training: bool = True) -> None:
    """Before any work: every setting and allocator option, the model's config, the evaluation protocol, a
    trial allocation on the meta device (:func:`moela.checks.preflight`), ``train.trainer_args`` and, for a
    command that trains, the ``train.report_to`` trackers."""
    checks.preflight(settings, evaluate=evaluate, data=data, model_config=model_config)
    check_trainer_args(settings.train.trainer_args)
    if training:
        check_report_to(settings.train.report_to)


# --- evaluation ---------------------------------------------------------------------------------------------------
def evaluate_model(model: nn.Module, settings: Settings, prepared: Prepared,
                   routing: RoutingCounter | None = None) -> tuple[dict, list]:
    """(metrics, per-record predictions) of ``model`` on the prepared evaluation data."""
    ev = settings.eval
    if ev.protocol == "lm_eval":
        return lm_eval_harness(model, prepared.tokenizer, ev.lm_eval_tasks or [], ev.batch_size), []
    if not prepared.eval_records:
        raise ValueError("no evaluation data: set data.eval or data.val_size")
    return evaluate_accuracy(model, prepared.tokenizer, prepared.eval_records, prepared.kind, protocol=ev.protocol,
                             features=prepared.eval_features, template=settings.data.template,
                             max_new_tokens=ev.max_new_tokens, num_beams=ev.num_beams,
                             length_normalize=ev.length_normalize, batch_size=ev.batch_size, routing=routing)


def evaluate_and_report(model: nn.Module, settings: Settings, prepared: Prepared, plan: AllocationPlan,
                        method: str, trainable: int, run_dir: Path) -> dict[str, Any]:
    """Evaluate, write metrics, predictions, routing statistics and ``report.md``; return the summary row."""
    counter = RoutingCounter(model)
    metrics, rows = evaluate_model(model, settings, prepared, counter)
    report.annotate(metrics, rows, prepared.eval_records)  # majority and chance rates, what was predicted
    if counter.tokens:  # counted during the classification forwards
        routing = counter.result()
    else:  # generation, option log-likelihood and lm-eval do not run the evaluation features as they are
        routing = routing_statistics(model, make_loader(prepared.eval_features, prepared.tokenizer.pad_token_id,
                                                        batch_size=settings.eval.batch_size))
    metrics.update(method=method, adapter_params=trainable, budget=plan.meta.get("budget"),
                   active_params_per_token=routing["active_params_per_token"], seed=settings.train.seed,
                   train_examples=len(prepared.train_records))
    run_folder.write_json(run_dir / "metrics.json", metrics)
    run_folder.write_json(run_dir / "predictions.json", rows)
    run_folder.write_json(run_dir / "routing.json", routing)
    write_run_report(run_dir, method, plan, metrics, routing, trainable, model)
    return run_row(method, metrics, routing, trainable) | {"run_dir": str(run_dir)}


# --- runs ---------------------------------------------------------------------------------------------------------
def run(settings: Settings, *, overwrite: bool = False, resume: bool = False, evaluate_after: bool = True,
        prepared: Prepared | None = None) -> dict | None:
    """allocate → train → (evaluate → report) into ``settings.output_dir``; returns the summary row (None on
    the processes other than the main one). ``prepared``: this run's data when already read (:func:`prepare`
    of the same data settings and seed), as a comparison passes it to each method."""
    state = process_state()
    main = state.is_main_process
    run_dir = Path(settings.output_dir)
    check_methods(settings, evaluate=evaluate_after)
    if len(settings.methods) > 1:
        raise ValueError(f"adapter.method names {len(settings.methods)} methods; a run trains one (moela compare "
                         "runs several)")
    # the folder and the data are checked before the folder is claimed (and, with --overwrite, emptied)
    on_main(run_folder.check_run_dir, run_dir, overwrite=overwrite, resume=resume, settings=settings)
    method, seed = settings.methods[0], settings.train.seed
    transformers.set_seed(seed)
    if prepared is None:
        prepared = prepare(settings)
        checks.check_prepared(settings, prepared)
    settings = settings.updated({"model": {"num_labels": prepared.num_labels}})
    on_main(run_folder.claim, run_dir, overwrite=overwrite, resume=resume, settings=settings)
    try:
        on_main(run_folder.start_run, run_dir, settings, resume=resume,
                records=(prepared.train_records, prepared.eval_records))
        plan_path = run_dir / "plan.json"
        resumed_plan = broadcast(resume and plan_path.is_file())
        if resumed_plan:  # checked before the model loads
            on_main(run_folder.record_plan, run_dir)
            plan = broadcast(AllocationPlan.load(plan_path) if main else None)
        model, new_params = load_base(settings, prepared)
        if not resumed_plan:
            started = time.perf_counter()
            plan = broadcast(make_plan(settings, model, prepared, method))
            plan.meta.setdefault("allocation_seconds", round(time.perf_counter() - started, 3))
            if main:
                plan.save(plan_path)
            on_main(run_folder.record_plan, run_dir)
        trainable = plan.num_trainable(model)
        if main:
            print(f"[{method}] plan: {len(plan)} modules, {trainable:,} adapter parameters", flush=True)
        transformers.set_seed(seed)
        adapter = settings.adapter
        head = list(adapter.modules_to_save) if adapter.modules_to_save is not None else \
            default_modules_to_save(model)
        head += [n.rsplit(".", 1)[0] for n in new_params if n.rsplit(".", 1)[0] not in head]
        # adapter weights stay float32 under a bf16/fp16 base (METHODS.md §2.1)
        inject(model, MoelaConfig(plan, alpha=adapter.alpha, dropout=adapter.dropout, scaling=adapter.scaling,
                                  base_model_name_or_path=settings.model.name_or_path, modules_to_save=head,
                                  balance_coef=settings.train.balance_coef,
                                  balance_reduction=settings.train.balance_reduction),
               adapter_dtype=torch.float32)
        checkpoints = run_dir / "checkpoints"
        latest = broadcast(transformers.trainer_utils.get_last_checkpoint(str(checkpoints))
                           if checkpoints.is_dir() else None)
        if resume and latest is None and main:
            print(f"[{method}] no checkpoint in {checkpoints}; training from the start", flush=True)
        history = train_adapter(model, prepared.train_features, prepared.tokenizer.pad_token_id, settings.train,
                                checkpoints, resume=latest if resume else None, save_to=run_dir)
        if not main:
            return None
        run_folder.write_json(run_dir / "train_log.json", history)
        row = {"method": method, "trainable": trainable, "run_dir": str(run_dir)}
        if evaluate_after:
            if history["sharded"]:  # FSDP/DeepSpeed left shards here: evaluate the saved adapter on a fresh base
                model, _ = load_base(settings, prepared)
                load_adapter(model, run_dir / "adapter", adapter_dtype=torch.float32)
            row = evaluate_and_report(model, settings, prepared, plan, method, trainable, run_dir)
        run_folder.mark_finished(run_dir)
        return row
    except BaseException as err:
        run_folder.mark_failed(run_dir, err)
        raise
    finally:
        run_folder.release(run_dir)


def compare(settings: Settings, methods: Sequence[str] | None = None, *, overwrite: bool = False,
            resume: bool = False, seeds: Sequence[int] | None = None) -> list[dict]:
    """Run every method on the same model, data and seed at the same budget, each in ``output_dir/<method>``
    (several ``seeds``: ``output_dir/<method>/seed-<s>``, and the report gives mean ± sd); write
    ``output_dir/report.md`` and ``compare.json``; return the rows (empty on the other processes)."""
    methods = list(methods or settings.methods)
    seeds = list(seeds) if seeds else [settings.train.seed]
    settings = settings.updated({"adapter": {"method": methods}})
    settings = settings.updated({"adapter": {"budget": settings.adapter.budget or "uniform:E=4,r=8"}})
    check_methods(settings)
    out = Path(settings.output_dir)
    # the folder and the data are checked before the folder is claimed (and, with --overwrite, emptied)
    on_main(run_folder.check_run_dir, out, overwrite=overwrite, resume=resume, kind="compare", settings=settings)
    prepared = prepare(settings)  # read once: the runs of the first seed use it
    checks.check_prepared(settings, prepared)
    on_main(run_folder.claim, out, overwrite=overwrite, resume=resume, kind="compare", settings=settings)
    try:
        on_main(run_folder.start_compare, out, settings, seeds, resume=resume)
        return _compare(settings, methods, seeds, out, resume, prepared)
    finally:
        run_folder.release(out)


def _compare(settings: Settings, methods: list[str], seeds: list[int], out: Path, resume: bool,
             prepared: Prepared) -> list[dict]:
    state = process_state()
    budget = settings.adapter.budget
    rows = []
    started_all = time.perf_counter()
    for method, seed in ((m, s) for m in methods for s in seeds):
        done = out / method / f"seed-{seed}" if len(seeds) > 1 else out / method
        sub = settings.updated({"adapter": {"method": method, "budget": budget}, "output_dir": str(done),
                                "train": {"seed": seed}})
        started = time.perf_counter()
        if broadcast(resume and run_folder.is_finished(done)):  # an interrupted comparison keeps its finished runs
            if not state.is_main_process:
                continue
            metrics = json.loads((done / "metrics.json").read_text())
            routing = json.loads((done / "routing.json").read_text())
            rows.append(run_row(method, metrics, routing, metrics["adapter_params"]) | {"run_dir": str(done)})
            continue
        row = run(sub, resume=resume, prepared=prepared if seed == settings.train.seed else None)
        if row is None:  # not the main process
            continue
        row["seconds"] = round(time.perf_counter() - started, 1)
        print(report.progress_line(row, seed if len(seeds) > 1 else None), flush=True)
        rows.append(row)
    if not state.is_main_process:
        return []
    targets = [r["metrics"].get("budget", {}).get("target") for r in rows if r["metrics"].get("budget")]
    described = f"{budget} = {targets[0]:,} parameters" if targets else str(budget)
    run_folder.write_json(out / "compare.json", {"budget": budget, "budget_parameters": targets[0] if targets else None,
                                             "rows": rows})
    path = write_compare_report(out, rows, described, report.describe_setup(settings, rows, seeds))
    run_folder.mark_finished(out)
    print()
    print(metrics_table(rows))
    print("\n" + "\n".join(report.summary(rows)))
    print(f"\n{len(rows)} runs in {time.perf_counter() - started_all:.0f} s; report: {path}")
    return rows


def plan_only(settings: Settings, *, meta: bool = False,
              model_config: str | Path | None = None) -> list[tuple[AllocationPlan, nn.Module]]:
    """The plan of every method of ``settings`` with its model; ``meta``: the model built on the meta device
    (no weights or data read; allocators that need them are refused) from its config (``model_config``: a
    local config.json or folder to read it from instead of the model's own, for hub models offline)."""
    out = []
    check_methods(settings, evaluate=False, data=False, model_config=model_config,  # data: data-driven methods only
                  training=False)
    for method in settings.methods:
        if meta:
            if allocator(method).needs_weights:
                raise ValueError(f"--dry-run cannot run allocator {method!r}: it needs the model's weights or data")
            task = model_task(settings.model.name_or_path, settings.model.task, model_config)
            model, _ = load_model(settings.model.name_or_path, task, num_labels=settings.model.num_labels or 2,
                                  meta=True, config_file=model_config)
            out.append((make_plan(settings, model, None, method), model))
        else:
            prepared = prepare(settings, need_train=allocator(method).needs_data)
            model, _ = load_base(settings, prepared)
            out.append((make_plan(settings, model, prepared, method), model))
    return out


def evaluate_run(run_dir: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The metrics of a finished run's adapter, on its evaluation data or the one ``overrides`` set.

    ``overrides`` replace what the run stored (``key=null`` resets an optional key); a new ``data.eval``
    also drops the run's ``data.max_eval_samples`` unless the overrides set that too."""
    run_dir = Path(run_dir)
    recover_dir(run_dir / "adapter")  # a crash between the two renames of a replacement left it as .adapter.old
    if not (run_dir / run_folder.SETTINGS_FILE).is_file() or not (run_dir / "adapter").is_dir():
        raise ValueError(f"{run_dir} is not a moela run folder (needs {run_folder.SETTINGS_FILE} and adapter/)")
    overrides = list(overrides)
    given = {key for text in overrides for key in _keys(parse_override(text))}
    if "data.eval" in given and "data.max_eval_samples" not in given:
        overrides.insert(0, "data.max_eval_samples=null")  # the run's cap was for the run's own evaluation data
    settings = load_settings(run_dir / run_folder.SETTINGS_FILE, overrides)
    checks.preflight(settings, allocation=False)
    read_adapter(run_dir / "adapter")  # its files are checked before the model loads
    prepared = prepare(settings, need_train=False)
    model, _ = load_base(settings, prepared)
    load_adapter(model, run_dir / "adapter", adapter_dtype=torch.float32)
    metrics, rows = evaluate_model(model, settings, prepared)
    return report.annotate(metrics, rows, prepared.eval_records)


def _keys(tree: dict, prefix: str = "") -> list[str]:
    """The dotted keys an override sets (``{"data": {"eval": …}}`` → ``["data", "data.eval"]``)."""
    out = []
    for key, value in tree.items():
        out.append(prefix + key)
        if isinstance(value, dict) and prefix + key in ("data", "model", "adapter", "train", "eval"):
            out += _keys(value, prefix + key + ".")
    return out


"""The ``moela`` command: argument parsing and one function per command, each calling the library.

Settings come from a YAML file and ``key=value`` overrides (:mod:`moela.settings`); the run itself is
:func:`moela.pipeline.run` / :func:`moela.pipeline.compare`.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Sequence

from . import pipeline
from .settings import Settings, load_settings, reference


def split_args(args: Sequence[str], overrides: Sequence[str]) -> tuple[str | None, list[str]]:
    """(config path, overrides) from positional arguments: ``key=value`` items are overrides."""
    paths = [a for a in args if "=" not in a]
    if len(paths) > 1:
        raise ValueError(f"expected one config file, got {paths}")
    return (paths[0] if paths else None), [a for a in args if "=" in a] + list(overrides)


def settings_from(ns) -> Settings:
    path, overrides = split_args(ns.args, ns.set or [])
    if ns.output_dir:
        overrides.append(f"output_dir={ns.output_dir}")
    if path is None and not getattr(ns, "default", False) and ns.command != "run":
        raise ValueError(f"moela {ns.command} needs a config file (or --default for the built-in one)")
    return load_settings(path, overrides, default=getattr(ns, "default", False))


def print_plan(plan, model) -> None:
    trainable = plan.num_trainable(model)
    print(plan.summary(model))
    print(f"budget: {trainable:,} adapter parameters "
          f"({100 * trainable / sum(p.numel() for p in model.parameters()):.3f}% of the model)")


def cmd_run(ns) -> None:
    settings = settings_from(ns)
    if ns.dry_run:
        for plan, model in pipeline.plan_only(settings, meta=True):
            print_plan(plan, model)
        return
    if len(settings.methods) > 1:
        pipeline.compare(settings, overwrite=ns.overwrite, resume=ns.resume)
        return
    row = pipeline.run(settings, overwrite=ns.overwrite, resume=ns.resume)
    if row is not None:  # the main process
        from .report import metrics_table

        print(metrics_table([row]))
        print(f"\nreport: {Path(settings.output_dir) / 'report.md'}")


def cmd_compare(ns) -> None:
    settings = settings_from(ns)
    methods = [m.strip() for m in ns.methods.split(",")] if ns.methods else None
    pipeline.compare(settings, methods, overwrite=ns.overwrite, resume=ns.resume)


def cmd_train(ns) -> None:
    row = pipeline.run(settings_from(ns), overwrite=ns.overwrite, resume=ns.resume, evaluate_after=False)
    if row is not None:
        print(f"adapter: {Path(row['run_dir']) / 'adapter'}")


def cmd_allocate(ns) -> None:
    settings = settings_from(ns)
    for plan, model in pipeline.plan_only(settings.updated({"adapter": {"method": settings.methods[0]}}),
                                          meta=ns.dry_run):
        print_plan(plan, model)
        if ns.output:
            plan.save(ns.output)
            print(f"plan: {ns.output}")


def cmd_evaluate(ns) -> None:
    metrics = pipeline.evaluate_run(ns.run_dir, list(ns.overrides) + list(ns.set or []))
    print(json.dumps(metrics, indent=1))
    if ns.output:
        from .run_folder import write_json

        write_json(Path(ns.output), metrics)


def cmd_plan_show(ns) -> None:
    from .base_model import load_model, model_task
    from .plan import AllocationPlan
    from .report import plot_plan

    path = Path(ns.path)
    model = None
    if path.is_dir():
        settings = load_settings(path / "config.yaml") if (path / "config.yaml").is_file() else None
        path = path / "plan.json"
        if settings and not ns.model:
            ns.model = settings.model.name_or_path
    plan = AllocationPlan.load(path)
    if ns.model:
        model, _ = load_model(ns.model, model_task(ns.model), num_labels=2, meta=True)
    print(plan.summary(model))
    if ns.plot:
        print(f"heatmap: {plot_plan(plan, ns.plot, model)}")


def cmd_export(ns) -> None:
    from .export import export_peft

    if ns.to != "peft":
        raise ValueError(f"unknown export format {ns.to!r}; supported: peft")
    print(f"PEFT adapter: {export_peft(ns.run_dir, ns.out_dir)}")


OVERRIDE_HELP = ("config overrides key=value (YAML values), e.g. train.epochs=2 adapter.method=hilo "
                 "'adapter.options={uniform: {experts: 2}}' data.max_train_samples=200")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moela", description="Fine-tune with a mixture of LoRA experts allocated per layer.",
        epilog="Every config value can be overridden: KEY=VALUE arguments or --set KEY=VALUE, with KEY a dotted "
               "path (train.epochs=2) and VALUE read as YAML. `moela run` with no config runs the built-in "
               "offline default (MiniLM on a generated multi-task dataset, comparing allocators).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    sub = parser.add_subparsers(dest="command", required=True)

    def configured(name: str, help: str, run_flags: bool = True):
        p = sub.add_parser(name, help=help, description=help, epilog=parser.epilog + " " + reference())
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
    p = sub.add_parser("export", help="export an adapter (or a run's) to another format")
    p.add_argument("--to", required=True, choices=["peft"])
    p.add_argument("run_dir", metavar="ADAPTER_OR_RUN_DIR")
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
    if not ns.debug:  # moela's own warnings as one line each; third-party library noise hidden
        import warnings

        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"moela(\.|$)")
        warnings.showwarning = lambda message, *_, **__: print(f"moela: warning: {message}", file=sys.stderr)
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

"""The ``moela`` command: argument parsing and one function per command, each calling the library.

Settings come from a YAML file and ``key=value`` overrides (:mod:`moela.settings`); the run itself is
:func:`moela.pipeline.run` / :func:`moela.pipeline.compare`.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .errors import first_line

if TYPE_CHECKING:  # the commands import the library when they run, so that `--help` and `plan show` are quick
    from .settings import Settings


def split_args(args: Sequence[str], overrides: Sequence[str]) -> tuple[str | None, list[str]]:
    """(config path, overrides) from positional arguments: ``key=value`` items are overrides."""
    paths = [a for a in args if "=" not in a]
    if len(paths) > 1:
        raise ValueError(f"expected one config file, got {paths}")
    return (paths[0] if paths else None), [a for a in args if "=" in a] + list(overrides)


def settings_from(ns) -> Settings:
    from .settings import load_settings

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


def is_demo(ns) -> bool:
    """``moela run`` with no config file (or ``--default``): the built-in demo."""
    return getattr(ns, "default", False) or split_args(ns.args, [])[0] is None


def cmd_run(ns) -> None:
    from . import pipeline

    settings = settings_from(ns)
    if ns.dry_run:
        for plan, model in pipeline.plan_only(settings, meta=True, model_config=ns.model_config):
            print_plan(plan, model)
        return
    demo = None
    if is_demo(ns):  # the built-in demo says what it runs (once its folder may be used), and then what to do next
        from . import demo, run_folder

        run_folder.check_run_dir(Path(settings.output_dir), overwrite=ns.overwrite, resume=ns.resume,
                                 kind="compare" if len(settings.methods) > 1 else "run", settings=settings)
        print(demo.introduction(settings), flush=True)
    if len(settings.methods) > 1:
        pipeline.compare(settings, overwrite=ns.overwrite, resume=ns.resume)
    else:
        row = pipeline.run(settings, overwrite=ns.overwrite, resume=ns.resume)
        if row is None:  # not the main process
            return
        from .report import metrics_table

        print(metrics_table([row]))
        print(f"\nreport: {Path(settings.output_dir) / 'report.md'}")
    if demo is not None:
        print(demo.next_steps(settings))


def cmd_compare(ns) -> None:
    from . import pipeline

    settings = settings_from(ns)
    methods = [m.strip() for m in ns.methods.split(",")] if ns.methods else None
    try:
        seeds = [int(s) for s in ns.seeds.split(",")] if ns.seeds else None
    except ValueError:
        raise ValueError(f"--seeds {ns.seeds!r}: give integers separated by commas, e.g. --seeds 0,1,2") from None
    pipeline.compare(settings, methods, overwrite=ns.overwrite, resume=ns.resume, seeds=seeds)


def cmd_train(ns) -> None:
    from . import pipeline

    row = pipeline.run(settings_from(ns), overwrite=ns.overwrite, resume=ns.resume, evaluate_after=False)
    if row is not None:
        print(f"adapter: {Path(row['run_dir']) / 'adapter'}")


def cmd_allocate(ns) -> None:
    from . import pipeline, run_folder

    settings = settings_from(ns)
    if ns.output:
        run_folder.check_output_file(ns.output, ns.overwrite)
    for plan, model in pipeline.plan_only(settings.updated({"adapter": {"method": settings.methods[0]}}),
                                          meta=ns.dry_run, model_config=ns.model_config):
        print_plan(plan, model)
        if ns.output:
            plan.save(ns.output)
            print(f"plan: {ns.output}")


def cmd_evaluate(ns) -> None:
    from . import pipeline, run_folder

    if ns.output:
        run_folder.check_output_file(ns.output, ns.overwrite)
    metrics = pipeline.evaluate_run(ns.run_dir, list(ns.overrides) + list(ns.set or []))
    print(json.dumps(metrics, indent=1))
    if ns.output:
        from .run_folder import write_json

        write_json(Path(ns.output), metrics)


def cmd_plan_show(ns) -> None:
    from .report import show

    model = None
    if ns.model:  # per-module parameters from a model built on the meta device (imports transformers)
        from .base_model import load_model, model_task

        quiet()
        model, _ = load_model(ns.model, model_task(ns.model), num_labels=2, meta=True)
    print(show(ns.path, model, ns.plot, overwrite=ns.overwrite))


def cmd_data(ns) -> None:
    from . import prepare_data

    out = Path(ns.out) if ns.out else (prepare_data.LLM_ADAPTERS_DIR if ns.dataset == "llm-adapters"
                                       else prepare_data.SCIENCEQA_DIR)
    print(f"{ns.dataset} → {out} (from {ns.source or 'the Hugging Face hub'})")
    if ns.dataset == "llm-adapters":
        tasks = ns.tasks.split(",") if ns.tasks else prepare_data.COMMONSENSE
        manifest = prepare_data.llm_adapters(out, ns.source, tasks)
        for name, why in manifest["missing"].items():
            print(f"  missing {name}: {why}")
        override = prepare_data.eval_override(out, manifest, tasks)
        if override:
            print(f"Some test sets are missing: evaluate on the others with\n  {override}")
    else:
        prepare_data.scienceqa(out, ns.source)
    print(f"manifest: {out / 'MANIFEST.json'}")


def cmd_export(ns) -> None:
    from .export import export_peft

    if ns.to != "peft":
        raise ValueError(f"unknown export format {ns.to!r}; supported: peft")
    print(f"PEFT adapter: {export_peft(ns.run_dir, ns.out_dir)}")


OVERRIDE_HELP = ("config overrides key=value (YAML values), e.g. train.epochs=2 adapter.method=hilo "
                 "'adapter.options={uniform: {experts: 2}}' data.max_train_samples=200; key=null resets a key")
OVERRIDES = ("Every config value can be overridden: KEY=VALUE arguments or --set KEY=VALUE, with KEY a dotted path "
             "(train.epochs=2) and VALUE read as YAML (null resets an optional key).")
EXAMPLES = {
    "moela": """
  moela run                                   # the built-in demo: MiniLM, generated tasks, 4 allocators (~3 min, CPU)
  moela run configs/stories260k-boolq.yaml    # a small real-data run; see configs/ for more
  moela data llm-adapters --source DIR        # the data layout the Llama/Mistral configs expect
  moela plan show runs/default                # what a run or a comparison allocated""",
    "run": """
  moela run                                   # the built-in demo (a comparison of lora, uniform, hilo, sensitivity)
  moela run configs/stories260k-boolq.yaml train.epochs=2 adapter.method=hilo
  moela run configs/llama2-7b-commonsense.yaml --dry-run --model-config llama-2-7b/config.json""",
    "compare": """
  moela compare configs/stories260k-boolq.yaml --methods lora,uniform,hilo
  moela compare configs/minilm-sst2.yaml --methods lora,uniform --seeds 0,1,2   # mean ± sd over seeds""",
    "train": """
  moela train configs/minilm-sst2.yaml --output-dir runs/sst2 && moela evaluate runs/sst2""",
    "allocate": """
  moela allocate configs/stories260k-boolq.yaml adapter.method=hilo -o plan.json
  moela allocate configs/mistral-7b-commonsense.yaml adapter.method=mola --dry-run --model-config mistral/config.json""",
    "evaluate": """
  moela evaluate runs/stories260k-boolq
  moela evaluate runs/stories260k-boolq 'data.eval={path: ../shared/data/llm-adapters/boolq/test.json, limit: 128}'
  moela evaluate runs/stories260k-boolq data.max_eval_samples=null eval.protocol=loglik""",
    "plan": """
  moela plan show runs/default""",
    "show": """
  moela plan show runs/default                       # a compare folder: its runs
  moela plan show runs/default/hilo --plot hilo.png  # a run folder: its plan and parameters, and the heatmap
  moela plan show plan.json --model Qwen/Qwen2.5-0.5B""",
    "export": """
  moela export --to peft runs/my-lora-run peft-adapter""",
    "data": """
  moela data llm-adapters                                        # from the Hugging Face hub (needs network)
  moela data llm-adapters --source ../shared/data/llm-adapters   # offline, from a local copy
  moela data scienceqa --source ../shared/data/scienceqa-sample""",
}


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog may be a function, called only when the help is shown (the settings
    reference imports the library)."""

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


def _epilog(name: str, settings: bool = False):
    def text() -> str:
        out = "examples:" + EXAMPLES[name]
        if settings:
            from .settings import reference

            out += "\n\n" + textwrap.fill(OVERRIDES + " " + reference(), 110)
        return out
    return text


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = Parser(prog="moela", description="Fine-tune with a mixture of LoRA experts allocated per layer.",
                    epilog=_epilog("moela"), formatter_class=raw)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, parent=sub, **kwargs):
        p = parent.add_parser(name, help=help, description=textwrap.fill(help, 100), formatter_class=raw, **kwargs)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return p

    def configured(name: str, help: str, run_flags: bool = True):
        p = command(name, help, epilog=_epilog(name, settings=True))
        p.add_argument("args", nargs="*", metavar="CONFIG|KEY=VALUE", help="a YAML config, then " + OVERRIDE_HELP)
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="one more override")
        p.add_argument("--default", action="store_true", help="use the built-in default config")
        p.add_argument("--output-dir", help="the run folder (default runs/<name>)")
        if run_flags:
            p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
            p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
        return p

    model_config = ("with --dry-run: read the model's shapes from this config.json (or folder) instead of the "
                    "model's own (hub models offline)")
    p = configured("run", "the whole pipeline: allocate, train, evaluate, report (several methods: compare); "
                          "no config: the built-in demo")
    p.add_argument("--dry-run", action="store_true",
                   help="build the model on the meta device and print the plan and budget (static allocators)")
    p.add_argument("--model-config", metavar="PATH", help=model_config)
    p.set_defaults(func=cmd_run)
    p = configured("compare", "several allocators at equal budget on the same model, data and seed; one table")
    p.add_argument("--methods", help="comma-separated allocators (default: adapter.method)")
    p.add_argument("--seeds", help="comma-separated seeds: every method runs with each (default: train.seed)")
    p.set_defaults(func=cmd_compare)
    configured("train", "allocate and train; writes the adapter into the run folder").set_defaults(func=cmd_train)
    p = configured("allocate", "compute the plan only", run_flags=False)
    p.add_argument("-o", "--output", help="write the plan here (JSON)")
    p.add_argument("--overwrite", action="store_true", help="replace the -o file if it exists")
    p.add_argument("--dry-run", action="store_true", help="meta-device model: no weights read (static allocators)")
    p.add_argument("--model-config", metavar="PATH", help=model_config)
    p.set_defaults(func=cmd_allocate)
    p = command("evaluate", "evaluate a run's adapter again; overrides replace what the run stored (a new "
                            "data.eval also drops the run's data.max_eval_samples)", epilog=_epilog("evaluate"))
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDE_HELP + " (e.g. data.eval=FILE)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("-o", "--output", help="also write the metrics JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace the -o file if it exists")
    p.set_defaults(func=cmd_evaluate)
    plan = command("plan", "inspect plans", epilog=_epilog("plan")).add_subparsers(dest="plan_command", required=True)
    p = command("show", "print a plan: a plan.json, a run folder (with its parameters per module) or a compare "
                        "folder (its runs); optionally the heatmap", parent=plan, epilog=_epilog("show"))
    p.add_argument("path", metavar="PLAN_OR_FOLDER")
    p.add_argument("--model", help="base model, for per-module parameter counts of a plan file (meta device)")
    p.add_argument("--plot", metavar="PNG", help="write the allocation heatmap here (a compare folder: one per run)")
    p.add_argument("--overwrite", action="store_true", help="replace the --plot files if they exist")
    p.set_defaults(func=cmd_plan_show, light=True)
    p = command("export", "export an adapter (or a run's) to another format", epilog=_epilog("export"))
    p.add_argument("--to", required=True, choices=["peft"])
    p.add_argument("run_dir", metavar="ADAPTER_OR_RUN_DIR")
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_export)
    p = command("data", "prepare the data the example configs expect (data/llm-adapters, data/scienceqa)",
                epilog=_epilog("data"))
    p.add_argument("dataset", choices=["llm-adapters", "scienceqa"])
    p.add_argument("--source", metavar="DIR", help="a local copy to read (offline); default: the Hugging Face hub")
    p.add_argument("--out", metavar="DIR", help="where to write (default data/llm-adapters or data/scienceqa)")
    p.add_argument("--tasks", help="llm-adapters: comma-separated task folders (default: the 8 commonsense tasks)")
    p.set_defaults(func=cmd_data, light=True)
    return parser


def quiet(debug: bool = False) -> None:
    """transformers' info logs and progress bars off (unless ``debug``)."""
    if debug:
        return
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


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

        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"moela(\.|$)")
        warnings.showwarning = lambda message, *_, **__: print(f"moela: warning: {message}", file=sys.stderr)
        if not getattr(ns, "light", False):  # commands that load models
            quiet()
    dist = sys.modules.get("torch.distributed")
    inherited = dist is not None and dist.is_available() and dist.is_initialized()  # the caller's: left alone
    completed = False
    try:
        ns.func(ns)
        completed = True
    except KeyboardInterrupt:
        print("moela: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line unless --debug
        if ns.debug:
            traceback.print_exc()
        else:
            print(f"moela: error: {first_line(err)}", file=sys.stderr)
        return 1
    finally:
        if not inherited and "torch.distributed" in sys.modules:  # the command may have started a process group
            from .distributed import shut_down

            shut_down(completed)
    return 0


if __name__ == "__main__":
    sys.exit(main())

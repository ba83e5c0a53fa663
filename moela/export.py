"""Export a run's adapter to PEFT, when every module of its plan is plain LoRA (one expert, no router).

moela's single-expert layer computes ``W0 x + (α/r) B A x`` (``α/√r`` with rsLoRA), exactly PEFT's LoRA with
``lora_alpha = α``, ``r`` per module through ``rank_pattern`` and ``use_rslora``; a trained classifier head
goes to PEFT's ``modules_to_save``. The files are written by PEFT itself, so its own loader reads them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from .config import MoelaConfig
from .io import atomic_dir


def check_exportable(config: MoelaConfig, source: str) -> None:
    """Raise ValueError naming the first routed module (PEFT LoRA has one expert per module)."""
    for name, spec in config.plan.items():
        if spec.routed:
            null = f" + {spec.num_null} null" if spec.num_null else ""
            raise ValueError(f"{source}: module {name!r} has {spec.num_experts}{null} experts with a router; "
                             "PEFT LoRA holds one expert per module, so only plans where every module is plain "
                             "LoRA (method lora, or E=1 everywhere) can be exported")


def export_peft(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's format into ``out_dir``, such
    that ``peft.PeftModel.from_pretrained(base, out_dir)`` computes the same logits as the run's model."""
    try:
        import peft
    except ImportError:
        raise ValueError("exporting to PEFT needs the peft package: pip install 'moela[peft]'") from None
    from .cli import load_config
    from .train import HEAD_FILE, load_model, load_trained, model_task

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    adapter_dir = run_dir / "adapter"
    config = MoelaConfig.load(adapter_dir)
    check_exportable(config, str(adapter_dir))
    settings = load_config(run_dir / "config.yaml")
    name = settings["model"]["name_or_path"]
    task = model_task(name, settings["model"]["task"])
    head_file = adapter_dir / HEAD_FILE
    num_labels = settings["model"]["num_labels"]

    trained, _ = load_model(name, task, num_labels=num_labels)
    load_trained(trained, adapter_dir)
    params = dict(trained.named_parameters())
    head_modules = sorted({n.rsplit(".", 1)[0] for n in _head_names(head_file)})

    ranks = {path: spec.ranks[0] for path, spec in config.plan.items()}
    default_r = Counter(ranks.values()).most_common(1)[0][0]
    lora_config = peft.LoraConfig(
        r=default_r, lora_alpha=config.alpha, lora_dropout=config.dropout, use_rslora=config.scaling == "rslora",
        target_modules=list(ranks), rank_pattern={p: r for p, r in ranks.items() if r != default_r},
        modules_to_save=list(head_modules) or None, bias="none",  # PEFT extends this list in place
        task_type="CAUSAL_LM" if task == "causal_lm" else "SEQ_CLS")
    base, _ = load_model(name, task, num_labels=num_labels)
    wrapped = peft.get_peft_model(base, lora_config)
    inner = wrapped.base_model.model
    with torch.no_grad():
        for path in ranks:
            layer = inner.get_submodule(path)
            layer.lora_A["default"].weight.copy_(params[f"{path}.lora_A.weight"])
            layer.lora_B["default"].weight.copy_(params[f"{path}.lora_B.weight"])
        for module in head_modules:
            copy = inner.get_submodule(module).modules_to_save["default"]
            for pname, value in copy.named_parameters():
                value.copy_(params[f"{module}.{pname}"])
    with atomic_dir(out_dir) as tmp:
        wrapped.save_pretrained(str(tmp))
    return out_dir


def _head_names(path: Path) -> list[str]:
    if not path.is_file():
        return []
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return list(handle.keys())


"""Export a run's adapter to PEFT, when every module of its plan is plain LoRA (one expert, no router).

moela's single-expert layer computes ``W0 x + (α/r) B A x`` (``α/√r`` with rsLoRA), exactly PEFT's LoRA with
``lora_alpha = α``, ``r`` per module through ``rank_pattern`` and ``use_rslora``; a trained classifier head
goes to PEFT's ``modules_to_save``. The files are written by PEFT itself, so its own loader reads them. Only the
adapter folder is read: its config names the base model, task and head.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from .adapter import load_adapter
from .base_model import load_model
from .config import CONFIG_NAME, MoelaConfig
from .io import atomic_dir, follow_umask, inside, is_temporary, protected
from .run_folder import MARKER, mark_owned, owner, stray


EXPORT_FILES = (MARKER, "adapter_config.json", "adapter_model.safetensors", "README.md")  # what an export writes


def check_exportable(config: MoelaConfig, source: str) -> None:
    """Raise ValueError naming the first routed module (PEFT LoRA has one expert per module)."""
    for name, spec in config.plan.items():
        if spec.routed:
            null = f" + {spec.num_null} null" if spec.num_null else ""
            raise ValueError(f"{source}: module {name!r} has {spec.num_experts}{null} experts with a router; "
                             "PEFT LoRA holds one expert per module, so only plans where every module is plain "
                             "LoRA (method lora, or E=1 everywhere) can be exported")


def check_target(source: Path, adapter_dir: Path, out_dir: Path) -> None:
    """Refuse an export folder that would replace anything but an earlier export: a file, a non-empty folder
    moela's export did not create, the current folder or a parent of it, the run or adapter being exported or
    a folder holding them, or a folder inside the adapter."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"export target {out_dir} is a file; give a folder path")
    reason = protected(out_dir)
    for folder in (source, adapter_dir):
        if reason is None and inside(folder, out_dir):
            reason = f"it is {'the folder being exported' if folder.resolve() == out_dir.resolve() else 'a parent of ' + str(folder)}"
    if reason is None and inside(out_dir, adapter_dir):
        reason = f"it is inside the adapter folder {adapter_dir}"
    if reason is None and out_dir.is_dir() and any(out_dir.iterdir()) and owner(out_dir) != "export":
        reason = "it is not empty and moela's export did not create it"
    other = stray(out_dir, EXPORT_FILES) if reason is None else None
    if other is not None:
        reason = f"it holds {other}, which the export did not write (move it out first)"
    if reason:
        raise ValueError(f"refusing to export into {out_dir}: {reason}; choose a new folder")


def remove_stale(out_dir: Path) -> None:
    """Temporary folders of killed exports to ``out_dir`` (named so and holding the export marker)."""
    import shutil

    parent = out_dir.parent
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        if entry.name.startswith(f".{out_dir.name}.") and is_temporary(entry) and entry.is_dir() \
                and not entry.is_symlink() and owner(entry) == "export":
            shutil.rmtree(entry, ignore_errors=True)


def export_peft(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's format into ``out_dir``, such
    that ``peft.PeftModel.from_pretrained(base, out_dir)`` computes the same logits as the adapted model.
    ``adapter_dir``: a moela adapter folder, or a run folder holding one in ``adapter/``; its config names the
    base model, task and head."""
    try:
        import peft
    except ImportError:
        raise ValueError("exporting to PEFT needs the peft package: pip install 'moela[peft]'") from None
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    source = adapter_dir
    if not (adapter_dir / CONFIG_NAME).is_file() and (adapter_dir / "adapter" / CONFIG_NAME).is_file():
        adapter_dir = adapter_dir / "adapter"
    check_target(source, adapter_dir, out_dir)
    config = MoelaConfig.load(adapter_dir)
    check_exportable(config, str(adapter_dir))
    name, task = config.base_model_name_or_path, config.task_type
    if not name or not task:
        raise ValueError(f"{adapter_dir / CONFIG_NAME}: the adapter does not record its base model and task "
                         "(base_model_name_or_path, task_type)")

    def base() -> torch.nn.Module:
        return load_model(name, task, num_labels=config.num_labels, revision=config.revision)[0]

    trained = load_adapter(base(), adapter_dir)
    params = dict(trained.named_parameters())
    ranks = {path: spec.ranks[0] for path, spec in config.plan.items()}
    default_r = Counter(ranks.values()).most_common(1)[0][0]
    lora_config = peft.LoraConfig(
        r=default_r, lora_alpha=config.alpha, lora_dropout=config.dropout, use_rslora=config.scaling == "rslora",
        target_modules=list(ranks), rank_pattern={p: r for p, r in ranks.items() if r != default_r},
        modules_to_save=list(config.modules_to_save) or None, bias="none",  # PEFT extends this list in place
        task_type="CAUSAL_LM" if task == "causal_lm" else "SEQ_CLS")
    wrapped = peft.get_peft_model(base(), lora_config)
    inner = wrapped.base_model.model
    with torch.no_grad():
        for path in ranks:
            layer = inner.get_submodule(path)
            layer.lora_A["default"].weight.copy_(params[f"{path}.lora_A.weight"])
            layer.lora_B["default"].weight.copy_(params[f"{path}.lora_B.weight"])
        for module in config.modules_to_save:
            copy = inner.get_submodule(module).modules_to_save["default"]
            for pname, value in copy.named_parameters():
                value.copy_(params[f"{module}.{pname}"])
    check_target(source, adapter_dir, out_dir)  # again: the folder may have changed while the models loaded
    remove_stale(out_dir)
    with atomic_dir(out_dir) as tmp:
        mark_owned(tmp, "export")
        wrapped.save_pretrained(str(tmp))
        for file in tmp.iterdir():
            follow_umask(file)
    return out_dir

"""The base model: its task, and loading it and its tokenizer with transformers' Auto classes."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from torch import nn

from .config import TASK_TYPES as TASKS

_AUTO_CLASSES = {"causal_lm": "AutoModelForCausalLM", "sequence_classification": "AutoModelForSequenceClassification",
                 "multiple_choice": "AutoModelForMultipleChoice"}
# The record kind (moela.data) each model task trains on.
DATA_KINDS = {"causal_lm": "instruction", "sequence_classification": "classification",
              "multiple_choice": "multiple_choice"}


def torch_dtype(name: str | None) -> torch.dtype | str:
    if name in (None, "auto"):
        return "auto"
    if not hasattr(torch, str(name)) or not isinstance(getattr(torch, name), torch.dtype):
        raise ValueError(f"model.dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return getattr(torch, name)


def model_task(name_or_path: str, task: str = "auto") -> str:
    """One of :data:`TASKS`; ``auto`` reads the architecture from the model config (a causal LM, else sequence
    classification; multiple choice is never guessed)."""
    if task != "auto":
        if task not in TASKS:
            raise ValueError(f"model.task must be one of {('auto',) + TASKS}, got {task!r}")
        return task
    config = transformers.AutoConfig.from_pretrained(name_or_path)
    arch = " ".join(config.architectures or [])
    return "causal_lm" if "CausalLM" in arch or "LMHead" in arch else "sequence_classification"


def task_of(model: nn.Module) -> str | None:
    """The task of an instantiated model, read from its class name (None for a bare encoder or decoder)."""
    name = type(model).__name__
    if "ForSequenceClassification" in name:
        return "sequence_classification"
    if "ForMultipleChoice" in name:
        return "multiple_choice"
    if "CausalLM" in name or "LMHead" in name:
        return "causal_lm"
    return None


def load_tokenizer(name_or_path: str):
    """The model's tokenizer with a pad token (unk, else eos) and right padding for training."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(name_or_path: str, task: str, *, num_labels: int | None = None, dtype: str | None = "auto",
               meta: bool = False, revision: str | None = None) -> tuple[nn.Module, list[str]]:
    """(model, names of newly initialised parameters). ``meta``: built from the config on the meta device,
    no weights read (for ``--dry-run``)."""
    if (Path(name_or_path).is_absolute() or name_or_path.startswith((".", "~"))) and not Path(name_or_path).exists():
        raise ValueError(f"base model {name_or_path}: no such folder (moved or deleted? give its new location, e.g. "
                         "model.name_or_path=... or MoelaModel.from_pretrained(base, adapter))")
    auto = getattr(transformers, _AUTO_CLASSES[task])
    extra = {"num_labels": num_labels} if task == "sequence_classification" and num_labels else {}
    if revision:
        extra["revision"] = revision
    if meta:
        config = transformers.AutoConfig.from_pretrained(name_or_path, **extra)
        with torch.device("meta"):
            return auto.from_config(config), []
    model, info = auto.from_pretrained(name_or_path, dtype=torch_dtype(dtype), output_loading_info=True, **extra)
    if model.config.pad_token_id is None and task == "sequence_classification":
        model.config.pad_token_id = 0
    return model, sorted(info.get("missing_keys", []))

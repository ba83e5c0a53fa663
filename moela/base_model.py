"""The base model: its task, and loading it and its tokenizer with transformers' Auto classes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import transformers
from torch import nn

from .config import TASK_TYPES as TASKS
from .errors import first_line

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


def check_local(name_or_path: str, what: str = "base model",
                key: str = "model.name_or_path=... or MoelaModel.from_pretrained(base, adapter)") -> None:
    """A name written as a local path (absolute, or starting with ``.`` or ``~``) must exist: ValueError
    naming it (a moved or deleted model) and where to give its new location (``key``) instead of a hub lookup."""
    if (Path(name_or_path).is_absolute() or name_or_path.startswith((".", "~"))) and not Path(name_or_path).exists():
        raise ValueError(f"{what} {name_or_path}: no such folder (moved or deleted? give its new location, e.g. "
                         f"{key})")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_weights(name_or_path: str) -> None:
    """A local model folder holds weights (:data:`WEIGHT_FILES`): ValueError naming it, before any work."""
    path = Path(name_or_path)
    if path.is_dir() and not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(f"{path}: no model weights in this folder (none of {', '.join(WEIGHT_FILES)})")


def read_config(name_or_path: str, config_file: str | os.PathLike | None = None, **extra):
    """The model's config, no weights: from ``config_file`` (a ``config.json`` or the folder holding it) when
    given, else from a local folder or the Hugging Face cache, else from the hub. A ValueError says how to give
    it when none of these has it (``--dry-run`` works offline that way)."""
    if config_file is not None:
        if not Path(config_file).exists():
            raise ValueError(f"{config_file}: no such model config (give a config.json or the folder holding it)")
        return transformers.AutoConfig.from_pretrained(str(config_file), **extra)
    check_local(name_or_path)
    try:
        return transformers.AutoConfig.from_pretrained(name_or_path, local_files_only=True, **extra)
    except (OSError, ValueError) as err:
        if (Path(name_or_path) / "config.json").is_file():
            raise ValueError(f"{Path(name_or_path) / 'config.json'}: not a model config transformers can read "
                             f"({first_line(err)})") from None
        if Path(name_or_path).exists():
            raise ValueError(f"{name_or_path}: no config.json in this model folder") from None
        if not isinstance(err, OSError):
            raise
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True", "ON"):
        print(f"moela: reading the config of {name_or_path} from the Hugging Face hub", file=sys.stderr)
        try:
            return transformers.AutoConfig.from_pretrained(name_or_path, **extra)
        except OSError:
            pass
    raise ValueError(f"the config of {name_or_path!r} is not cached and the hub could not give it: pass "
                     f"--model-config PATH (its config.json, or a folder holding it), or cache it once online "
                     f"(hf download {name_or_path} config.json; gated models need `hf auth login` first)")


def model_task(name_or_path: str, task: str = "auto", config_file: str | os.PathLike | None = None) -> str:
    """One of :data:`TASKS`; ``auto`` reads the architecture from the model config (a causal LM, else sequence
    classification; multiple choice is never guessed)."""
    if task != "auto":
        if task not in TASKS:
            raise ValueError(f"model.task must be one of {('auto',) + TASKS}, got {task!r}")
        return task
    config = read_config(name_or_path, config_file)
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
               meta: bool = False, revision: str | None = None,
               config_file: str | os.PathLike | None = None) -> tuple[nn.Module, list[str]]:
    """(model, names of newly initialised parameters). ``meta``: built from the config on the meta device,
    no weights read (for ``--dry-run``; the config from ``config_file`` when given, :func:`read_config`)."""
    auto = getattr(transformers, _AUTO_CLASSES[task])
    extra = {"num_labels": num_labels} if task == "sequence_classification" and num_labels else {}
    if revision:
        extra["revision"] = revision
    if meta:
        config = read_config(name_or_path, config_file, **extra)
        with torch.device("meta"):
            return auto.from_config(config), []
    check_local(name_or_path)
    model, info = auto.from_pretrained(name_or_path, dtype=torch_dtype(dtype), output_loading_info=True, **extra)
    if model.config.pad_token_id is None and task == "sequence_classification":
        model.config.pad_token_id = 0
    return model, sorted(info.get("missing_keys", []))

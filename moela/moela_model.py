"""``MoelaModel``: a transformers model with a moela adapter, in the PEFT idiom (``get_peft_model`` /
``PeftModel``): ``save_pretrained`` writes the adapter only, ``from_pretrained(base, path_or_repo)`` loads it.

The wrapper's ``state_dict()`` holds the adapter, the trained head and the adapter config (as the module's
extra state, a byte tensor), not the frozen base weights. So the transformers ``Trainer`` (and TRL's
trainers), which save a model that is not a ``PreTrainedModel`` through its state dict, write adapter-only
checkpoints and ``save_model`` folders, resume from them, and :meth:`MoelaModel.from_pretrained` reloads them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from torch import nn

from .adapter import load_adapter, save_adapter
from .config import CONFIG_NAME, MoelaConfig
from .model import count_parameters, disable_adapters, inject, merge_and_unload, unload
from .plan import AllocationPlan

TRAINER_WEIGHTS = "model.safetensors"  # what the Trainer writes for a model that is not a PreTrainedModel
EXTRA_STATE = "_extra_state"


class MoelaModel(nn.Module):
    """``model`` with the LoRA-MoE layers of ``config`` injected (:func:`moela.inject`), held as ``wrapped``;
    every attribute of the wrapped model is reachable through the wrapper (``config``, ``generate``, ``device``,
    transformers' ``base_model`` backbone …)."""

    def __init__(self, model: nn.Module, config: MoelaConfig | None = None, **inject_options: Any):
        super().__init__()
        if config is not None:
            inject(model, config, **inject_options)
        elif not hasattr(model, "moela_config"):
            raise ValueError("MoelaModel needs a MoelaConfig, or a model that moela.inject already adapted")
        self.wrapped = model
        # forward with the base model's signature: the Trainer picks dataset columns and loss arguments from it
        self.forward = functools.wraps(model.forward)(lambda *args, **kwargs: self.wrapped(*args, **kwargs))
        self.register_state_dict_post_hook(_adapter_only)
        self.register_load_state_dict_post_hook(_base_keys_are_not_missing)

    # --- the wrapped model -----------------------------------------------------------------------------------
    @property
    def moela_config(self) -> MoelaConfig:
        return self.wrapped.moela_config

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (with its LoRA-MoE layers), as PEFT's ``get_base_model``."""
        return self.wrapped

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapped.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "wrapped":
                raise
            return getattr(self.wrapped, name)

    # --- state: adapter, head and config only ----------------------------------------------------------------------
    def get_extra_state(self) -> torch.Tensor:
        """The adapter config as UTF-8 JSON bytes, so a state-dict checkpoint says how to rebuild the adapter."""
        return torch.frombuffer(bytearray(json.dumps(self.moela_config.to_dict()).encode()), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        """Refuse a checkpoint whose adapter plan differs from this model's (loading it would mis-shape weights)."""
        saved = config_from_bytes(state)
        if saved.plan.to_dict()["modules"] != self.moela_config.plan.to_dict()["modules"]:
            raise ValueError("the checkpoint's adapter plan differs from this model's; load it with "
                             "MoelaModel.from_pretrained(base, checkpoint) instead")

    # --- PEFT's API ----------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                        is_main_process: bool = True, **_: Any) -> None:
        """Write ``adapter_config.json``, ``adapter_model.safetensors`` and the trained head (``head.safetensors``)
        into ``save_directory``, replacing an earlier adapter there atomically; nothing of the base model."""
        if not is_main_process:
            return
        inner = None if state_dict is None else {k.removeprefix("wrapped."): v for k, v in state_dict.items()}
        save_adapter(self.wrapped, save_directory, inner)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | Path, is_trainable: bool = False,
                        revision: str | None = None, **hub: Any) -> "MoelaModel":
        """``model`` (a fresh base) with the adapter of ``model_id``: a local adapter folder, a folder the
        ``Trainer`` saved (its ``model.safetensors``), or a hub repository (downloaded with ``huggingface_hub``).
        Frozen unless ``is_trainable``."""
        folder = Path(model_id)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(model_id), revision=revision, **hub))
        if (folder / CONFIG_NAME).is_file():
            return cls(load_adapter(model, folder, is_trainable=is_trainable))
        weights = folder / TRAINER_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"{folder}: no moela adapter here (neither {CONFIG_NAME} nor {TRAINER_WEIGHTS})")
        with safe_open(str(weights), "pt") as handle:
            if EXTRA_STATE not in handle.keys():
                raise ValueError(f"{weights}: not a moela checkpoint (no adapter config in it)")
            state = {k: handle.get_tensor(k) for k in handle.keys()}
        wrapped = cls(model, config_from_bytes(state[EXTRA_STATE]))
        wrapped.load_state_dict(state, strict=False)
        wrapped.requires_grad_(False)
        if is_trainable:
            for name, param in wrapped.named_parameters():
                param.requires_grad_(_is_adapter_or_head(wrapped, name))
        return wrapped

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "moela adapter") -> Any:
        """Upload the adapter folder (:meth:`save_pretrained`) to the hub repository ``repo_id``."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as scratch:
            self.save_pretrained(Path(scratch) / "adapter")
            return api.upload_folder(repo_id=repo_id, folder_path=str(Path(scratch) / "adapter"),
                                     commit_message=commit_message)

    def merge_and_unload(self) -> nn.Module:
        """The base model with the adapter folded into its weights (plain-LoRA plans only; the first routed
        module is named otherwise) and the trained head kept."""
        return merge_and_unload(self.wrapped)

    def unload(self) -> nn.Module:
        """The base model exactly as it was before the adapter was injected."""
        return unload(self.wrapped)

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator["MoelaModel"]:
        """Within the block the model computes as its base."""
        with disable_adapters(self.wrapped):
            yield self

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = count_parameters(self)
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")


def get_moela_model(model: nn.Module, config: MoelaConfig | AllocationPlan, **inject_options: Any) -> MoelaModel:
    """PEFT's ``get_peft_model``: ``model`` adapted by ``config`` (a :class:`MoelaConfig`, or a plan with
    :func:`moela.inject`'s options), wrapped in a :class:`MoelaModel`."""
    if isinstance(config, AllocationPlan):
        inject(model, config, **inject_options)
        return MoelaModel(model)
    return MoelaModel(model, config, **inject_options)


def config_from_bytes(state: torch.Tensor) -> MoelaConfig:
    return MoelaConfig.from_dict(json.loads(bytes(state.to(torch.uint8).tolist()).decode()))


def _is_adapter_or_head(wrapped: MoelaModel, name: str) -> bool:
    inner = name.removeprefix("wrapped.")
    return any(f".{part}." in f".{inner}" for part in ("lora_A", "lora_B", "router")) or any(
        inner.startswith(m + ".") for m in wrapped.moela_config.modules_to_save)


def _adapter_only(module: MoelaModel, state: dict[str, Any], prefix: str, local_metadata: dict) -> None:
    for key in list(state):
        name = key[len(prefix):]
        if name != EXTRA_STATE and not _is_adapter_or_head(module, name):
            del state[key]


def _base_keys_are_not_missing(module: MoelaModel, incompatible: Any) -> None:
    """A state dict of :class:`MoelaModel` leaves out the frozen base weights on purpose."""
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if _is_adapter_or_head(module, k)]

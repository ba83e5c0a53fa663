"""The adapter folder (PEFT's layout): ``adapter_config.json`` (:class:`~moela.config.MoelaConfig`),
``adapter_model.safetensors`` and, when the config names ``modules_to_save``, ``head.safetensors``.

``adapter_model.safetensors`` holds, per adapted module, ``<module>.router.weight`` (E+M × d_in, absent without
a router), ``<module>.experts.<i>.lora_A`` (r_i × d_in) and ``<module>.experts.<i>.lora_B`` (d_out × r_i);
``head.safetensors`` the parameters of the saved base modules under their names in the model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import CONFIG_NAME, HEAD_NAME, WEIGHTS_NAME, MoelaConfig
from .errors import first_line
from .io import (atomic_dir, follow_umask, fsync_dir, fsync_tree, is_temporary, make_temp_dir, protected,
                 recover_dir)
from .model import inject, moela_layers


def adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter weights under their documented per-expert keys (module docstring). ``state``: a full state
    dict of ``model`` to read the packed weights from instead of its parameters (what FSDP or DeepSpeed ZeRO-3
    gather from their shards)."""
    def weight(module: nn.Module, path: str) -> torch.Tensor:
        return (state[f"{path}.weight"] if state is not None else module.weight).detach()

    out = {}
    for name, layer in moela_layers(model):
        if layer.router is not None:
            out[f"{name}.router.weight"] = weight(layer.router, f"{name}.router")
        a, b = weight(layer.lora_A, f"{name}.lora_A"), weight(layer.lora_B, f"{name}.lora_B")
        for i, cols in enumerate(layer.expert_slices()):
            out[f"{name}.experts.{i}.lora_A"] = a[cols]
            out[f"{name}.experts.{i}.lora_B"] = b[:, cols]
    return {k: v.contiguous().cpu() for k, v in out.items()}


def head_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The parameters of the config's ``modules_to_save`` under their names in ``model`` (``state`` as in
    :func:`adapter_state_dict`)."""
    modules = model.moela_config.modules_to_save
    params = state if state is not None else dict(model.named_parameters())
    names = [n for n in params if any(n.startswith(m + ".") for m in modules)]
    return {n: params[n].detach().contiguous().cpu() for n in names}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy per-expert weights into the packed layers. Raises ValueError on a missing, extra or
    mis-shaped tensor, naming it."""
    expected = set()
    with torch.no_grad():
        for name, layer in moela_layers(model):
            targets = []
            if layer.router is not None:
                targets.append((f"{name}.router.weight", layer.router.weight, slice(None), None))
            for i, cols in enumerate(layer.expert_slices()):
                targets.append((f"{name}.experts.{i}.lora_A", layer.lora_A.weight, cols, 0))
                targets.append((f"{name}.experts.{i}.lora_B", layer.lora_B.weight, cols, 1))
            for key, weight, cols, axis in targets:
                expected.add(key)
                if key not in state:
                    raise ValueError(f"{source}: tensor {key!r} is missing")
                dest = weight if axis is None else (weight[cols] if axis == 0 else weight[:, cols])
                if tuple(state[key].shape) != tuple(dest.shape):
                    raise ValueError(f"{source}: tensor {key!r} has shape {tuple(state[key].shape)} but module "
                                     f"{name!r} of this base model needs {tuple(dest.shape)}")
                dest.copy_(state[key].to(dest.dtype))
    extra = sorted(set(state) - expected)
    if extra:
        raise ValueError(f"{source}: tensor {extra[0]!r} belongs to no adapted module of this model "
                         f"({len(extra)} unexpected tensor(s))")


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; ValueError naming the file when it cannot be read (empty, truncated,
    not safetensors) and naming the tensor when one holds a NaN or an infinity."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({first_line(err)}); the file is empty, "
                         "truncated or corrupt") from None
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{path}: tensor {key!r} holds non-finite values (NaN or infinity); refusing a corrupt "
                             "adapter")
    return tensors


def load_head_state_dict(model: nn.Module, directory: str | Path) -> list[str]:
    """Copy ``head.safetensors`` (if any) into ``model``; returns the parameter names loaded."""
    path = Path(directory) / HEAD_NAME
    if not path.is_file():
        return []
    tensors = read_tensors(path)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if name not in params or params[name].shape != value.shape:
                raise ValueError(f"{path}: tensor {name!r} does not fit this model")
            params[name].copy_(value.to(params[name].dtype))
    return sorted(tensors)


def write_adapter(model: nn.Module, directory: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the adapter files into the existing folder ``directory`` (not atomic: :func:`save_adapter` is).
    ``state`` as in :func:`adapter_state_dict`."""
    config = getattr(model, "moela_config", None)
    if config is None:
        raise ValueError("this model has no moela adapters: call moela.inject first")
    config.save(directory)
    _save_tensors(adapter_state_dict(model, state), Path(directory) / WEIGHTS_NAME)
    head = head_state_dict(model, state)
    if head:
        _save_tensors(head, Path(directory) / HEAD_NAME)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file with the permissions ``open`` gives under the umask (safetensors makes it 0600)."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    follow_umask(path)


ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, HEAD_NAME)


def save_adapter(model: nn.Module, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the adapter files (module docstring) into ``directory``. ``state``: a gathered full state dict to
    read the weights from.

    A new folder, or one holding only an adapter's files, is replaced whole, atomically: a failure leaves the
    previous adapter untouched. Into any other folder (a tokenizer or a script beside the adapter, as PEFT users
    keep them; the current folder) only the adapter's own files are written, each replaced atomically, the
    weights before the config, and nothing else there is touched.
    """
    directory = Path(directory)
    others = [e for e in directory.iterdir() if e.name not in ADAPTER_FILES and not is_temporary(e)] \
        if directory.is_dir() else []
    if not others and protected(directory) is None:
        with atomic_dir(directory) as tmp:
            write_adapter(model, tmp, state)
        return
    tmp = make_temp_dir(directory / ".adapter")
    try:
        write_adapter(model, tmp, state)
        fsync_tree(tmp)
        for name in (WEIGHTS_NAME, HEAD_NAME, CONFIG_NAME):
            if (tmp / name).is_file():
                os.replace(tmp / name, directory / name)
            elif name == HEAD_NAME:  # an earlier adapter's head, which this one does not have
                (directory / name).unlink(missing_ok=True)
        fsync_dir(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_adapter(directory: str | Path) -> tuple[MoelaConfig, dict[str, torch.Tensor]]:
    """The config and weights of the adapter folder ``directory``, read without a model (so a command can check
    them before it loads one); every error names the file."""
    directory = Path(directory)
    recover_dir(directory)  # a crash between the two renames of a replacement left it as .<name>.old
    config = MoelaConfig.load(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no adapter weights here")
    return config, read_tensors(weights)


def load_adapter(model: nn.Module, directory: str | Path, is_trainable: bool = False,
                 adapter_dtype: torch.dtype | None = None) -> nn.Module:
    """Inject the adapter saved in ``directory`` into the base ``model`` and load its weights and head.

    The adapter is frozen unless ``is_trainable``. Raises ValueError if the base model lacks a planned module
    or its shapes differ from the adapter's.
    """
    directory = Path(directory)
    config, state = read_adapter(directory)
    weights = directory / WEIGHTS_NAME
    try:
        dims = config.plan.validate(model)
    except ValueError as err:
        raise ValueError(f"{directory / CONFIG_NAME}: adapter does not fit this base model: {err}") from None
    for name, (d_in, d_out) in dims.items():
        a, b = state.get(f"{name}.experts.0.lora_A"), state.get(f"{name}.experts.0.lora_B")
        if a is not None and b is not None and (a.shape[1], b.shape[0]) != (d_in, d_out):
            raise ValueError(f"{weights}: adapter does not fit this base model: module {name!r} was trained on "
                             f"d_in={a.shape[1]}, d_out={b.shape[0]} but here has d_in={d_in}, d_out={d_out}")
    inject(model, config, adapter_dtype=adapter_dtype)
    load_adapter_state_dict(model, state, source=str(weights))
    load_head_state_dict(model, directory)
    model.requires_grad_(False)
    if is_trainable:
        for _, layer in moela_layers(model):
            for module in (layer.lora_A, layer.lora_B, layer.router):
                if module is not None:
                    module.requires_grad_(True)
        for name in config.modules_to_save:
            model.get_submodule(name).requires_grad_(True)
    return model


def copy_adapter(model: nn.Module, directory: str | Path) -> None:
    """Load adapter and head weights from ``directory`` into a model that already has the adapter."""
    load_adapter_state_dict(model, read_tensors(Path(directory) / WEIGHTS_NAME), source=str(directory))
    load_head_state_dict(model, directory)

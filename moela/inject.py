"""Putting LoRA-MoE layers into a model, the auxiliary loss, and adapter save/load.

Adapter files (PEFT's layout): ``adapter_config.json`` (:class:`MoelaConfig`) and ``adapter_model.safetensors``
with, per adapted module, ``<module>.router.weight`` (E+M × d_in, absent without a router),
``<module>.experts.<i>.lora_A`` (r_i × d_in) and ``<module>.experts.<i>.lora_B`` (d_out × r_i).
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import CONFIG_NAME, WEIGHTS_NAME, MoelaConfig
from .io import atomic_dir
from .layer import LoraMoELinear
from .plan import AllocationPlan

_MASK_ATTR = "_moela_attention_mask"


def inject(model: nn.Module, plan: AllocationPlan | MoelaConfig, alpha: float = 16.0, dropout: float = 0.0,
           scaling: str = "lora", adapter_dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap every module of ``plan`` in a :class:`LoraMoELinear`, in place; freeze all other parameters.

    ``plan`` may be a :class:`MoelaConfig`, whose alpha/dropout/scaling then apply. Returns ``model``, with
    the config at ``model.moela_config``. Raises ValueError naming a module the plan cannot apply to.
    """
    config = plan if isinstance(plan, MoelaConfig) else MoelaConfig(plan, alpha, dropout, scaling)
    if hasattr(model, "moela_config"):
        raise ValueError("this model already has moela adapters; load a fresh base model to inject again")
    config.plan.validate(model)
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config.base_model_name_or_path = config.base_model_name_or_path or name_or_path
    config.revision = config.revision or getattr(getattr(model, "config", None), "_commit_hash", None)
    model.requires_grad_(False)
    for name, spec in config.plan.items():
        base = model.get_submodule(name)
        layer = LoraMoELinear(base, spec.ranks, top_k=spec.top_k, alpha=config.alpha, dropout=config.dropout,
                              scaling=config.scaling, top_p=spec.top_p, max_k=spec.max_k, num_null=spec.num_null,
                              adapter_dtype=adapter_dtype)
        model.set_submodule(name, layer)
    model.moela_config = config
    model.register_forward_pre_hook(_capture_attention_mask, with_kwargs=True)
    return model


def get_moela_model(model: nn.Module, config: MoelaConfig) -> nn.Module:
    """PEFT-style alias of :func:`inject` taking a :class:`MoelaConfig`."""
    return inject(model, config)


def moela_layers(model: nn.Module) -> Iterator[tuple[str, LoraMoELinear]]:
    """``(path, layer)`` for every LoRA-MoE layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoraMoELinear):
            yield name, module


def _capture_attention_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
    mask = kwargs.get("attention_mask")
    if mask is None and args:
        try:
            bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
            mask = bound.arguments.get("attention_mask")
        except TypeError:
            mask = None
    object.__setattr__(module, _MASK_ATTR, mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None)


def balance_loss(model: nn.Module, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean load-balancing loss (METHODS.md §2.4) of the routed layers over the last forward.

    Padding positions are ignored, using ``attention_mask`` or else the one passed to the model's forward.
    Multiply by a coefficient (1e-3 in MoLA/GuiLoMo) before adding it to the task loss.
    """
    mask = attention_mask if attention_mask is not None else getattr(model, _MASK_ATTR, None)
    losses = []
    for _, layer in moela_layers(model):
        stats = layer.last_stats
        if stats is None:
            continue
        token_mask = mask if mask is not None and tuple(mask.shape) == tuple(stats.logits.shape[:-1]) else None
        loss = layer.balance_loss(token_mask)
        if loss is not None:
            losses.append(loss)
    if not losses:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.stack(losses).mean()


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the model computes as its base (every adapter bypassed)."""
    layers = [layer for _, layer in moela_layers(model)]
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, state in zip(layers, previous):
            layer.disabled = state


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def print_trainable_parameters(model: nn.Module) -> None:
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")


# --- adapter files ---------------------------------------------------------------------------------------
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


def write_adapter(model: nn.Module, directory: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into the existing folder ``directory``
    (not atomic: :func:`save_adapter` is). ``state`` as in :func:`adapter_state_dict`."""
    config = getattr(model, "moela_config", None)
    if config is None:
        raise ValueError("this model has no moela adapters: call moela.inject first")
    config.save(directory)
    save_file(adapter_state_dict(model, state), str(Path(directory) / WEIGHTS_NAME), metadata={"format": "pt"})


def save_adapter(model: nn.Module, directory: str | Path) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``, atomically:
    a failure leaves any previous adapter there untouched."""
    with atomic_dir(Path(directory)) as tmp:
        write_adapter(model, tmp)


def load_adapter(model: nn.Module, directory: str | Path, is_trainable: bool = False,
                 adapter_dtype: torch.dtype | None = None) -> nn.Module:
    """Inject the adapter saved in ``directory`` into the base ``model`` and load its weights.

    The adapter is frozen unless ``is_trainable``. Raises ValueError if the base model lacks a planned module
    or its shapes differ from the adapter's.
    """
    directory = Path(directory)
    config = MoelaConfig.load(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no adapter weights here")
    state = load_file(str(weights))
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
    for _, layer in moela_layers(model):
        for p in (*layer.lora_A.parameters(), *layer.lora_B.parameters(),
                  *(layer.router.parameters() if layer.router is not None else ())):
            p.requires_grad_(is_trainable)
    return model

"""A model with LoRA-MoE layers: injecting them, the trained head, the auxiliary loss, switching them off."""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from .base_model import task_of
from .config import MoelaConfig
from .layer import LoraMoELinear
from .plan import AllocationPlan

_MASK_ATTR = "_moela_attention_mask"
# Output heads an encoder task trains with the adapter (PEFT's ``modules_to_save`` for sequence classification).
CLASSIFIER_HEADS = ("classifier", "score")


def inject(model: nn.Module, plan: AllocationPlan | MoelaConfig, alpha: float = 16.0, dropout: float = 0.0,
           scaling: str = "lora", adapter_dtype: torch.dtype | None = None,
           modules_to_save: Sequence[str] | None = None, balance_coef: float = 1e-3,
           balance_reduction: str = "sum") -> nn.Module:
    """Wrap every module of ``plan`` in a :class:`LoraMoELinear`, in place; freeze all other parameters except
    those of ``modules_to_save``.

    ``plan`` may be a :class:`MoelaConfig`, whose settings then apply instead of the arguments.
    ``modules_to_save``: base modules trained and saved with the adapter (names or path suffixes); default: the
    classifier head of a sequence-classification or multiple-choice model (:func:`default_modules_to_save`).
    ``balance_coef``: the routers' load-balancing loss (METHODS.md §2.4) is added to their gradients in
    backward by each routed layer in training mode — with the transformers Trainer, TRL, Accelerate or a plain
    loop alike, nothing else to add — with this coefficient per module (``balance_reduction="sum"``, as MoLA
    and GuiLoMo) or divided by the number of routed modules (``"mean"``); 0 turns it off.
    Returns ``model``, with the config at ``model.moela_config``. Raises ValueError naming a module the plan
    cannot apply to.
    """
    if hasattr(model, "moela_config"):
        raise ValueError("this model already has moela adapters; load a fresh base model to inject again")
    if isinstance(plan, MoelaConfig):
        config = plan
    else:
        config = MoelaConfig(plan, alpha, dropout, scaling, balance_coef=balance_coef,
                             balance_reduction=balance_reduction)
        config.modules_to_save = list(modules_to_save) if modules_to_save is not None else \
            default_modules_to_save(model)
    config.plan.validate(model)
    head = resolve_modules(model, config.modules_to_save)
    settings = getattr(model, "config", None)
    name_or_path = getattr(settings, "_name_or_path", None) or None
    config.base_model_name_or_path = located(config.base_model_name_or_path or name_or_path)
    config.revision = config.revision or getattr(settings, "_commit_hash", None)
    config.task_type = config.task_type or task_of(model)
    if config.task_type == "sequence_classification":
        config.num_labels = config.num_labels or getattr(settings, "num_labels", None)
    config.modules_to_save = head
    object.__setattr__(model, "_moela_base_state", {  # what unload() puts back
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "head": {n: t.detach().clone() for n, t in model.state_dict().items() if any(n.startswith(h + ".") for h in head)}})
    model.requires_grad_(False)
    for name in head:
        model.get_submodule(name).requires_grad_(True)
    for name, spec in config.plan.items():
        base = model.get_submodule(name)
        layer = LoraMoELinear(base, spec.ranks, top_k=spec.top_k, alpha=config.alpha, dropout=config.dropout,
                              scaling=config.scaling, top_p=spec.top_p, max_k=spec.max_k, num_null=spec.num_null,
                              adapter_dtype=adapter_dtype)
        model.set_submodule(name, layer)
    model.moela_config = config
    object.__setattr__(model, "_moela_layers", [layer for _, layer in moela_layers(model)])  # not submodules
    set_balance_coef(model, config.balance_coef)
    object.__setattr__(model, "_moela_hook", model.register_forward_pre_hook(_capture_attention_mask, with_kwargs=True))
    return model


def unload(model: nn.Module) -> nn.Module:
    """The base model exactly back, in place: every LoRA-MoE layer replaced by the module it wrapped, the head
    (``modules_to_save``) and every ``requires_grad`` flag as they were before :func:`inject`."""
    base = model._moela_base_state
    for name, layer in list(moela_layers(model)):
        model.set_submodule(name, layer.base_layer)
    model.load_state_dict(base["head"], strict=False)
    for name, param in model.named_parameters():
        param.requires_grad_(base["requires_grad"].get(name, param.requires_grad))
    model._moela_hook.remove()
    for attr in ("moela_config", "_moela_layers", "_moela_hook", "_moela_base_state", _MASK_ATTR):
        if hasattr(model, attr):
            object.__delattr__(model, attr)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """The base model with each adapter folded into its weight, ``W ← W + s · B A`` (and the trained head kept),
    in place. Only plain-LoRA modules (one expert, no router) can be merged: a routed module's update depends on
    the input, so a ValueError names the first one."""
    for name, layer in moela_layers(model):
        if layer.routed:
            raise ValueError(f"module {name!r} has {layer.num_experts} experts with a router: its update depends on "
                             "each token, so it cannot be merged into the weight (use unload() or keep the adapter)")
    with torch.no_grad():
        for _, layer in moela_layers(model):
            weight = layer.base_layer.weight
            delta = float(layer.column_scale[0]) * (layer.lora_B.weight.float() @ layer.lora_A.weight.float())
            weight.add_((delta if isinstance(layer.base_layer, nn.Linear) else delta.T).to(weight.dtype))
    model._moela_base_state["head"] = {}  # the trained head stays
    return unload(model)


def set_balance_coef(model: nn.Module, coef: float) -> None:
    """Set the load-balancing coefficient of every routed layer (per the config's reduction; 0: off)."""
    config = model.moela_config
    routed = [layer for _, layer in moela_layers(model) if layer.routed]
    config.balance_coef = float(coef)
    for layer in routed:
        layer.balance_coef = config.balance_coef / (len(routed) if config.balance_reduction == "mean" else 1)


def located(name_or_path: str | None) -> str | None:
    """A local model folder as an absolute path (so the adapter finds its base from anywhere); a hub id as given."""
    if name_or_path and Path(name_or_path).is_dir():
        return str(Path(name_or_path).resolve())
    return name_or_path


def default_modules_to_save(model: nn.Module) -> list[str]:
    """The classifier head (modules named ``classifier`` or ``score``) of a sequence-classification or
    multiple-choice model; nothing for other models."""
    if task_of(model) not in ("sequence_classification", "multiple_choice"):
        return []
    return [name for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] in CLASSIFIER_HEADS and any(True for _ in module.parameters())
            and not any(name.startswith(other + ".") for other in CLASSIFIER_HEADS)]


def resolve_modules(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Full paths of the modules named by ``names`` (a path, or a suffix after a dot); ValueError naming one that
    matches no module with parameters."""
    modules = dict(model.named_modules())
    found: list[str] = []
    for name in names:
        hits = [p for p, m in modules.items() if p and (p == name or p.endswith("." + name))
                and any(True for _ in m.parameters())]
        if not hits:
            raise ValueError(f"modules_to_save: no module {name!r} in this model")
        found += [h for h in hits if h not in found]
    return found


def moela_layers(model: nn.Module) -> Iterator[tuple[str, LoraMoELinear]]:
    """``(path, layer)`` for every LoRA-MoE layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoraMoELinear):
            yield name, module


def _capture_attention_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: the batch's attention mask (2-D, or 3-D for multiple choice) goes to every layer as its
    ``token_mask``, so the balance loss counts real tokens only."""
    mask = kwargs.get("attention_mask")
    if mask is None and args:
        try:
            bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
            mask = bound.arguments.get("attention_mask")
        except TypeError:
            mask = None
    mask = mask if isinstance(mask, torch.Tensor) and mask.dim() in (2, 3) else None
    object.__setattr__(module, _MASK_ATTR, mask)
    for layer in module._moela_layers:  # a plain attribute: skip nn.Module.__setattr__'s bookkeeping (every forward)
        object.__setattr__(layer, "token_mask", mask)


def _token_mask(mask: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor | None:
    """``mask`` shaped as the router logits' token dimensions, or None when it does not fit them."""
    if mask is None or mask.numel() != logits.shape[:-1].numel():
        return None
    return mask.reshape(logits.shape[:-1])


def balance_loss(model: nn.Module, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The load-balancing loss (METHODS.md §2.4) of the routed layers over the last forward, summed or averaged
    over modules as the adapter config says (``balance_reduction``), for logging or a loss of your own.

    Padding positions are ignored, using ``attention_mask`` or else the one passed to the model's forward.
    In training the layers already add ``balance_coef`` times it to the router gradients (:func:`inject`).
    """
    mask = attention_mask if attention_mask is not None else getattr(model, _MASK_ATTR, None)
    losses = []
    for _, layer in moela_layers(model):
        stats = layer.last_stats
        if stats is None:
            continue
        loss = layer.balance_loss(_token_mask(mask, stats.logits))
        if loss is not None:
            losses.append(loss)
    if not losses:
        return torch.zeros((), device=next(model.parameters()).device)
    config = getattr(model, "moela_config", None)
    reduce = torch.mean if config is not None and config.balance_reduction == "mean" else torch.sum
    return reduce(torch.stack(losses))


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

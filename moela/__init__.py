"""moela: fine-tune pretrained transformers with a mixture of LoRA experts allocated per layer.

The public names below, and the submodules, are imported on first use (PEP 562), so that ``import moela.plan``
or the ``moela plan show`` command do not pay for torch, transformers and the Trainer.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

from .version import __version__

# public name → the module that defines it
_EXPORTS = {
    "load_adapter": "adapter", "save_adapter": "adapter",
    "allocate": "allocators", "allocator": "allocators", "available": "allocators", "register": "allocators",
    "MoelaConfig": "config",
    "teacher_loss": "distillation",
    "LoraMoELinear": "layer",
    "balance_loss": "model", "count_parameters": "model", "disable_adapters": "model", "inject": "model",
    "merge_and_unload": "model", "moela_layers": "model", "print_trainable_parameters": "model",
    "set_balance_coef": "model", "unload": "model",
    "MoelaModel": "moela_model", "get_moela_model": "moela_model",
    "compare": "pipeline", "run": "pipeline",
    "AllocationPlan": "plan", "ModulePlan": "plan", "find_targets": "plan",
    "Settings": "settings", "load_settings": "settings",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)  # a submodule, e.g. moela.allocators
    raise AttributeError(f"module 'moela' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .adapter import load_adapter, save_adapter
    from .allocators import allocate, allocator, available, register
    from .config import MoelaConfig
    from .layer import LoraMoELinear
    from .model import (balance_loss, count_parameters, disable_adapters, inject, merge_and_unload, moela_layers,
                        print_trainable_parameters, set_balance_coef, unload)
    from .moela_model import MoelaModel, get_moela_model
    from .pipeline import compare, run
    from .plan import AllocationPlan, ModulePlan, find_targets
    from .settings import Settings, load_settings

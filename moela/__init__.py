"""moela: fine-tune pretrained transformers with a mixture of LoRA experts allocated per layer."""

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
from .version import __version__

__all__ = ["AllocationPlan", "LoraMoELinear", "ModulePlan", "MoelaConfig", "MoelaModel", "Settings", "__version__",
           "allocate", "allocator", "available", "balance_loss", "compare", "count_parameters", "disable_adapters",
           "find_targets", "get_moela_model", "inject", "load_adapter", "load_settings", "merge_and_unload",
           "moela_layers", "print_trainable_parameters", "register", "run", "save_adapter", "set_balance_coef",
           "unload"]

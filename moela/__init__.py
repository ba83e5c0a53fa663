"""moela: fine-tune pretrained transformers with a mixture of LoRA experts allocated per layer."""

__version__ = "0.1.0"

from .config import MoelaConfig
from .inject import (balance_loss, count_parameters, disable_adapters, get_moela_model, inject, load_adapter,
                     moela_layers, print_trainable_parameters, save_adapter)
from .layer import LoraMoELinear
from .allocators import allocate, register
from .plan import AllocationPlan, ModulePlan, find_targets

__all__ = ["allocate", "register", "AllocationPlan", "LoraMoELinear", "ModulePlan", "MoelaConfig", "__version__", "balance_loss",
           "count_parameters", "disable_adapters", "find_targets", "get_moela_model", "inject", "load_adapter",
           "moela_layers", "print_trainable_parameters", "save_adapter"]

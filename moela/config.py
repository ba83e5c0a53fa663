"""``MoelaConfig``: everything needed to rebuild an adapter besides its weights (``adapter_config.json``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io import atomic_write_text, read_json
from .layer import SCALINGS
from .plan import AllocationPlan
from .version import __version__

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
HEAD_NAME = "head.safetensors"
TASK_TYPES = ("causal_lm", "sequence_classification", "multiple_choice")
BALANCE_REDUCTIONS = ("sum", "mean")


@dataclass
class MoelaConfig:
    """The plan plus the layer hyper-parameters shared by all adapted modules (METHODS.md §2), and what is
    needed to find and shape the base model again."""

    plan: AllocationPlan
    alpha: float = 16.0
    """LoRA scale numerator: expert i adds ``α/r_i · B_i A_i x`` (``α/√r_i`` with ``scaling="rslora"``)."""
    dropout: float = 0.0
    """Dropout probability on the adapter input (one mask shared by the router and the experts)."""
    scaling: str = "lora"
    """``lora`` (α/r) or ``rslora`` (α/√r)."""
    base_model_name_or_path: str | None = None
    """The base model: a hub id as given, or an absolute local path."""
    revision: str | None = None
    """The base model's commit on the hub, when known."""
    task_type: str | None = None
    """One of :data:`TASK_TYPES` (which ``AutoModelFor…`` class the base is loaded with), when known."""
    num_labels: int | None = None
    """Classifier output size of a sequence-classification base."""
    modules_to_save: list[str] = field(default_factory=list)
    """Base modules trained with the adapter (e.g. the classifier head), saved in ``head.safetensors``."""
    balance_coef: float = 1e-3
    """Coefficient of the routers' load-balancing loss, added to their gradients in backward by the layers
    themselves, whatever computes the task loss (0: off)."""
    balance_reduction: str = "sum"
    """``sum`` over routed modules (as MoLA and GuiLoMo: each router gets ``balance_coef``) or ``mean``
    (each gets ``balance_coef / n_routed``)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {self.scaling!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.balance_reduction not in BALANCE_REDUCTIONS:
            raise ValueError(f"balance_reduction must be one of {BALANCE_REDUCTIONS}, got {self.balance_reduction!r}")
        if not float(self.balance_coef) >= 0:
            raise ValueError(f"balance_coef must be >= 0, got {self.balance_coef!r}")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES}, got {self.task_type!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"adapter_type": "moela", "moela_version": __version__, "alpha": self.alpha,
                "dropout": self.dropout, "scaling": self.scaling,
                "base_model_name_or_path": self.base_model_name_or_path, "revision": self.revision,
                "task_type": self.task_type, "num_labels": self.num_labels,
                "modules_to_save": list(self.modules_to_save), "balance_coef": self.balance_coef,
                "balance_reduction": self.balance_reduction, "extra": self.extra, "plan": self.plan.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoelaConfig":
        if not isinstance(data, dict) or "plan" not in data:
            raise ValueError("not a moela adapter config: it has no 'plan'")
        def number(key: str, default: float) -> float:
            try:
                return float(data.get(key, default))
            except (TypeError, ValueError):
                raise ValueError(f"{key!r} must be a number, got {data[key]!r}") from None

        return cls(plan=AllocationPlan.from_dict(data["plan"]), alpha=number("alpha", 16.0),
                   dropout=number("dropout", 0.0), scaling=data.get("scaling", "lora"),
                   base_model_name_or_path=data.get("base_model_name_or_path"), revision=data.get("revision"),
                   task_type=data.get("task_type"), num_labels=data.get("num_labels"),
                   modules_to_save=list(data.get("modules_to_save") or []),
                   balance_coef=number("balance_coef", 1e-3),
                   balance_reduction=data.get("balance_reduction", "sum"), extra=dict(data.get("extra") or {}))

    def save(self, directory: str | Path) -> None:
        atomic_write_text(Path(directory) / CONFIG_NAME, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "MoelaConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no adapter config here")
        data = read_json(path)
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from None

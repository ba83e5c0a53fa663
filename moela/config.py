"""``MoelaConfig``: everything needed to rebuild an adapter besides its weights (``adapter_config.json``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io import atomic_write_text
from .layer import SCALINGS
from .plan import AllocationPlan

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class MoelaConfig:
    """The plan plus the layer hyper-parameters shared by all adapted modules (METHODS.md §2)."""

    plan: AllocationPlan
    alpha: float = 16.0
    dropout: float = 0.0
    scaling: str = "lora"
    base_model_name_or_path: str | None = None
    revision: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {self.scaling!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict[str, Any]:
        from . import __version__

        return {"adapter_type": "moela", "moela_version": __version__, "alpha": self.alpha,
                "dropout": self.dropout, "scaling": self.scaling,
                "base_model_name_or_path": self.base_model_name_or_path, "revision": self.revision,
                "extra": self.extra, "plan": self.plan.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoelaConfig":
        if not isinstance(data, dict) or "plan" not in data:
            raise ValueError("not a moela adapter config: it has no 'plan'")
        return cls(plan=AllocationPlan.from_dict(data["plan"]), alpha=float(data.get("alpha", 16.0)),
                   dropout=float(data.get("dropout", 0.0)), scaling=data.get("scaling", "lora"),
                   base_model_name_or_path=data.get("base_model_name_or_path"), revision=data.get("revision"),
                   extra=dict(data.get("extra") or {}))

    def save(self, directory: str | Path) -> None:
        atomic_write_text(Path(directory) / CONFIG_NAME, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "MoelaConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no adapter config here")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from None

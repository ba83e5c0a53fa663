"""Allocation plans: which modules get experts, how many, of which ranks, routed how; and what they cost.

A plan maps full module paths to a :class:`ModulePlan`. Its budget is the number of trainable parameters it
adds (METHODS.md §3): ``Σ_i r_i (d_in + d_out)`` per module, plus ``(E + M) · d_in`` for the router when the
module has one (more than one expert, or null experts).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from .io import atomic_write_text, read_json

if TYPE_CHECKING:  # torch is imported where a model is used, so that reading a plan file stays light
    from torch import nn

PLAN_FORMAT = "moela-plan/1"
# Output heads and poolers, which "all-linear" leaves out (as PEFT does): any path component among these.
HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs", "pooler", "embed_out")


@dataclass
class ModulePlan:
    """Experts of one module: their ranks and the routing (top-k, or top-p capped at max_k; null experts)."""

    ranks: list[int]
    top_k: int | None = None  # None: min(2, E + M)
    top_p: float | None = None
    max_k: int | None = None
    num_null: int = 0

    def __post_init__(self):
        if self.top_k is None and isinstance(self.ranks, list) and _is_int(self.num_null):
            self.top_k = min(2, len(self.ranks) + self.num_null)

    @classmethod
    def capped(cls, ranks: list[int], top_k: int = 2, **routing: Any) -> "ModulePlan":
        """A module plan with ``top_k`` capped by its number of experts, null ones included (top-1 for a single
        expert): the one place where routing is defaulted or clamped."""
        return cls(list(ranks), top_k=min(top_k, len(ranks) + routing.get("num_null", 0)), **routing)

    @property
    def num_experts(self) -> int:
        return len(self.ranks)

    @property
    def routed(self) -> bool:
        return self.num_experts + self.num_null > 1

    def cost(self, d_in: int, d_out: int) -> int:
        """Trainable parameters of this module's adapter (METHODS.md §3)."""
        router = (self.num_experts + self.num_null) * d_in if self.routed else 0
        return sum(self.ranks) * (d_in + d_out) + router

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ranks": list(self.ranks), "top_k": self.top_k}
        if self.top_p is not None:
            out.update(top_p=self.top_p, max_k=self.max_k)
        if self.num_null:
            out["num_null"] = self.num_null
        return out

    def check(self, name: str) -> None:
        """Raise ValueError naming ``name`` if this entry is malformed."""
        if not isinstance(self.ranks, list) or not self.ranks:
            raise ValueError(f"plan entry {name!r}: 'ranks' must be a non-empty list of expert ranks")
        if any(not _is_int(r) or r < 1 for r in self.ranks):
            raise ValueError(f"plan entry {name!r}: every rank must be an integer >= 1, got {self.ranks}")
        if not _is_int(self.num_null) or self.num_null < 0:
            raise ValueError(f"plan entry {name!r}: num_null must be an integer >= 0, got {self.num_null!r}")
        slots = self.num_experts + self.num_null
        if not _is_int(self.top_k) or not 1 <= self.top_k <= slots:
            raise ValueError(f"plan entry {name!r}: top_k={self.top_k!r} must be between 1 and the number of "
                             f"experts ({self.num_experts}{f' + {self.num_null} null' if self.num_null else ''})")
        if self.top_p is not None and not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"plan entry {name!r}: top_p must be in (0, 1], got {self.top_p!r}")
        if self.max_k is not None and (not _is_int(self.max_k) or not 1 <= self.max_k <= slots):
            raise ValueError(f"plan entry {name!r}: max_k={self.max_k!r} must be between 1 and {slots}")


@dataclass
class AllocationPlan:
    """A mapping ``module path → ModulePlan`` plus ``meta`` (method, options, budget, the allocator's scores)."""

    modules: dict[str, ModulePlan]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not all(isinstance(spec, ModulePlan) for spec in self.modules.values()):  # plain JSON-like entries
            entries = {n: spec.to_dict() if isinstance(spec, ModulePlan) else spec for n, spec in self.modules.items()}
            self.modules = AllocationPlan.from_dict({"modules": entries}).modules

    # --- construction and serialisation -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AllocationPlan":
        """Build from ``{"modules": {path: {"ranks": [...], "top_k": k, ...}}, "meta": {...}}`` or a bare
        ``{path: {...}}`` mapping. Raises ValueError naming the entry at fault."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a plan must be a JSON object, got {type(data).__name__}")
        entries = data["modules"] if "modules" in data else data
        meta = data.get("meta", {}) if "modules" in data else {}
        if not isinstance(meta, Mapping):
            raise ValueError(f"plan 'meta' must be a JSON object, got {type(meta).__name__}")
        if not isinstance(entries, Mapping) or not entries:
            raise ValueError("a plan must name at least one module")
        modules = {}
        allowed = set(ModulePlan.__dataclass_fields__)
        for name, entry in entries.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"plan module names must be non-empty strings, got {name!r}")
            if not isinstance(entry, Mapping) or "ranks" not in entry:
                raise ValueError(f"plan entry {name!r}: expected an object with 'ranks', got {entry!r}")
            unknown = set(entry) - allowed
            if unknown:
                raise ValueError(f"plan entry {name!r}: unknown field(s) {sorted(map(str, unknown))}; "
                                 f"allowed: {sorted(allowed)}")
            spec = ModulePlan(**entry)
            spec.check(name)
            modules[name] = spec
        return cls(modules, dict(meta))

    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "meta": self.meta,
                "modules": {name: spec.to_dict() for name, spec in self.modules.items()}}

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON, atomically."""
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1, default=_json_default) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "AllocationPlan":
        path = Path(path)
        data = read_json(path)
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    @classmethod
    def uniform(cls, model: nn.Module, targets: str | Iterable[str], experts: int = 4, rank: int = 8,
                top_k: int = 2, **routing: Any) -> "AllocationPlan":
        """Every target module gets ``experts`` experts of rank ``rank`` (``experts=1``: plain LoRA)."""
        modules = {name: ModulePlan.capped([rank] * experts, top_k, **routing) for name in find_targets(model, targets)}
        return cls(modules, {"method": "uniform" if experts > 1 else "lora",
                             "options": {"experts": experts, "rank": rank, "top_k": top_k, **routing}})

    # --- mapping behaviour --------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> ModulePlan:
        return self.modules[name]

    def __iter__(self):
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def items(self):
        return self.modules.items()

    # --- checks and accounting ----------------------------------------------------------------------------
    def validate(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        """Check the plan against ``model``; return ``{path: (d_in, d_out)}``. Raises ValueError naming the
        first module that is missing, is not linear, or has a malformed entry."""
        from .layer import linear_dims

        found = dict(model.named_modules())
        dims = {}
        for name, spec in self.modules.items():
            spec.check(name)
            module = found.get(name)
            if module is None:
                examples = [n for n, m in found.items() if is_linear(m)][:4]
                raise ValueError(f"plan module {name!r} does not exist in {type(model).__name__} (was the plan "
                                 f"made for another model?); its linear modules look like {examples}")
            base = getattr(module, "base_layer", module)
            try:
                dims[name] = linear_dims(base)
            except TypeError:
                raise ValueError(f"plan module {name!r} is a {type(base).__name__}, not a linear layer") from None
        return dims

    def num_trainable(self, model: nn.Module) -> int:
        """Trainable parameters this plan adds to ``model`` (METHODS.md §3)."""
        dims = self.validate(model)
        return sum(spec.cost(*dims[name]) for name, spec in self.modules.items())

    def summary(self, model: nn.Module | None = None, dims: Mapping[str, tuple[int, int]] | None = None) -> str:
        """A per-module text table: experts, ranks, routing and (with ``model``, or ``dims``: ``{path: (d_in,
        d_out)}``) parameters."""
        dims = self.validate(model) if model is not None else dict(dims or {})
        width = max(len(n) for n in self.modules) if self.modules else 6
        lines = [f"{'module':<{width}}  experts  ranks{'':<19} routing{'':<6} params"]
        total = 0
        for name, spec in self.modules.items():
            cost = spec.cost(*dims[name]) if name in dims else None
            total += cost or 0
            routing = (f"top-p {spec.top_p}" if spec.top_p is not None else f"top-{spec.top_k}") + (
                f"+{spec.num_null}null" if spec.num_null else "")
            ranks = ",".join(map(str, spec.ranks))
            lines.append(f"{name:<{width}}  {spec.num_experts:>7}  {ranks:<24} {routing:<13} "
                         f"{'' if cost is None else f'{cost:,}'}")
        if dims:
            lines.append(f"total trainable parameters: {total:,}")
        if self.meta.get("method"):
            lines.insert(0, f"method: {self.meta['method']}")
        return "\n".join(lines)


# --- finding target modules ---------------------------------------------------------------------------------
def is_linear(module: nn.Module) -> bool:
    from .layer import linear_dims

    try:
        linear_dims(module)
        return True
    except TypeError:
        return False


def find_targets(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Full paths of the linear modules selected by ``targets``, in model order.

    ``targets`` is ``"all-linear"`` (every linear layer but the output head), a regular expression matched
    against the full path (a single string), or a list of names, each matching a path equal to it or ending
    in ``"." + name`` (PEFT's ``target_modules`` convention). Raises ValueError if nothing matches.
    """
    linears = [(n, m) for n, m in model.named_modules() if n and is_linear(getattr(m, "base_layer", m))
               and not n.endswith(".base_layer")]
    if targets == "all-linear":
        chosen = [n for n, _ in linears if not set(n.split(".")) & set(HEAD_NAMES)]
    elif isinstance(targets, str):
        pattern = re.compile(targets)
        chosen = [n for n, _ in linears if pattern.fullmatch(n)]
    else:
        names = list(targets)
        chosen = [n for n, _ in linears if any(n == t or n.endswith("." + t) for t in names)]
    if not chosen:
        sample = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})[:12]
        raise ValueError(f"targets {targets!r} match no linear module of {type(model).__name__}; "
                         f"its linear module names include {sample}")
    return chosen


_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


def layer_index(path: str) -> int:
    """Depth of a module: the first integer component of its path (``model.layers.3.mlp.up_proj`` → 3)."""
    match = _INDEX.search("." + path)
    if match is None:
        raise ValueError(f"module {path!r} has no block index in its path; depth-based allocators need one")
    return int(match.group(1))


def module_type(path: str) -> str:
    """The path below the block index (``self_attn.q_proj``; BERT's ``attention.output.dense``), which names
    modules of the same kind across depth."""
    match = _INDEX.search("." + path)
    return path if match is None else ("." + path)[match.end():] or path


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"cannot write {type(value).__name__} to a plan file")

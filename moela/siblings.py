"""Sibling routing: adapted modules that read the same input (q, k and v; gate and up) routed in one pass.

In decoding each adapted module costs a few small operators beyond PEFT LoRA's (the router's GEMM, top-k, softmax,
the gate expansion); three of them in a row cost three times that. A :class:`SiblingGroup` lets the first member
the model calls compute the adapter outputs of the whole group — one GEMM for every member's ``A`` and router
rows, one routing pass when their plans are equal — and hand each other member its own output when it is called
with the same, unmodified input tensor. Only :meth:`moela.layer.LoraMoELinear._infer` (evaluation, no autograd,
no autocast, no hooks) uses it; training and every other path compute module by module.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .layer import RouterStats, Routing

if TYPE_CHECKING:
    from .layer import LoraMoELinear

# Names of sibling modules under one parent, which the model calls one after another on the same input.
SIBLING_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"), ("query", "key", "value"))


class SiblingGroup:
    """Layers whose adapter outputs the first one called computes for all (module docstring).

    Correctness does not rest on the names that grouped them: a member uses a stored output only for the very
    tensor object it was computed from, at the same version (no in-place change since), and with its weights
    unchanged (same storage and version); the members' weights are stacked anew for every input. A member
    called with a new input while outputs for another one are still waiting means the members are not called
    together (e.g. a cross-attention's keys from the encoder, or a member that cannot take the inference path,
    such as one with hooks on its adapter): the group switches itself off (``enabled``), and every member
    computes alone from then on. Outputs equal the module-by-module
    path up to the GEMMs' rounding.
    """

    def __init__(self, layers: Iterable[LoraMoELinear]):
        self.layers = tuple(layers)
        self.enabled = True
        first = self.layers[0]
        # Equal plans and routing: one routing pass over (tokens, members, slots) and one gate expansion.
        self.shared_routing = all(layer.routed and _routing_key(layer) == _routing_key(first) for layer in self.layers)
        self._ranks = [sum(layer.ranks) for layer in self.layers]
        self._rank = sum(self._ranks)
        # (input, its version, {layer: (output, layer's weights key)}): what the other members will take
        self._pending: tuple[torch.Tensor, int, dict] | None = None

    def output(self, layer: LoraMoELinear, x: torch.Tensor) -> torch.Tensor | None:
        """``layer``'s adapter output ``B(A x ⊙ gates)`` for ``x`` (recording its ``last_stats``), computed with
        the group's; None when ``layer`` must compute it alone."""
        pending = self._pending  # read once: another thread may replace it
        if pending is not None:
            waiting = pending[2]
            if pending[0] is x and pending[1] == x._version and waiting.get(layer, (None, None))[1] == _key(layer):
                out = waiting.pop(layer)[0]
                if not waiting:
                    self._pending = None
                return out
            if pending[0] is not x:  # outputs for another input still wait: the members do not share their input
                self.enabled = False
            self._pending = None
        if not self.enabled or x.is_inference() or torch.compiler.is_compiling() or any(
                member.disabled for member in self.layers):
            return None
        outputs = self._outputs(x)
        if outputs is None:
            return None
        out = outputs.pop(layer)
        self._pending = (x, x._version, {member: (output, _key(member)) for member, output in outputs.items()})
        return out

    def _outputs(self, x: torch.Tensor) -> dict | None:
        """Every member's adapter output for ``x`` (None if their weights cannot be stacked)."""
        stack = self._stacked()
        if stack is None:
            return None
        weight, weight_A, weight_G = stack
        layers, ranks, rank = self.layers, self._ranks, self._rank
        if weight is not None:
            z = F.linear(_cast(x, weight.dtype), weight)
            h, logits = z[..., :rank], z[..., rank:]
        else:
            h = F.linear(_cast(x, weight_A.dtype), weight_A)
            logits = None if weight_G is None else F.linear(_cast(x, weight_G.dtype), weight_G)
        if not self.shared_routing:
            slots = [layer.num_slots if layer.routed else 0 for layer in layers]
            parts = logits.split(slots, -1) if logits is not None else [None] * len(layers)
            return {layer: layer._adapter_output(part, None if not layer.routed else logit)
                    for layer, part, logit in zip(layers, h.split(ranks, -1), parts)}
        first, count = layers[0], len(layers)
        routing = first._select(logits.unflatten(-1, (count, first.num_slots)))
        gates, column_map = routing.gates(), first._buffers["column_map"]
        gates = gates @ (column_map if column_map.dtype == gates.dtype else column_map.to(gates.dtype))
        h = h.unflatten(-1, (count, ranks[0]))
        h = h * (gates if gates.dtype == h.dtype else gates.to(h.dtype))
        outputs = {}
        for i, (layer, part) in enumerate(zip(layers, h.unbind(-2))):
            layer._record(_MemberStats(routing, i))
            outputs[layer] = F.linear(part, layer._modules["lora_B"]._parameters["weight"])
        return outputs

    def _stacked(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None:
        """(``[A_1; …; A_n; G_1; …]`` when the adapters and routers share a dtype, else None; the stacked ``A``s
        and the stacked routers, each None when in the first; the routers' also without any router) of the
        current weights, or None if the ``A``s (or the routers) differ in dtype or device.

        Stacked again on every call (a few µs, less than one GEMM): no copy outlives the call, so no change of the
        weights can be missed, even one that does not bump their version (``.data`` writes, FSDP2's all-gather).
        """
        params = [layer._modules["lora_A"]._parameters["weight"] for layer in self.layers]
        routers = [layer._modules["router"]._parameters["weight"] for layer in self.layers if layer.routed]
        kinds = {(p.dtype, p.device) for p in params}
        if len(kinds) > 1 or len({(p.dtype, p.device) for p in routers}) > 1:
            return None
        if routers and (routers[0].dtype, routers[0].device) in kinds:
            return torch.cat(params + routers), None, None
        return None, torch.cat(params), torch.cat(routers) if routers else None


class _MemberStats(RouterStats):
    """Member ``member``'s :class:`RouterStats`, sliced from the group's ``routing`` when first read (decoding
    rarely reads them; slicing every forward would cost about as much as routing)."""

    __slots__ = ("_routing", "_member")

    def __init__(self, routing: Routing, member: int):
        self._routing, self._member = routing, member

    def __getattr__(self, name: str):  # only called while RouterStats' own slots are unset
        if name not in RouterStats.__slots__:
            raise AttributeError(name)
        routing, i = self._routing, self._member
        RouterStats.__init__(self, routing.logits[..., i, :],
                             indices=None if routing.indices is None else routing.indices[..., i, :],
                             chosen=None if routing.chosen is None else routing.chosen[..., i, :])
        return getattr(self, name)


def group_siblings(layers: dict[str, LoraMoELinear]) -> list[SiblingGroup]:
    """Group the layers of ``{module path: layer}`` that are siblings by name (:data:`SIBLING_NAMES`: two or
    more of one family under one parent) and attach each group to its members (``layer.siblings``)."""
    groups = []
    for parent in dict.fromkeys(path.rpartition(".")[0] for path in layers):
        for family in SIBLING_NAMES:
            members = [layers[_join(parent, name)] for name in family if _join(parent, name) in layers]
            if len(members) > 1:
                group = SiblingGroup(members)
                for member in members:
                    member.siblings = group
                groups.append(group)
    return groups


def _join(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def _key(layer: LoraMoELinear) -> tuple:
    """Identifies the current values of ``layer``'s adapter weights (storage address and version of each)."""
    modules = layer._modules
    a, b = modules["lora_A"]._parameters["weight"], modules["lora_B"]._parameters["weight"]
    router = modules.get("router")
    g = a if router is None else router._parameters["weight"]
    return a._version, a.data_ptr(), b._version, b.data_ptr(), g._version, g.data_ptr()


def _routing_key(layer: LoraMoELinear) -> tuple:
    return layer.ranks, layer.num_null, layer.top_k, layer.top_p, layer.max_k, layer.alpha, layer.scaling


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)

"""A slow per-expert loop implementation of METHODS.md §2.1, written the way public LoRA-MoE code is
(MoLA, GuiLoMo, MixLoRA: a Python loop over experts, gathering the tokens routed to each).

It is the oracle the packed layer is tested against and the "per-expert loop" baseline of the benchmarks.
It reads the weights of a :class:`~moela.layer.LoraMoELinear` and recomputes its adapter output.
"""

from __future__ import annotations

import torch

from .layer import LoraMoELinear, RouterStats


def reference_gates(layer: LoraMoELinear, x: torch.Tensor) -> torch.Tensor:
    """Renormalised gates ĝ (T × E) by the literal definition: sort, pick, divide."""
    probs = torch.softmax(layer.router(x.to(layer.router.weight.dtype)), dim=-1)
    gates = torch.zeros(x.shape[0], layer.num_experts, dtype=probs.dtype, device=x.device)
    for t in range(x.shape[0]):
        order = torch.argsort(probs[t], descending=True, stable=True).tolist()
        if layer.top_p is None:
            chosen = order[:layer.top_k]
        else:
            chosen, mass = [], 0.0
            for i in order[:layer.max_k]:
                if mass >= layer.top_p:
                    break
                chosen.append(i)
                mass += probs[t, i].item()
        real = [i for i in chosen if i < layer.num_experts]
        if real:
            total = sum(probs[t, i] for i in real)
            for i in real:
                gates[t, i] = probs[t, i] / total
    return gates


def topk_gates(layer: LoraMoELinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing as public code does it (softmax, top-k, divide by the chosen mass): router logits,
    selection mask and gates, each (…, E+M); the gate is 1 for every token when there is no router."""
    if layer.router is None:
        ones = torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
        return ones, ones.bool(), ones
    logits = layer.router(x.to(layer.router.weight.dtype))
    weights, chosen = torch.softmax(logits, dim=-1).topk(layer.top_k, dim=-1)
    selected = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, chosen, True)
    return logits, selected, torch.zeros_like(logits).scatter(-1, chosen, weights / weights.sum(-1, keepdim=True))


def loop_forward(layer: LoraMoELinear, x: torch.Tensor, gates: torch.Tensor | None = None) -> torch.Tensor:
    """``W0 x + b + Σ_i ĝ_i s_i B_i A_i x̃``, looping over experts and the tokens routed to each.

    ``gates`` defaults to the cheap top-k routing public code uses (top-p and null experts need
    :func:`reference_gates`). Dropout must be off (the packed layer draws one mask for all experts).
    """
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    out = layer.base_layer(x)
    if gates is None:
        gates = topk_gates(layer, x)[2]
    gates = gates.reshape(x.shape[0], -1)
    for i, cols in enumerate(layer.expert_slices()):
        tokens = torch.nonzero(gates[:, i] > 0).squeeze(-1)
        if tokens.numel() == 0:
            continue
        a, b = layer.lora_A.weight[cols], layer.lora_B.weight[:, cols]
        scale = layer.alpha / (layer.ranks[i] if layer.scaling == "lora" else layer.ranks[i] ** 0.5)
        delta = (x[tokens] @ a.T) @ b.T * scale * gates[tokens, i, None].to(x.dtype)
        out = out.index_add(0, tokens, delta.to(out.dtype))
    return out.reshape(*shape[:-1], -1)


class ReferenceLoraMoELinear(LoraMoELinear):
    """A :class:`LoraMoELinear` computed by the literal definitions, for any routing: :func:`reference_gates`
    and :func:`loop_forward` (slow; the oracle of the packed layer in whole models, e.g. in generation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x)
        return loop_forward(self, x, reference_gates(self, x.reshape(-1, x.shape[-1])) if self.routed else None)


class LoopLoraMoELinear(LoraMoELinear):
    """A :class:`LoraMoELinear` computed by :func:`loop_forward` with :func:`topk_gates` routing (the
    benchmarks' per-expert loop baseline). It keeps ``last_stats``, so the balance loss works as usual."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x)
        if self.top_p is not None or self.num_null:
            raise ValueError("LoopLoraMoELinear implements top-k routing without null experts only")
        logits, selected, gates = topk_gates(self, x)
        self.last_stats = RouterStats(logits, selected) if self.routed else None
        return loop_forward(self, x, gates)

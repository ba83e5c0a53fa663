"""The LoRA-MoE layer: a frozen linear map plus a routed mixture of LoRA experts of heterogeneous ranks.

Specification: METHODS.md §2. The experts are stored *packed*: ``lora_A.weight`` is ``A_cat = [A_1; …; A_E]``
(R × d_in) and ``lora_B.weight`` is ``B_cat = [B_1 … B_E]`` (d_out × R) with ``R = Σ r_i``, so a forward is
two GEMMs like a single LoRA of rank R, whatever the number of experts.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

SCALINGS = ("lora", "rslora")


def linear_dims(base: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an ``nn.Linear`` or a transformers GPT-2 ``Conv1D`` (weight stored d_in × d_out)."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if type(base).__name__ == "Conv1D" and hasattr(base, "nf"):
        return base.weight.shape[0], base.nf
    raise TypeError(f"{type(base).__name__} is not a linear layer (nn.Linear or transformers Conv1D)")


def _hook_free() -> bool:
    """No global module hooks and no JIT tracing: what :func:`_plain` assumes of the process."""
    return not (_module._global_forward_pre_hooks or _module._global_forward_hooks
                or _module._global_backward_pre_hooks or _module._global_backward_hooks
                or torch._C._get_tracing_state())


def _plain(module: nn.Module, cls: type) -> bool:
    """Given :func:`_hook_free`, whether ``module(x)`` only runs ``cls.forward`` on the parameters in
    ``module._parameters``: ``module`` is exactly a ``cls`` (no subclass, no parametrization), has no hooks of its
    own (so that hook-based sharding such as ZeRO-3 or FSDP sees every call it hooked), no ``forward`` of its own
    (accelerate's offloading wraps it so) and is not compiled (``module.compile()``)."""
    return (type(module) is cls and not (module._forward_pre_hooks or module._forward_hooks
                                         or module._backward_pre_hooks or module._backward_hooks)
            and "forward" not in module.__dict__ and module._compiled_call_impl is None)


class RouterStats:
    """What the balance loss and the routing statistics need from the last forward.

    ``logits``: (..., E + M) router logits (float32, in the autograd graph); ``selected``: (..., E + M) bool,
    the experts (real and null) each token was routed to. ``selected`` is given, or built on first access from
    the ``indices`` (…, k) of the slots the router considered and which of them were ``chosen`` (…, k bool;
    None: all), or, with neither, is every slot; so a forward whose statistics nobody reads does not build it.
    """

    __slots__ = ("logits", "_selected", "_indices", "_chosen")

    def __init__(self, logits: torch.Tensor, selected: torch.Tensor | None = None,
                 indices: torch.Tensor | None = None, chosen: torch.Tensor | None = None):
        self.logits, self._selected, self._indices, self._chosen = logits, selected, indices, chosen

    @property
    def selected(self) -> torch.Tensor:
        if self._selected is None:
            if self._indices is None:
                self._selected = torch.ones_like(self.logits, dtype=torch.bool)
            else:
                chosen = True if self._chosen is None else self._chosen
                self._selected = torch.zeros_like(self.logits, dtype=torch.bool).scatter_(-1, self._indices, chosen)
        return self._selected


class Routing(NamedTuple):
    """One forward's routing. ``logits``: (…, E+M) float32; ``indices``: (…, k) the slots considered, best first
    (the top-k, or all E+M sorted for top-p), or None for all E+M slots in order; ``weights``: (…, k) their
    gates ĝ (0 for null experts and for slots not chosen); ``chosen``: (…, k) bool, which of ``indices`` were
    selected (None: all of them)."""

    logits: torch.Tensor
    indices: torch.Tensor | None
    weights: torch.Tensor
    chosen: torch.Tensor | None

    def gates(self) -> torch.Tensor:
        """Dense gates (…, E+M): ĝ_i of the selected real experts, 0 elsewhere."""
        if self.indices is None:
            return self.weights
        return torch.zeros_like(self.logits).scatter_(-1, self.indices, self.weights)


class LoraMoELinear(nn.Module):
    """``y = W0 x + b + Σ_{i∈S(x)} ĝ_i(x) · s_i · B_i A_i x̃``, with ``x̃ = dropout(x)`` and ``s_i = α/r_i``.

    ``S(x)`` and ``ĝ`` come from a bias-free router ``G`` (``softmax(G x̃)``, float32): top-k renormalised
    (default), top-p capped at ``max_k`` (``top_p`` set), with ``num_null`` AdaMoE zero-output experts
    appended to the softmax. One expert (``E = 1``, no null experts) is plain LoRA with no router.

    Load balancing (METHODS.md §2.4) is built in: with ``balance_coef > 0``, every training-mode forward of a
    routed layer with gradients enabled attaches ``balance_coef · L_bal`` (:meth:`balance_loss` of that forward's
    routing, over the tokens of ``token_mask``) to its output, so that backpropagating *any* loss computed from
    the output gives the router the gradient of ``loss + balance_coef · L_bal`` — with the plain transformers
    ``Trainer``, TRL's ``SFTTrainer`` or a hand-written loop alike (DeepSeek-MoE's ``AddAuxiliaryLoss``). The
    output's value is unchanged. The auxiliary gradient is added once per backward through the output: under
    gradient accumulation once per micro-batch, unscaled by the trainer's division of the loss by the number of
    accumulation steps (the effective coefficient is ``balance_coef ×`` that number); under loss scaling
    (fp16 ``GradScaler``) it is not multiplied by the scale, so after unscaling it is divided by it.

    Attributes set from outside between forwards:
        balance_coef: the coefficient of the built-in balance loss (0 = off, the default). The model's loss of
            METHODS.md §2.4 (the mean over routed modules, times ``coef``) is ``balance_coef = coef / n`` on each
            of the ``n`` routed layers.
        token_mask: None, or a bool/int tensor, nonzero for real (non-padding) tokens, used by the built-in
            balance loss when it has as many elements as the forward has tokens (reshaped to them); else ignored.
        disabled: when True the layer computes as its base.

    Attributes set by each forward (for logging and routing statistics):
        last_stats: the routing of the last forward (:class:`RouterStats`), None without a router.
        last_balance: the (detached, float32) ``L_bal`` attached by the last training-mode forward, or None if it
            attached none (``balance_coef = 0``, no router, no gradient, or no real token).

    Args:
        base: the frozen ``nn.Linear`` or ``Conv1D``; it is kept as ``base_layer`` and not modified.
        ranks: the rank ``r_i ≥ 1`` of each expert.
        top_k: experts per token (counting null experts), at most ``E + num_null``.
        alpha: LoRA scale numerator. ``scaling="rslora"`` uses ``α/√r_i``.
        dropout: dropout probability on the adapter input (one mask shared by the router and all experts).
        top_p: if set, route to the smallest set of experts whose probability mass reaches ``top_p``.
        max_k: cap on that set (default: all experts).
        num_null: AdaMoE null experts.
        adapter_dtype: dtype of the adapter weights (default: the base weight's dtype).
        balance_coef: initial ``balance_coef``.
    """

    def __init__(self, base: nn.Module, ranks: list[int], top_k: int = 2, alpha: float = 16.0,
                 dropout: float = 0.0, scaling: str = "lora", top_p: float | None = None,
                 max_k: int | None = None, num_null: int = 0, adapter_dtype: torch.dtype | None = None,
                 balance_coef: float = 0.0):
        super().__init__()
        if not ranks or any(int(r) < 1 for r in ranks):
            raise ValueError(f"expert ranks must be a non-empty list of integers >= 1, got {ranks}")
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
        self.base_layer = base
        self.d_in, self.d_out = linear_dims(base)
        self.ranks = [int(r) for r in ranks]
        self.num_experts = len(self.ranks)
        self.num_null = int(num_null)
        self.num_slots = self.num_experts + self.num_null
        self.top_k = min(int(top_k), self.num_slots)
        self.top_p = top_p
        self.max_k = min(max_k or self.num_slots, self.num_slots)
        self.alpha = float(alpha)
        self.scaling = scaling
        self.disabled = False
        self.balance_coef = float(balance_coef)
        self.token_mask: torch.Tensor | None = None
        self.last_stats: RouterStats | None = None
        self.last_balance: torch.Tensor | None = None

        weight = base.weight
        factory = dict(device=weight.device, dtype=adapter_dtype or weight.dtype)
        rank_total = sum(self.ranks)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.d_in, rank_total, bias=False, **factory)
        self.lora_B = nn.Linear(rank_total, self.d_out, bias=False, **factory)
        self.router = Router(self.d_in, self.num_slots, device=weight.device) if self.routed else None

        scales = [alpha / (r if scaling == "lora" else math.sqrt(r)) for r in self.ranks]
        owner = torch.repeat_interleave(torch.arange(self.num_experts), torch.tensor(self.ranks))
        column_scale = torch.tensor(scales, dtype=torch.float32)[owner]
        # c(j): the expert that owns rank column j, s_{c(j)} the scale of that column, and the (E+M) × R map
        # from slot gates to column gates (s_{c(j)} in row c(j) of column j; null experts' rows are zero).
        column_map = torch.zeros(self.num_slots, rank_total).index_put_((owner, torch.arange(rank_total)),
                                                                      column_scale)
        self.register_buffer("column_expert", owner.to(weight.device), persistent=False)
        self.register_buffer("column_scale", column_scale.to(weight.device), persistent=False)
        self.register_buffer("column_map", column_map.to(weight.device), persistent=False)
        self.reset_parameters()

    @property
    def routed(self) -> bool:
        """Whether the layer has a router (more than one expert, or null experts)."""
        return self.num_slots > 1

    def reset_parameters(self) -> None:
        """A_i Kaiming-uniform (a=√5) as LoRA, B_i = 0 so the adapted layer starts equal to the base, G like A."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.router is not None:
            nn.init.kaiming_uniform_(self.router.weight, a=math.sqrt(5))

    def expert_slices(self) -> list[slice]:
        """Rank-column slice of each expert in the packed ``lora_A``/``lora_B``."""
        bounds = [0]
        for r in self.ranks:
            bounds.append(bounds[-1] + r)
        return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def route(self, x: torch.Tensor) -> Routing:
        """The router's choice for every token of ``x`` (a router is required)."""
        return self._select(self.router(x))

    def _select(self, logits: torch.Tensor) -> Routing:
        """The routing given the router ``logits``."""
        if self.top_p is None and self.top_k == self.num_slots and not self.num_null:
            return Routing(logits, None, logits.softmax(-1), None)  # every expert selected: the full softmax
        if self.top_p is None:
            top, indices = logits.topk(self.top_k, dim=-1)
            chosen = None
        else:
            top, indices = logits.sort(dim=-1, descending=True)
            probs = top.softmax(-1)
            chosen = probs.cumsum(-1) - probs < self.top_p  # the probability mass before each slot
            chosen[..., self.max_k:] = False
        counted = chosen  # the slots whose gate is nonzero: chosen real experts
        if self.num_null:
            real = indices < self.num_experts
            counted = real if chosen is None else chosen & real
        # Renormalising p over a selected set equals a softmax of the logits restricted to it.
        if counted is None:
            return Routing(logits, indices, top.softmax(-1), chosen)
        weights = top.masked_fill(~counted, float("-inf")).softmax(-1).nan_to_num(0.0)  # no real expert: all 0
        return Routing(logits, indices, weights, chosen)

    def column_gates(self, x: torch.Tensor) -> torch.Tensor:
        """``ĝ_{c(j)} · s_{c(j)}`` for every rank column j: (…, R), or (R,) when there is no router. Records
        ``last_stats``."""
        if not self.routed:
            self._record(None)
            return self.column_scale
        return self._column_gates(self.route(x))

    def _column_gates(self, routing: Routing) -> torch.Tensor:
        """The column gates of ``routing``, recorded in ``last_stats``."""
        self._record(RouterStats(routing.logits, indices=routing.indices, chosen=routing.chosen))
        gates, column_map = routing.gates(), self._buffers["column_map"]
        return gates @ (column_map if column_map.dtype == gates.dtype else column_map.to(gates.dtype))

    def _record(self, stats: RouterStats | None) -> None:
        # A plain attribute: skip nn.Module.__setattr__'s parameter/module/buffer bookkeeping (every forward).
        object.__setattr__(self, "last_stats", stats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training or torch.is_grad_enabled()) and self._inferable():
            return self._infer(x)
        y = self.base_layer(x)
        if self.disabled:
            return y
        if self.training:  # dropout is the identity in evaluation: skip the call
            x = self.dropout(x)
        lora_A = self.lora_A
        dtype = lora_A.weight.dtype
        # Under autocast, lora_A casts for itself (to the autocast dtype); else the adapter reads its own dtype.
        h = lora_A(x if x.dtype == dtype or torch.is_autocast_enabled(x.device.type) else x.to(dtype))
        gates = self.column_gates(x)
        h = h * (gates if gates.dtype == h.dtype else gates.to(h.dtype))
        delta = self.lora_B(h)
        if delta.dtype != y.dtype:
            delta = delta.to(y.dtype)
        aux = self._auxiliary_loss() if self.training else None
        return y + delta if aux is None else _AddAuxiliaryLoss.apply(y, delta, aux)

    def _inferable(self) -> bool:
        """Whether :meth:`_infer` may compute this forward: no autocast, the layer is no subclass, and calling its
        adapter's submodules would only run their ``forward`` (:func:`_hook_free`, :func:`_plain`)."""
        modules = self._modules
        router = modules.get("router")  # no router: the attribute is a plain None
        return (type(self) is LoraMoELinear and not torch._C._is_any_autocast_enabled() and _hook_free()
                and _plain(modules["lora_A"], nn.Linear) and _plain(modules["lora_B"], nn.Linear)
                and (router is None or _plain(router, Router)))

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` in evaluation without autograd or autocast: the same operations, on the adapter's weights.

        In decoding (a token or a few per call) ``nn.Module``'s attribute lookups and module calls cost about as
        much as the matmuls, so the submodules and their weights are read from its registries and the weights used
        directly; the base layer's too when it is a plain ``nn.Linear`` (else, e.g. a quantized or GPT-2
        ``Conv1D`` base, it is called).
        """
        modules = self._modules
        base = modules["base_layer"]
        y = F.linear(x, base._parameters["weight"], base._parameters["bias"]) if _plain(base, nn.Linear) else base(x)
        if self.disabled:
            return y
        weight_A, router = modules["lora_A"]._parameters["weight"], modules.get("router")
        h = F.linear(x if x.dtype == weight_A.dtype else x.to(weight_A.dtype), weight_A)
        if router is None:
            self._record(None)
            gates = self._buffers["column_scale"]
        else:
            weight_G = router._parameters["weight"]
            gates = self._column_gates(self._select(F.linear(x if x.dtype == weight_G.dtype else x.to(weight_G.dtype),
                                                             weight_G)))
        delta = F.linear(h * (gates if gates.dtype == h.dtype else gates.to(h.dtype)),
                         modules["lora_B"]._parameters["weight"])
        return y + (delta if delta.dtype == y.dtype else delta.to(y.dtype))

    def _auxiliary_loss(self) -> torch.Tensor | None:
        """``balance_coef · L_bal`` of this forward (or None) to attach to the output; sets ``last_balance``."""
        self.last_balance = None
        if self.balance_coef <= 0 or self.last_stats is None or not torch.is_grad_enabled():
            return None
        mask = self.token_mask
        if mask is not None and mask.numel() * self.num_slots != self.last_stats.logits.numel():
            mask = None
        loss = self.balance_loss(mask)
        if loss is None:
            return None
        self.last_balance = loss.detach()
        return self.balance_coef * loss

    def balance_loss(self, token_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """``L_bal = (E+M) Σ_i f_i P_i`` over the last forward's tokens (``token_mask``: nonzero for real tokens,
        as many elements as tokens), float32, in the autograd graph of the router.

        ``f_i`` is the fraction of routing slots given to expert i, ``P_i`` its mean router probability; null
        experts' ``f`` and ``P`` are replaced by their mean, so only total null usage is balanced (AdaMoE).
        Returns None when the layer has no router or has not run; 0 when ``token_mask`` keeps no token.
        """
        if self.last_stats is None:
            return None
        probs = self.last_stats.logits.softmax(-1).flatten(0, -2)
        chosen = self.last_stats.selected.flatten(0, -2).to(probs.dtype)
        if token_mask is not None:  # weights rather than boolean indexing: no host-device synchronisation
            keep = token_mask.reshape(-1, 1).to(probs.device).bool().to(probs.dtype)
            probs, chosen = probs * keep, chosen * keep
            p = probs.sum(0) / keep.sum().clamp_min(1.0)
        else:
            p = probs.mean(0)
        f = chosen.sum(0) / chosen.sum().clamp_min(1.0)
        if self.num_null:
            f, p = _average_nulls(f, self.num_experts), _average_nulls(p, self.num_experts)
        return self.num_slots * (f * p).sum()

    def extra_repr(self) -> str:
        routing = f"top_p={self.top_p}, max_k={self.max_k}" if self.top_p is not None else f"top_k={self.top_k}"
        null = f", num_null={self.num_null}" if self.num_null else ""
        return f"ranks={self.ranks}, {routing}{null}, alpha={self.alpha}, scaling={self.scaling}"


def _average_nulls(values: torch.Tensor, num_real: int) -> torch.Tensor:
    null = values[num_real:]
    return torch.cat([values[:num_real], null.mean().expand_as(null)])


class _AddAuxiliaryLoss(torch.autograd.Function):
    """``y + delta``, whose backward also gives the scalar ``aux`` the gradient 1, as if ``aux`` had been added to
    the loss (DeepSeek-MoE's ``AddAuxiliaryLoss``, fused with the layer's last add so that its output is a new
    tensor, which later in-place operations may modify)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, delta: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_dtype = aux.dtype
        return y + delta

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_y, grad_delta, grad_aux = ctx.needs_input_grad
        one = torch.ones((), dtype=ctx.aux_dtype, device=grad.device) if grad_aux else None
        return grad if grad_y else None, grad if grad_delta else None, one


class Router(nn.Linear):
    """The bias-free linear router ``G``: computes in its own (float32) precision, whatever the input dtype and
    the autocast state.

    Always called as a module, so hook-based sharding (DeepSpeed ZeRO-3, FSDP) gathers its weight first.
    Under ``torch.autocast`` it opts out of autocast, so the logits stay float32 (METHODS.md §2.1).
    """

    def __init__(self, in_features: int, out_features: int, device: torch.device | None = None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if not torch.is_autocast_enabled(x.device.type):
            return F.linear(x, weight) if x.dtype == weight.dtype else _UpcastLinear.apply(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, weight) if x.dtype == weight.dtype else _UpcastLinear.apply(x, weight)


class _UpcastLinear(torch.autograd.Function):
    """``x.to(W.dtype) @ Wᵀ`` that keeps ``x`` for backward in its own (lower) precision, not as a float32 copy.

    The router runs in float32 on bf16 activations; ``nn.Linear`` on the cast input would save one float32
    copy of the hidden state per routed module. The gradients are those of the plain cast + linear, computed in
    ``W``'s dtype whatever the incoming gradient's dtype and the autocast state of the backward pass.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.linear(x.to(weight.dtype), weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.to(weight.dtype)
            grad_x = (grad @ weight).to(x.dtype) if ctx.needs_input_grad[0] else None
            grad_w = grad.flatten(0, -2).T @ x.flatten(0, -2).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w

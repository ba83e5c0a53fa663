"""``guilomo``: expert counts and ranks learned as GuidedSelection Vectors by bilevel search (METHODS.md §4.6).

Every target gets a search layer with ``E_max`` experts of rank ``r_max``, an expert GSV ``g`` and a rank GSV
``u_i`` per expert. The GSVs (outer variables) minimise the validation loss of the adapter weights (inner
variables) trained on the training split, DARTS-style; the read-out turns them into a plan that the caller
trains from scratch. The search swaps the target modules for search layers and puts the originals back.

Only the selected GSV entry receives a gradient, so a selection moves only while its active prefix hurts the
validation loss (then it is pushed down, and a count falls to ``n_min`` once entry 0 leads); where the
experts help, the selection is merely reinforced. A short search can therefore return its seed-drawn start.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..model import balance_loss
from ..layer import LoraMoELinear, RouterStats
from ..plan import AllocationPlan, ModulePlan, find_targets
from ..distributed import process_group
from .registry import register
from .budget import apportion, finish, fit, parse_budget, routed, target_dims
from .probe import Cost, holdout, pad_id, size, to_device

RANK_OFF = 1e-4  # scale of the rank rows beyond the selected prefix


class PrefixSelect(torch.autograd.Function):
    """``mask_j = 1`` for ``j ≤ n`` and ``off`` beyond, ``n = max(floor, argmax_j σ_j)`` per row of ``σ``.

    Straight-through backward: only the selected entry gets a gradient, ``∂L/∂σ_n = Σ_{j≤n} ∂L/∂mask_j · σ_j``,
    so the selection is pushed away from ``n`` exactly when the active prefix hurts the loss.
    """

    @staticmethod
    def forward(ctx, sig: torch.Tensor, floor: int, off: float) -> torch.Tensor:
        n = sig.argmax(-1, keepdim=True).clamp_min(floor)
        prefix = torch.arange(sig.shape[-1], device=sig.device) <= n
        ctx.save_for_backward(sig, n)
        return torch.where(prefix, torch.ones_like(sig), torch.full_like(sig, off))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        sig, n = ctx.saved_tensors
        idx = torch.arange(sig.shape[-1], device=sig.device)
        total = (grad * sig * (idx <= n)).sum(-1, keepdim=True)
        return torch.where(idx == n, total, torch.zeros_like(sig)), None, None


class GSVLinear(LoraMoELinear):
    """Search layer: column gate ``ĝ_{c(j)} m_{c(j)} · s_{c(j)} · e_j · ρ_j``.

    ``m`` = :class:`PrefixSelect` of ``σ(g)`` (floor ``n_min − 1``): experts beyond the prefix get ``−∞`` router
    logits, and the gates of the others are multiplied by ``m`` (= 1), through which the mask's gradient flows
    ([decision] the public code adds the mask to the logits, where it only shifts a softmax).
    ``ρ`` = :class:`PrefixSelect` of ``σ(u_i)`` for each expert, ``1e-4`` beyond its prefix; ``e`` per-rank scales.
    GSVs start at ``softmax(randn)``; the adapter is float32.
    """

    def __init__(self, base: nn.Module, experts: int = 8, rank: int = 8, top_k: int = 2, alpha: float = 16.0,
                 min_experts: int = 2):
        if experts < 2 or not 1 <= min_experts <= experts:
            raise ValueError(f"guilomo needs experts >= 2 and 1 <= min_experts <= experts, got {experts}, {min_experts}")
        super().__init__(base, [rank] * experts, top_k=top_k, alpha=alpha, adapter_dtype=torch.float32)
        device = self.lora_A.weight.device
        self.min_experts = min_experts
        self.expert_gsv = nn.Parameter(torch.randn(experts, device=device).softmax(-1))
        self.rank_gsv = nn.Parameter(torch.randn(experts, rank, device=device).softmax(-1))
        self.rank_scale = nn.Parameter(torch.ones(experts * rank, device=device))

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert mask (E,), rank mask (E, r)) with straight-through gradients into the GSVs."""
        return (PrefixSelect.apply(self.expert_gsv.sigmoid(), self.min_experts - 1, 0.0),
                PrefixSelect.apply(self.rank_gsv.sigmoid(), 0, RANK_OFF))

    def column_gates(self, x: torch.Tensor) -> torch.Tensor:
        expert, rank = self.masks()
        logits = self.router(x).masked_fill(expert.detach() == 0, float("-inf"))
        selected = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(self.top_k, -1).indices, True)
        gates = logits.masked_fill(~selected, float("-inf")).softmax(-1).nan_to_num(0.0) * expert
        self.last_stats = RouterStats(logits, selected)
        return gates.index_select(-1, self.column_expert) * self.column_scale * self.rank_scale * rank.flatten()

    def selection(self) -> tuple[int, list[int]]:
        """Read-out: ``max(n_min, argmax g + 1)`` experts, expert i of rank ``argmax u_i + 1``."""
        experts = max(self.min_experts, int(self.expert_gsv.argmax()) + 1)
        return experts, [int(r) + 1 for r in self.rank_gsv.argmax(-1)[:experts]]


def _fill(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def hypergradient(weights: Sequence[torch.Tensor], arch: Sequence[torch.Tensor], train_loss: Callable[[], torch.Tensor],
                  val_loss: Callable[[], torch.Tensor], xi: float, second_order: bool = False) -> list[torch.Tensor]:
    """``∇_α L_val`` (first order), or the DARTS unrolled hypergradient of ``L_val(w − ξ ∇_w L_train(w, α), α)``:
    ``∇_α L_val(w', α) − ξ (∇_α L_train(w⁺, α) − ∇_α L_train(w⁻, α)) / 2ε`` with ``w± = w ± ε v``,
    ``v = ∇_{w'} L_val(w', α)``, ``ε = 0.01 / ‖v‖``. The weights are restored exactly; no ``.grad`` is touched.
    """
    if not second_order:
        return _fill(torch.autograd.grad(val_loss(), arch, allow_unused=True), arch)
    g_train = _fill(torch.autograd.grad(train_loss(), weights, allow_unused=True), weights)
    saved = [w.detach().clone() for w in weights]
    try:
        with torch.no_grad():
            for w, g in zip(weights, g_train):
                w.sub_(xi * g)
        grads = _fill(torch.autograd.grad(val_loss(), [*weights, *arch], allow_unused=True), [*weights, *arch])
        v, direct = grads[:len(weights)], grads[len(weights):]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in v))
        if norm == 0:
            return direct
        eps = 0.01 / float(norm)
        sides = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for w, w0, g in zip(weights, saved, v):
                    w.copy_(w0 + sign * eps * g)
            sides.append(_fill(torch.autograd.grad(train_loss(), arch, allow_unused=True), arch))
    finally:
        with torch.no_grad():
            for w, w0 in zip(weights, saved):
                w.copy_(w0)
    return [d - xi * (p - m) / (2 * eps) for d, p, m in zip(direct, *sides)]


def _step(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """One optimizer step with ``grads``, averaged over the processes when several run."""
    _, world = process_group()
    if world > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        grads = [f.view_as(g) for f, g in zip((flat / world).split([g.numel() for g in grads]), grads)]
    for p, g in zip(params, grads):
        p.grad = g
    optimizer.step()
    for p in params:
        p.grad = None


def search(model: nn.Module, names: list[str], train: list[dict], val: list[dict], *, experts: int, rank: int,
           top_k: int, alpha: float, min_experts: int, lr: float, gsv_lr: float, steps: int, second_order: bool,
           balance: float, check_every: int, patience: int, seed: int, cost: Cost) -> dict[str, GSVLinear]:
    """Run the bilevel search on search layers swapped in for ``names``; return them (detached from the model,
    which gets its own modules, flags and mode back). The search runs in eval mode (no dropout), so the seed
    fixes the result. With several processes each step takes one batch per process and averages the gradients
    over them, so the GSVs stay identical on every process."""
    device = next(model.parameters()).device
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    layers: dict[str, GSVLinear] = {}
    try:
        model.eval()
        model.requires_grad_(False)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for name in names:
                layers[name] = GSVLinear(model.get_submodule(name), experts, rank, top_k, alpha, min_experts)
                model.set_submodule(name, layers[name])
        weights = [p for l in layers.values() for p in (l.lora_A.weight, l.lora_B.weight, l.router.weight, l.rank_scale)]
        arch = [p for l in layers.values() for p in (l.expert_gsv, l.rank_gsv)]
        inner = torch.optim.AdamW(weights, lr=lr, weight_decay=0.0)
        outer = torch.optim.AdamW(arch, lr=gsv_lr, betas=(0.5, 0.999), weight_decay=0.0)

        def loss_on(batch: dict, coef: float) -> Callable[[], torch.Tensor]:
            inputs, _ = to_device(batch, device)

            def loss() -> torch.Tensor:
                out = model(**inputs).loss
                return out + coef * balance_loss(model, inputs.get("attention_mask")) if coef else out
            return loss

        last, stable = None, 0
        rank, world = process_group()
        for step in (bar := tqdm(range(steps), desc="guilomo search", leave=False)):
            at = step * world + rank  # several processes: each takes its own batch of the step
            train_loss = loss_on(train[at % len(train)], balance)
            val_loss = loss_on(val[at % len(val)], 0.0)
            _step(outer, arch, hypergradient(weights, arch, train_loss, val_loss, lr, second_order))
            _step(inner, weights, _fill(torch.autograd.grad(train_loss(), weights, allow_unused=True), weights))
            cost.add(train[at % len(train)])
            cost.examples += size(val[at % len(val)])
            if (step + 1) % check_every == 0:
                chosen = [l.selection() for l in layers.values()]
                stable = stable + 1 if chosen == last else 0
                last = chosen
                bar.set_postfix(stable=stable)
                if stable >= patience:
                    break
    finally:
        for name, layer in layers.items():
            model.set_submodule(name, layer.base_layer)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return layers


@register("guilomo", needs_data=True, needs_weights=True)
def guilomo(model: nn.Module, *, targets: Any, budget: int | str | None = None, data: Any = None, seed: int = 0,
            experts: int = 8, rank: int = 8, min_experts: int = 2, top_k: int = 2, alpha: float = 16.0,
            lr: float = 1e-3, gsv_lr: float = 3e-3, epochs: float = 1.0, max_steps: int = 300,
            second_order: bool = False, val_fraction: float = 0.1, batch_size: int = 8, examples: int | None = None,
            balance: float = 1e-3, check_every: int = 10, patience: int = 5) -> AllocationPlan:
    """GuiLoMo: bilevel GSV search, then read-out to a plan (experts ∈ [min_experts, experts], ranks ∈ [1, rank]).

    The search runs ``epochs`` passes over the training split (at most ``max_steps`` steps), stopping early
    once the selections have not changed for ``patience`` checks ``check_every`` steps apart. ``lr``: inner
    AdamW (paper: 3e-4 over 4 epochs; higher here for a short search); ``gsv_lr``: outer AdamW, betas
    (0.5, 0.999). With a budget, the read-out ranks are scaled together (counts kept) to meet it.
    """
    names = find_targets(model, targets)
    dims = target_dims(model, names)
    target = parse_budget(budget, model, targets)
    train, val = holdout(data, val_fraction, batch_size, seed, pad_id(model), examples)
    steps = max(1, min(max_steps, round(epochs * len(train))))
    cost = Cost("guilomo")
    layers = search(model, names, train, val, experts=experts, rank=rank, top_k=top_k, alpha=alpha,
                    min_experts=min_experts, lr=lr, gsv_lr=gsv_lr, steps=steps, second_order=second_order,
                    balance=balance, check_every=check_every, patience=patience, seed=seed, cost=cost)
    chosen = {n: layers[n].selection() for n in names}
    if target is None:
        modules: dict[str, ModulePlan] = {n: routed(r, top_k) for n, (_, r) in chosen.items()}
    else:
        flat = [(n, r) for n in names for r in chosen[n][1]]

        def build(total: int) -> dict:
            ranks: dict[str, list[int]] = {n: [] for n in names}
            for (n, _), r in zip(flat, apportion([r for _, r in flat], total, lo=1)):
                ranks[n].append(r)
            return {n: routed(r, top_k) for n, r in ranks.items()}

        modules, _ = fit(build, target, dims, lo=len(flat),
                         minimum=f"{len(flat)} experts of rank 1 (at least {min_experts} per module)")
    scores = {"expert_gsv": {n: l.expert_gsv.detach().sigmoid().tolist() for n, l in layers.items()},
              "rank_gsv": {n: l.rank_gsv.detach().sigmoid().tolist() for n, l in layers.items()}}
    options = {"experts": experts, "rank": rank, "min_experts": min_experts, "top_k": top_k, "alpha": alpha,
               "lr": lr, "gsv_lr": gsv_lr, "epochs": epochs, "max_steps": max_steps, "second_order": second_order,
               "val_fraction": val_fraction, "batch_size": batch_size, "examples": examples, "balance": balance,
               "check_every": check_every, "patience": patience, "seed": seed}
    return finish(modules, dims, "guilomo", options, target, scores, cost.report())

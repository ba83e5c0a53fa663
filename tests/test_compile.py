"""``train.compile``: training a compiled model gives the adapter of eager training; and the inference forward
compiles whole.

The test compiles with the ``aot_eager`` backend (TorchDynamo graph capture and AOTAutograd's joint forward and
backward, without code generation). Inductor also runs on CPU here (g++): 3 Trainer steps of the 4-block tiny
Llama gave the eager adapter within 1.2e-6, but compiling took 8 minutes on the 2 loaded cores."""

from __future__ import annotations

import torch
import torch._dynamo
import transformers

import moela
from moela.adapter import adapter_state_dict
from moela.settings import TrainSettings
from moela.train import train_adapter, training_arguments
from tests.helpers import TINY


def features(n: int = 8, length: int = 8) -> list[dict]:
    """Examples of one length, so that every batch has the shape the step was compiled for."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 97, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * length, "labels": ids})
    return out


def trained(tmp_path, compile: bool) -> tuple[dict[str, torch.Tensor], list[float]]:
    torch.manual_seed(0)  # one block: tracing time grows with depth
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, "num_hidden_layers": 1}))
    moela.inject(model, moela.AllocationPlan.uniform(model, "all-linear", experts=3, rank=2, top_k=2), dropout=0.0)
    cfg = TrainSettings(max_steps=2, batch_size=4, lr=1e-2, logging_steps=1, progress=False, compile=compile,
                        trainer_args={"torch_compile_backend": "aot_eager"} if compile else {})
    history = train_adapter(model, features(), 0, cfg, tmp_path / str(compile))["log_history"]
    return adapter_state_dict(model), [h["loss"] for h in history if "loss" in h]


def test_compiled_training_matches_eager(tmp_path):
    assert training_arguments(TrainSettings(compile=True), tmp_path, 8).torch_compile
    eager, eager_losses = trained(tmp_path, compile=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled, losses = trained(tmp_path, compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the step really ran compiled
    torch.testing.assert_close(losses, eager_losses, rtol=1e-6, atol=0)
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=0, atol=1e-6, msg=key)


def test_inference_forward_compiles_to_one_graph_equal_to_eager():
    """The evaluation forward without autograd (decoding's: the layers' direct path on their weights) compiles to
    one graph with no break, so that compiled decoding runs it whole, and gives the eager logits."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, "num_hidden_layers": 1}))
    moela.inject(model, moela.AllocationPlan.uniform(model, "all-linear", experts=3, rank=2, top_k=2), dropout=0.0)
    for _, layer in moela.moela_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.3)
    model.eval()
    ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(input_ids=ids)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model, backend="eager")(input_ids=ids).logits
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)

"""Tiny models built offline from transformers configs, and the path to the shared real data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)


def tiny_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny model of the given architecture, in eval mode."""
    torch.manual_seed(seed)
    if kind in ("llama", "mistral", "qwen2"):
        config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                      "qwen2": transformers.Qwen2Config}[kind]
        model = transformers.AutoModelForCausalLM.from_config(config_cls(**TINY))
    elif kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=32, n_layer=4, n_head=4, vocab_size=97, n_positions=64))
    elif kind == "bert":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=48, vocab_size=97,
            max_position_embeddings=64, num_labels=3))
    else:
        raise ValueError(kind)
    return model.eval()


ARCHITECTURES = ["llama", "mistral", "qwen2", "gpt2", "bert"]
TARGETS = {"llama": "all-linear", "mistral": ["q_proj", "v_proj", "down_proj"], "qwen2": "all-linear",
           "gpt2": ["c_attn", "c_proj", "c_fc"], "bert": ["query", "value", "intermediate.dense"]}


@pytest.fixture
def shared() -> Path:
    if not (SHARED / "METHODS.md").exists():
        pytest.skip(f"the shared data folder {SHARED} is absent (it sits beside the repository in CI)")
    return SHARED


def batch(seed: int = 1, size: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    """Random token ids with the last two positions of the first row padded out."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (size, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}

"""Helpers shared by the tests: tiny models saved with a byte tokenizer, and small data files and examples."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
import yaml
from torch import nn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers


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


def batch(seed: int = 1, size: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    """Random token ids with the last two positions of the first row padded out."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (size, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges (260 tokens), built offline."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<pad>")


def save_tiny(folder: Path, kind: str) -> Path:
    """A tiny random Llama (``lm``) or BERT classifier (``bert``) with the byte tokenizer, saved to ``folder``."""
    torch.manual_seed(0)
    if kind == "lm":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=260, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    else:  # "bert": a sequence classifier; "bert-base": the bare encoder (for a multiple-choice head)
        config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=48, vocab_size=260, max_position_embeddings=128,
                                         num_labels=2, pad_token_id=0)
        model = (transformers.BertForSequenceClassification if kind == "bert" else transformers.BertModel)(config)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def instruction_records(n: int) -> list[dict]:
    words = ["sun", "moon", "tree", "rock", "fish", "bird"]
    out = []
    for i in range(n):
        answer = "true" if i % 2 else "false"
        out.append({"instruction": f"is {words[i % 6]} {i % 7} odd?\n\nAnswer format: true/false", "input": "",
                    "output": f"the correct answer is {answer}", "answer": answer})
    return out


def lm_config(tmp: Path, model: Path, **sections) -> Path:
    train = tmp / "train.json"
    train.write_text(json.dumps(instruction_records(24)))
    test = tmp / "test.jsonl"
    test.write_text("\n".join(json.dumps(r) for r in instruction_records(8)))
    config = {"name": "tiny", "output_dir": str(tmp / "run"),
              "model": {"name_or_path": str(model)},
              "data": {"train": [{"path": str(train), "task": "odd"}], "eval": [{"path": str(test), "task": "odd"}],
                       "template": "plain", "cutoff_len": 64},
              "adapter": {"method": "uniform", "options": {"uniform": {"experts": 2, "rank": 2}}},
              "train": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "logging_steps": 2, "progress": False},
              "eval": {"max_new_tokens": 6, "batch_size": 8}}
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def classification_files(tmp: Path, n_train: int = 64, n_eval: int = 32) -> tuple[Path, Path]:
    """A TSV task a model can learn from its first byte: label 1 iff the sentence starts with 'b'."""
    def rows(n, offset):
        return "\n".join(f"{'ab'[i % 2]} {'xyz'[(i + offset) % 3] * (1 + i % 4)} w{i}\t{i % 2}" for i in range(n))
    train, dev = tmp / "train.tsv", tmp / "dev.tsv"
    train.write_text(rows(n_train, 0))
    dev.write_text(rows(n_eval, 1))
    return train, dev


def examples(n: int = 6, seed: int = 0, tasks: int | None = None, classify: bool = False) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 5 + i % 4
        ids = torch.randint(3, 97, (length,), generator=g).tolist()
        ex = {"input_ids": ids, "attention_mask": [1] * length,
              "labels": int(ids[0] % 3) if classify else [-100] * 2 + ids[2:]}
        if tasks:
            ex["task"] = i % tasks
        out.append(ex)
    return out


class Toy(nn.Module):
    """``out = layers.0.proj(x₁) + layers.1.proj(x₂)``, mean squared error."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.d = d
        self.layers = nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(d, d, bias=False)}) for _ in range(2)])

    def forward(self, x, labels):
        out = self.layers[0]["proj"](x[:, :self.d]) + self.layers[1]["proj"](x[:, self.d:])
        return SimpleNamespace(loss=((out - labels) ** 2).mean())


def toy_task(seed: int, n: int = 640, d: int = 16) -> tuple[Toy, list[dict]]:
    """Targets need a rank-6 change of layers.0.proj and none of layers.1.proj (which only sees noise)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Toy(d).eval()
    delta = torch.randn(d, 6, generator=g) @ torch.randn(6, d, generator=g) / 6 ** 0.5
    x = torch.randn(n, 2 * d, generator=g)
    with torch.no_grad():
        y = model.layers[0]["proj"](x[:, :d]) + x[:, :d] @ delta.T + model.layers[1]["proj"](x[:, d:])
    y = y + 0.3 * torch.randn(n, d, generator=g)
    return model, [{"x": x[i:i + 16], "labels": y[i:i + 16]} for i in range(0, n, 16)]

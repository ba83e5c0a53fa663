"""Property-based: any JSON-like plan input either parses into a valid plan or raises ValueError."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from moela import AllocationPlan

json_scalars = st.none() | st.booleans() | st.integers(-3, 20) | st.floats(-2, 3) | st.just(float("nan")) | st.text(max_size=3)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)
entry = st.fixed_dictionaries({"ranks": st.lists(st.integers(-1, 9), max_size=5) | json_values},
                              optional={"top_k": json_scalars, "top_p": json_scalars, "max_k": json_scalars,
                                        "num_null": json_scalars, "other": json_scalars})
plans = st.dictionaries(st.text(min_size=1, max_size=8), entry | json_values, max_size=4)
documents = plans | st.fixed_dictionaries({"modules": plans}, optional={"meta": json_values}) | json_values


@settings(max_examples=400, deadline=None)
@given(documents)
def test_any_input_parses_or_raises_value_error(data):
    try:
        plan = AllocationPlan.from_dict(data)
    except ValueError:
        return
    for name, spec in plan.items():
        assert spec.ranks and all(isinstance(r, int) and r >= 1 for r in spec.ranks)
        assert 1 <= spec.top_k <= spec.num_experts + spec.num_null
        assert AllocationPlan.from_dict(plan.to_dict()).modules == plan.modules

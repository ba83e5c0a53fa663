"""Shared fixtures: tiny models built offline from transformers configs (in memory or saved to disk), one
thread for small ops, and the path to the shared real data. Hypothesis draws the same examples on every run
(``derandomize``), so CI's result is the one seen here; ``HYPOTHESIS_RANDOM=1`` explores fresh draws."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from tests import helpers
from tests.helpers import SHARED

settings.register_profile("fixed", derandomize=True)
settings.load_profile("default" if os.environ.get("HYPOTHESIS_RANDOM") else "fixed")


@pytest.fixture
def shared() -> Path:
    if not (SHARED / "METHODS.md").exists():
        pytest.skip(f"the shared data folder {SHARED} is absent (it sits beside the repository in CI)")
    return SHARED


@pytest.fixture
def one_thread():
    """Small ops on a shared 2-core machine run far faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    return helpers.save_tiny(tmp_path_factory.mktemp("lm"), "lm")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return helpers.save_tiny(tmp_path_factory.mktemp("bert"), "bert")

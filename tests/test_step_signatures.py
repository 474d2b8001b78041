"""The six steps' run() speak one language: the same keyword for the same thing, and the
settings (`config`) passed by name only, so that a caller never has to look up which step
spells what how."""
from __future__ import annotations

import inspect

import pytest

from components import class_weights, evaluate, preprocess, register, split, train

STEPS = (preprocess, split, class_weights, train, evaluate, register)
# keyword -> the spellings it replaced
ONE_SPELLING = {"out": ("out_dir", "output"), "use_mlflow": ("mlflow",)}


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.__name__.split(".")[-1])
def test_run_takes_config_by_name_and_spells_shared_keywords_one_way(step):
    params = inspect.signature(step.run).parameters
    assert params["config"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["config"].default is None
    for spelling, others in ONE_SPELLING.items():
        assert not set(others) & set(params), f"{step.__name__}.run: spell it {spelling!r}"
    if step is not register:  # register writes nothing itself: its caller saves the result
        assert "out" in params

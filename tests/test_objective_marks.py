"""Objective marks are kept by identity: the built-in objectives are marked, copies of
their attributes (functools.wraps) and other callables are not."""

import functools

import pytest

from jaccli.engine.objective_marks import kind_of, mark
from jaccli.params.objectives import objective


def test_built_in_objectives_are_marked_and_wrappers_are_not():
    assert kind_of(None) == "outputs"
    assert kind_of(objective()) == "outputs"
    assert kind_of(objective(output_index=2)) == "rows"
    assert kind_of(objective(loss="mse")) == "rows"
    base = objective()

    @functools.wraps(base)
    def wrapper(out, targets):
        return base(out, targets)

    assert kind_of(wrapper) is None
    assert kind_of(lambda out, targets: out) is None


def test_unhashable_callables_and_bad_kinds():
    class Unhashable:
        __hash__ = None

        def __call__(self, out, targets):
            return out

    assert kind_of(Unhashable()) is None
    with pytest.raises(ValueError, match="must be one of"):
        mark(lambda out, targets: out, "columns")

"""What a batch holds in memory, term by term, and the batch size that keeps it in budget.

Every term is `shared` bytes (held once, whatever the batch size) plus `per_sample` bytes for
each sample of a batch. The budget covers the sum of the terms; what the process already
held when the run was planned (torch, the model and its weights: the *baseline*) is not part
of it and is stated beside it, so the promise is: peak ≤ baseline + budget (peak RSS on CPU,
`torch.cuda.max_memory_allocated` on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import OutOfMemoryError
from ..units import format_bytes

MAX_AUTO_BATCH = 4096


@dataclass
class Term:
    """One part of what a batch holds. fixes: the options that make this term smaller
    (those already in effect left out); detail: what it is made of, for messages."""

    name: str
    shared: int = 0
    per_sample: int = 0
    detail: str = ""
    fixes: list[str] = field(default_factory=list)

    def bytes(self, batch: int) -> int:
        return self.shared + self.per_sample * batch


@dataclass
class MemoryPlan:
    """The terms of a batch, the budget they must fit and the baseline beside it."""

    terms: list[Term]
    budget: int
    source: str
    baseline: int
    baseline_source: str

    def need(self, batch: int) -> int:
        return sum(t.bytes(batch) for t in self.terms)

    def fit(self, requested: int | None, n_samples: int) -> int:
        """The largest batch (at most `requested`, `n_samples`, `MAX_AUTO_BATCH`) whose
        terms fit the budget; refuse, naming the term, when not even one sample fits or when
        `requested` does not."""
        shared = sum(t.shared for t in self.terms)
        if shared > self.budget:
            self._refuse(max(self.terms, key=lambda t: t.shared), lambda t: t.shared, "")
        per_sample = max(1, sum(t.per_sample for t in self.terms))
        room = (self.budget - shared) // per_sample
        if room < 1:
            self._refuse(max(self.terms, key=lambda t: t.per_sample), lambda t: t.per_sample,
                         "one sample's ")
        if requested is not None:
            if requested > room and min(requested, n_samples) > room:
                raise OutOfMemoryError(
                    f"a batch of {requested} needs {format_bytes(self.need(requested))} "
                    f"({self.breakdown(requested)}), more than the memory budget "
                    f"({format_bytes(self.budget)}, {self.source}); use --batch-size {room} "
                    "or less, or raise --max-memory")
            return max(1, min(requested, n_samples))
        return max(1, min(room, MAX_AUTO_BATCH, n_samples))

    def _refuse(self, term: Term, size, prefix: str) -> None:
        others = [t for t in self.terms if t is not term and size(t)]
        beside = (f" (besides {format_bytes(sum(size(t) for t in others))} for "
                  f"{_names(others)})" if others else "")
        detail = f" {term.detail}" if term.detail else ""
        name = prefix + term.name.removeprefix("the ") if prefix else term.name
        raise OutOfMemoryError(
            f"{name}{detail} need {format_bytes(size(term))}{beside}, more than "
            f"the memory budget ({format_bytes(self.budget)}, {self.source}) allows; "
            f"{_join(term.fixes)}")

    def breakdown(self, batch: int) -> str:
        return ", ".join(f"{t.name} {format_bytes(t.bytes(batch))}" for t in self.terms
                         if t.bytes(batch))

    def to_dict(self, batch: int) -> dict:
        return {"budget_bytes": self.budget, "budget_source": self.source,
                "baseline_bytes": self.baseline, "baseline_source": self.baseline_source,
                "batch_bytes": self.need(batch),
                "terms": [{"name": t.name, "shared_bytes": t.shared,
                           "per_sample_bytes": t.per_sample, "batch_bytes": t.bytes(batch),
                           "detail": t.detail} for t in self.terms]}


def _names(terms: list[Term]) -> str:
    return ", ".join(t.name.removeprefix("the ") for t in terms)


def _join(fixes: list[str]) -> str:
    """'use A, B, or raise --max-memory' from the options that would help."""
    other = [f for f in fixes if f != "--max-memory"]
    if not other:
        return "raise --max-memory"
    return f"use {', '.join(other)}, or raise --max-memory"

"""The `ntk` pipeline's memory plan: what a block of B samples over the pairs holds, term by
term (the `Term`s of `jaccli.pipelines.memory`, as `compute` counts them), the block size that
keeps them in the budget, and the refusal — naming the term and its size — where not even
one sample (or the `--batch-size` asked for) fits.

Shapes: N samples of DATA, M of DATA2, C outputs, B samples per block. Every term is
`shared + per_sample·B` bytes except the kernel blocks, `per_pair·B²` (full and trace
modes: a B×B block of C×C entries; `diagonal`: B blocks, linear in B).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import OutOfMemoryError
from ..units import format_bytes
from .memory import MemoryPlan, Term
from .planner import allocator_reserve
from .resources import baseline_memory

KERNEL_BLOCKS = "the kernel blocks"


@dataclass
class BlockPlan:
    """Blocks of B samples over the pairs: how many are computed, and whether the factors
    of DATA2's blocks are kept between rows (else computed again for every row); the memory
    terms of a block and its predicted peak (`peak_bytes`, within the budget)."""

    block_size: int
    row_blocks: int
    col_blocks: int
    computed_blocks: int
    pairs: int
    cache_factors: bool
    factor_passes: int
    bytes_per_sample: float
    bytes_per_pair: float
    peak_bytes: float
    terms: list[dict]
    baseline_bytes: int
    baseline_source: str


def ntk_terms(run, activation_bytes: float, n: int) -> list[Term]:
    """What computing one block holds: its inputs and the passes' activations (one block at
    a time), the factors of a row block and a column block, the kernel blocks (`per_sample`
    here: their bytes for one pair, B² of them), the spectrum's matrix, the allocator's
    reserve (CPU)."""
    settings, c = run.settings, run.n_outputs
    inputs = run.inputs
    itemsize = inputs.dtype.itemsize
    float32 = ["--dtype float32"] if itemsize == 8 else []
    d_in = math.prod(inputs.data.sample_shape)
    largest = max(run.params, key=lambda p: p.bytes_per_sample)
    several = len(_output_names(run)) > 1 and settings.model_output is None
    copies = 2 + (len(run.layers) if settings.per_layer else 0)
    mode = settings.mode
    cc = 1 if mode == "trace" else c * c
    kernel_fixes = ([] if mode != "full" else ["--trace", "--diagonal"]) + (
        ["without --per-layer"] if settings.per_layer else []) + float32
    terms = [
        Term("the inputs", 0, int(d_in * (itemsize + 8)), f"({d_in} values a sample)",
             float32),
        Term("the recorded activations", 0, int(activation_bytes),
             f"(the forward pass and the reverse pass with {c} cotangents)",
             (["--model-output"] if several else []) + float32),
        Term("the per-parameter factors", 0,
             int(2 * sum(p.bytes_per_sample for p in run.params)),
             f"(a row block's and a column block's; largest: {largest.name}, "
             f"{format_bytes(int(largest.bytes_per_sample))} a sample)",
             (["--model-output"] if several else []) + float32),
        Term(KERNEL_BLOCKS, 0, int(itemsize * cc * copies),
             f"({cc} values per pair, {copies} copies: total, "
             f"{'per-layer parts, ' if settings.per_layer else ''}a temporary)", kernel_fixes),
    ]
    if settings.spectrum:
        size = n * c
        terms.append(Term(f"the spectrum's {size}×{size} kernel matrix", 2 * size * size * 8,
                          0, "(float64, and eigvalsh's copy)", ["--limit"]))
    reserve = allocator_reserve(inputs.device, settings.run.max_memory)
    if reserve:
        terms.append(Term("the allocator's reserve", reserve, 0,
                          "(freed memory the C allocator keeps)", []))
    return terms


def _output_names(run) -> list[str]:
    graph = run.inputs.graph
    return list(graph.outputs) if graph is not None else ["output"]


def plan_blocks(run, activation_bytes: float, n: int, m: int) -> BlockPlan:
    """The block size B: the largest whose terms fit the budget (`--batch-size` sets B, and
    is refused when it does not fit); refused, naming the term, when one sample does not."""
    settings = run.settings
    mode = settings.mode
    terms = ntk_terms(run, activation_bytes, n)
    baseline, baseline_source = baseline_memory(run.inputs.device)
    memory = MemoryPlan(terms, run.budget, run.budget_source, baseline, baseline_source)
    memory.fit(None, 1)  # one sample (one pair) must fit: else the term too big is named
    kernel = next(t for t in terms if t.name == KERNEL_BLOCKS)
    linear = [t for t in terms if t is not kernel]
    shared = sum(t.shared for t in linear)
    per_sample = sum(t.per_sample for t in linear)
    pair = float(kernel.per_sample)
    quadratic = mode != "diagonal"

    def need(b: int) -> float:
        return shared + per_sample * b + pair * (b * b if quadratic else b)

    largest = max(n, m) if quadratic else n
    room = run.budget - shared
    if quadratic:
        fit = (-per_sample + math.sqrt(per_sample ** 2 + 4 * pair * room)) / (2 * pair)
    else:
        fit = room / (per_sample + pair)
    fit = max(1, int(fit))
    while fit > 1 and need(fit) > run.budget:  # rounding of the square root
        fit -= 1
    requested = settings.run.batch_size
    if requested is not None and min(requested, largest) > fit:
        b = min(requested, largest)
        raise OutOfMemoryError(
            f"blocks of {b} samples need {format_bytes(int(need(b)))} "
            f"({_breakdown(terms, kernel, b, quadratic)}), more than the memory budget "
            f"({format_bytes(run.budget)}, {run.budget_source}); use --batch-size {fit} or "
            "less, or raise --max-memory")
    b = min(requested or fit, largest)
    rows = -(-n // b)
    cols = rows if mode == "diagonal" or run.second is None else -(-m // b)
    symmetric = run.second is None and mode != "diagonal"
    if mode == "diagonal":
        computed, pairs = rows, n
    elif symmetric:
        computed = rows * (rows + 1) // 2
        pairs = sum(min(b, n - i * b) * min(b, n - j * b)
                    for i in range(rows) for j in range(i, rows))
    else:
        computed, pairs = rows * cols, n * m
    factors = next(t for t in terms if t.name == "the per-parameter factors").per_sample / 2
    peak = need(b)
    cached = peak + factors * max(m - b, 0)  # every column block's factors kept
    cache = cols > 1 and quadratic and cached <= run.budget
    if mode == "diagonal":
        passes = rows
    elif cache or cols == 1:
        passes = rows + (0 if symmetric else cols)
    else:
        passes = rows + (computed - rows if symmetric else computed)
    held = [{"name": t.name, "bytes": (t.per_sample * (b * b if quadratic else b))
             if t is kernel else t.bytes(b), "detail": t.detail} for t in terms]
    if cache:
        held.append({"name": "the cached factors of the column blocks",
                     "bytes": factors * max(m - b, 0), "detail": ""})
    return BlockPlan(b, rows, cols, computed, pairs, cache, passes, float(per_sample),
                     pair if quadratic else 0.0, cached if cache else peak, held, baseline,
                     baseline_source)


def _breakdown(terms: list[Term], kernel: Term, b: int, quadratic: bool) -> str:
    sizes = [(t.name, t.per_sample * (b * b if quadratic else b) if t is kernel
              else t.bytes(b)) for t in terms]
    return ", ".join(f"{name} {format_bytes(int(size))}" for name, size in sizes if size)

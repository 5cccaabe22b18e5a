"""The protocol every side implements, and the parts every side shares."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from ..nodes import Graph

if TYPE_CHECKING:
    from ..nodes import MoeBlock


@runtime_checkable
class Side(Protocol):
    """Something that produces every node of the canonical graph for token ids."""

    name: str  # "reference", "actdiff", "llamacpp", an imported engine's name
    variant: str  # the variant it runs (the reference: fp32)
    graph: Graph
    ids_column: str  # the tokens column it reads: "reference_ids" or "engine_ids"
    records_input_ids: bool  # the dump records the ids it ran on (an import cannot know them)
    missing_nodes: tuple[str, ...]  # nodes it cannot provide: written as placeholders, judged not_captured

    def provenance(self) -> dict:
        """HDF5 attributes describing this side (implementation, versions, settings); JSON-safe values."""

    def forward(self, items: Iterable[tuple[str, list[int]]]) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """(prompt_id, every node's value except missing_nodes) for each (prompt_id, ids), in input order."""

    def close(self) -> None: ...

    # optional: ``stream(items, sink: RowSink) -> None``, forward's values handed to ``sink`` as they are
    # computed, in any order, none held: the dumps of a model whose values are large use it
    # (actdiff.batching.streams_rows); it runs the batches forward runs (actdiff.batching.stream_batches), so the
    # values are forward's, bit for bit


class RowSink(Protocol):
    """Where a streaming side (``Side.stream``) hands its values: prompts by their index in the items given."""

    def put(self, index: int, name: str, value: np.ndarray) -> None:
        """Node ``name``'s value for prompt ``index``, shaped as forward() gives it."""

    def done(self, index: int) -> None:
        """Every node of prompt ``index`` was put."""


@runtime_checkable
class Replay(Protocol):
    """A side's own code run on given inputs (teacher forcing): the local error of a node is its replay on
    the reference's inputs against the reference's value. That is only sound if the replay is the code that
    produced the dump, so every node is also replayed on the side's OWN inputs and checked against its dump."""

    variant: str

    def replay_node(self, name: str, inputs: dict[str, np.ndarray]) -> np.ndarray: ...

    # optional: ``replay_many(name, inputs: list[dict]) -> list[np.ndarray]``, replay_node for several prompts
    # at once, each result bitwise replay_node's (a side whose kernels compute rows independently batches them,
    # ONNX Runtime after a trial per node; replay_many() below falls back to one call per prompt)

    def forced_moe(self, block: MoeBlock, h: np.ndarray, indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """The MoE block's output with the expert choice given (separates expert-kernel error from flips)."""

    def fused_nodes(self) -> frozenset[str]:
        """Nodes the side's forward computes on another code path than replay_node (a fused kernel): their
        replay on the side's own inputs must match the dump within the node's budget, every other node's
        bit for bit (actdiff.compare.stats checks both: the replay must be the code that ran)."""


_SAME_WIDTH_INT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
# At most this many bytes, two arrays' bytes are compared as bytes objects (two copies and a memcmp: 1.6 us for
# 20 KB against 4.7 for the integer views, whose per-call cost of numpy's comparison and reduction is most of a
# small array's time). The statistics compare every node's replay with its dump: a prompt of the tiny model is
# 20 KB a node, 50-100 thousand comparisons a job.
SAME_BITS_AS_BYTES = 1 << 16


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Do two arrays hold the same bytes? Compared as integers of the element's width (bytes where small,
    SAME_BITS_AS_BYTES): 8x faster than ``array_equal(equal_nan=True)``, which it implies (equal bits are equal
    values or the same NaN); arrays of another dtype, shape or layout are not the same bits here."""
    if a.dtype != b.dtype or a.shape != b.shape or not (a.flags.c_contiguous and b.flags.c_contiguous):
        return False
    if a.nbytes <= SAME_BITS_AS_BYTES:
        return a.tobytes() == b.tobytes()
    as_int = _SAME_WIDTH_INT.get(a.dtype.itemsize, np.uint8)
    return np.array_equal(a.view(as_int), b.view(as_int))


def replay_many(replay: Replay, name: str, inputs: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """``replay.replay_node(name, x)`` for every ``x`` of ``inputs``, through the side's own ``replay_many`` when
    it has one."""
    many = getattr(replay, "replay_many", None)
    if many is not None and len(inputs) > 1:
        return list(many(name, inputs))
    return [replay.replay_node(name, x) for x in inputs]


def placeholder(graph: Graph, name: str, tokens: int) -> np.ndarray:
    """The value stored for a node a side cannot provide: NaN, or -1 for expert ids (int64 holds no NaN)."""
    n = graph[name]
    return np.full(graph.shape(name, tokens), -1 if n.kind == "index" else np.nan, dtype=n.dtype)

"""Node alignment: bring another engine's tensors onto the canonical graph (actdiff.nodes).

Two pieces:

- :func:`normalize` brings one array to the canonical shape ``graph.shape(node, T)``. It only does what
  cannot change the meaning of the data: it drops a leading batch axis of size 1 (``[1, T, H] -> [T, H]``),
  adds the row axis of a prompt-level node given as ``[H]``, and merges or splits trailing axes when the
  token axis is kept and one side's axes are runs of the other's (``[T, nh, hd] <-> [T, H]``,
  ``[T, k, F] <-> [T, k*F]``). Anything else (``[H, T]``, ``[T, hd, nh]``, ``[T*nh, hd]``) is a
  :class:`~actdiff.errors.DumpError` naming the node and both shapes: a transposed or interleaved layout
  must be declared with transforms in the mapping, never guessed. It also casts to the node's dtype
  (float32; int64 for expert ids, which must then hold integral values).
- A mapping file (YAML) says which external tensor(s) feed each canonical node and how to transform them.
  :func:`load_mapping` validates it; :meth:`Mapping.resolve` matches it against the tensor names an
  engine actually dumped (:class:`Alignment`); :meth:`Mapping.apply` turns one prompt's external tensors
  into canonical arrays. Without a mapping file, :meth:`Mapping.identity` aligns by canonical name.

Mapping file format (full description and examples in docs/mapping.md)::

    version: 1                 # optional; only 1 exists
    engine: llama.cpp          # optional free text, recorded in reports
    identity: false            # optional; true: nodes without an entry are looked up by canonical name
    nodes:                     # required: canonical node -> source
      embeddings: inp_embd                                   # 1:1 rename (string shorthand)
      emb_ln: {from: inp_norm, transforms: [{squeeze: 0}, {transpose: [1, 0]}]}
      encoder.layers.{i}.attn.qkv: blk.{i}.attn_qkv          # {i} expands over the graph's layers;
                                                             # quote names with {i} inside [..] / {..}
      encoder.layers.{i}.attn.q:                             # 1:N: one tensor feeds q, k, v and qkv
        from: blk.{i}.attn_qkv
        transforms: [{split: {axis: -1, parts: 3, index: 0}}, {reshape: [T, nh, hd]}]
      encoder.layers.{i}.attn.context:                       # N:1: sources combined, then transformed
        from: ["blk.{i}.kqv_out.a", {name: "blk.{i}.kqv_out.b", transforms: [{squeeze: 0}]}]
        combine: concat                                      # concat | sum | stack
        axis: -1                                             # axis of concat/stack (default -1)

A node entry is a string (the external tensor name) or a mapping with keys ``from`` (a name, or a list
of names / ``{name, transforms}`` items, each with its own per-source transforms), ``combine`` and
``axis`` (required with several sources), and ``transforms`` (applied after combining, in order). A key
with ``{i}`` expands for every layer ``i`` whose expanded name is a graph node (so
``encoder.layers.{i}.mlp.fc1`` covers the dense layers only); a key that names no graph node for any
layer is an error, and an explicit key (``encoder.layers.3.attn.q``) overrides the ``{i}`` entry for
that node. ``{i}`` in a source name is replaced by the same layer index.

Transforms (one single-key mapping each, applied in order):

- ``squeeze: AXIS``: drop an axis of size 1;
- ``transpose: [PERM]``: permute axes (a permutation of all axes);
- ``reshape: [DIMS]``: ints, ``-1`` (once) or symbols ``T`` (tokens of the prompt), ``H``, ``3H``,
  ``nh``, ``hd``, ``F``, ``E``, ``k``;
- ``split: {axis: A, parts: N, index: I}`` or ``split: {axis: A, sizes: [..], index: I}``: keep part I of
  the axis cut into N equal parts (or parts of the given sizes; symbols allowed); axis defaults to -1;
- ``scale: X``: multiply by X in the array's float dtype;
- ``index_offset: N``: add the integer N to integer ids (``-1`` for 1-based expert ids);
- ``cast: DTYPE``: numpy dtype name (``float32``, ``float16``, ``int64``, ...).

Mapping errors are :class:`MappingError` (a :class:`~actdiff.errors.ConfigError`) naming the file and
the key; errors while applying a mapping are :class:`~actdiff.errors.DumpError` naming the node.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from collections.abc import Mapping as AbcMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DumpError
from ..nodes import Graph

__all__ = [
    "Alignment",
    "Mapping",
    "MappingError",
    "NodeSpec",
    "Source",
    "Transform",
    "alignment_summary",
    "load_mapping",
    "normalize",
]

LAYER = "{i}"
SYMBOLS = ("T", "H", "3H", "nh", "hd", "F", "E", "k")
COMBINE_OPS = ("concat", "sum", "stack")
TRANSFORM_OPS = ("squeeze", "transpose", "reshape", "split", "scale", "index_offset", "cast")
_TOP_KEYS = ("version", "engine", "identity", "nodes")
_ENTRY_KEYS = ("from", "transforms", "combine", "axis")
_SOURCE_KEYS = ("name", "transforms")


class MappingError(ConfigError):
    """A mapping file is malformed (the message names the file and key)."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate (difflib), or "" when none is close."""
    import difflib

    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------------------------- normalize
def _regroupable(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """True when ``a`` and ``b`` cut the same row-major block into runs, each run being ONE axis on at
    least one side (a pure merge or split of adjacent axes, never a reordering)."""
    if math.prod(a) != math.prod(b):
        return False
    if 0 in a or 0 in b:
        return a == b
    a = tuple(d for d in a if d != 1)
    b = tuple(d for d in b if d != 1)
    i = j = 0
    while i < len(a) and j < len(b):
        pa, pb, na, nb = a[i], b[j], 1, 1
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i == len(a):
                    return False
                pa, i, na = pa * a[i], i + 1, na + 1
            else:
                if j == len(b):
                    return False
                pb, j, nb = pb * b[j], j + 1, nb + 1
        if na > 1 and nb > 1:
            return False
    return i == len(a) and j == len(b)


def normalize(arr, graph: Graph, node_name: str, tokens: int) -> np.ndarray:
    """Return ``arr`` with the canonical shape and dtype of ``node_name`` for a prompt of ``tokens`` tokens.

    Allowed: dropping a leading batch axis of size 1, adding the row axis of a prompt-level node, merging
    or splitting trailing axes (row-major order kept, token axis unchanged). Anything else raises
    DumpError naming the node and both shapes.
    """
    if node_name not in graph.by_name:
        raise DumpError(f"node {node_name!r} is not in the graph")
    node = graph[node_name]
    expected = graph.shape(node_name, tokens)
    a = np.asarray(arr)
    got = a.shape
    if got != expected:
        candidates = [got]
        if len(got) >= 2 and got[0] == 1:
            candidates.append(got[1:])  # batch axis
        if node.axis == "prompt":
            candidates.append((1, *got))  # [H] for a one-row prompt-level node
        for shape in candidates:
            if shape and shape[0] == expected[0] and _regroupable(shape[1:], expected[1:]):
                a = a.reshape(expected)
                break
        else:
            raise DumpError(
                f"node {node_name!r}: array of shape {list(got)} does not fit the canonical shape "
                f"{list(expected)} ({node.shape_template} with T={tokens}); only a leading batch axis of size 1 "
                "and merged/split head axes are handled automatically: declare transpose/reshape/split "
                "transforms for this node in the mapping"
            )
    return _cast_to_node(a, node_name, node.kind, node.dtype)


def _cast_to_node(a: np.ndarray, node_name: str, kind: str, dtype: str) -> np.ndarray:
    if a.dtype.kind not in "biuf":
        raise DumpError(f"node {node_name!r}: dtype {a.dtype} is not numeric")
    if kind == "index" and a.dtype.kind == "f":
        if not (np.all(np.isfinite(a)) and np.array_equal(a, np.round(a))):
            raise DumpError(f"node {node_name!r}: expert ids given as {a.dtype} hold non-integral values")
    return np.ascontiguousarray(a, dtype=dtype)


# --------------------------------------------------------------------------------------------- transforms
def _resolve_dim(d, sym: dict[str, int]) -> int:
    return sym[d] if isinstance(d, str) else int(d)


@dataclass(frozen=True)
class Transform:
    """One transform step: ``op`` is one of TRANSFORM_OPS, ``arg`` its validated argument."""

    op: str
    arg: Any

    def describe(self) -> str:
        return f"{self.op}: {self.arg}"

    def apply(self, a: np.ndarray, sym: dict[str, int]) -> np.ndarray:
        op, arg = self.op, self.arg
        if op == "squeeze":
            if a.shape[arg] != 1:
                raise ValueError(f"axis {arg} has size {a.shape[arg]}, not 1")
            return np.squeeze(a, axis=arg)
        if op == "transpose":
            if len(arg) != a.ndim:
                raise ValueError(f"permutation {list(arg)} has {len(arg)} axes, the array has {a.ndim}")
            return np.transpose(a, arg)
        if op == "reshape":
            return a.reshape([_resolve_dim(d, sym) for d in arg])
        if op == "split":
            axis = arg["axis"]
            n = a.shape[axis]
            if "parts" in arg:
                parts = arg["parts"]
                if n % parts:
                    raise ValueError(f"axis {axis} of size {n} does not split into {parts} equal parts")
                sizes = [n // parts] * parts
            else:
                sizes = [_resolve_dim(d, sym) for d in arg["sizes"]]
                if sum(sizes) != n:
                    raise ValueError(f"sizes {sizes} sum to {sum(sizes)}, axis {axis} has size {n}")
            start = sum(sizes[: arg["index"]])
            sl = [slice(None)] * a.ndim
            sl[axis] = slice(start, start + sizes[arg["index"]])
            return a[tuple(sl)]
        if op == "scale":
            if a.dtype.kind != "f":
                raise ValueError(f"scale needs a float array, got {a.dtype}")
            return a * np.asarray(arg, dtype=a.dtype)
        if op == "index_offset":
            if a.dtype.kind not in "iu":
                raise ValueError(f"index_offset needs an integer array, got {a.dtype}")
            return a.astype(np.int64) + np.int64(arg)
        if op == "cast":
            return a.astype(arg)
        raise AssertionError(op)


@dataclass(frozen=True)
class Source:
    """One external tensor (layer index expanded) and the transforms applied to it alone."""

    name: str
    transforms: tuple[Transform, ...] = ()


@dataclass(frozen=True)
class NodeSpec:
    """How one canonical node is built from external tensors."""

    node: str
    sources: tuple[Source, ...]
    combine: str | None = None
    axis: int = -1
    transforms: tuple[Transform, ...] = ()
    key: str = ""  # the mapping key it came from ("" for identity)

    @property
    def external_names(self) -> list[str]:
        return [s.name for s in self.sources]

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"from": self.external_names}
        if any(s.transforms for s in self.sources):
            d["source_transforms"] = {s.name: [t.describe() for t in s.transforms] for s in self.sources}
        if self.combine:
            d["combine"] = self.combine
            d["axis"] = self.axis
        if self.transforms:
            d["transforms"] = [t.describe() for t in self.transforms]
        return d

    def build(self, graph: Graph, external: AbcMapping[str, np.ndarray], tokens: int) -> np.ndarray:
        sym = {**graph.dims.symbols(), "T": int(tokens)}
        arrays = []
        for s in self.sources:
            a = np.asarray(external[s.name])
            arrays.append(_run(a, s.transforms, sym, self.node, f"source {s.name!r}"))
        if self.combine is None:
            out = arrays[0]
        else:
            shapes = [list(a.shape) for a in arrays]
            try:
                if self.combine == "concat":
                    out = np.concatenate(arrays, axis=self.axis)
                elif self.combine == "stack":
                    out = np.stack(arrays, axis=self.axis)
                else:
                    if len({a.shape for a in arrays}) != 1:
                        raise ValueError("sum needs equal shapes")
                    out = arrays[0].copy()
                    for a in arrays[1:]:
                        out = out + a
            except (ValueError, IndexError) as e:
                raise DumpError(
                    f"node {self.node!r}: cannot {self.combine} sources {self.external_names} (shapes {shapes}, "
                    f"axis {self.axis}): {e}"
                ) from None
        what = "the combined value" if self.combine else f"source {self.sources[0].name!r}"
        out = _run(out, self.transforms, sym, self.node, what)
        return normalize(out, graph, self.node, tokens)


def _run(a: np.ndarray, transforms: Iterable[Transform], sym: dict[str, int], node: str, what: str) -> np.ndarray:
    for j, t in enumerate(transforms):
        shape = list(a.shape)
        try:
            a = t.apply(a, sym)
        except (ValueError, IndexError, TypeError) as e:  # numpy's AxisError is a ValueError and IndexError
            raise DumpError(
                f"node {node!r}: transform {j} ({t.describe()}) fails on {what} of shape {shape} dtype {a.dtype}: {e}"
            ) from None
    return a


# --------------------------------------------------------------------------------------------- alignment
@dataclass
class Alignment:
    """Result of matching a mapping against the external tensor names a dump actually holds.

    ``matched``: canonical node -> spec, for nodes whose every source is present (graph order);
    ``unmatched_canonical``: graph nodes with no usable source (no entry, or an entry whose tensors are
    absent: ``missing_sources`` says which); ``unused_external``: external names no matched node reads.
    """

    matched: dict[str, NodeSpec]
    unmatched_canonical: list[str]
    unused_external: list[str]
    missing_sources: dict[str, list[str]] = field(default_factory=dict)
    suggestions: dict[str, str] = field(default_factory=dict)  # absent tensor -> " (did you mean 'x'?)"

    def to_dict(self) -> dict:
        return {
            "matched": {k: v.to_dict() for k, v in self.matched.items()},
            "unmatched_canonical": list(self.unmatched_canonical),
            "missing_sources": dict(self.missing_sources),
            "unused_external": list(self.unused_external),
            "suggestions": dict(self.suggestions),
        }

    def summary(self, limit: int = 50) -> str:
        return alignment_summary(self.to_dict(), limit)


def alignment_summary(d: dict, limit: int = 50) -> str:
    """Human-readable summary of :meth:`Alignment.to_dict` output (as stored in an imported dump)."""

    def _list(xs: list[str]) -> str:
        if not xs:
            return "none"
        more = f", ... ({len(xs) - limit} more)" if len(xs) > limit else ""
        return ", ".join(xs[:limit]) + more

    unmatched = d["unmatched_canonical"]
    total = len(d["matched"]) + len(unmatched)
    lines = [
        f"matched {len(d['matched'])}/{total} canonical nodes",
        f"unmatched canonical nodes ({len(unmatched)}): {_list(unmatched)}",
    ]
    hints = d.get("suggestions", {})
    for n, miss in d.get("missing_sources", {}).items():
        lines.append(f"  {n}: mapped, but external tensor(s) absent: {', '.join(m + hints.get(m, '') for m in miss)}")
    lines.append(f"unused external tensors ({len(d['unused_external'])}): {_list(d['unused_external'])}")
    return "\n".join(lines)


class Mapping:
    """Canonical node -> external source specification for one graph."""

    def __init__(
        self,
        graph: Graph,
        specs: dict[str, NodeSpec],
        source: str = "<identity>",
        identity_fallback: bool = False,
        engine: str | None = None,
    ):
        self.graph = graph
        self.specs = specs
        self.source = source
        self.identity_fallback = identity_fallback
        self.engine = engine

    @classmethod
    def identity(cls, graph: Graph) -> Mapping:
        """Alignment by canonical name: every node is read from the external tensor of the same name."""
        return cls(graph, {}, "<identity>", identity_fallback=True)

    def spec_for(self, node: str) -> NodeSpec | None:
        if node in self.specs:
            return self.specs[node]
        if self.identity_fallback:
            return NodeSpec(node, (Source(node),))
        return None

    def resolve(self, available_external_names: Iterable[str]) -> Alignment:
        avail = set(available_external_names)
        matched: dict[str, NodeSpec] = {}
        unmatched: list[str] = []
        missing: dict[str, list[str]] = {}
        for n in self.graph:
            spec = self.spec_for(n.name)
            if spec is None:
                unmatched.append(n.name)
                continue
            absent = [s for s in spec.external_names if s not in avail]
            if absent:
                unmatched.append(n.name)
                missing[n.name] = absent
            else:
                matched[n.name] = spec
        used = {s for spec in matched.values() for s in spec.external_names}
        close = {a: did_you_mean(a, avail) for absent in missing.values() for a in absent}
        return Alignment(matched, unmatched, sorted(avail - used), missing, {a: h for a, h in close.items() if h})

    def apply(
        self, external: AbcMapping[str, np.ndarray], tokens: int, nodes: Iterable[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Canonical arrays (normalized) for every node whose sources are all in ``external``
        (or for ``nodes`` only: then a node without its sources is a DumpError)."""
        out: dict[str, np.ndarray] = {}
        wanted = None if nodes is None else set(nodes)
        for n in self.graph:
            if wanted is not None and n.name not in wanted:
                continue
            spec = self.spec_for(n.name)
            if spec is None or any(s not in external for s in spec.external_names):
                if wanted is not None:
                    why = (
                        "has no entry in the mapping"
                        if spec is None
                        else (f"needs external tensor(s) {[s for s in spec.external_names if s not in external]}")
                    )
                    raise DumpError(f"node {n.name!r} {why} ({self.source})")
                continue
            out[n.name] = spec.build(self.graph, external, tokens)
        return out


# --------------------------------------------------------------------------------------------- loading
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _dim_ok(d, allow_minus_one: bool) -> bool:
    if isinstance(d, str):
        return d in SYMBOLS
    return _is_int(d) and (d > 0 or (allow_minus_one and d == -1))


def _parse_transform(raw, where: str, err) -> Transform:
    if not isinstance(raw, dict) or len(raw) != 1:
        raise err(f"{where}: a transform is a mapping with exactly one key, one of {list(TRANSFORM_OPS)}; got {raw!r}")
    ((op, arg),) = raw.items()
    if op not in TRANSFORM_OPS:
        raise err(f"{where}: unknown transform {op!r} (known: {', '.join(TRANSFORM_OPS)})")
    w = f"{where}.{op}"
    if op == "squeeze":
        if not _is_int(arg):
            raise err(f"{w}: expected an integer axis, got {arg!r}")
    elif op == "transpose":
        if not isinstance(arg, list) or not all(_is_int(x) for x in arg) or sorted(arg) != list(range(len(arg))):
            raise err(f"{w}: expected a permutation of 0..n-1 such as [1, 0], got {arg!r}")
        arg = tuple(arg)
    elif op == "reshape":
        if not isinstance(arg, list) or not arg or not all(_dim_ok(d, True) for d in arg):
            raise err(f"{w}: expected a list of positive ints, -1 or symbols {list(SYMBOLS)}, got {arg!r}")
        if sum(1 for d in arg if d == -1) > 1:
            raise err(f"{w}: at most one -1, got {arg!r}")
        arg = tuple(arg)
    elif op == "split":
        if not isinstance(arg, dict):
            raise err(f"{w}: expected {{axis, parts | sizes, index}}, got {arg!r}")
        unknown = set(arg) - {"axis", "parts", "sizes", "index"}
        if unknown:
            raise err(f"{w}: unknown key(s) {sorted(unknown)} (allowed: axis, parts, sizes, index)")
        if ("parts" in arg) == ("sizes" in arg):
            raise err(f"{w}: give exactly one of parts (equal parts) or sizes")
        axis = arg.get("axis", -1)
        if not _is_int(axis):
            raise err(f"{w}.axis: expected an integer, got {axis!r}")
        if "parts" in arg:
            n = arg["parts"]
            if not _is_int(n) or n < 1:
                raise err(f"{w}.parts: expected a positive integer, got {n!r}")
        else:
            sizes = arg["sizes"]
            if not isinstance(sizes, list) or not sizes or not all(_dim_ok(d, False) for d in sizes):
                raise err(f"{w}.sizes: expected a list of positive ints or symbols {list(SYMBOLS)}, got {sizes!r}")
            n = len(sizes)
        idx = arg.get("index")
        if not _is_int(idx) or not 0 <= idx < n:
            raise err(f"{w}.index: expected an integer in [0, {n}), got {idx!r}")
        arg = {"axis": axis, "index": idx, **({"parts": arg["parts"]} if "parts" in arg else {"sizes": tuple(sizes)})}
    elif op == "scale":
        if isinstance(arg, bool) or not isinstance(arg, (int, float)) or not math.isfinite(arg):
            raise err(f"{w}: expected a finite number, got {arg!r}")
    elif op == "index_offset":
        if not _is_int(arg):
            raise err(f"{w}: expected an integer, got {arg!r}")
    elif op == "cast":
        try:
            dt = np.dtype(arg) if isinstance(arg, str) else None
        except TypeError:
            dt = None
        if dt is None or dt.kind not in "biuf":
            raise err(f"{w}: expected a numeric numpy dtype name such as float32 or int64, got {arg!r}")
        arg = dt.name
    return Transform(op, arg)


def _parse_transforms(raw, where: str, err) -> tuple[Transform, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise err(f"{where}: expected a list of transforms, got {raw!r}")
    return tuple(_parse_transform(t, f"{where}[{j}]", err) for j, t in enumerate(raw))


def _check_name(name, where: str, err, templated: bool) -> str:
    if not isinstance(name, str) or not name:
        raise err(f"{where}: expected a non-empty tensor name, got {name!r}")
    if LAYER in name and not templated:
        raise err(f"{where}: {name!r} uses {LAYER} but the node key does not")
    rest = name.replace(LAYER, "")
    if "{" in rest or "}" in rest:
        raise err(f"{where}: {name!r}: the only placeholder is {LAYER}")
    return name


def _parse_entry(key: str, raw, where: str, err, templated: bool):
    """Return (sources [(name template, transforms)], combine, axis, transforms)."""
    if isinstance(raw, str):
        return [(_check_name(raw, where, err, templated), ())], None, -1, ()
    if not isinstance(raw, dict):
        raise err(f"{where}: expected an external tensor name or a mapping with 'from', got {raw!r}")
    unknown = set(raw) - set(_ENTRY_KEYS)
    if unknown:
        raise err(f"{where}: unknown key(s) {sorted(unknown)} (allowed: {', '.join(_ENTRY_KEYS)})")
    if "from" not in raw:
        raise err(f"{where}: missing 'from' (the external tensor name or list of names)")
    frm = raw["from"]
    items = frm if isinstance(frm, list) else [frm]
    if not items:
        raise err(f"{where}.from: empty list")
    sources = []
    for j, it in enumerate(items):
        w = f"{where}.from[{j}]" if isinstance(frm, list) else f"{where}.from"
        if isinstance(it, dict):
            unknown = set(it) - set(_SOURCE_KEYS)
            if unknown or "name" not in it:
                raise err(f"{w}: a source is a name or {{name, transforms}}; got keys {sorted(it)}")
            sources.append(
                (
                    _check_name(it["name"], w + ".name", err, templated),
                    _parse_transforms(it.get("transforms"), w + ".transforms", err),
                )
            )
        else:
            sources.append((_check_name(it, w, err, templated), ()))
    combine = raw.get("combine")
    if len(sources) > 1 and combine is None:
        raise err(f"{where}: {len(sources)} sources need 'combine' ({' | '.join(COMBINE_OPS)})")
    if combine is not None:
        if combine not in COMBINE_OPS:
            raise err(f"{where}.combine: expected one of {list(COMBINE_OPS)}, got {combine!r}")
        if len(sources) < 2:
            raise err(f"{where}.combine: needs a list of at least two sources in 'from'")
    axis = raw.get("axis", -1)
    if not _is_int(axis):
        raise err(f"{where}.axis: expected an integer, got {axis!r}")
    if "axis" in raw and combine not in ("concat", "stack"):
        raise err(f"{where}.axis: only meaningful with combine: concat or stack")
    return sources, combine, axis, _parse_transforms(raw.get("transforms"), where + ".transforms", err)


def load_mapping(path: str | Path, graph: Graph) -> Mapping:
    """Read and validate a mapping file against ``graph``; errors name the file and the key."""
    import yaml

    path = Path(path)

    def err(msg: str) -> MappingError:
        return MappingError(f"{path}: {msg}")

    if not path.is_file():
        raise err("mapping file not found")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise err(f"not valid YAML ({e})") from None
    except UnicodeDecodeError as e:
        raise err(f"not UTF-8 text ({e})") from None
    if not isinstance(doc, dict):
        raise err("expected a mapping with a 'nodes' key at the top level")
    unknown = set(doc) - set(_TOP_KEYS)
    if unknown:
        raise err(f"unknown top-level key(s) {sorted(unknown)} (allowed: {', '.join(_TOP_KEYS)})")
    if doc.get("version", 1) != 1:
        raise err(f"version: {doc['version']!r} is not supported (only 1)")
    engine = doc.get("engine")
    if engine is not None and not isinstance(engine, str):
        raise err(f"engine: expected a string, got {engine!r}")
    identity = doc.get("identity", False)
    if not isinstance(identity, bool):
        raise err(f"identity: expected true or false, got {identity!r}")
    nodes = doc.get("nodes")
    if not isinstance(nodes, dict) or not nodes:
        raise err("nodes: expected a non-empty mapping of canonical node name -> external source")

    explicit: dict[str, NodeSpec] = {}
    templated: dict[str, NodeSpec] = {}
    for key, raw in nodes.items():
        where = f"nodes.{key}"
        if not isinstance(key, str) or not key:
            raise err(f"nodes: key {key!r} is not a node name")
        is_tpl = LAYER in key
        rest = key.replace(LAYER, "")
        if "{" in rest or "}" in rest:
            raise err(f"{where}: the only placeholder is {LAYER}")
        sources, combine, axis, transforms = _parse_entry(key, raw, where, err, is_tpl)
        layers = range(graph.dims.layers) if is_tpl else [None]
        hits = 0
        for i in layers:

            def sub(s: str, i=i) -> str:
                return s if i is None else s.replace(LAYER, str(i))

            name = sub(key)
            if name not in graph.by_name:
                continue
            hits += 1
            spec = NodeSpec(name, tuple(Source(sub(n), t) for n, t in sources), combine, axis, transforms, key)
            target = templated if is_tpl else explicit
            if name in target:
                raise err(f"{where}: node {name!r} is also mapped by key {target[name].key!r}")
            target[name] = spec
        if not hits:
            hint = f" for any layer 0..{graph.dims.layers - 1}" if is_tpl else ""
            names = [n.name for n in graph]
            guess = did_you_mean(key.replace(LAYER, "0"), names)
            guess = guess.replace("encoder.layers.0.", f"encoder.layers.{LAYER}.") if is_tpl else guess
            raise err(f"{where}: {key!r} names no node of the graph{hint}{guess} (see `actdiff nodes MODEL_DIR`)")
    specs = {
        n.name: explicit.get(n.name) or templated[n.name] for n in graph if n.name in explicit or n.name in templated
    }
    return Mapping(graph, specs, str(path), identity_fallback=identity, engine=engine)

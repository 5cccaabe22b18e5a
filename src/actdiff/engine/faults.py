"""Deliberate faults the engine can run with, to validate the diagnosis (``fp32+fault=<name>[:param]``).

A fault is a hypothesis of the root-cause catalogue (``actdiff/data/hypotheses.yaml``) applied on purpose:
the engine runs the nodes the entry matches with the entry's parameter overrides of the spec. Faults and
hypotheses are one vocabulary: ``<name>`` is an entry's name or the short handle its ``fault:`` key gives
(``causal_mask`` for ``attention_causal_mask``); ``:param`` replaces the entry's one numeric parameter
(``ln_eps:1e-3``). Any entry whose overrides the engine's kernels can execute (:data:`RUNNABLE`) is a fault;
the others are refused with the reason. The handles' defaults are chosen so that the changed node's LOCAL
error is far above the fp32 budget (at least 10x; tests/test_engine.py measures it): LayerNorm eps 1e-2, not
1e-6 (on unit-variance inputs 1e-6 changes outputs by ~5e-6 relative, 1e-2 by ~5e-3).

A fault made only of :data:`PADDING_ONLY` overrides (``mask_query_axis``: the padding mask on the query axis)
runs the spec on a prompt alone: it shows only in a padded batch (``Engine.forward_batch``, an engine dump with
``batch_size`` > 1), in the prompts shorter than their batch, at the nodes it declares (the attention nodes).

The diagnosis stage never reads a fault's name: it only sees the numbers (``fault_aliases`` give opaque
labels, resolved once at the stage boundary by :func:`actdiff.variants.resolve_variant`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

from ..errors import ConfigError

# (op, parameter) -> the override values the engine's kernels execute (None: any number)
RUNNABLE: dict[tuple[str, str], frozenset | None] = {
    ("ATTENTION", "mask"): frozenset({"causal", "query_padding"}),
    ("GELU", "form"): frozenset({"tanh"}),
    ("LAYERNORM", "eps"): None,
    ("ROPE", "layout"): frozenset({"gptj", "neox"}),
    ("SPLIT", "order"): frozenset({"head_major"}),
    ("TOPK", "renormalize"): frozenset({True}),
    ("EXPERT_FC2", "w2_orientation"): frozenset({"HF"}),
    ("BIAS_ADD", "bias"): frozenset({"none"}),
}

# (op, parameter, value) overrides that act on padding only: a prompt alone (batch 1, no pad token) runs them
# as the spec, so such a fault shows only in a padded batch (Engine.forward_batch; a dump with batch_size > 1)
PADDING_ONLY: frozenset[tuple[str, str, object]] = frozenset({("ATTENTION", "mask", "query_padding")})


@dataclass(frozen=True)
class Fault:
    """A catalogue entry the engine runs on purpose, with its parameter overrides (``params``)."""

    name: str  # the name the variant uses (handle or entry name)
    entry: object  # actdiff.compare.hypotheses.Hypothesis
    params: dict = field(hash=False)

    def changes(self, node, arch: str | None = None) -> bool:
        """True if the fault runs ``node`` differently: the entry's op and conditions select it."""
        return self.entry.matches(node, arch)

    @property
    def padding_only(self) -> bool:
        """True if the fault changes nothing unless the batch has padding (see PADDING_ONLY)."""
        return all((op, k, v) in PADDING_ONLY for op in self.entry.ops for k, v in self.params.items())

    def overrides(self, node, arch: str | None = None) -> dict:
        """The parameters ``node`` runs with besides the spec's (empty for nodes the fault does not change)."""
        return self.params if self.changes(node, arch) else {}


@cache
def _catalogue() -> dict[str, object]:
    from ..compare.hypotheses import load_catalogue

    out: dict[str, object] = {}
    for h in load_catalogue():
        out[h.name] = h
        if h.fault:
            out[h.fault] = h
    return out


def fault_names() -> list[str]:
    """Handles of the catalogue entries the engine can run (entry names work too)."""
    return sorted({h.fault for h in _catalogue().values() if h.fault and _unrunnable(h) is None})


def _unrunnable(entry) -> str | None:
    for op in entry.ops:
        for k, v in entry.params.items():
            allowed = RUNNABLE.get((op, k), frozenset())
            if allowed is not None and v not in allowed:
                return f"the engine has no kernel for {op} with {k}={v!r}"
    return None


def get_fault(name: str | None, param: str | None, graph) -> Fault | None:
    """The fault ``name`` (with ``param``) for ``graph``'s model; ConfigError saying why it cannot run."""
    if name is None:
        return None
    f = lookup_fault(name, param)
    if not any(f.changes(n, graph.dims.arch) for n in graph):
        arch, ops = graph.dims.arch, ", ".join(f.entry.ops)
        raise ConfigError(f"fault {name!r} does not apply to architecture {arch!r} (it changes {ops})")
    return f


def lookup_fault(name: str, param: str | None = None) -> Fault:
    """The fault ``name`` with ``param``, whatever the model; ConfigError naming the runnable ones."""
    cat = _catalogue()
    if name not in cat:
        raise ConfigError(f"unknown fault {name!r}; available: {', '.join(fault_names())} or a catalogue entry name")
    entry = cat[name]
    why = _unrunnable(entry)
    if why:
        raise ConfigError(f"fault {name!r} ({entry.name}) cannot run: {why}")
    f = Fault(name, entry, dict(entry.params))
    return Fault(name, entry, _with_param(f, param)) if param is not None else f


def _with_param(f: Fault, param: str) -> dict:
    numeric = [k for k, v in f.params.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numeric) != 1:
        raise ConfigError(f"fault {f.name!r} takes no parameter (it has no single numeric setting)")
    try:
        return {**f.params, numeric[0]: float(param)}
    except ValueError:
        raise ConfigError(f"fault {f.name!r}: parameter {param!r} is not a number") from None


def runnable_faults() -> dict[str, Fault]:
    return {n: lookup_fault(n) for n in fault_names()}

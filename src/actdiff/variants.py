"""Variant grammar: ``precision[+fault=name[:param]]``.

A variant says how the engine side runs: the precision policy (``fp32``, ``fp16``, ``bf16``,
``int8``, ``fp16-act``; llama.cpp's ``q8_0``; ONNX Runtime's ``int8-dynamic`` and ``int8-static``) and
optionally one deliberate fault, for example ``fp32+fault=gelu_tanh``
or ``fp32+fault=ln_eps:1e-2``. The reference side always runs at ``fp32`` with no fault.

The same regular expression is used as the Snakemake ``wildcard_constraints`` for ``{variant}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError
from .onnxrt import POLICIES as ONNXRUNTIME_POLICIES  # owned by the onnxrt package (importing it imports no ORT)
from .onnxrt import VARIANTS as ONNXRUNTIME_VARIANTS

# what each engine can run (q8_0 is llama.cpp's GGUF block format; int8-dynamic and int8-static ORT's
# quantisations; faults exist only in our engine)
ENGINE_PRECISIONS = {
    "actdiff": ("fp32", "fp16", "bf16", "int8", "fp16-act"),
    "llamacpp": ("fp32", "fp16", "q8_0"),
    "onnxruntime": ONNXRUNTIME_VARIANTS,
}
PRECISIONS = tuple(dict.fromkeys(p for ps in ENGINE_PRECISIONS.values() for p in ps))  # every engine's, once
REFERENCE_VARIANT = "fp32"


@dataclass(frozen=True)
class Policy:
    """What a precision stores and rounds, in the terms actdiff.compare.budgets budgets by: a precision of
    any engine is judged by the rule of its weight format and activation format, so one format is budgeted
    alike whatever engine runs it."""

    weights: str = "fp32"  # storage format of the weighted ops' weights: fp32, fp16, bf16, int8
    fp32_ops: tuple[str, ...] = ()  # weighted ops (actdiff.nodes op names) whose weights stay fp32
    activations: str = "fp32"  # the format activations are rounded to: fp32, fp16, int8 (quantised)


_SHARED_POLICIES = {
    "fp32": Policy(),
    "fp16": Policy("fp16"),  # weights stored fp16, fp32 accumulation (actdiff.engine.weights)
    "bf16": Policy("bf16"),
    "int8": Policy("int8", ("ROUTER", "EMBED")),  # per-channel symmetric; routers and embeddings stay fp32
    "fp16-act": Policy(activations="fp16"),  # activations rounded to fp16 after every node
    "q8_0": Policy("int8"),  # llama.cpp's blocks of 32 weights with one fp16 scale: int8's rule
}
# an engine's own policies, declared by its package: for a precision only it runs (ORT's int8-dynamic), and for
# one whose name it shares but whose formats differ there (ORT's fp16 rounds its activations to fp16 too)
ENGINE_POLICIES = {"onnxruntime": {p: Policy(**d) for p, d in ONNXRUNTIME_POLICIES.items()}}
# by precision name: the shared policy of a name, else the one engine's that runs it
POLICIES = {
    **{p: pol for own in ENGINE_POLICIES.values() for p, pol in own.items() if p not in _SHARED_POLICIES},
    **_SHARED_POLICIES,
}


def policy(precision: str, side: str | None = None) -> Policy:
    """The precision policy of ``precision`` as engine ``side`` runs it: the engine's own where its package
    declares one for that name (ENGINE_POLICIES), else the name's (a ConfigError for a precision no engine
    declares). ``side`` None: the name's policy, which for a shared name is our engine's and llama.cpp's."""
    own = ENGINE_POLICIES.get(side, {})
    if precision in own:
        return own[precision]
    if precision not in POLICIES:
        raise ConfigError(f"precision {precision!r} has no precision policy: one of {', '.join(POLICIES)}")
    return POLICIES[precision]


_PRECISION_RE = "|".join(re.escape(p) for p in sorted(PRECISIONS, key=len, reverse=True))
# fault names are identifiers; a parameter is a number or identifier-like token.
FAULT_NAME_RE = r"[a-z][a-z0-9_\-]*"  # a fault handle or a catalogue entry name (layernorm_eps_1e-6)
FAULT_PARAM_RE = r"[A-Za-z0-9_.eE+\-]+"
VARIANT_RE = rf"(?:{_PRECISION_RE})(?:\+fault={FAULT_NAME_RE}(?::{FAULT_PARAM_RE})?)?"
_VARIANT_FULL = re.compile(
    rf"^(?P<precision>{_PRECISION_RE})(?:\+fault=(?P<fault>{FAULT_NAME_RE})(?::(?P<param>{FAULT_PARAM_RE}))?)?$"
)


@dataclass(frozen=True)
class Variant:
    precision: str
    fault: str | None = None
    fault_param: str | None = None
    label: str | None = None  # the configured text when the fault came through an alias

    def __str__(self) -> str:
        if self.label is not None:
            return self.label
        s = self.precision
        if self.fault:
            s += f"+fault={self.fault}"
            if self.fault_param is not None:
                s += f":{self.fault_param}"
        return s


def parse_variant(text: str) -> Variant:
    """Parse a variant string; raise ConfigError naming the string and the grammar if it is invalid."""
    m = _VARIANT_FULL.match(text)
    if not m:
        raise ConfigError(
            f"variant {text!r} is not valid: expected precision[+fault=name[:param]] with precision one of "
            f"{', '.join(PRECISIONS)} (for example 'fp32', 'int8', 'fp32+fault=gelu_tanh')"
        )
    return Variant(m["precision"], m["fault"], m["param"])


def resolve_variant(text: str | Variant, aliases: dict[str, str] | None = None) -> Variant:
    """The variant a stage runs, resolved once at the stage boundary: an opaque fault label of the config's
    ``fault_aliases`` (``{label: "fault" or "fault:param"}``) becomes the fault it stands for. ``str()`` of the
    result is still the configured text, so paths, attributes and tables only ever show the label."""
    v = text if isinstance(text, Variant) else parse_variant(text)
    aliases = aliases or {}
    if v.fault is None or v.fault not in aliases:
        return v
    name, _, param = aliases[v.fault].partition(":")
    return Variant(v.precision, name, v.fault_param if v.fault_param is not None else (param or None), label=str(v))

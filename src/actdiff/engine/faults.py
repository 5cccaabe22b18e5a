"""Deliberate faults the engine can run with, to validate the diagnosis (``fp32+fault=<name>[:param]``).

Each fault is a real bug class seen in ports of this model family. It declares the node(s) it changes
(by op type and part) and a default parameter chosen so that the changed node's LOCAL error is far
above the fp32 budget (at least 10x; tests/test_engine.py measures it):

- ``ln_eps``: every LayerNorm uses eps=1e-2 instead of 1e-5 (1e-6 would be invisible: on unit-variance
  inputs it changes outputs by ~5e-6 relative); with 1e-2 the change is ~5e-3 relative.
- the others are structural (mask, formula, layout) and change their nodes by O(1e-3) to O(1).

The diagnosis stage never reads these names: it only sees the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Fault:
    name: str
    description: str
    ops: tuple[str, ...]  # op types of the nodes it changes
    parts: tuple[str, ...] = ()  # further restricts the nodes by their ``part`` attribute (() = any)
    default_param: str | None = None
    arch: tuple[str, ...] = ("nomic_bert_moe", "bert")

    def changes(self, node) -> bool:
        if node.op not in self.ops:
            return False
        return not self.parts or node.attrs.get("part") in self.parts


FAULTS: dict[str, Fault] = {
    f.name: f
    for f in (
        Fault("causal_mask", "attention applies a causal mask although the model is bidirectional", ("ATTENTION",)),
        Fault("gelu_tanh", "tanh-approximated GELU instead of exact erf", ("GELU",)),
        Fault("expert_bias_dropped", "the shared expert bias is never added", ("BIAS_ADD",), arch=("nomic_bert_moe",)),
        Fault(
            "topk_renorm",
            "top-k expert weights renormalised to sum to 1",
            ("TOPK",),
            ("weights",),  # the top-k weights, not the expert ids
            arch=("nomic_bert_moe",),
        ),
        Fault(
            "w2_transposed",
            "expert w2 read as (E, H, F) and transposed instead of (E, F, H)",
            ("EXPERT_FC2",),
            arch=("nomic_bert_moe",),
        ),
        Fault(
            "ln_eps",
            "LayerNorm eps changed (default 1e-2 instead of the config's)",
            ("LAYERNORM",),
            default_param="1e-2",
        ),
        Fault(
            "rotary_interleaved",
            "rotary applied to interleaved (GPT-J) pairs instead of halves",
            ("ROPE",),
            arch=("nomic_bert_moe",),
        ),
        Fault(
            "qkv_head_major",
            "fused QKV split head-major ((nh, 3, hd)) instead of q|k|v-major",
            ("SPLIT",),
            arch=("nomic_bert_moe",),
        ),
    )
}


# Opaque labels for faults (``fp32+fault=f7``), so tests can show that the diagnosis never reads a fault's
# name: the engine resolves the label, every other stage only ever sees the label.
FAULT_ALIASES: dict[str, str] = {}


def register_aliases(aliases: dict[str, str]) -> None:
    """Register opaque labels: {label: "fault_name" or "fault_name:param"}."""
    for label, target in aliases.items():
        if target.split(":", 1)[0] not in FAULTS:
            raise ConfigError(f"fault alias {label!r} -> {target!r}: unknown fault; available: {', '.join(FAULTS)}")
        FAULT_ALIASES[label] = target


def get_fault(name: str | None, param: str | None, arch: str) -> tuple[Fault | None, float | None]:
    if name is None:
        return None, None
    if name in FAULT_ALIASES:
        target = FAULT_ALIASES[name]
        name, _, alias_param = target.partition(":")
        param = param if param is not None else (alias_param or None)
    if name not in FAULTS:
        raise ConfigError(f"unknown fault {name!r}; available: {', '.join(sorted(FAULTS))}")
    f = FAULTS[name]
    if arch not in f.arch:
        raise ConfigError(f"fault {name!r} does not apply to architecture {arch!r} (it changes {', '.join(f.ops)})")
    p = param if param is not None else f.default_param
    if p is not None:
        try:
            return f, float(p)
        except ValueError:
            raise ConfigError(f"fault {name!r}: parameter {p!r} is not a number") from None
    return f, None

"""Faults are catalogue hypotheses run on purpose (actdiff.engine.faults): one vocabulary, resolved once."""

from __future__ import annotations

import numpy as np
import pytest

from actdiff.engine.core import Engine
from actdiff.engine.faults import RUNNABLE, lookup_fault, runnable_faults
from actdiff.errors import ConfigError
from actdiff.variants import parse_variant, resolve_variant

IDS = [0, 45, 120, 987, 33, 2001, 64, 5, 2]


def test_every_handle_names_a_runnable_catalogue_entry():
    faults = runnable_faults()
    assert set(faults) == {
        "causal_mask", "gelu_tanh", "expert_bias_dropped", "topk_renorm", "w2_transposed", "ln_eps",
        "rotary_interleaved", "qkv_head_major", "mask_query_axis",
    }  # fmt: skip
    for f in faults.values():
        assert f.entry.fault == f.name and all((op, k) in RUNNABLE for op in f.entry.ops for k in f.entry.params)
    assert {n for n, f in faults.items() if f.padding_only} == {"mask_query_axis"}


def test_a_catalogue_entry_runs_by_its_own_name(tiny_model_dir):
    """No code names layernorm_eps_1e-6: the engine runs it because its override (eps) is one it executes."""
    e = Engine(tiny_model_dir)
    clean, bad = e.forward(IDS, "fp32"), e.forward(IDS, "fp32+fault=layernorm_eps_1e-6")
    assert e.understood_config("fp32+fault=layernorm_eps_1e-6")["layer_norm_eps"] == 1e-6
    first = next(n for n in e.graph if not np.array_equal(clean[n.name], bad[n.name]))
    assert first.op == "LAYERNORM" and first.index == min(n.index for n in e.graph if n.op == "LAYERNORM")


def test_param_replaces_the_one_numeric_setting():
    assert lookup_fault("ln_eps", "1e-3").params == {"eps": 1e-3}
    with pytest.raises(ConfigError, match="takes no parameter"):
        lookup_fault("causal_mask", "2")
    with pytest.raises(ConfigError, match="not a number"):
        lookup_fault("ln_eps", "abc")


def test_entries_the_kernels_cannot_execute_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="no kernel for ATTENTION with scale='none'"):
        lookup_fault("attention_no_scale")
    with pytest.raises(ConfigError, match="unknown fault 'nope'"):
        lookup_fault("nope")


def test_fault_that_changes_no_node_of_the_model_is_refused(minilm_model_dir):
    with pytest.raises(ConfigError, match="does not apply to architecture 'bert'"):
        Engine(minilm_model_dir).prepare("fp32+fault=rotary_interleaved")


def test_alias_is_resolved_once_and_the_label_kept():
    v = resolve_variant("fp32+fault=f3", {"f3": "ln_eps:1e-3"})
    assert (v.precision, v.fault, v.fault_param, str(v)) == ("fp32", "ln_eps", "1e-3", "fp32+fault=f3")
    assert resolve_variant(v) is v and str(resolve_variant("int8")) == "int8"
    assert parse_variant("fp32+fault=layernorm_eps_1e-6").fault == "layernorm_eps_1e-6"

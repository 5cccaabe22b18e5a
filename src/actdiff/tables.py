"""Every Parquet table actdiff writes, named once, with its level and (where it is fixed) its schema.

Statistics (``compare.stats``) write the shard tables, aggregation (``compare.aggregate``) the summary
tables; the Snakefile, the report and ``actdiff check`` find them through :mod:`actdiff.layout` by these
names. A table whose columns depend only on the code gets an explicit schema here, so an empty table (no
failing node, no MoE layer) still has its columns; the others are written from their rows.
Column meanings: docs/formats.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class Table:
    name: str
    # "shard" (one file per run and shard, compute_stats) | "summary" (one per run, aggregate_stats) |
    # "reference" (one per model and shard, shared by every run: reference_noise)
    level: str
    doc: str
    schema: pa.Schema | None = None  # written as is when the table has no rows

    @property
    def file(self) -> str:
        return f"{self.name}.parquet"


_TOKENS = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("node", pa.string()),
        ("token", pa.int64()),
        ("local_max_abs", pa.float64()),
        ("local_rel_l2", pa.float64()),
        ("max_abs", pa.float64()),
        ("rel_l2", pa.float64()),
    ]
)
_HYPOTHESES = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("node", pa.string()),
        ("first_divergence", pa.bool_()),
        ("rank", pa.int64()),
        ("candidate", pa.string()),  # a catalogue entry tried (ranked): a cause only where verdict says explained
        ("error", pa.float64()),
        ("says", pa.string()),
        ("baseline_error", pa.float64()),
        ("verdict", pa.string()),
        ("explained_by", pa.string()),
    ]
)
_SEARCH = pa.schema(
    [
        ("node", pa.string()),
        ("node_index", pa.int64()),
        ("op", pa.string()),
        ("rank", pa.int64()),  # 0: nothing found (the row records what was tried)
        ("kind", pa.string()),  # actdiff.compare.findings.KINDS
        ("name", pa.string()),
        ("says", pa.string()),
        ("error", pa.float64()),
        ("params", pa.string()),  # JSON
        ("explains", pa.bool_()),
        ("baseline_error", pa.float64()),
        ("budget", pa.float64()),
        ("prompts", pa.int64()),
        ("rows", pa.int64()),
        ("tried", pa.int64()),
        ("seconds", pa.float64()),
        ("timed_out", pa.bool_()),
    ]
)
_SEARCH_SAMPLE = pa.schema(
    [
        ("node", pa.string()),  # a node the catalogue left unexplained (actdiff.compare.search_run.SearchSample)
        ("node_index", pa.int64()),
        ("prompt_id", pa.string()),  # one of the node's longest unexplained prompts in the shard
        ("budget", pa.float64()),  # the node's budget on that prompt
        ("array", pa.string()),  # "target" (the judged output) or the input node it holds
        ("dtype", pa.string()),  # numpy dtype.str
        ("shape", pa.list_(pa.int64())),
        ("data", pa.large_binary()),  # the values, C order
    ]
)
_ROUTING = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("layer", pa.int64()),
        ("token", pa.int64()),
        ("ref_experts", pa.list_(pa.int64())),
        ("eng_experts", pa.list_(pa.int64())),
        ("agree", pa.bool_()),
        ("jaccard", pa.float64()),
        ("ref_margin", pa.float64()),
        ("near_tie", pa.bool_()),
        ("flip_explained", pa.bool_()),
    ]
)
_EMBEDDINGS = pa.schema([("prompt_id", pa.string()), ("ref", pa.list_(pa.float32())), ("eng", pa.list_(pa.float32()))])
_DRILLDOWN = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("node", pa.string()),
        ("node_index", pa.int64()),
        ("score", pa.float64()),
        ("ref_first", pa.list_(pa.float64())),
        ("eng_first", pa.list_(pa.float64())),
        ("rel_l2", pa.float64()),
    ]
)
_WORST_PROMPTS = pa.schema(
    [
        ("rank", pa.int64()),
        ("prompt_id", pa.string()),
        ("text", pa.string()),
        ("tokens", pa.int64()),
        ("failing_nodes", pa.int64()),
        ("first_divergence", pa.string()),
        ("worst_node", pa.string()),
        ("local_over_budget", pa.float64()),
        ("rel_l2_max", pa.float64()),
        ("embedding_cosine", pa.float64()),
    ]
)
_PROMPT_TABLE = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("text", pa.string()),  # the first compare.prompt_table.TEXT_CHARS characters
        ("tokens", pa.int64()),
        ("first_divergence", pa.string()),
        ("failing_nodes", pa.int64()),
        ("embedding_cosine", pa.float64()),
        ("key_rel_l2", pa.list_(pa.float64())),  # propagated rel L2 at each of Graph.key_nodes(), in that order
        ("routing_layers", pa.list_(pa.int64())),  # the MoE layers, and per layer:
        ("routing_agreement", pa.list_(pa.float64())),  # the fraction of tokens routed as the reference routes
        ("routing_flips", pa.list_(pa.int64())),  # the tokens whose expert set differs
    ]
)
_HEATMAP = pa.schema(
    [("prompt_id", pa.string()), ("rank", pa.int64()), ("node_index", pa.int64()), ("rel_l2", pa.float64())]
)

_REFERENCE_NOISE = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("node", pa.string()),
        ("measured", pa.float64()),  # budgets.Noise.measured: the reference against float64 (NaN: not measurable)
        ("envelope", pa.float64()),  # budgets.Noise.envelope: the sequential-summation model (0 outside its ops)
        # the propagated budget of an engine at the reference's precision, from a simulation that follows no
        # engine's routing (NaN at index nodes), and that simulation's expert ids at top-k indices nodes (tokens x
        # k, row-major; null elsewhere): actdiff.compare.refnoise, shared by the runs where it is their own
        ("propagated", pa.float64()),
        ("routed", pa.list_(pa.int16())),
    ]
)
EMBEDDING_SAMPLE = "embeddings"  # the shard table of sampled final embeddings, and the JSON summary made from it

SHARD_TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        Table("nodes", "shard", "one row per (prompt, node): errors, budget, status, first divergence"),
        Table("tokens", "shard", "per-token local and propagated error of each failing node", _TOKENS),
        Table("routing", "shard", "one row per (prompt, MoE layer, token): expert sets and margins", _ROUTING),
        Table("drilldown", "shard", "the shard's worst prompts: first values of the key nodes", _DRILLDOWN),
        Table("hypotheses", "shard", "root-cause ranking at failing nodes", _HYPOTHESES),
        Table("search_sample", "shard", "values of the nodes the catalogue left unexplained, for the search",
              _SEARCH_SAMPLE),
        Table("prompts", "shard", "per-prompt values: MoE layer errors, embedding cosines"),
        Table(EMBEDDING_SAMPLE, "shard", "bounded sample of final embeddings (neighbour analysis)", _EMBEDDINGS),
    )
}

SUMMARY_TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        Table("nodes", "summary", "per node: quantiles of every metric, fail/warn counts, worst prompts"),
        Table("first_divergence", "summary", "first divergent node -> number of prompts"),
        Table("hypotheses", "summary", "top hypotheses per failing node with prompt counts"),
        Table("search", "summary", "per searched node: the best explanation found, what was tried, time", _SEARCH),
        Table("routing", "summary", "per MoE layer: agreement, flips, expert load, margin histograms"),
        Table("worst_prompts", "summary", "the corpus's worst prompts, ranked once (compare.worst)", _WORST_PROMPTS),
        Table("heatmap", "summary", "propagated error per node of the worst prompts", _HEATMAP),
        Table("token_errors", "summary", "per-token errors of the failing nodes on their worst prompts", _TOKENS),
        Table("drilldown", "summary", "first values of the key nodes for the worst prompts", _DRILLDOWN),
        Table(
            "prompt_table",
            "summary",
            "every prompt: text, first divergence, cosine, key-node errors, routing",
            _PROMPT_TABLE,
        ),  # fmt: skip
        Table("weights", "summary", "weight parity of our engine (compare.parity)"),
    )
}

# per model and shard, read by every run's statistics (actdiff.compare.refnoise)
REFERENCE_NOISE = Table("reference_noise", "reference", "the reference's fp32 noise and the fp32 propagated budget per "
                        "(prompt, node), in graph order",
                        _REFERENCE_NOISE)  # fmt: skip

# the summary tables aggregation writes (weights come from the parity rule)
AGGREGATE_TABLES = tuple(t for t in SUMMARY_TABLES if t != "weights")
# the JSON summaries of a run
AGGREGATE_JSON = (EMBEDDING_SAMPLE, "verdict", "tokenization")  # written by aggregation
SUMMARY_JSON = (*AGGREGATE_JSON, "config_parity")


def empty_table(table: Table) -> pa.Table:
    """The table with no rows: its fixed schema, or no columns when it has none. Built from no record batches:
    pyarrow's Schema.empty_table imports pandas (0.2 s), which a statistics job otherwise never loads."""
    return pa.Table.from_batches([], schema=table.schema or pa.schema([]))

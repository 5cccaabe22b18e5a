"""Adapter for rule aggregate_stats: corpus aggregates and the verdict."""

from actdiff.pipeline import STATS_TABLES, aggregate_stats
from actdiff.workflow_support import run

tables = [str(p) for p in snakemake.input.tables]  # noqa: F821
run(
    snakemake,  # noqa: F821
    aggregate_stats,
    model_json=snakemake.input.model,  # noqa: F821
    side=snakemake.wildcards.side,  # noqa: F821
    variant=snakemake.wildcards.variant,  # noqa: F821
    shard_tables={t: [p for p in tables if p.endswith(f"/{t}.parquet")] for t in STATS_TABLES},
    outputs=dict(snakemake.output.items()),  # noqa: F821
    embedding_sample=snakemake.params.embedding_sample,  # noqa: F821
)

"""Adapter for rule aggregate_stats: corpus aggregates, the worst prompts and the verdict."""

from actdiff.warm import hand_over

hand_over()  # in a fork of the run's warm process, where there is one (actdiff.warm)

from actdiff.layout import Layout
from actdiff.pipeline import aggregate_stats
from actdiff.tables import SHARD_TABLES
from actdiff.workflow_support import run

tables = sorted((str(p) for p in snakemake.input.tables), key=Layout().shard_of)  # noqa: F821
run(
    snakemake,  # noqa: F821
    aggregate_stats,
    model_json=snakemake.input.model,  # noqa: F821
    tokens=list(snakemake.input.tokens),  # noqa: F821
    side=snakemake.wildcards.side,  # noqa: F821
    variant=snakemake.wildcards.variant,  # noqa: F821
    shard_tables={t: [p for p in tables if p.endswith(f"/{t}.parquet")] for t in SHARD_TABLES},
    outputs=dict(snakemake.output.items()),  # noqa: F821
    embedding_sample=snakemake.params.embedding_sample,  # noqa: F821
    worst_n=int(snakemake.params.worst_n),  # noqa: F821
    search=dict(snakemake.params.search),  # noqa: F821
)

"""Adapter for rule compute_stats: statistics of one shard."""

from actdiff.warm import hand_over

hand_over()  # in a fork of the run's warm process, where there is one (actdiff.warm)

from actdiff.pipeline import compute_stats
from actdiff.workflow_support import run

run(
    snakemake,  # noqa: F821
    compute_stats,
    model_json=snakemake.input.model,  # noqa: F821
    ref_h5=snakemake.input.ref,  # noqa: F821
    eng_h5=snakemake.input.eng,  # noqa: F821
    noise=snakemake.input.noise,  # noqa: F821
    side=snakemake.wildcards.side,  # noqa: F821
    variant=snakemake.wildcards.variant,  # noqa: F821
    shard=int(snakemake.wildcards.shard),  # noqa: F821
    outputs=dict(snakemake.output.items()),  # noqa: F821
    budgets=dict(snakemake.params.budgets),  # noqa: F821
    worst_m=snakemake.params.worst_m,  # noqa: F821
    embedding_sample=snakemake.params.embedding_sample,  # noqa: F821
    fault_aliases=dict(snakemake.params.fault_aliases),  # noqa: F821
    diagnose_all_failing=snakemake.params.diagnose_all_failing,  # noqa: F821
    search=dict(snakemake.params.search),  # noqa: F821
)

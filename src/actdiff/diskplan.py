"""Disk budget of a run: how many bytes of activation dumps can exist at once, and the shard count that keeps
them under ``disk_budget`` (config/README.md; dump sizes: docs/formats.md).

Shards are planned when the workflow starts, before any prompt is tokenized, so a prompt's dump is bounded by
the model's truncation limit: every prompt counts as ``max_length`` tokens (the config's, else the model's
own). That is an upper bound, never an estimate that a long corpus could exceed; on the bundled corpus it is
8.5x the same bound with the real token counts (94.1 GB against 11.1 GB for the default config at --cores 8).
The bytes per token follow from the node graph (``actdiff.nodes``) and the dump layout
(``actdiff.h5io.dump_bytes_bound``: whole HDF5 chunks, uncompressed: compression only makes a dump smaller).

Dumps in flight (``keep_activations: false``): a shard is *open* from the start of its reference dump to the
end of its last statistics job. Every other dump of a shard waits for the shard's reference dump (rules
``dump_*`` take it as an input) and the statistics jobs, which delete dumps, have the highest priority, so a
new shard opens only when no job of an open shard is ready; each open shard then holds a running job, and the
new reference dump needs ``reference.threads`` free cores: at most ``jobs - reference.threads + 1`` shards are
open at once (``jobs``: --cores, or --jobs on a cluster), and never more than (models x shards). An engine's
dump exists from its job's start to its statistics job's end, and a finished dump's statistics job starts at
once (it has the highest priority and needs no more than the job that ended), so at most ``jobs`` engine dumps
exist, and at most ``sides`` per open shard. With ``keep_activations: true`` every dump of the corpus counts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError
from .h5io import dump_bytes_bound, prompt_values_bytes
from .nodes import Graph

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
LINEAR_SEARCH = 64  # shard counts tried one by one from the first conceivable one, then in steps of 10 %
MANY_SHARDS = 10_000  # beyond this Snakemake's DAG (tens of jobs per shard) gets slow: the plan says so


def parse_size(value, key: str = "disk_budget") -> int:
    """Bytes from an integer or a string such as ``"20 GB"`` or ``"500 MiB"`` (kB/MB/GB/TB are powers of 1000,
    KiB/MiB/GiB/TiB of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = _SIZE_RE.match(str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(
                f"config key '{key}': {value!r} is not a size; write bytes (an integer) or a number with a unit "
                'such as "20 GB" or "500 MiB" (units: B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)'
            )
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ConfigError(f"config key '{key}': {value!r} must be more than 0 bytes")
    return n


def fmt_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class ModelDumps:
    """What one model's dumps hold: its graph, the tokens a prompt may have, and how many sides it is dumped
    on besides the reference (one per configured (engine, variant))."""

    name: str
    graph: Graph
    max_tokens: int
    sides: int

    def prompt_data_bytes(self) -> int:
        """The node values of one prompt at max_length, without any file overhead (a lower bound per prompt)."""
        return prompt_values_bytes(self.graph, self.max_tokens)

    def shard_bytes(self, prompts: int, id_bytes: int) -> int:
        """Bound on one side's dump of a shard of ``prompts`` prompts."""
        return dump_bytes_bound(self.graph, prompts, prompts * self.max_tokens, id_bytes)


@dataclass(frozen=True)
class Corpus:
    """The prompt sheet as the planner needs it: each prompt's shard hash and the longest id in bytes."""

    hashes: np.ndarray  # uint64, actdiff.prompts.prompt_hash of every prompt_id
    id_bytes: int

    def shard_sizes(self, n_shards: int) -> np.ndarray:
        return np.bincount((self.hashes % np.uint64(n_shards)).astype(np.int64), minlength=n_shards)


@dataclass(frozen=True)
class Concurrency:
    """How many jobs run at once, the reference dump's threads and whether every other dump job needs no more
    threads than the reference's (the condition under which open shards are bounded by the running jobs)."""

    jobs: int
    reference_threads: int
    others_fit: bool = True

    def open_shards(self, pairs: int) -> int:
        free = self.jobs - min(self.reference_threads, self.jobs) + 1 if self.others_fit else self.jobs
        return max(1, min(pairs, free))


@dataclass(frozen=True)
class DiskEstimate:
    n_shards: int
    largest_shard: int  # prompts
    dump_bytes: int  # bound on the largest single dump (largest shard, largest model)
    open_shards: int
    dumps_in_flight: int
    kept_bytes: int  # every dump of the corpus, counted when keep_activations is true (else 0)
    total: int

    def explain(self, models: list[ModelDumps]) -> str:
        toks = ", ".join(f"{m.name}: {m.max_tokens} tokens x {m.sides + 1} sides" for m in models)
        if self.kept_bytes:
            return (f"keep_activations: true keeps every dump of the corpus ({toks} per prompt, {self.n_shards} "
                    f"shard(s)): up to {fmt_bytes(self.total)}")  # fmt: skip
        return (
            f"{self.n_shards} shard(s), the largest {self.largest_shard} prompts; up to {self.open_shards} shard(s) "
            f"open and {self.dumps_in_flight} dumps at once, each up to {fmt_bytes(self.dump_bytes)} (every prompt "
            f"at its max_length: {toks}): up to {fmt_bytes(self.total)} on disk at once"
        )


def estimate(models: list[ModelDumps], corpus: Corpus, n_shards: int, conc: Concurrency, keep: bool) -> DiskEstimate:
    """Bound on the bytes of dumps on disk at once with ``n_shards`` shards (module docstring)."""
    sizes = corpus.shard_sizes(n_shards)
    largest = int(sizes.max())
    dump = max(m.shard_bytes(largest, corpus.id_bytes) for m in models)
    open_shards = conc.open_shards(len(models) * n_shards)
    sides = max(m.sides for m in models)
    in_flight = open_shards + min(open_shards * sides, conc.jobs)
    kept = 0
    if keep:  # every shard's dumps on every side; shards of equal size are bounded once
        sizes_counts = list(zip(*np.unique(sizes, return_counts=True), strict=True))
        kept = sum(
            (m.sides + 1) * int(c) * m.shard_bytes(int(p), corpus.id_bytes) for m in models for p, c in sizes_counts
        )
    total = max(kept, in_flight * dump)
    return DiskEstimate(n_shards, largest, dump, open_shards, in_flight, kept, total)


def _candidates(n_prompts: int, start: int = 1):
    """Shard counts to try, ascending from ``start``, ending at one prompt per shard (at least one shard)."""
    last = max(1, n_prompts)
    n = first = max(1, min(start, last))
    while n < last:
        yield n
        n = n + 1 if n < first + LINEAR_SEARCH else max(n + 1, math.ceil(n * 1.1))
    yield last


def _fewest_conceivable(models: list[ModelDumps], corpus: Corpus, budget: int) -> int:
    """A shard count below which nothing can fit: even one dump of a shard holding an even share of the corpus
    would exceed the budget (where the search starts; at least one dump is on disk while a shard runs)."""
    per_prompt = max(m.prompt_data_bytes() for m in models)
    return max(1, len(corpus.hashes) * per_prompt // budget)


def plan_shards(models: list[ModelDumps], corpus: Corpus, budget: int, conc: Concurrency, keep: bool) -> DiskEstimate:
    """The fewest shards whose dumps fit in ``budget`` (one by one up to LINEAR_SEARCH, then in 10 % steps);
    a ConfigError when even one prompt per shard does not fit, or when keep_activations keeps too much."""
    best = None
    for n in _candidates(len(corpus.hashes), _fewest_conceivable(models, corpus, budget)):
        est = estimate(models, corpus, n, conc, keep)
        if est.total <= budget:
            return est
        if keep:  # more shards only add chunk overhead to what is kept: the whole corpus cannot fit
            break
        best = est
    est = best or estimate(models, corpus, 1, conc, keep)
    raise ConfigError(
        f"disk_budget {fmt_bytes(budget)} cannot hold this run's dumps: {est.explain(models)}. "
        + _what_to_change(keep, explicit=None)
    )


def _what_to_change(keep: bool, explicit: str | None) -> str:
    if keep:
        return ("Set keep_activations: false (dumps are then deleted shard by shard), raise disk_budget, or use a "
                "smaller corpus")  # fmt: skip
    first = f"Remove {explicit} (the shards are then planned from disk_budget) or change it; " if explicit else ""
    return first + ("raise disk_budget, lower models.<m>.max_length, run fewer variants, or run with fewer --cores "
                    "(fewer shards open at once)")  # fmt: skip


def check_explicit(models, corpus, n_shards: int, budget: int, conc: Concurrency, keep: bool, key: str) -> DiskEstimate:
    """The estimate for shards set by the config (``key``: ``'shards' = N`` or ``'shard_size' = P``); a
    ConfigError naming the key, the estimate, the budget and what to change when it does not fit."""
    est = estimate(models, corpus, n_shards, conc, keep)
    if est.total <= budget:
        return est
    hint = ""
    if not keep:
        try:
            fit = plan_shards(models, corpus, budget, conc, keep)
            hint = f" ({fit.n_shards} shards of at most {fit.largest_shard} prompts would fit)"
        except ConfigError:
            hint = " (no shard size fits: even one prompt per shard is too much)"
    raise ConfigError(
        f"config {key}: this run may hold more on disk than disk_budget {fmt_bytes(budget)}: "
        f"{est.explain(models)}{hint}. " + _what_to_change(keep, explicit=key.split(" ")[0])
    )


# ------------------------------------------------------------------------------------- from the config
def corpus_of(sheet) -> Corpus:
    from .prompts import prompt_hash, read_prompt_ids

    ids = read_prompt_ids(sheet)
    hashes = np.fromiter((prompt_hash(p) for p in ids), dtype=np.uint64, count=len(ids))
    return Corpus(hashes, max((len(p.encode("utf-8")) for p in ids), default=1))


def max_tokens_of(name: str, model_cfg: dict, graph: Graph) -> int:
    """Tokens a prompt of this model may have: the config's max_length, else the model's own limit as the
    tokens stage finds it, else (model not there yet) its config.json's position count."""
    if model_cfg.get("max_length"):
        return int(model_cfg["max_length"])
    from .errors import ModelError
    from .models.loading import resolve_model_dir
    from .token_shards import model_max_length

    try:
        return model_max_length(resolve_model_dir(name, model_cfg["source"]))[0]
    except (ModelError, OSError):
        return graph.dims.max_positions


def configured_shards(config: dict, n_prompts: int) -> tuple[int, str] | None:
    """(shard count, the key that sets it) when the config sets ``shard_size`` or ``shards``; None otherwise."""
    if "shard_size" in config:
        return max(1, -(-n_prompts // int(config["shard_size"]))), f"'shard_size' = {config['shard_size']}"
    if "shards" in config:
        return int(config["shards"]), f"'shards' = {config['shards']}"
    return None


def shard_count(config: dict, models: list[ModelDumps], conc: Concurrency, plan_path) -> tuple[int, str]:
    """The run's shard count and a line saying why: ``shard_size`` or ``shards`` when the config sets one
    (checked against disk_budget), else the plan recorded at ``plan_path`` while it still fits (so a rerun
    with other --cores keeps its shards), else the fewest shards that fit, recorded there."""
    budget = parse_size(config["disk_budget"])
    keep = bool(config["keep_activations"])
    corpus = corpus_of(config["prompts"])
    explicit = configured_shards(config, len(corpus.hashes))
    if not models:  # no model's graph is known yet: rule resolve_model says why
        return (explicit or (1, ""))[0], "no model graph known yet: the shard count is not checked against disk_budget"
    if explicit is not None:
        est = check_explicit(models, corpus, explicit[0], budget, conc, keep, explicit[1])
        return explicit[0], f"{explicit[1]}: {est.explain(models)} (disk_budget {fmt_bytes(budget)})"
    recorded = recorded_plan(plan_path)
    if recorded:
        est = estimate(models, corpus, recorded, conc, keep)
        if est.total <= budget:
            return recorded, f"shards planned earlier ({plan_path}): {est.explain(models)}"
    est = plan_shards(models, corpus, budget, conc, keep)
    _record_plan(plan_path, est, budget)
    why = f"shards planned from disk_budget {fmt_bytes(budget)}: {est.explain(models)}"
    if est.n_shards > MANY_SHARDS:
        why += (f". NOTE: {est.n_shards} shards make a large workflow (Snakemake slows down past ~{MANY_SHARDS}); "
                "a larger disk_budget, fewer --cores or a lower max_length give fewer")  # fmt: skip
    return est.n_shards, why


def recorded_plan(path) -> int | None:
    import json
    from pathlib import Path

    try:
        return int(json.loads(Path(path).read_text(encoding="utf-8"))["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _record_plan(path, est: DiskEstimate, budget: int) -> None:
    from pathlib import Path

    from .atomic import write_json_atomic

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    record = {"shards": est.n_shards, "largest_shard": est.largest_shard, "disk_budget": budget,
              "bound_bytes": est.total}  # fmt: skip
    write_json_atomic(path, record)


def free_space_note(results, budget: int) -> str | None:
    """A note when disk_budget is more than the free space where the results go (the budget is then no guard)."""
    import shutil
    from pathlib import Path

    where = Path(results).resolve()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free >= budget:
        return None
    return (
        f"NOTE: disk_budget {fmt_bytes(budget)} is more than the {fmt_bytes(free)} free on {where}; the bound counts "
        "every prompt at its max_length, so the real use is usually far lower, but set disk_budget to what this "
        "disk can hold to be sure"
    )

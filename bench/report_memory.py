"""Peak memory of aggregation and of the report against corpus size (issue: the report reads summaries only).

Takes one finished run (its shard tables and tokens), replicates its prompts to ``--prompts`` prompts (prompt
``p`` becomes ``p~0``, ``p~1``, ...; ``--shards`` shards of equal size), then runs ``aggregate_stats`` and
``render_report`` on the original and on the replica, each in its own process, and records each one's peak
resident memory (VmHWM of the process; for the report, also its pandoc, and quarto's kernel where quarto renders, from
RUSAGE_CHILDREN). Prints a table and writes JSON.

    python bench/report_memory.py --results results/ci --model tiny-nomic-moe --side actdiff \\
        --variant 'fp32+fault=causal_mask' --prompts 20000 --shards 40 --out results/bench/report_memory.json
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from actdiff.layout import Layout
from actdiff.tables import SHARD_TABLES

CHILD = """
import json, resource, sys, time
from actdiff import pipeline
from actdiff.report import render_report
kind, args = sys.argv[1], json.loads(sys.argv[2])
t0 = time.perf_counter()
(pipeline.aggregate_stats if kind == "aggregate" else render_report)(**args)
own = [int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:")][0] / 1024
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"seconds": time.perf_counter() - t0, "own_mb": own, "children_mb": kids}))
"""


def replicate(src: Layout, dst: Layout, run: tuple[str, str, str], prompts: int, shards: int) -> int:
    """Copy ``run``'s shard tables and tokens into ``dst``, replicated to about ``prompts`` prompts."""
    model = run[0]
    n_src = len(list(Path(src.tokens(model, 0)).parent.glob("shard-*.parquet")))
    tables = {t: pd.concat([pd.read_parquet(src.stats(*run, s, t)) for s in range(n_src)]) for t in SHARD_TABLES}
    tokens = pd.concat([pd.read_parquet(src.tokens(model, s)) for s in range(n_src)])
    copies = max(1, math.ceil(prompts / tokens["prompt_id"].nunique()))
    per_shard = math.ceil(copies / shards)
    Path(dst.model_json(model)).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src.model_json(model), dst.model_json(model))
    shard = 0
    for first in range(0, copies, per_shard):
        ks = range(first, min(first + per_shard, copies))
        _write(_renamed(tokens, ks), dst.tokens(model, shard))
        for t, df in tables.items():
            _write(_renamed(df, ks), dst.stats(*run, shard, t))
        shard += 1
    return shard


def _renamed(df: pd.DataFrame, ks) -> pd.DataFrame:
    if "prompt_id" not in df.columns:  # a per-shard table not keyed by prompt (e.g. the search's findings)
        return df
    return pd.concat([df.assign(prompt_id=df["prompt_id"] + f"~{k}") for k in ks], ignore_index=True)


def _write(df: pd.DataFrame, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(path, index=False)


def measure(L: Layout, run: tuple[str, str, str], n_shards: int, out_html: Path) -> dict:
    """Aggregate then render one layout's run, each in a fresh process."""
    model, side, variant = run
    agg = {
        "model_json": L.model_json(model),
        "tokens": [L.tokens(model, s) for s in range(n_shards)],
        "side": side,
        "variant": variant,
        "shard_tables": {t: [L.stats(*run, s, t) for s in range(n_shards)] for t in SHARD_TABLES},
        "outputs": _summary_outputs(L, run),
    }
    rep = {"results": L.results, "model": model, "side": side, "variant": variant, "out_html": str(out_html)}
    res = {}
    for kind, args in (("aggregate", agg), ("report", rep)):
        p = subprocess.run([sys.executable, "-c", CHILD, kind, json.dumps(args)], capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"{kind} failed:\n{p.stderr[-4000:]}")
        res[kind] = json.loads(p.stdout.strip().splitlines()[-1])
    return res


def _summary_outputs(L: Layout, run) -> dict:
    from actdiff.tables import AGGREGATE_JSON, AGGREGATE_TABLES

    out = {t: L.summary(*run, t) for t in AGGREGATE_TABLES}
    out.update({n: L.summary_json(*run, n) for n in AGGREGATE_JSON})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="results/ci")
    ap.add_argument("--model", default="tiny-nomic-moe")
    ap.add_argument("--side", default="actdiff")
    ap.add_argument("--variant", default="fp32+fault=causal_mask")
    ap.add_argument("--prompts", type=int, default=20_000)
    ap.add_argument("--shards", type=int, default=40)
    ap.add_argument("--workdir", default="results/bench/report_memory")
    ap.add_argument("--out", default="results/bench/report_memory.json")
    a = ap.parse_args(argv)
    run = (a.model, a.side, a.variant)
    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    for label, prompts, shards in (("1x", 0, 0), (f"{a.prompts}", a.prompts, a.shards)):
        L = Layout(str(work / label))
        n = replicate(Layout(a.results), L, run, prompts or 1, shards or 2)
        t0 = time.perf_counter()
        m = measure(L, run, n, work / f"{label}.html")
        n_prompts = sum(len(pd.read_parquet(L.tokens(a.model, s), columns=["prompt_id"])) for s in range(n))
        html_bytes = (work / f"{label}.html").stat().st_size
        rows.append({"corpus": label, "prompts": n_prompts, "shards": n, **m, "html_bytes": html_bytes,
                     "wall_s": time.perf_counter() - t0})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"run": "/".join(run), "rows": rows}, indent=2))
    print("\n| prompts | shards | aggregate peak MB | report peak MB (own / kernel+pandoc) | report s | page MB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rp = r["report"]
        print(
            f"| {r['prompts']} | {r['shards']} | {r['aggregate']['own_mb']:.0f} | {rp['own_mb']:.0f} / "
            f"{rp['children_mb']:.0f} | {rp['seconds']:.1f} | {r['html_bytes'] / 2**20:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

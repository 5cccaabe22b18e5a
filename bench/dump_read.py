"""Reading a dump prompt by prompt against reading it whole (actdiff.h5io.ActivationReader.iter_prompts).

    python bench/dump_read.py                               # the released graph (random values), 12 prompts
    python bench/dump_read.py --model tiny --prompts 200    # the tiny NomicBERT-MoE's graph
    python bench/dump_read.py --chunk-kib 1024 256 --repeats 3

Writes one dump per chunk size (``--chunk-kib``, the writer's chunk bytes: actdiff.h5io._CHUNK_BYTES) of random
values for ``--prompts`` prompts of 10-69 tokens (seed 0), then reads it, in one process, ``--repeats`` times each,
interleaved: whole (every dataset in one read: the floor), ``iter_prompts`` (what the statistics and the reference
noise read), and prompt by prompt with ``node(name, prompt)`` (each read checksums the whole chunks holding the
prompt's rows). Prints the CPU seconds (best of the repeats) and the rate in MB of values per CPU second."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import actdiff.h5io as h5io  # noqa: E402
from actdiff.h5io import ActivationReader, ActivationWriter  # noqa: E402
from actdiff.nodes import build_graph, dims_from_config  # noqa: E402


def graph_of(model: str):
    if model == "released":
        return build_graph(dims_from_config(json.loads((ROOT.parent / "shared/spec/nomic-embed-text-v2-moe.config.json")
                                                        .read_text())))  # fmt: skip
    from helpers import ensure_tiny_model

    from actdiff.nodes import graph_for_model_dir

    return graph_for_model_dir(ensure_tiny_model())


def write(path: Path, graph, lengths: list[int]) -> None:
    rng = np.random.default_rng(0)
    with ActivationWriter(path, graph, {"model": "bench"}) as w:
        for i, T in enumerate(lengths):
            vals = {}
            for n in graph:
                shape = graph.shape(n.name, T if n.axis == "token" else 1)
                vals[n.name] = (rng.integers(0, max(1, graph.dims.experts), shape) if n.kind == "index"
                                else rng.standard_normal(shape, dtype=np.float32))  # fmt: skip
            w.append(f"p{i}", vals, input_ids=np.arange(T))


def read(path: Path, how: str) -> tuple[float, int]:
    """CPU seconds and bytes of values of one read of the whole dump as ``how`` says."""
    with ActivationReader(path) as r:
        names = r.node_names
        t, n = time.process_time(), 0
        if how == "whole":
            n = sum(r.node_all(name).nbytes for name in names)
        elif how == "iter_prompts":
            for _, _, vals in r.iter_prompts(names):
                n += sum(v.nbytes for k, v in vals.items() if k in names)
        else:
            n = sum(r.node(name, p).nbytes for p in r.prompt_ids for name in names)
        return time.process_time() - t, n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["released", "tiny"], default="released")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--chunk-kib", type=int, nargs="+", default=[1024, 512, 256])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--per-prompt", action="store_true", help="also time node(name, prompt) reads (slow)")
    a = ap.parse_args(argv)
    graph = graph_of(a.model)
    lengths = [int(x) for x in np.random.default_rng(0).integers(10, 70, a.prompts)]
    hows = ["whole", "iter_prompts", *(["per_prompt"] if a.per_prompt else [])]
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for kib in a.chunk_kib:
            h5io._CHUNK_BYTES = kib << 10
            files[kib] = Path(tmp) / f"chunks-{kib}.h5"
            write(files[kib], graph, lengths)
        best: dict = {}
        for _ in range(a.repeats):
            for kib, path in files.items():
                for how in hows:
                    s, n = read(path, how)
                    best[(kib, how)] = (min(s, best.get((kib, how), (s, n))[0]), n)
    print(f"{a.model} graph, {len(graph)} nodes, {a.prompts} prompts, {sum(lengths)} tokens; best of {a.repeats}")
    print("| chunk | read | CPU s | MB/s |\n|---|---|---:|---:|")
    for (kib, how), (s, n) in best.items():
        print(f"| {kib} KiB | {how} | {s:.3f} | {n / 1e6 / max(s, 1e-9):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

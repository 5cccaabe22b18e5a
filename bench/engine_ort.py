"""ONNX Runtime rows for bench/engine.py: the full-size model exported to ONNX (fp32) and quantised (int8
dynamic and static), timed in the same rotated rounds as the engine, torch and llama.cpp.

Model files: ``actdiff.onnxrt.export.export_model`` (TorchScript exporter) and
``actdiff.onnxrt.variants.write_variant``, each made once in a fresh subprocess (so its peak memory is
measured on its own and released) and cached under ``<cache>/<model dir name>-onnx-<sha256(config.json)[:12]>/``
with a ``manifest.json`` (written atomically, last) that records the checkpoint it was made from (size and
mtime of model.safetensors and config.json), the times, peak RSS and file sizes. A manifest whose checkpoint
stamp differs is stale: every file is made again. Each model file is itself written atomically by actdiff.

Sessions: ``actdiff.onnxrt.capture.cpu_session`` on the model file as written, unmarked (the model's only
output, ``embedding``: no capture outputs), graph optimisation level ``all`` (ORT_ENABLE_ALL, the production
setting), intra_op threads = the row's threads, inter_op 1, CPU execution provider.

FLOPs: the export computes the MoE in the dense-gather formulation (docs/onnxruntime.md): every expert's fc1
on every token and every expert's fc2 on every top-k slot, the slot's own expert then gathered. ORT
therefore executes E x the top-k fc1 work / k and E x the fc2 work of top-k routing in the MoE layers (for
the released model, 8 experts top-2: 6x the expert FLOPs). :func:`count_flops_dense_gather` counts what ORT
executes; a batched run executes the padded tokens too, and those are counted.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ORT_VARIANTS = ("fp32", "int8-dynamic", "int8-static")
LEVEL = "all"  # ORT_ENABLE_ALL: what a production session uses
CALIBRATION_PROMPTS, CALIBRATION_TOKENS = 4, 128  # int8-static: random ids (own seed), MinMax ranges
MANIFEST = "manifest.json"
PROTOBUF_LIMIT = 2**31 - 1  # one serialized ModelProto (inline weights) must stay under 2 GiB

MAKE_CHILD = r"""
import json, sys, time
kind, model_dir, src, out, calib = sys.argv[1:6]
t0 = time.perf_counter()
if kind == 'export':
    from actdiff.onnxrt.export import export_model
    info = export_model(model_dir, out)
else:
    from actdiff.onnxrt.variants import write_variant
    info = {}
    write_variant(src, out, kind, calibration=json.loads(calib), calibration_ids=[])
secs = time.perf_counter() - t0
hwm = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
print(json.dumps({'seconds': secs, 'peak_rss_bytes': hwm, 'info': info}))
"""


def config_key(model_dir: Path) -> str:
    return hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()[:12]


def checkpoint_stamp(model_dir: Path) -> dict:
    """What the cached files were made from: the checkpoint's files and the exporter's revision."""
    from actdiff.onnxrt.export import EXPORT_REVISION

    stats = {f: (model_dir / f).stat() for f in ("model.safetensors", "config.json")}
    return {**{f: [st.st_size, st.st_mtime] for f, st in stats.items()}, "export_revision": EXPORT_REVISION}


def calibration_ids(vocab: int = 4000) -> list[list[int]]:
    rng = np.random.default_rng(4321)  # not the timed ids' seeds (engine.SEED + T)
    return [rng.integers(4, vocab, CALIBRATION_TOKENS).tolist() for _ in range(CALIBRATION_PROMPTS)]


def _make(kind: str, model_dir: Path, src: Path | None, out: Path) -> dict:
    """One model file made in a fresh subprocess: seconds, the child's own peak RSS (VmHWM), file bytes."""
    calib = json.dumps(calibration_ids() if kind == "int8-static" else [])
    argv = [sys.executable, "-c", MAKE_CHILD, kind, str(model_dir), str(src or ""), str(out), calib]
    r = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ))
    if r.returncode != 0:
        raise RuntimeError(f"making the ORT {kind} model {out} failed:\n{r.stderr[-3000:]}")
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    rec["bytes"] = out.stat().st_size
    rec["path"] = str(out)
    return rec


def ensure_ort_models(model_dir: Path, cache_root: Path, variants=ORT_VARIANTS) -> tuple[dict[str, Path], dict]:
    """The ONNX model file of each variant for ``model_dir``, made (one at a time) or reused from the cache."""
    from actdiff.atomic import atomic_path
    from actdiff.onnxrt.variants import variant_path

    d = cache_root / f"{model_dir.name}-onnx-{config_key(model_dir)}"
    d.mkdir(parents=True, exist_ok=True)
    man_path = d / MANIFEST
    man = json.loads(man_path.read_text()) if man_path.is_file() else {}
    stamp = checkpoint_stamp(model_dir)
    if man.get("checkpoint") != json.loads(json.dumps(stamp)):
        man = {"checkpoint": stamp, "files": {}}
    paths = {}
    for v in ("fp32", *[x for x in variants if x != "fp32"]):
        paths[v] = p = variant_path(d, v)
        if v in man["files"] and p.is_file() and p.stat().st_size == man["files"][v]["bytes"]:
            man["files"][v]["reused"] = True
            continue
        print(f"  onnxruntime {v}: making {p} ...", flush=True)
        rec = _make("export" if v == "fp32" else v, model_dir, paths["fp32"], p)
        rec["reused"] = False
        man["files"][v] = rec
        print(f"  onnxruntime {v}: {rec['seconds']:.1f} s, {rec['bytes'] / 1e9:.2f} GB, peak RSS "
              f"{rec['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)  # fmt: skip
        with atomic_path(man_path) as tmp:  # after every file: a later failure keeps what was made
            Path(tmp).write_text(json.dumps(man, indent=1) + "\n", encoding="utf-8")
    man["fp32_under_protobuf_limit"] = man["files"]["fp32"]["bytes"] < PROTOBUF_LIMIT
    man["dir"] = str(d)
    return {v: paths[v] for v in variants}, man


def count_flops_dense_gather(cfg: dict, T: int, B: int = 1) -> int:
    """FLOPs ORT executes for B sequences of T tokens (padded ones included): as engine.count_flops, but the
    MoE layers' experts in the export's dense-gather formulation (every expert's fc1 on every token, every
    expert's fc2 on every top-k slot)."""
    H, F, L = cfg["n_embd"], cfg["n_inner"], cfg["n_layer"]
    E, k = int(cfg.get("num_experts", 0) or 0), int(cfg.get("moe_top_k", 0) or 0)
    every = int(cfg.get("moe_every_n_layers", 0) or 0)
    n_moe = sum(1 for i in range(L) if E and every and i % every == 1)  # as engine.is_moe_layer
    per_layer = 2 * T * H * 3 * H + 2 * T * H * H + 2 * 2 * T * T * H
    dense_mlp = 2 * T * (H * F + F * H)
    moe = 2 * T * H * E + 2 * T * E * H * F + 2 * T * k * F * E * H
    return B * (L * per_layer + (L - n_moe) * dense_mlp + n_moe * moe)


def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(l2n(a) * l2n(b), axis=-1)


class OrtSides:
    """Unmarked ORT sessions (level all) for each variant, for one thread count at a time (the fp32 session
    holds its own copy of the 1.9 GB of weights: two thread counts at once would double that)."""

    def __init__(self, paths: dict[str, Path], pad_id: int):
        self.paths, self.pad_id = paths, pad_id
        self.threads: int | None = None
        self.sessions: dict[str, object] = {}
        self.session_s: dict[str, float] = {}  # "<variant>/threads=<n>" -> session creation seconds

    def for_threads(self, threads: int) -> dict[str, object]:
        if self.threads != threads:
            from actdiff.onnxrt.capture import cpu_session

            self.sessions.clear()
            for v, p in self.paths.items():
                t0 = time.perf_counter()
                self.sessions[v] = cpu_session(Path(p), LEVEL, threads)
                self.session_s[f"{v}/threads={threads}"] = time.perf_counter() - t0
            self.threads = threads
        return self.sessions

    @staticmethod
    def _timed(sess, ids: np.ndarray, mask: np.ndarray):
        from actdiff.nodes import EMBEDDING, INPUT_IDS
        from actdiff.onnxrt.export import INPUT_MASK

        t0 = time.perf_counter()
        (emb,) = sess.run([EMBEDDING], {INPUT_IDS: ids, INPUT_MASK: mask})
        return time.perf_counter() - t0, emb

    def single(self, threads: int, ids: list[int]) -> dict:
        """name -> callable returning (seconds, embedding [H]) for one unpadded prompt."""
        x = np.asarray([ids], dtype=np.int64)
        m = np.ones_like(x)

        def one(sess):
            dt, emb = self._timed(sess, x, m)
            return dt, emb[0]

        return {f"ort_{v}": (lambda s=s: one(s)) for v, s in self.for_threads(threads).items()}

    def batched(self, threads: int, batch: list[list[int]]) -> dict:
        """name -> callable returning (seconds, embeddings [B, H]): the padded batch with its mask
        (actdiff.onnxrt.capture.pad_batch, as the ORT side pads), and the same prompts one by one."""
        from actdiff.onnxrt.capture import pad_batch

        x, m = pad_batch(batch, self.pad_id)
        one = [(np.asarray([b], dtype=np.int64), np.ones((1, len(b)), dtype=np.int64)) for b in batch]
        runs = {}
        for v, s in self.for_threads(threads).items():
            runs[f"ort_{v}"] = lambda s=s: self._timed(s, x, m)

            def by_one(s=s):
                out = [self._timed(s, a, b) for a, b in one]
                return sum(o[0] for o in out), np.concatenate([o[1] for o in out])

            runs[f"ort_{v}_1by1"] = by_one
        return runs

    def close(self) -> None:
        self.sessions.clear()
        self.threads = None


def ort_fields(med: dict, outs: dict, torch_emb: np.ndarray, ort_flop: int, peak: float) -> dict:
    """The ORT entries of a row: ms, ratios against the other sides' medians, GFLOP/s of the FLOPs ORT
    executes (dense-gather MoE), and the accuracy checks against torch's embedding (L2-normalised mean pool)."""
    r: dict = {"ort_level": LEVEL, "ort_gflop_executed": ort_flop / 1e9}
    for s, t in med.items():
        if not s.startswith("ort_") or s.endswith("_1by1"):
            continue
        r[f"{s}_ms"] = t * 1e3
        r[f"{s}_gflops_executed"] = ort_flop / t / 1e9
        r[f"{s}_pct_peak_executed"] = 100 * ort_flop / t / 1e9 / peak
        for other in ("engine", "torch", "llamacpp"):
            if other in med:
                r[f"ratio_{s}_over_{other}"] = t / med[other]
        d = np.asarray(outs[s], dtype=np.float64) - torch_emb
        r[f"max_abs_diff_embedding_{s}_vs_torch"] = float(np.abs(d).max())
        r[f"min_cosine_embedding_{s}_vs_torch"] = float(np.min(cosine(np.asarray(outs[s], np.float64), torch_emb)))
    return r

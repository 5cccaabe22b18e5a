"""A small, independent NomicBERT-MoE engine in numpy (float32), written from docs/spec.md.

It is an example of "your own engine" for actdiff: it knows nothing of actdiff (it imports numpy,
pyarrow, safetensors and, when present, scipy only) and dumps its intermediate tensors under ITS OWN
names and layouts, the way a real engine would:

- a leading batch axis of size 1 on every tensor ([1, T, H]);
- the fused QKV projection only (``blk.{i}.qkv``; no separate q, k, v);
- the rotary outputs head-major ([1, nh, T, hd]);
- 1-based expert ids (int32).

``mapping.yaml`` beside this file maps those tensors onto actdiff's canonical graph (docs/nodes.md).

Usage::

    python nomic_numpy.py --model-dir MODEL --tokens shard-0.parquet --out DIR [--bug emb_ln_eps]

writes ``DIR/<prompt_id>/<tensor>.npy`` for every prompt of the tokens file (columns ``prompt_id`` and
``reference_ids``). ``--bug emb_ln_eps`` is a deliberate mistake for demonstrations: the embedding
LayerNorm uses eps 1e-12 (the BERT default) instead of the configured 1e-5.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from safetensors.numpy import load_file

try:
    from scipy.special import erf
except ImportError:  # pragma: no cover
    _erf64 = np.vectorize(math.erf, otypes=[np.float64])

    def erf(x):
        return _erf64(x).astype(x.dtype)


F32 = np.float32
BUGS = ("emb_ln_eps",)


class NumpyNomicMoe:
    """The forward pass of spec.md in float32, recording every intermediate tensor."""

    def __init__(self, model_dir: str | Path, bug: str | None = None):
        model_dir = Path(model_dir)
        self.cfg = json.loads((model_dir / "config.json").read_text())
        self.w = {k: v.astype(F32) for k, v in load_file(str(model_dir / "model.safetensors")).items()}
        c = self.cfg
        self.H, self.nh, self.L = c["n_embd"], c["n_head"], c["n_layer"]
        self.hd = self.H // self.nh
        self.E, self.k, self.every = c["num_experts"], c["moe_top_k"], c["moe_every_n_layers"]
        self.eps = float(c["layer_norm_epsilon"])
        self.base = float(c["rotary_emb_base"])
        if bug not in (None, *BUGS):
            raise SystemExit(f"nomic_numpy: unknown --bug {bug!r}; known: {', '.join(BUGS)}")
        self.bug = bug

    # ------------------------------------------------------------------------------------- ops
    @staticmethod
    def layer_norm(x, g, b, eps):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return ((x - mu) / np.sqrt(var + F32(eps)) * g + b).astype(F32)

    @staticmethod
    def gelu(x):
        return (F32(0.5) * x * (F32(1) + erf(x / F32(math.sqrt(2.0))))).astype(F32)

    @staticmethod
    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return (e / e.sum(-1, keepdims=True)).astype(F32)

    def linear(self, x, name):
        return (x @ self.w[name + ".weight"].T + self.w[name + ".bias"]).astype(F32)

    def rotary(self, x):
        """x [nh, T, hd] (head-major) -> rotated, NeoX halves, angles built in float32."""
        T, half = x.shape[1], self.hd // 2
        inv = F32(1) / (F32(self.base) ** (np.arange(0, self.hd, 2, dtype=F32) / F32(self.hd)))
        ang = np.outer(np.arange(T, dtype=F32), inv).astype(F32)  # [T, hd/2]
        cos, sin = np.cos(ang)[None], np.sin(ang)[None]
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(F32)

    # ----------------------------------------------------------------------------------- blocks
    def attention(self, x, i, out):
        p, T = f"encoder.layers.{i}.attn.", x.shape[0]
        qkv = self.linear(x, p + "Wqkv")
        out[f"blk.{i}.qkv"] = qkv
        heads = [qkv[:, j * self.H : (j + 1) * self.H].reshape(T, self.nh, self.hd) for j in range(3)]
        q, k, v = (a.transpose(1, 0, 2) for a in heads)  # head-major [nh, T, hd]
        q, k = self.rotary(q), self.rotary(k)
        out[f"blk.{i}.q_rope"], out[f"blk.{i}.k_rope"] = q, k
        scores = (q @ k.transpose(0, 2, 1)) / F32(math.sqrt(self.hd))  # [nh, T, T], bidirectional
        ctx = (self.softmax(scores) @ v).transpose(1, 0, 2).reshape(T, self.H)
        out[f"blk.{i}.attn_ctx"] = ctx
        o = self.linear(ctx, p + "out_proj")
        out[f"blk.{i}.attn_o"] = o
        return o

    def moe(self, h, i, out):
        p, T = f"encoder.layers.{i}.mlp.", h.shape[0]
        logits = (h @ self.w[p + "router.layer.weight"].T).astype(F32)
        probs = self.softmax(logits)
        top = np.argsort(-probs, axis=-1, kind="stable")[:, : self.k]
        wts = np.take_along_axis(probs, top, -1)
        w1 = self.w[p + "experts.mlp.w1"].reshape(self.E, -1, self.H)
        w2 = self.w[p + "experts.mlp.w2"].reshape(self.E, -1, self.H)
        up = np.stack([np.stack([h[t] @ w1[e].T for e in top[t]]) for t in range(T)]).astype(F32)
        act = self.gelu(up)
        down = np.stack([np.stack([act[t, s] @ w2[e] for s, e in enumerate(top[t])]) for t in range(T)]).astype(F32)
        wsum = (down * wts[..., None]).sum(1).astype(F32)
        res = (wsum + self.w[p + "experts.bias"]).astype(F32)
        out.update({f"blk.{i}.gate_logits": logits, f"blk.{i}.gate_probs": probs, f"blk.{i}.topk_w": wts,
                    f"blk.{i}.topk_id": (top + 1).astype(np.int32), f"blk.{i}.exp_up": up,
                    f"blk.{i}.exp_act": act, f"blk.{i}.exp_down": down, f"blk.{i}.moe_sum": wsum,
                    f"blk.{i}.moe_out": res})  # fmt: skip
        return res

    def dense(self, h, i, out):
        p = f"encoder.layers.{i}.mlp."
        up = self.linear(h, p + "fc1")
        act = self.gelu(up)
        down = self.linear(act, p + "fc2")
        out.update({f"blk.{i}.ffn_up": up, f"blk.{i}.ffn_act": act, f"blk.{i}.ffn_down": down})
        return down

    def forward(self, ids: list[int]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        x = self.w["embeddings.word_embeddings.weight"][ids] + self.w["embeddings.token_type_embeddings.weight"][0]
        out["tok_embd"] = x.astype(F32)
        eps = 1e-12 if self.bug == "emb_ln_eps" else self.eps
        x = self.layer_norm(out["tok_embd"], self.w["emb_ln.weight"], self.w["emb_ln.bias"], eps)
        out["embd_norm"] = x
        for i in range(self.L):
            p = f"encoder.layers.{i}."
            r = (x + self.attention(x, i, out)).astype(F32)
            h = self.layer_norm(r, self.w[p + "norm1.weight"], self.w[p + "norm1.bias"], self.eps)
            out[f"blk.{i}.attn_resid"], out[f"blk.{i}.ln1"] = r, h
            m = self.moe(h, i, out) if i % self.every == 1 else self.dense(h, i, out)
            r = (h + m).astype(F32)
            x = self.layer_norm(r, self.w[p + "norm2.weight"], self.w[p + "norm2.bias"], self.eps)
            out[f"blk.{i}.ffn_resid"], out[f"blk.{i}.out"] = r, x
        pooled = x.mean(0, dtype=F32)
        out["pool_mean"] = pooled
        out["sentence_embd"] = (pooled / max(np.linalg.norm(pooled), F32(1e-12))).astype(F32)
        return {n: a[None] for n, a in out.items()}  # the batch axis of one prompt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--tokens", required=True, help="Parquet with prompt_id and reference_ids")
    ap.add_argument("--out", required=True, help="folder receiving <prompt_id>/<tensor>.npy")
    ap.add_argument("--bug", choices=BUGS, help="a deliberate mistake (for demonstrations)")
    args = ap.parse_args(argv)
    model = NumpyNomicMoe(args.model_dir, args.bug)
    table = pq.read_table(args.tokens, columns=["prompt_id", "reference_ids"]).to_pydict()
    for pid, ids in zip(table["prompt_id"], table["reference_ids"], strict=True):
        d = Path(args.out) / pid
        d.mkdir(parents=True, exist_ok=True)
        for name, a in model.forward([int(t) for t in ids]).items():
            np.save(d / f"{name}.npy", a)
    print(f"nomic_numpy: {len(table['prompt_id'])} prompts -> {args.out}" + (f" (bug: {args.bug})" if args.bug else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

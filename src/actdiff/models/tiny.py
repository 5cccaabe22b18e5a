"""The embedded default model ``tiny-nomic-moe``, generated deterministically from a seed.

Tokenizer: built the way XLM-R's was. A SentencePiece Unigram model is trained with the
``sentencepiece`` library (nmt_nfkc normalisation, one thread, fixed seed) on a fixed text file shipped as
package data (:data:`TRAINING_TEXT`), then turned into a ``tokenizer.json`` with the released nomic
tokenizer's structure: a bare ``Precompiled`` normalizer holding the SentencePiece charsmap, a Metaspace pre-tokenizer,
``<s>``=0 ``<pad>``=1 ``</s>``=2 ``<unk>``=3, SentencePiece id + 1 for every other piece, and ``<mask>``
as the last id.

Model: a small NomicBERT-MoE in the released file format (config.json with the released key names,
model.safetensors, tokenizer.json). Weights come from numpy's PCG64 stream in a fixed tensor order, so
the bytes are identical on every run and platform. The scales are chosen so activations and routing look
like a trained model's; the router structure (see ``ROUTER_SCALE``) was calibrated so that in every
MoE layer between 1% and 10% of tokens of the bundled corpus have a gap below 1e-2 between the k-th
and (k+1)-th router probability (tests/test_tiny_model.py checks it).
"""

from __future__ import annotations

import io
import json
import math
from importlib import resources
from pathlib import Path

import numpy as np

from ..atomic import atomic_path, write_bytes_atomic
from ..nodes import build_graph

# the tokenizer's training corpus (package data)
TRAINING_TEXT = Path(str(resources.files("actdiff").joinpath("data/tokenizer_training.txt")))

TINY_ARCH = {
    "n_embd": 128,
    "n_head": 4,
    "n_layer": 4,
    "n_inner": 512,
    "num_experts": 8,
    "moe_top_k": 2,
    "moe_every_n_layers": 2,
}
SPM_VOCAB_SIZE = 4000
# Router rows: experts come in pairs that share a direction (2e and 2e+1 both follow D[e]) plus a
# smaller expert-specific part. A trained router behaves like this: each token has two clearly preferred
# experts, so the gap between the 2nd and 3rd probability is rarely tiny. With i.i.d. Gaussian rows at
# any scale, 10-20% of tokens are near-ties; with this structure about 5%, top-2 weight sums average
# about 0.8 (the released model: 0.70-0.83) and expert load stays balanced.
ROUTER_SCALE = 3.0
ROUTER_NOISE = 0.3
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")


def train_sentencepiece(text_file: Path, vocab_size: int = SPM_VOCAB_SIZE, seed: int = 0) -> bytes:
    """Train a SentencePiece Unigram model on a fixed text file; return the serialized model proto."""
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    lines = [ln for ln in Path(text_file).read_text(encoding="utf-8").splitlines() if ln.strip()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="unigram",
        vocab_size=vocab_size,
        normalization_rule_name="nmt_nfkc",
        character_coverage=0.9995,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        hard_vocab_limit=False,
        max_sentence_length=4096,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return buf.getvalue()


def tokenizer_json_from_spm(model_proto: bytes) -> str:
    """Build the XLM-R style tokenizer.json from a SentencePiece model proto."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    proto = pb.ModelProto()
    proto.ParseFromString(model_proto)
    # fairseq layout: 4 specials, then SentencePiece pieces 3.. (so every SP id shifts by +1), then <mask>
    vocab = [(s, 0.0) for s in SPECIALS]
    vocab += [(p.piece, p.score) for p in proto.pieces[3:]]
    vocab += [("<mask>", 0.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.normalizer = normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.add_special_tokens([AddedToken("<mask>", special=True, lstrip=True, normalized=False)])
    return tok.to_str(pretty=True)


TOKENIZER_CONFIG = {
    "tokenizer_class": "XLMRobertaTokenizer",
    "model_max_length": 512,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "sep_token": "</s>",
    "cls_token": "<s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "mask_token": "<mask>",
    "clean_up_tokenization_spaces": True,
}


def tiny_config(released: dict, n_tokens: int) -> dict:
    """The released config.json with the tiny sizes; positions stay 2048 as released."""
    cfg = dict(released)
    cfg.update(TINY_ARCH)
    multiple = int(released.get("pad_vocab_size_multiple", 64))
    cfg["vocab_size"] = int(math.ceil(n_tokens / multiple) * multiple)
    cfg["_name_or_path"] = "actdiff/tiny-nomic-moe"
    cfg["n_positions"] = 2048
    cfg["max_trained_positions"] = 2048
    return cfg


def tiny_weights(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """Deterministic weights for the released tensor layout at the tiny sizes."""
    H, F, E, L = cfg["n_embd"], cfg["n_inner"], cfg["num_experts"], cfg["n_layer"]
    V, every = cfg["vocab_size"], cfg["moe_every_n_layers"]
    rng = np.random.default_rng(seed)
    # the LayerNorm parameter names come from the graph, which names every node's checkpoint tensors
    layer_norms = {i: [n for n in build_graph(cfg) if n.op == "LAYERNORM" and n.layer == i] for i in range(L)}

    def normal(shape, std, mean=0.0):
        return (mean + std * rng.standard_normal(shape)).astype(np.float32)

    w = {
        "embeddings.word_embeddings.weight": normal((V, H), 0.5),
        "embeddings.token_type_embeddings.weight": normal((1, H), 0.1),
        "emb_ln.weight": normal((H,), 0.05, 1.0),
        "emb_ln.bias": normal((H,), 0.02),
    }
    for i in range(L):
        p = f"encoder.layers.{i}."
        w[p + "attn.Wqkv.weight"] = normal((3 * H, H), 1.0 / math.sqrt(H))
        w[p + "attn.Wqkv.bias"] = normal((3 * H,), 0.02)
        w[p + "attn.out_proj.weight"] = normal((H, H), 0.5 / math.sqrt(H))
        w[p + "attn.out_proj.bias"] = normal((H,), 0.02)
        if every > 0 and E > 0 and i % every == 1:
            shared = np.repeat(rng.standard_normal((E // 2 + E % 2, H)), 2, axis=0)[:E]
            own = rng.standard_normal((E, H))
            w[p + "mlp.router.layer.weight"] = (ROUTER_SCALE / math.sqrt(H) * (shared + ROUTER_NOISE * own)).astype(
                np.float32
            )
            w[p + "mlp.experts.mlp.w1"] = normal((E * F, H), 1.0 / math.sqrt(H))
            w[p + "mlp.experts.mlp.w2"] = normal((E * F, H), 0.5 / math.sqrt(F))
            w[p + "mlp.experts.bias"] = normal((H,), 0.1)
        else:
            w[p + "mlp.fc1.weight"] = normal((F, H), 1.0 / math.sqrt(H))
            w[p + "mlp.fc1.bias"] = normal((F,), 0.02)
            w[p + "mlp.fc2.weight"] = normal((H, F), 0.5 / math.sqrt(F))
            w[p + "mlp.fc2.bias"] = normal((H,), 0.02)
        for ln in layer_norms[i]:  # the layer's two LayerNorms in graph order (weight, then bias)
            w[ln.weights[0]] = normal((H,), 0.05, 1.0)
            w[ln.weights[1]] = normal((H,), 0.02)
    return w


def generate_tiny_model(out_dir: str | Path, text_file: str | Path, released_config: dict, seed: int = 0) -> Path:
    """Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json into ``out_dir``."""
    from safetensors.numpy import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    proto = train_sentencepiece(Path(text_file), seed=seed)
    tok_json = tokenizer_json_from_spm(proto)
    n_tokens = len(json.loads(tok_json)["model"]["vocab"])
    cfg = tiny_config(released_config, n_tokens)
    weights = tiny_weights(cfg, seed)
    write_bytes_atomic(out / "sentencepiece.bpe.model", proto)
    write_bytes_atomic(out / "tokenizer.json", tok_json.encode("utf-8"))
    write_bytes_atomic(out / "tokenizer_config.json", (json.dumps(TOKENIZER_CONFIG, indent=2) + "\n").encode())
    write_bytes_atomic(out / "model.safetensors", save(weights, metadata={"format": "pt"}))
    # config.json last: its presence marks a complete model directory
    with atomic_path(out / "config.json") as tmp:
        tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out

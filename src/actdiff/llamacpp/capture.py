"""Record llama.cpp's graph nodes through ggml's scheduler eval callback (ctypes, no C extension).

llama-cpp-python exposes the callback type and the context parameter ``cb_eval`` but neither the
``ggml_tensor`` struct nor the ggml accessors, so both are declared here against the bundled
``libggml-base`` and checked at load time (:func:`check_layout`): the struct size against
``ggml_tensor_overhead()`` and every field we read against ggml's own accessors on a probe tensor. A
llama.cpp with a different layout fails there, loudly, instead of returning garbage.

How the callback is used (ggml-backend.cpp, ``ggml_backend_sched_compute_splits``): for every graph node
in execution order it is called with ``ask=True``; returning True makes the scheduler compute everything
up to that node and call again with ``ask=False``, when the node's data can be copied out. At ``ask`` time
the graph is complete (names, ops and sources are set), so unnamed nodes are identified there from their
op and sources; their data are read later.

Node names (the keys of :meth:`LlamaCppRunner.forward`):

- every name llama.cpp's graph builder gives with ``cb(tensor, name, il)``: ``name-il`` for layer nodes
  (``Qcur-1``, ``ffn_moe_topk-1``), ``name`` otherwise (``inp_embd``, ``result_embd_pooled``); a name that
  several tensors share in one graph (``norm-1``, ``norm_w-1``: attention-output and layer-output norms)
  is suffixed ``#2``, ``#3`` from its second tensor on, in graph order;
- structural names for nodes llama.cpp leaves unnamed or names ambiguously (found from op and sources):
  ``attn_out-{i}`` the attention output projection (+bias), which llama.cpp ALSO names ``kqv_out-{i}``
  (``kqv_out-{i}`` here is only the attention context before the projection); ``attn_residual-{i}`` =
  attn_out + layer input; ``ffn_residual-{i}`` = FFN/MoE output + ``ffn_inp-{i}``; ``l_out-{i}`` the
  layer-output LayerNorm (for the last layer the same tensor as ``result_embd``);
- ``embd_normalized``: NOT a graph node; ``result_embd_pooled`` L2-normalised after the forward the way
  llama.cpp's ``common_embd_normalize`` (llama-embedding, llama-server) does it (float32 values, norm
  accumulated in double, ``1/norm`` applied in float).

Arrays are numpy, row-major with ggml's axes reversed (ggml ``ne[0]`` is the fastest axis): a ``[H, T]``
ggml tensor is ``[T, H]``, ``Qcur`` ``[hd, nh, T]`` is ``[T, nh, hd]``, ``ffn_moe_up`` ``[F, k, T]`` is
``[T, k, F]``. The rank of each node is learned once from a 3-token warm-up forward, so a length-1 axis
is never dropped by accident.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import re
import threading
from collections import deque
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import ActdiffError, ModelError
from . import PINNED_VERSION
from .gguf_meta import read_gguf_header

log = logging.getLogger(__name__)
ggml_log = logging.getLogger("actdiff.llamacpp.ggml")

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_OBJECT_SIZE = 32  # sizeof(struct ggml_object) in ggml.c: offs, size, next, type, char padding[4]

# llama.h enums
LLAMA_POOLING_TYPE_UNSPECIFIED, LLAMA_POOLING_TYPE_NONE, LLAMA_POOLING_TYPE_MEAN = -1, 0, 1
LLAMA_FLASH_ATTN_TYPE_DISABLED = 0
POOLING_NAMES = {-1: "unspecified", 0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
ROPE_TYPE_NAMES = {-1: "none", 0: "norm", 2: "neox", 8: "mrope", 24: "vision"}

ALLOW_VERSION_ENV = "ACTDIFF_LLAMACPP_ANY_VERSION"


class LlamaCppError(ActdiffError):
    """llama.cpp refused or failed (the message carries its status code and last log lines)."""


class GgmlTensor(ctypes.Structure):
    """``struct ggml_tensor`` of ggml/include/ggml.h (llama-cpp-python 0.3.36)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


class GgmlInitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


# ----------------------------------------------------------------------------------------- the library
class Ggml:
    """ctypes declarations of the ggml functions we call, bound to the libggml-base llama_cpp loaded."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        lib = ctypes.CDLL(self.path)  # the loader returns the already-loaded object (same soname)
        P, S, I64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64
        sigs = {
            "ggml_tensor_overhead": ([], S),
            "ggml_get_name": ([P], P),
            "ggml_get_data": ([P], P),
            "ggml_nbytes": ([P], S),
            "ggml_nelements": ([P], I64),
            "ggml_n_dims": ([P], ctypes.c_int),
            "ggml_op_name": ([ctypes.c_int], ctypes.c_char_p),
            "ggml_op_desc": ([P], ctypes.c_char_p),
            "ggml_type_name": ([ctypes.c_int], ctypes.c_char_p),
            "ggml_type_size": ([ctypes.c_int], S),
            "ggml_blck_size": ([ctypes.c_int], I64),
            "ggml_backend_tensor_get": ([P, P, S, S], None),
            "ggml_init": ([GgmlInitParams], P),
            "ggml_free": ([P], None),
            "ggml_new_tensor_2d": ([P, ctypes.c_int, I64, I64], P),
            "ggml_transpose": ([P, P], P),
            "ggml_set_name": ([P, ctypes.c_char_p], P),
        }
        for name, (args, res) in sigs.items():
            try:
                f = getattr(lib, name)
            except AttributeError:
                raise LlamaCppError(f"{self.path}: ggml symbol {name} not found; llama.cpp version drift?") from None
            f.argtypes, f.restype = args, res
            setattr(self, name, f)
        self.lib = lib
        self._op_names: dict[int, str] = {}
        self._type_names: dict[int, str] = {}

    def op_name(self, op: int) -> str:
        if op not in self._op_names:
            self._op_names[op] = (self.ggml_op_name(op) or b"?").decode()
        return self._op_names[op]

    def type_name(self, t: int) -> str:
        if t not in self._type_names:
            self._type_names[t] = (self.ggml_type_name(t) or b"?").decode()
        return self._type_names[t]


def check_layout(g: Ggml, struct: type[ctypes.Structure] = GgmlTensor) -> dict:
    """Verify ``struct`` (default GgmlTensor) against the running ggml; raise LlamaCppError naming what differs."""
    errs = []
    overhead = int(g.ggml_tensor_overhead())
    size = ctypes.sizeof(struct)
    if overhead != size + GGML_OBJECT_SIZE:
        errs.append(
            f"ggml_tensor_overhead() = {overhead}, expected sizeof(ggml_tensor) {size} + sizeof(ggml_object) "
            f"{GGML_OBJECT_SIZE}"
        )
    ctx = g.ggml_init(GgmlInitParams(1 << 16, None, False))
    if not ctx:
        raise LlamaCppError("ggml_init failed for the 64 KiB layout probe")
    try:
        a = g.ggml_new_tensor_2d(ctx, 0, 3, 5)  # F32 [3, 5]
        g.ggml_set_name(a, b"actdiff_probe")
        b = g.ggml_transpose(ctx, a)
        A = struct.from_address(a)
        B = struct.from_address(b)
        checks = {
            "type": (A.type, 0),
            "ne": (tuple(A.ne), (3, 5, 1, 1)),
            "nb": (tuple(A.nb), (4, 12, 60, 60)),
            "name": (A.name, b"actdiff_probe"),
            "name offset": (g.ggml_get_name(a), a + struct.name.offset),
            "data": (A.data, g.ggml_get_data(a)),
            "nbytes": (g.ggml_nbytes(a), 60),
            "n_dims": (g.ggml_n_dims(a), 2),
            "op": (g.op_name(B.op), "TRANSPOSE"),
            "op_desc": (g.ggml_op_desc(b), b"TRANSPOSE"),
            "src[0]": (B.src[0], a),
            "view_src": (B.view_src, a),
            "transposed ne": (tuple(B.ne), (5, 3, 1, 1)),
            "transposed nb": (tuple(B.nb)[:2], (12, 4)),
        }
        errs += [f"{k}: read {got!r}, expected {want!r}" for k, (got, want) in checks.items() if got != want]
    finally:
        g.ggml_free(ctx)
    if errs:
        raise LlamaCppError(
            f"{g.path}: struct ggml_tensor does not have the layout actdiff declares (built for llama-cpp-python "
            f"{PINNED_VERSION}): " + "; ".join(errs)
        )
    return {"tensor_size": size, "tensor_overhead": overhead}


_LIB_LOCK = threading.Lock()
_STATE: dict = {}


def _log_tail() -> deque:
    return _STATE.setdefault("log_tail", deque(maxlen=20))


def load_libraries() -> tuple[object, Ggml]:
    """Import llama_cpp (version-checked), bind ggml, check the struct layout, init the backend (once)."""
    with _LIB_LOCK:
        if "ggml" in _STATE:
            return _STATE["llama_cpp"], _STATE["ggml"]
        try:
            import llama_cpp
        except ImportError as e:
            from . import INSTALL

            raise LlamaCppError(f"llama_cpp is not importable ({e}); install it with: {INSTALL}") from None
        version = getattr(llama_cpp, "__version__", "?")
        if version != PINNED_VERSION:
            msg = (
                f"llama_cpp {version} is installed but actdiff's ggml struct layout and node names are for "
                f"{PINNED_VERSION}"
            )
            if os.environ.get(ALLOW_VERSION_ENV) != "1":
                raise LlamaCppError(f"{msg}; install {PINNED_VERSION} or set {ALLOW_VERSION_ENV}=1 to try anyway")
            log.warning("%s (%s=1: continuing; the layout check below still applies)", msg, ALLOW_VERSION_ENV)
        libdir = Path(llama_cpp.__file__).resolve().parent / "lib"
        cands = sorted(libdir.glob("libggml-base.*")) or sorted(libdir.glob("ggml-base.*"))
        if not cands:
            raise LlamaCppError(f"{libdir}: libggml-base not found next to llama_cpp's libllama")
        g = Ggml(cands[0])
        _STATE["layout"] = check_layout(g)
        _install_log_callback(llama_cpp)
        llama_cpp.llama_backend_init()
        _STATE["llama_cpp"], _STATE["ggml"] = llama_cpp, g
        return llama_cpp, g


def _install_log_callback(llama_cpp) -> None:
    # llama.cpp logs every load to stderr; route it to Python logging and keep the last lines for errors
    tail = _log_tail()
    # ggml_log_level: 1 DEBUG, 2 INFO (the chatty load report: kept at debug), 3 WARN, 4 ERROR, 5 CONT
    levels = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR, 5: logging.DEBUG}

    @llama_cpp.llama_log_callback
    def _cb(level, text, user_data):  # pragma: no cover - called from C
        try:
            s = text.decode("utf-8", errors="replace").rstrip("\n")
            if s:
                tail.append(s)
                ggml_log.log(levels.get(level, logging.DEBUG), "%s", s)
        except Exception:  # never let an exception cross into C
            pass

    _STATE["log_cb"] = _cb  # keep it alive as long as the library
    llama_cpp.llama_log_set(_cb, ctypes.c_void_p(0))


def _system_info() -> str:
    llama_cpp, _ = load_libraries()
    sysinfo = llama_cpp.llama_print_system_info()
    return sysinfo.decode(errors="replace").strip() if isinstance(sysinfo, bytes) else str(sysinfo)


def extra_buffer_types_enabled() -> bool:
    """Whether the runner lets ggml use its CPU "extra" buffer types (AMX tiles, repacked quant layouts).
    Off on a build with AMX_INT8: ggml's AMX matmul (llama-cpp-python 0.3.36) segfaults inside llama_encode on a
    q8_0 NomicBERT-MoE GGUF (measured on a Xeon with amx_int8, the tiny model's 128-wide layers), taking the
    whole job down with no error to report. Without them ggml runs the same quant types on its AVX-512/AVX2 dot
    products; which choice ran is in the dump's provenance (``llama_cpp_extra_bufts``)."""
    return "AMX_INT8 = 1" not in _system_info()


def library_info() -> dict:
    """Versions and build facts of the loaded llama.cpp (for dump attributes)."""
    llama_cpp, _ = load_libraries()
    return {
        "llama_cpp_python": getattr(llama_cpp, "__version__", "?"),
        "system_info": _system_info(),
        "extra_bufts": extra_buffer_types_enabled(),
        "ggml_tensor_layout": dict(_STATE.get("layout", {})),
    }


def _fail(what: str, status: int | None = None) -> LlamaCppError:
    tail = list(_log_tail())[-8:]
    st = f" (status {status})" if status is not None else ""
    return LlamaCppError(f"{what}{st}" + (f"; llama.cpp log: {' | '.join(tail)}" if tail else ""))


# --------------------------------------------------------------------------------------------- the runner
# names ggml gives by itself: "<src> (view)" etc., and "node_<n>" (position in the graph) for unnamed nodes
_AUTO_NAME = re.compile(r" \((view|permuted|transposed|reshaped|cont|copy|copy of .*)\)$|^node_\d+$|^leaf_\d+$")
_LAYER = re.compile(r"^(.*)-(\d+)$")
_NP_TYPES = {"f32": np.float32, "f16": np.float16, "i32": np.int32}
_NO_CAPTURE_NODES = ("result_embd_pooled", "embd_normalized")  # what forward returns with capture_nodes=False


class _Capture:
    """Per-forward state of the callback: labels by tensor address, requested nodes, copied arrays."""

    def __init__(self, wanted: set[str] | None):
        self.wanted = wanted
        self.labels: dict[int, list[str]] = {}  # tensor address -> its names (cb name, #n, structural)
        self.seen: dict[str, int] = {}  # name -> count in this graph (for #n suffixes)
        self.pending: dict[int, list[str]] = {}  # address -> names to copy at ask=False
        self.arrays: dict[str, np.ndarray] = {}
        self.meta: dict[str, dict] = {}
        self.error: BaseException | None = None


class LlamaCppRunner:
    """One GGUF model and context on the CPU; :meth:`forward` runs one prompt and returns its nodes.

    ``threads``: ggml threads (n_threads and n_threads_batch). Flash attention is disabled (its AUTO
    setting casts K and V to f16 for a cache-less encoder); pooling is the GGUF's ``pooling_type``, or mean
    when the GGUF has none (the converter writes it only when the model folder has sentence-transformers'
    modules.json; actdiff's graph pools by mean). Use as a context manager, or call :meth:`close`.

    ``capture_nodes=False`` (for timing, e.g. bench/engine.py): no eval callback is installed, so ggml runs
    the graph without calling into Python per node; :meth:`forward` then returns only
    ``result_embd_pooled`` ``[H]`` (from ``llama_get_embeddings_seq``) and ``embd_normalized``.

    ``n_seq_max`` > 1 (with ``capture_nodes=False``): :meth:`encode_batch` runs up to that many prompts as
    one llama_batch, llama.cpp's own way of batching: the sequences are packed one after another (no
    padding), each with its own seq_id and positions from 0, and the attention mask keeps them apart.
    ``n_ctx`` must then hold their total token count."""

    def __init__(
        self,
        gguf_path: str | Path,
        threads: int = 1,
        n_ctx: int | None = None,
        capture_nodes: bool = True,
        n_seq_max: int = 1,
    ):
        self.gguf_path = str(gguf_path)
        self.n_seq_max = int(n_seq_max)
        if self.n_seq_max > 1 and capture_nodes:
            raise ActdiffError("LlamaCppRunner: several sequences per batch (n_seq_max > 1) need capture_nodes=False")
        self.capture_nodes = bool(capture_nodes)
        if not Path(self.gguf_path).is_file():
            raise ModelError(f"{self.gguf_path}: GGUF file not found")
        self.threads = int(threads)
        self.lc, self.g = load_libraries()
        lc = self.lc
        self.model = None
        self.ctx = None
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = 0
        mparams.use_extra_bufts = extra_buffer_types_enabled()
        _log_tail().clear()
        self.model = lc.llama_model_load_from_file(self.gguf_path.encode(), mparams)
        if not self.model:
            raise _fail(f"{self.gguf_path}: llama_model_load_from_file failed")
        try:
            self.n_ctx_train = int(lc.llama_model_n_ctx_train(self.model))
            self.n_embd = int(lc.llama_model_n_embd(self.model))
            self.n_layer = int(lc.llama_model_n_layer(self.model))
            self.n_vocab = int(lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model)))
            self.header = read_gguf_header(self.gguf_path)
            if self.header.arch != "nomic-bert-moe":
                raise ModelError(
                    f"{self.gguf_path}: general.architecture is {self.header.arch!r}; this runner is for nomic-bert-moe"
                )
            self.pooling_from_gguf = self.header.get(".pooling_type") is not None
            self.n_ctx = int(n_ctx or self.n_ctx_train)
            cparams = lc.llama_context_default_params()
            cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = self.n_ctx  # an encoder needs one ubatch
            cparams.n_seq_max = self.n_seq_max  # > 1: encode_batch packs that many prompts into one ubatch
            cparams.n_threads = cparams.n_threads_batch = self.threads
            cparams.embeddings = True
            cparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED
            cparams.pooling_type = LLAMA_POOLING_TYPE_UNSPECIFIED if self.pooling_from_gguf else LLAMA_POOLING_TYPE_MEAN
            cparams.no_perf = True
            if self.capture_nodes:  # capture_nodes=False: cb_eval stays NULL (the default), see _pooled_only
                self._cb = lc.ggml_backend_sched_eval_callback(self._callback)  # referenced for the context's life
                cparams.cb_eval = self._cb
                cparams.cb_eval_user_data = None
            self._cap: _Capture | None = None
            self.ctx = lc.llama_init_from_model(self.model, cparams)
            if not self.ctx:
                raise _fail(f"{self.gguf_path}: llama_init_from_model failed")
            self.pooling = POOLING_NAMES.get(int(lc.llama_pooling_type(self.ctx)), "?")
            if self.pooling != "mean":
                raise ModelError(f"{self.gguf_path}: pooling type {self.pooling!r}; actdiff's graph pools by mean")
            self.rope_type = ROPE_TYPE_NAMES.get(int(lc.llama_model_rope_type(self.model)), "?")
            self._ranks: dict[str, int] = {}
            if self.capture_nodes:
                warm = self.forward([0, 0, 0], _learn_ranks=True)  # learns ranks; also proves the graph runs
                self.node_names = list(warm)
            else:
                self.forward([0, 0, 0])  # proves the graph runs
                self.node_names = list(_NO_CAPTURE_NODES)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ callback
    def _callback(self, t: int, ask: bool, user_data) -> bool:
        cap = self._cap
        if cap is None:
            return False
        try:
            if ask:
                return self._classify(cap, t)
            names = cap.pending.pop(t, None)
            if names:
                arr = self._read(t)
                for n in names:
                    cap.arrays[n] = arr
            return True
        except BaseException as e:  # never let an exception cross into C; re-raised after llama_encode
            if cap.error is None:
                cap.error = e
            return False

    def _srcs(self, T: GgmlTensor) -> list[int]:
        return [s for s in T.src if s]

    def _label(self, cap: _Capture, addr: int | None) -> list[str]:
        return cap.labels.get(addr, []) if addr else []

    def _through_get_rows(self, cap: _Capture, addr: int) -> list[str]:
        # the last layer selects output rows with GET_ROWS before the residual add
        T = GgmlTensor.from_address(addr)
        labels = list(self._label(cap, addr))
        if self.g.op_name(T.op) == "GET_ROWS" and T.src[0]:
            labels += self._label(cap, T.src[0])
        return labels

    def _classify(self, cap: _Capture, addr: int) -> bool:
        g = self.g
        T = GgmlTensor.from_address(addr)
        raw = T.name.decode(errors="replace")
        op = g.op_name(T.op)
        names: list[str] = []
        if raw and not _AUTO_NAME.search(raw):
            names.append(self._disambiguate(cap, T, raw, op))
        if op == "ADD":
            names += self._structural_add(cap, T)
        if not names:
            return False
        cap.labels[addr] = names
        take = names if cap.wanted is None else [n for n in names if n in cap.wanted]
        if take:
            cap.pending[addr] = take
            for n in take:
                cap.meta[n] = {"op": op, "type": g.type_name(T.type), "ne": tuple(T.ne)}
            return True
        return False

    def _disambiguate(self, cap: _Capture, T: GgmlTensor, raw: str, op: str) -> str:
        """The name of a tensor llama.cpp named ``raw``; names it gives to several tensors of one graph are
        told apart by op and sources (never by position), see the module docstring."""
        m = _LAYER.match(raw)
        base, il = (m.group(1), m.group(2)) if m else (raw, None)
        if base == "kqv_out" and self._is_out_proj(cap, T, raw):
            return f"attn_out-{il}"
        if base in ("Qcur", "Kcur") and op == "VIEW":
            # the fused-QKV path names the views of wqkv "Qcur"/"Kcur" too, and the RoPE outputs again: the
            # plain name is the rotated tensor attention reads, "#view" the view before RoPE
            return f"{raw}#view"
        if base in ("norm", "norm_w"):
            # build_norm names its NORM and MUL "norm"/"norm_w" for every LayerNorm of the layer: qualify
            # each by the tensor it normalises
            src_labels = self._label(cap, T.src[0]) if T.src[0] else []
            for lab in src_labels:
                lm = _LAYER.match(lab.split("#")[0])
                which = {"attn_residual": "attn_output_norm", "ffn_residual": "layer_output_norm"}.get(
                    lm.group(1) if lm else lab
                )
                if lab == "inp_embd":
                    which = "token_embd_norm"
                if which is None and "#" in lab:
                    which = lab.split("#", 1)[1]  # norm_w inherits its NORM's qualifier
                if which:
                    return f"{raw}#{which}"
        k = cap.seen.get(raw, 0) + 1  # fallback for names actdiff does not map: order of appearance
        cap.seen[raw] = k
        return raw if k == 1 else f"{raw}#{k}"

    def _is_out_proj(self, cap: _Capture, T: GgmlTensor, raw: str) -> bool:
        # llama.cpp names both the attention context and wo(context)+wo_b "kqv_out-il": the projection is the one
        # that reads (through its MUL_MAT) a tensor already labelled with that name
        for s in self._srcs(T):
            if raw in self._label(cap, s):
                return True
            S = GgmlTensor.from_address(s)
            if self.g.op_name(S.op) == "MUL_MAT" and any(raw in self._label(cap, ss) for ss in self._srcs(S)):
                return True
        return False

    def _structural_add(self, cap: _Capture, T: GgmlTensor) -> list[str]:
        srcs = self._srcs(T)
        if len(srcs) != 2:
            return []
        a, b = (self._through_get_rows(cap, s) for s in srcs)
        both = a + b
        for n in both:
            m = _LAYER.match(n)
            if m and m.group(1) == "attn_out":
                return [f"attn_residual-{m.group(2)}"]
        for n in both:
            m = _LAYER.match(n)
            if m and m.group(1) == "ffn_inp":
                i = m.group(2)
                if f"ffn_out-{i}" in both or f"ffn_moe_out-{i}" in both:
                    return [f"ffn_residual-{i}"]
        # layer-output norm: ADD(MUL(NORM(ffn_residual-i), w), b)
        S0 = GgmlTensor.from_address(srcs[0])
        if self.g.op_name(S0.op) == "MUL" and S0.src[0]:
            N = GgmlTensor.from_address(S0.src[0])
            if self.g.op_name(N.op) == "NORM" and N.src[0]:
                for n in self._label(cap, N.src[0]):
                    m = _LAYER.match(n)
                    if m and m.group(1) == "ffn_residual":
                        return [f"l_out-{m.group(2)}"]
        return []

    def _read(self, addr: int) -> np.ndarray:
        g = self.g
        T = GgmlTensor.from_address(addr)
        tname = g.type_name(T.type)
        if tname not in _NP_TYPES:
            raise LlamaCppError(f"node {T.name.decode()!r}: ggml type {tname} is not readable here")
        if not T.buffer or not T.data:
            raise LlamaCppError(f"node {T.name.decode()!r}: no data buffer at evaluation time")
        dtype = np.dtype(_NP_TYPES[tname])
        nbytes = int(g.ggml_nbytes(addr))  # span of the (possibly strided) view
        raw = np.empty(nbytes, dtype=np.uint8)
        g.ggml_backend_tensor_get(addr, raw.ctypes.data, 0, nbytes)
        ne = tuple(int(x) for x in T.ne)
        nb = tuple(int(x) for x in T.nb)
        if nb[0] != dtype.itemsize:
            raise LlamaCppError(f"node {T.name.decode()!r}: element stride {nb[0]} != {dtype.itemsize}")
        if not all(ne):
            return np.zeros(ne[::-1], dtype)
        need = sum((n - 1) * s for n, s in zip(ne, nb, strict=True)) + dtype.itemsize
        if need > nbytes:
            raise LlamaCppError(f"node {T.name.decode()!r}: strides need {need} bytes, ggml_nbytes says {nbytes}")
        base = raw[: need - need % dtype.itemsize].view(dtype)
        return np.lib.stride_tricks.as_strided(base, shape=ne[::-1], strides=nb[::-1]).copy()

    # ------------------------------------------------------------------ forward
    def forward(self, ids: Iterable[int], nodes: Iterable[str] | None = None, _learn_ranks: bool = False) -> dict:
        """Run one prompt; return node name -> numpy array ([T, ...], see the module docstring).

        ``nodes``: only these names are copied (None: every named and structural node). Raises
        LlamaCppError for llama.cpp failures and re-raises any error from inside the callback."""
        if self.ctx is None:
            raise LlamaCppError(f"{self.gguf_path}: runner is closed")
        lc = self.lc
        ids = [int(i) for i in ids]
        n = len(ids)
        if n == 0:
            raise ActdiffError("llama.cpp forward: empty token list")
        if n > self.n_ctx:
            raise ActdiffError(f"llama.cpp forward: {n} tokens exceed the context of {self.n_ctx} ({self.gguf_path})")
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ActdiffError(f"llama.cpp forward: token id(s) {bad[:5]} outside the vocabulary of {self.n_vocab}")
        asked = None if nodes is None else set(nodes)
        if not self.capture_nodes and asked is not None and asked - set(_NO_CAPTURE_NODES):
            raise ActdiffError(
                f"llama.cpp forward: runner made with capture_nodes=False has only {list(_NO_CAPTURE_NODES)}; "
                f"asked for {sorted(asked - set(_NO_CAPTURE_NODES))[:5]}"
            )
        wanted = None if asked is None else asked | ({"result_embd_pooled"} if "embd_normalized" in asked else set())
        cap = _Capture(wanted)
        batch = lc.llama_batch_init(n, 0, 1)
        try:
            batch.n_tokens = n
            for i, tok in enumerate(ids):
                batch.token[i] = tok
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            self._cap = cap
            status = int(lc.llama_encode(self.ctx, batch))
        finally:
            self._cap = None
            lc.llama_batch_free(batch)
        if cap.error is not None:
            raise cap.error
        if status != 0:
            raise _fail(f"{self.gguf_path}: llama_encode failed on {n} tokens", status)
        if not self.capture_nodes:
            return self._pooled_only(asked)
        out = cap.arrays
        if "result_embd_pooled" in out:
            # what llama_get_embeddings_seq returns must be the pooled graph node (sanity of the capture)
            ptr = lc.llama_get_embeddings_seq(self.ctx, 0)
            if ptr:
                api = np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).copy()
                if not np.array_equal(api, out["result_embd_pooled"].reshape(-1)):
                    raise LlamaCppError("captured result_embd_pooled differs from llama_get_embeddings_seq")
            out["embd_normalized"] = _embd_normalize(out["result_embd_pooled"])
        if "result_embd" in out:
            out.setdefault(f"l_out-{self.n_layer - 1}", out["result_embd"])
        if _learn_ranks:
            self._ranks = {k: _rank_of(cap, k, v) for k, v in out.items()}
        return {k: self._shape(k, v) for k, v in out.items() if asked is None or k in asked}

    def encode_batch(self, batch_ids: list[list[int]]) -> np.ndarray:
        """Pooled embeddings ``[B, H]`` of several prompts run as one packed llama_batch (``n_seq_max`` >= B)."""
        if self.ctx is None:
            raise LlamaCppError(f"{self.gguf_path}: runner is closed")
        seqs = [[int(i) for i in ids] for ids in batch_ids]
        total = sum(len(s) for s in seqs)
        if not seqs or min(len(s) for s in seqs) == 0:
            raise ActdiffError("llama.cpp encode_batch: needs one or more non-empty token lists")
        if len(seqs) > self.n_seq_max or total > self.n_ctx:
            raise ActdiffError(
                f"llama.cpp encode_batch: {len(seqs)} prompts / {total} tokens exceed the runner's n_seq_max "
                f"{self.n_seq_max} / n_ctx {self.n_ctx} ({self.gguf_path})"
            )
        lc = self.lc
        batch = lc.llama_batch_init(total, 0, 1)
        try:
            batch.n_tokens = total
            i = 0
            for seq, ids in enumerate(seqs):
                for pos, tok in enumerate(ids):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, 1
                    batch.seq_id[i][0] = seq
                    i += 1
            status = int(lc.llama_encode(self.ctx, batch))
        finally:
            lc.llama_batch_free(batch)
        if status != 0:
            raise _fail(f"{self.gguf_path}: llama_encode failed on {len(seqs)} prompts, {total} tokens", status)
        return np.stack([self._pooled_of(seq) for seq in range(len(seqs))])

    # ------------------------------------------------------------------ no node capture (capture_nodes=False)
    def _pooled_of(self, seq: int) -> np.ndarray:
        ptr = self.lc.llama_get_embeddings_seq(self.ctx, seq)
        if not ptr:
            raise _fail(f"{self.gguf_path}: llama_get_embeddings_seq({seq}) returned NULL")
        return np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).copy()

    def _pooled_only(self, asked: set[str] | None) -> dict:
        pooled = self._pooled_of(0)
        out = {"result_embd_pooled": pooled, "embd_normalized": _embd_normalize(pooled)}
        return {k: v for k, v in out.items() if asked is None or k in asked}

    def _shape(self, name: str, a: np.ndarray) -> np.ndarray:
        # ggml arrays come out 4-D [ne3, ne2, ne1, ne0]; keep the node's rank learned at warm-up
        r = self._ranks.get(name)
        if r is None:
            r = max(1, a.ndim - next((i for i, d in enumerate(a.shape) if d != 1), a.ndim))
        return a.reshape(a.shape[a.ndim - r :]) if r < a.ndim else a

    def close(self) -> None:
        lc = getattr(self, "lc", None)
        if lc is None:
            return
        if getattr(self, "ctx", None):
            lc.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            lc.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> LlamaCppRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ understood config
    def understood_config(self) -> dict:
        """Config values as llama.cpp applies them (GGUF metadata read exactly, plus what the graph builder
        hard-codes), in the key vocabulary of actdiff's Engine.understood_config."""
        h = self.header
        heads = h.get(".attention.head_count")
        ftype = {0: "fp32", 1: "fp16", 7: "q8_0"}.get(h.get("general.file_type"), h.get("general.file_type"))
        return {
            "arch": "nomic_bert_moe" if h.arch == "nomic-bert-moe" else h.arch,
            "hidden": self.n_embd,
            "heads": heads,
            "head_dim": self.n_embd // heads if heads else None,
            "layers": self.n_layer,
            "inner": h.get(".feed_forward_length"),
            "experts": h.get(".expert_count"),
            "top_k": h.get(".expert_used_count"),
            "moe_every_n_layers": h.get(".moe_every_n_layers"),
            "layer_norm_eps": _f32_round(h.get(".attention.layer_norm_epsilon")),
            "rotary_base": _f32_round(h.get(".rope.freq_base")),
            "rotary_interleaved": {"neox": False, "norm": True}.get(self.rope_type),
            # ggml_gelu is the tanh form (looked up in an fp16 table on CPU), never erf
            "activation": "gelu_tanh",
            "attention": "causal" if h.get(".attention.causal", True) else "bidirectional",
            # nomic-bert-moe passes norm_w=false to build_moe_ffn
            "topk_renormalize": False,
            # the graph has no expert bias (the converter drops mlp.experts.bias)
            "expert_bias": any("exps.bias" in t.name for t in h.tensors),
            "rotary_scaling": None,  # llama.cpp's nomic-bert-moe graph rotates with one fixed base
            "linear_biases": {
                "qkv_proj_bias": any(t.name.endswith("attn_qkv.bias") for t in h.tensors),
                "mlp_fc1_bias": any(t.name.endswith("ffn_up.bias") for t in h.tensors),
                "mlp_fc2_bias": any(t.name.endswith("ffn_down.bias") for t in h.tensors),
            },
            "precision": ftype,
            "pooling": self.pooling + ("" if self.pooling_from_gguf else " (context setting; the GGUF has none)"),
            "context_length": self.n_ctx_train,
        }


def _f32_round(x: float | None) -> float | None:
    # GGUF floats are float32: report the shortest decimal that is the same float32 (1e-05, not 9.99e-06)
    if x is None:
        return None
    f = np.float32(x)
    for digits in range(1, 10):
        y = float(f"{float(f):.{digits}g}")
        if np.float32(y) == f:
            return y
    return float(f)


def _rank_of(cap: _Capture, name: str, a: np.ndarray) -> int:
    ne = cap.meta.get(name, {}).get("ne")
    if ne is None:  # derived (embd_normalized) or alias: rank of the array it comes from
        return max(1, a.ndim - next((i for i, d in enumerate(a.shape) if d != 1), a.ndim))
    n = GGML_MAX_DIMS
    while n > 1 and ne[n - 1] == 1:
        n -= 1
    return n


def _embd_normalize(pooled: np.ndarray) -> np.ndarray:
    """llama.cpp common_embd_normalize(embd_norm=2): sum of squares in double, scale by float(1/sqrt(sum))."""
    x = np.asarray(pooled, dtype=np.float32)
    flat = x.reshape(-1)
    s = math.sqrt(float(np.sum(flat.astype(np.float64) ** 2)))
    norm = np.float32(1.0 / s) if s > 0 else np.float32(0.0)
    return (x * norm).astype(np.float32)

"""Python wrappers for the C kernels (see kernels_c/include/actdiff_kernels.h)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from ._loader import ffi, lib

ISA_NAMES = {"scalar": 0, "avx2": 1, "avx512": 2}
_ISA_BY_ID = {v: k for k, v in ISA_NAMES.items()}
_DTYPE_CODES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(np.uint16): 2, np.dtype(np.int8): 3}
_GELU = {"none": 0, "tanh": 1}
_INT_MAX = 2**31 - 1


class KernelError(RuntimeError):
    """A C kernel returned a non-zero status code."""

    def __init__(self, op: str, status: int):
        self.op = op
        self.status = int(status)
        self.status_string = ffi.string(lib.ak_status_string(status)).decode()
        super().__init__(f"{op}: kernel failed with status {self.status} ({self.status_string})")


def _call(op: str, status: int) -> None:
    if status != 0:
        raise KernelError(op, status)


# ---------------------------------------------------------------- validation helpers
def _arr(name: str, x, dtypes, ndim=None, shape=None) -> np.ndarray:
    """Check x is a C-contiguous ndarray with an allowed dtype / ndim / shape (None = any dim)."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if isinstance(dtypes, (type, np.dtype)):
        dtypes = (dtypes,)
    allowed = tuple(np.dtype(d) for d in dtypes)
    if x.dtype not in allowed:
        raise TypeError(f"{name} must have dtype {' or '.join(str(d) for d in allowed)}, got {x.dtype}")
    if ndim is not None and x.ndim not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {x.shape}")
    if shape is not None:
        if len(shape) != x.ndim or any(s is not None and s != d for s, d in zip(shape, x.shape, strict=True)):
            want = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {x.shape}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
    if any(d > _INT_MAX for d in x.shape):
        raise ValueError(f"{name}: dimension too large for the kernel library")
    return x


def _is(x, dtype, ndim: int | None = None) -> bool:
    """The quick form of :func:`_arr`'s checks for a per-node hot path (which then calls _arr only for the error):
    a C-contiguous ndarray of ``dtype`` (and ``ndim`` dimensions unless None)."""
    return type(x) is np.ndarray and x.dtype == dtype and (ndim is None or x.ndim == ndim) and x.flags.c_contiguous


def _out(name: str, out, shape, inputs=(), dtype=np.float32) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=dtype)
    _arr(name, out, dtype, shape=tuple(shape))
    if not out.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    for iname, a in inputs:
        if a is not None and np.may_share_memory(out, a):
            raise ValueError(f"{name} must not overlap {iname}")
    return out


def _p(x, ctype="float *"):
    if x is None:
        return ffi.NULL
    return ffi.cast(ctype, ffi.from_buffer(x))


def _float(name: str, v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {v!r}") from None
    return f


# ---------------------------------------------------------------- runtime configuration
def set_num_threads(n: int) -> None:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if not 1 <= n <= 64:
        raise ValueError(f"n must be in [1, 64], got {n}")
    _call("set_num_threads", lib.ak_set_num_threads(int(n)))


def get_num_threads() -> int:
    return int(lib.ak_get_num_threads())


def cpu_supports(isa: str) -> bool:
    if isa not in ISA_NAMES:
        raise ValueError(f"isa must be one of {sorted(ISA_NAMES)}, got {isa!r}")
    return bool(lib.ak_cpu_supports_isa(ISA_NAMES[isa]))


ISA_ENV = "ACTDIFF_KERNELS_ISA"


def supported_isas() -> list[str]:
    """The instruction-set paths this CPU can run, slowest first (scalar is always there)."""
    return [name for name in ISA_NAMES if cpu_supports(name)]


def forced_isa() -> str | None:
    """The path ACTDIFF_KERNELS_ISA forces, None when unset. An unknown name, or a path this CPU cannot run,
    is an error: the C dispatcher would fall back to another path and a forced test run would prove nothing."""
    want = os.environ.get(ISA_ENV, "")
    if not want:
        return None
    if want not in ISA_NAMES:
        raise ValueError(f"{ISA_ENV}={want!r} is not a kernel path: use one of {list(ISA_NAMES)}, or unset it")
    if not cpu_supports(want):
        raise ValueError(
            f"{ISA_ENV}={want} cannot be honoured: this CPU lacks {want} (it runs {supported_isas()}); "
            f"unset {ISA_ENV} or pick one of those"
        )
    return want


def set_isa(isa: str) -> None:
    """Force an instruction-set path ('scalar', 'avx2', 'avx512') or 'auto' (the one ACTDIFF_KERNELS_ISA
    names, else the best the CPU supports)."""
    if isa == "auto":
        _call("set_isa", lib.ak_set_isa(-1))
        return
    if isa not in ISA_NAMES:
        raise ValueError(f"isa must be 'auto' or one of {sorted(ISA_NAMES)}, got {isa!r}")
    _call("set_isa", lib.ak_set_isa(ISA_NAMES[isa]))


def get_isa() -> str:
    return _ISA_BY_ID[int(lib.ak_get_isa())]


def call_counts() -> dict[str, int]:
    """{op_name: number of calls} since load or the last reset_call_counts()."""
    n = int(lib.ak_num_ops())
    buf = ffi.new("uint64_t[]", n)
    _call("call_counts", lib.ak_get_call_counts(buf, n))
    return {ffi.string(lib.ak_op_name(i)).decode(): int(buf[i]) for i in range(n)}


def reset_call_counts() -> None:
    lib.ak_reset_call_counts()


# ---------------------------------------------------------------- fp32 weights packed once
PACKED_LAYOUTS = {lib.AK_DTYPE_F32_PACKED: "rows of 32 columns", lib.AK_DTYPE_F32_PACKED16: "rows of 16 columns"}


def _layout_code(layout) -> int:
    """``layout`` as the C dtype code of a packed layout, or ValueError (an integer of ``PACKED_LAYOUTS``, not a
    bool, a float or a string that would compare equal to one)."""
    if isinstance(layout, bool) or not isinstance(layout, int | np.integer) or layout not in PACKED_LAYOUTS:
        raise ValueError(f"layout must be a code of PACKED_LAYOUTS {PACKED_LAYOUTS} (None: the path's), got {layout!r}")
    return int(layout)


class PackedF32:
    """An fp32 weight packed once (at load) for the C matmul core: ``ak_pack_weight_f32``'s 32-column
    panels, read in place by every ISA path, so no kernel call re-packs it. Matmuls on it are
    bit-identical to the same calls on the original array (the values are copied exactly).

    ``layout`` is the C dtype code of the panels' layout (``PACKED_LAYOUTS``): rows of 32 columns, what
    the AVX-512 kernel reads fastest, or of 16, the AVX2 kernel's; every path reads both.

    ``shape`` is the original array's shape: (OC, C) for a linear weight (``trans``: stored (N, K),
    the product reads it transposed) or (E, F, H) for expert weights, each expert's block packed on its
    own (w1: ``trans``, w2: not). ``data`` holds the panels, one row per expert for 3-D weights, so
    indexing ``data`` by experts (``take``) re-orders whole experts. ``unpack()`` gives the original back.
    """

    dtype = np.dtype(np.float32)  # the values it stands for

    def __init__(self, data: np.ndarray, shape: tuple[int, ...], trans: bool, layout: int):
        self.data, self.shape, self.trans = data, tuple(int(d) for d in shape), bool(trans)
        self.layout = _layout_code(layout)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def _kn(self) -> tuple[int, int]:
        rows, cols = self.shape[-2:]
        return (cols, rows) if self.trans else (rows, cols)

    def __repr__(self) -> str:
        return f"PackedF32(shape={self.shape}, trans={self.trans}, layout={PACKED_LAYOUTS[self.layout]!r})"

    def unpack(self) -> np.ndarray:
        """A new float32 array with the original layout and values."""
        K, N = self._kn()
        blocks = self.data.reshape(-1, self.data.shape[-1])
        out = np.empty((blocks.shape[0],) + self.shape[-2:], np.float32)
        for e in range(blocks.shape[0]):
            status = lib.ak_unpack_weight_f32(_p(out[e]), _p(blocks[e]), K, N, int(self.trans), self.layout)
            _call("unpack_weight_f32", status)
        return out.reshape(self.shape)

    def take(self, experts) -> PackedF32:
        """The 3-D weight with expert e taken from expert ``experts[e]`` (a permutation, a roll, ...)."""
        if self.ndim != 3:
            raise ValueError(f"take() re-orders experts of a 3-D weight, this one has shape {self.shape}")
        data = np.ascontiguousarray(self.data[np.asarray(experts)])
        return PackedF32(data, (data.shape[0],) + self.shape[1:], self.trans, self.layout)


def _aligned_empty(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """Uninitialised buffer whose first element is 64-byte aligned (one cache line, one AVX-512 load)."""
    n, size = int(np.prod(shape, dtype=np.int64)), np.dtype(dtype).itemsize
    raw = np.empty(n + 64 // size, dtype)
    skip = (-raw.ctypes.data % 64) // size
    return raw[skip : skip + n].reshape(shape)


def pack_f32(w, *, trans: bool = True, layout: int | None = None) -> PackedF32:
    """Pack a float32 weight once for the matmul core. w (OC, C) linear weight: ``trans=True``;
    (E, F, H) experts: each (F, H) block packed, ``trans=True`` for w1 (read transposed, x @ w1[e]^T),
    ``trans=False`` for w2 (x @ w2[e]). ``layout``: a ``PACKED_LAYOUTS`` code, by default the one the
    ISA path in use now reads fastest (``ak_packed_layout``)."""
    _arr("w", w, np.float32, ndim=(2, 3))
    layout = _layout_code(lib.ak_packed_layout() if layout is None else layout)
    rows, cols = w.shape[-2:]
    K, N = (cols, rows) if trans else (rows, cols)
    per = int(lib.ak_packed_size(K, N))
    blocks = w.reshape(-1, rows, cols)
    data = _aligned_empty((blocks.shape[0], per))
    for e in range(blocks.shape[0]):
        _call("pack_weight_f32", lib.ak_pack_weight_f32(_p(data[e]), _p(blocks[e]), K, N, int(bool(trans)), layout))
    return PackedF32(data if w.ndim == 3 else data[0], w.shape, trans, layout)


def _weight(name: str, w, ndim: int, trans: bool):
    """(the buffer to hand to C, dtype code, shape) of a weight argument: an ndarray of a storage dtype or a
    PackedF32 packed with the orientation this op reads (``trans``)."""
    if isinstance(w, PackedF32):
        if w.ndim != ndim:
            raise ValueError(f"{name} must be {ndim}-dimensional, got a packed weight of shape {w.shape}")
        if w.trans != trans:
            raise ValueError(f"{name} was packed with trans={w.trans}; this op reads it with trans={trans}")
        return w.data, w.layout, w.shape
    _arr(name, w, tuple(_DTYPE_CODES), ndim=ndim)
    return w, _DTYPE_CODES[w.dtype], w.shape


# ---------------------------------------------------------------- dtype helpers
def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 storage (uint16) with round-to-nearest-even; NaN stays a (quiet) NaN.

    In uint32, in place on one temporary: bits + 0x7FFF + (bit 16) cannot wrap for any non-NaN pattern (the
    largest, -inf's 0xFF800000, stays under 2**32), and NaN patterns are rewritten after. The earlier uint64
    version allocated three arrays of twice the size: loading a bf16 engine's 30522 x 384 embedding table
    took 1.7 s in a fresh process, nearly all of it page faults of those arrays (0.02 s now)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    b = x.view(np.uint32)
    r = b >> 16
    r &= 1
    r += 0x7FFF
    r += b
    r >>= 16
    out = r.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((b[nan] >> 16) | 0x40).astype(np.uint16)
    return out


def bf16_to_f32(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.uint16)
    return (x.astype(np.uint32) << 16).view(np.float32)


def quantize_int8(w: np.ndarray, axis: int = -1):
    """Symmetric int8 quantisation per output channel: w ~= q * scale[..., None].

    Reduces over ``axis`` (the input dimension); returns (q int8, scales float32)."""
    w = np.asarray(w, dtype=np.float32)
    amax = np.max(np.abs(w), axis=axis, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, np.ascontiguousarray(np.squeeze(scale, axis=axis))


# ---------------------------------------------------------------- ops
def _matmul(fn, opname, inp, weight, bias, scales, out):
    _arr("inp", inp, np.float32)
    if inp.ndim < 1:
        raise ValueError("inp must have at least 1 dimension")
    wbuf, dt, (OC, C) = _weight("weight", weight, 2, trans=True)
    if inp.shape[-1] != C:
        raise ValueError(f"inp last dimension {inp.shape[-1]} does not match weight (OC={OC}, C={C})")
    T = int(np.prod(inp.shape[:-1], dtype=np.int64))
    if T > _INT_MAX:
        raise ValueError("inp has too many rows")
    if bias is not None:
        _arr("bias", bias, np.float32, shape=(OC,))
    if dt == 3:
        if scales is None:
            raise ValueError("scales is required for an int8 weight")
        _arr("scales", scales, np.float32, shape=(OC,))
    elif scales is not None:
        raise ValueError("scales is only used with an int8 weight")
    out = _out("out", out, inp.shape[:-1] + (OC,), [("inp", inp), ("weight", wbuf), ("bias", bias)])
    _call(opname, fn(_p(out), _p(inp), _p(wbuf, "void *"), _p(scales), _p(bias), T, C, OC, dt))
    return out


def matmul(inp, weight, bias=None, *, scales=None, out=None):
    """out (..., OC) = inp (..., C) @ weight(OC, C)^T + bias (OC).

    weight dtype selects the kernel: float32, float16, uint16 (bf16 storage, see f32_to_bf16),
    or int8 with ``scales`` (OC,) float32 (w = q * scale per output channel); or a PackedF32
    (``pack_f32(weight)``), bit-identical to its float32 original without re-packing per call."""
    return _matmul(lib.ak_matmul, "matmul", inp, weight, bias, scales, out)


def matmul_naive(inp, weight, bias=None, *, scales=None, out=None):
    """Reference triple loop with the same per-element arithmetic as matmul."""
    return _matmul(lib.ak_matmul_naive, "matmul_naive", inp, weight, bias, scales, out)


class PackedF64:
    """A float64 weight packed once for :func:`matmul_f64` (``ak_pack_weight_f64``'s runs of 8 columns, read in
    place by every ISA path). ``shape``: the original array's, (N, K) when ``trans`` (an nn.Linear weight, the
    product reads it transposed), else (K, N), or (E, ...) of those for expert weights, each expert packed on its
    own (:meth:`block`); ``data``: the panels, one row per expert for a 3-D weight."""

    dtype = np.dtype(np.float64)  # the values it stands for

    def __init__(self, data: np.ndarray, shape: tuple[int, ...], trans: bool):
        self.data, self.shape, self.trans = data, tuple(int(d) for d in shape), bool(trans)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def kn(self) -> tuple[int, int]:
        """(K, N): the product's depth and its output columns."""
        rows, cols = self.shape[-2:]
        return (cols, rows) if self.trans else (rows, cols)

    def block(self, e: int) -> PackedF64:
        """Expert ``e``'s weight of a 3-D one (no copy)."""
        if len(self.shape) != 3:
            raise ValueError(f"block() takes an expert of a 3-D weight, this one has shape {self.shape}")
        return PackedF64(self.data[e], self.shape[1:], self.trans)

    def __repr__(self) -> str:
        return f"PackedF64(shape={self.shape}, trans={self.trans})"


def pack_f64(w, *, trans: bool = True) -> PackedF64:
    """Pack a float64 weight once for :func:`matmul_f64`: (N, K) with ``trans=True`` (x @ w^T), (K, N) with
    ``trans=False`` (x @ w); (E, ., .) expert weights each block on its own. The values are copied exactly; a
    float32 weight is widened as it is packed (ak_pack_weight_f64_of_f32: the packed bits of its float64 copy,
    without the copy)."""
    _arr("w", w, (np.float64, np.float32), ndim=(2, 3))
    rows, cols = w.shape[-2:]
    K, N = (cols, rows) if trans else (rows, cols)
    blocks = w.reshape(w.shape[0] if w.ndim == 3 else 1, rows, cols)
    data = _aligned_empty((blocks.shape[0], int(lib.ak_packed64_size(K, N))), np.float64)
    of_f32 = w.dtype == np.float32
    fn, ctype = (lib.ak_pack_weight_f64_of_f32, "float *") if of_f32 else (lib.ak_pack_weight_f64, "double *")
    for e, block in enumerate(blocks):
        _call("pack_weight_f64", fn(_p(data[e], "double *"), _p(block, ctype), K, N, int(bool(trans))))
    return PackedF64(data if w.ndim == 3 else data[0], w.shape, trans)


def matmul_f64(inp, weight, *, out=None) -> np.ndarray:
    """out (..., N) = inp (..., K) @ weight^T, float64: each element the double fma chain over k in order from 0,
    no bias (the same bits on every ISA path, thread count and number of rows). ``weight``: a 2-D PackedF64
    (:func:`pack_f64`, for a weight used again) or the (N, K) float64 weight itself, its blocks packed per call
    (for a weight used once): the same bits either way."""
    if isinstance(weight, PackedF64):
        if len(weight.shape) != 2:
            raise ValueError(f"weight must be a 2-D packed weight (an expert's: .block(e)), got shape {weight.shape}")
        K, N = weight.kn
        return _matmul_f64(lib.ak_matmul_f64_packed, "matmul_f64", inp, weight.data, K, N, out)
    if not isinstance(weight, np.ndarray):
        raise TypeError(f"weight must be a PackedF64 (pack_f64(w)) or an (N, K) ndarray, got {type(weight).__name__}")
    _arr("weight", weight, np.float64, ndim=2)
    return _matmul_f64(lib.ak_matmul_f64, "matmul_f64", inp, weight, weight.shape[1], weight.shape[0], out)


def matmul_f64_naive(inp, w, *, out=None) -> np.ndarray:
    """:func:`matmul_f64`'s arithmetic in plain loops on the unpacked (N, K) float64 weight ``w``."""
    _arr("w", w, np.float64, ndim=2)
    return _matmul_f64(lib.ak_matmul_f64_naive, "matmul_f64_naive", inp, w, w.shape[1], w.shape[0], out)


def _matmul_f64(fn, opname: str, inp, wbuf: np.ndarray, K: int, N: int, out) -> np.ndarray:
    _arr("inp", inp, np.float64)
    if inp.ndim < 1 or inp.shape[-1] != K:
        raise ValueError(f"inp must have a last dimension of {K} (the weight's K), got shape {inp.shape}")
    T = int(np.prod(inp.shape[:-1], dtype=np.int64))
    if T > _INT_MAX:
        raise ValueError("inp has too many rows")
    out = _out("out", out, inp.shape[:-1] + (N,), [("inp", inp), ("weight", wbuf)], dtype=np.float64)
    _call(opname, fn(_p(out, "double *"), _p(inp, "double *"), _p(wbuf, "double *"), T, K, N))
    return out


def _rows(name, x):
    _arr(name, x, np.float32)
    if x.ndim < 1:
        raise ValueError(f"{name} must have at least 1 dimension")
    C = x.shape[-1]
    T = int(np.prod(x.shape[:-1], dtype=np.int64))
    return T, C


def layernorm(x, weight=None, bias=None, eps: float = 1e-5, *, out=None):
    """LayerNorm over the last axis (biased variance); weight/bias (C,) or None."""
    T, C = _rows("x", x)
    if C == 0:
        raise ValueError("x last dimension must be > 0")
    if weight is not None:
        _arr("weight", weight, np.float32, shape=(C,))
    if bias is not None:
        _arr("bias", bias, np.float32, shape=(C,))
    eps = _float("eps", eps)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    out = _out("out", out, x.shape, [("x", x)])
    _call("layernorm", lib.ak_layernorm(_p(out), _p(x), _p(weight), _p(bias), T, C, eps))
    return out


def gelu(x, approximate: str = "none", *, out=None):
    """GELU, exact (erf) or approximate='tanh'. out may be x (in place)."""
    _arr("x", x, np.float32)
    if approximate not in _GELU:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    if out is not x:
        out = _out("out", out, x.shape, [("x", x)])
    _call("gelu", lib.ak_gelu(_p(out), _p(x), x.size, _GELU[approximate]))
    return out


def softmax(x, *, out=None):
    """Softmax over the last axis (max-subtracted). out may be x."""
    T, C = _rows("x", x)
    if out is not x:
        out = _out("out", out, x.shape, [("x", x)])
    _call("softmax", lib.ak_softmax(_p(out), _p(x), T, C))
    return out


def add(a, b, *, out=None):
    """Elementwise a + b (same shape, no broadcasting). out may be a or b."""
    _arr("a", a, np.float32)
    _arr("b", b, np.float32, shape=a.shape)
    if out is not a and out is not b:
        out = _out("out", out, a.shape, [("a", a), ("b", b)])
    _call("add", lib.ak_add(_p(out), _p(a), _p(b), a.size))
    return out


def embedding(ids, table, *, out=None):
    """Gather rows: out (T, C) = table (V, C)[ids (T,)]. ids: any integer dtype (copied to int64)."""
    if not isinstance(ids, np.ndarray):
        raise TypeError(f"ids must be a numpy.ndarray, got {type(ids).__name__}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"ids must have an integer dtype, got {ids.dtype}")
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-dimensional, got shape {ids.shape}")
    ids64 = np.ascontiguousarray(ids, dtype=np.int64)
    _arr("table", table, np.float32, ndim=2)
    V, C = table.shape
    out = _out("out", out, (ids.shape[0], C), [("table", table)])
    _call("embedding", lib.ak_embedding(_p(out), _p(ids64, "int64_t *"), _p(table), ids.shape[0], V, C))
    return out


def rotary(
    x,
    positions=None,
    *,
    offset: int = 0,
    base: float = 10000.0,
    interleaved: bool = False,
    rot_dim: int | None = None,
    out=None,
):
    """Rotary embedding of x (T, nh, hd) at positions (T,) (default offset + arange(T)).

    interleaved=False: half-split "NeoX" layout; True: "GPT-J" interleaved pairs."""
    _arr("x", x, np.float32, ndim=3)
    T, nh, hd = x.shape
    if positions is None:
        pos = np.arange(offset, offset + T, dtype=np.int64)
    else:
        if not isinstance(positions, np.ndarray) or positions.dtype.kind not in "iu":
            raise TypeError("positions must be an integer numpy.ndarray")
        if positions.shape != (T,):
            raise ValueError(f"positions must have shape ({T},), got {positions.shape}")
        pos = np.ascontiguousarray(positions, dtype=np.int64)
    rd = hd if rot_dim is None else int(rot_dim)
    if rd < 0 or rd > hd or rd % 2:
        raise ValueError(f"rot_dim must be even and in [0, {hd}], got {rd}")
    base = _float("base", base)
    if not base > 0:
        raise ValueError(f"base must be > 0, got {base}")
    if out is not x:
        out = _out("out", out, x.shape, [("x", x)])
    _call("rotary", lib.ak_rotary(_p(out), _p(x), _p(pos, "int64_t *"), T, nh, hd, rd, base, int(bool(interleaved))))
    return out


def _mask_u8(name, mask, shape):
    if mask is None:
        return None
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(mask).__name__}")
    if mask.dtype.kind not in "biu":
        raise TypeError(f"{name} must be bool or integer, got {mask.dtype}")
    if mask.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {mask.shape}")
    return np.ascontiguousarray(mask != 0, dtype=np.uint8)


def _attention(fn, opname, q, k, v, key_mask, scale, causal, out):
    _arr("q", q, np.float32, ndim=3)
    T, nh, hd = q.shape
    _arr("k", k, np.float32, shape=q.shape)
    _arr("v", v, np.float32, shape=q.shape)
    m = _mask_u8("key_mask", key_mask, (T,))
    scale = 1.0 / math.sqrt(hd) if scale is None else _float("scale", scale)
    out = _out("out", out, (T, nh * hd), [("q", q), ("k", k), ("v", v)])
    _call(opname, fn(_p(out), _p(q), _p(k), _p(v), _p(m, "uint8_t *"), T, nh, hd, scale, int(bool(causal))))
    return out


def attention(q, k, v, key_mask=None, scale=None, causal: bool = False, *, out=None):
    """Multi-head attention: q, k, v (T, nh, hd) -> context (T, nh*hd).

    key_mask (T,) bool/int (nonzero = attend) or None; scale default 1/sqrt(hd).
    A query with no visible key gets zeros."""
    return _attention(lib.ak_attention, "attention", q, k, v, key_mask, scale, causal, out)


def attention_naive(q, k, v, key_mask=None, scale=None, causal: bool = False, *, out=None):
    return _attention(lib.ak_attention_naive, "attention_naive", q, k, v, key_mask, scale, causal, out)


@dataclass
class MoEResult:
    out: np.ndarray  # (T, H) = weighted + bias
    router_logits: np.ndarray  # (T, E)  (None with forced routing and no router_w)
    probs: np.ndarray  # (T, E)
    topk_weights: np.ndarray  # (T, k)
    topk_indices: np.ndarray  # (T, k) int64
    fc1: np.ndarray  # (T, k, F)  slot j = j-th selected expert
    act: np.ndarray  # (T, k, F)
    expert_out: np.ndarray  # (T, k, H)
    weighted: np.ndarray  # (T, H)


def moe(
    h,
    router_w,
    w1,
    w2,
    bias=None,
    top_k: int = 2,
    renormalize: bool = False,
    gelu_approximate: str = "none",
    *,
    w1_scales=None,
    w2_scales=None,
    forced_indices=None,
    forced_weights=None,
    return_intermediates: bool = False,
    out=None,
):
    """Mixture-of-experts layer (see kernels_c/README.md).

    h (T,H) f32, router_w (E,H) f32, w1 (E,F,H) and w2 (E,F,H) (float32/float16/uint16-bf16/int8
    with w1_scales (E,F), w2_scales (E,H); or both PackedF32: pack_f32(w1), pack_f32(w2, trans=False)),
    bias (H,) or None.  forced_indices (T,k) int and
    forced_weights (T,k) f32 bypass the router (router_w may then be None).
    Returns out (T,H), or a MoEResult when return_intermediates=True."""
    _arr("h", h, np.float32, ndim=2)
    T, H = h.shape
    w1buf, dt, (E, F, H1) = _weight("w1", w1, 3, trans=True)
    if H1 != H:
        raise ValueError(f"w1 must have shape (E, F, {H}), got {w1.shape}")
    if dt in PACKED_LAYOUTS:
        if not isinstance(w2, PackedF32):
            raise TypeError(f"w2 must be a PackedF32 like w1 (pack_f32(w2, trans=False)), got {type(w2).__name__}")
        if w2.layout != dt:
            raise ValueError(
                f"w2 is packed in {PACKED_LAYOUTS[w2.layout]}, w1 in {PACKED_LAYOUTS[dt]}: pack both with one layout"
            )
        w2buf, _, w2_shape = _weight("w2", w2, 3, trans=False)
        if w2_shape != (E, F, H):
            raise ValueError(f"w2 must have shape {(E, F, H)}, got {w2_shape}")
    else:
        w2buf = _arr("w2", w2, w1.dtype, shape=(E, F, H))
    if dt == 3:
        if w1_scales is None or w2_scales is None:
            raise ValueError("w1_scales and w2_scales are required for int8 expert weights")
        _arr("w1_scales", w1_scales, np.float32, shape=(E, F))
        _arr("w2_scales", w2_scales, np.float32, shape=(E, H))
    elif w1_scales is not None or w2_scales is not None:
        raise ValueError("w1_scales/w2_scales are only used with int8 expert weights")
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, {E}], got {top_k}")
    if gelu_approximate not in _GELU:
        raise ValueError(f"gelu_approximate must be 'none' or 'tanh', got {gelu_approximate!r}")
    if bias is not None:
        _arr("bias", bias, np.float32, shape=(H,))
    forced = forced_indices is not None or forced_weights is not None
    if forced:
        if forced_indices is None or forced_weights is None:
            raise ValueError("forced_indices and forced_weights must be given together")
        if not isinstance(forced_indices, np.ndarray) or forced_indices.dtype.kind not in "iu":
            raise TypeError("forced_indices must be an integer numpy.ndarray")
        if forced_indices.shape != (T, top_k):
            raise ValueError(f"forced_indices must have shape ({T}, {top_k}), got {forced_indices.shape}")
        _arr("forced_weights", forced_weights, np.float32, shape=(T, top_k))
        if forced_indices.size and (forced_indices.min() < 0 or forced_indices.max() >= E):
            raise ValueError(f"forced_indices must be in [0, {E})")
        idx = np.ascontiguousarray(forced_indices, dtype=np.int32)
        tw = forced_weights.copy()
    else:
        idx = np.empty((T, top_k), np.int32)
        tw = np.empty((T, top_k), np.float32)
    if router_w is not None:
        _arr("router_w", router_w, np.float32, shape=(E, H))
    elif not forced:
        raise ValueError("router_w is required unless forced routing is given")
    out = _out("out", out, (T, H), [("h", h)])
    ri = return_intermediates
    have_router = ri and router_w is not None
    lg = np.empty((T, E), np.float32) if have_router else None
    pr = np.empty((T, E), np.float32) if have_router else None
    fc1 = np.empty((T, top_k, F), np.float32) if ri else None
    act = np.empty((T, top_k, F), np.float32) if ri else None
    eo = np.empty((T, top_k, H), np.float32) if ri else None
    ws = np.empty((T, H), np.float32) if ri else None
    st = lib.ak_moe(
        _p(out),
        _p(lg),
        _p(pr),
        _p(tw),
        _p(idx, "int32_t *"),
        _p(fc1),
        _p(act),
        _p(eo),
        _p(ws),
        _p(h),
        _p(router_w),
        _p(w1buf, "void *"),
        _p(w1_scales),
        _p(w2buf, "void *"),
        _p(w2_scales),
        _p(bias),
        T,
        H,
        F,
        E,
        int(top_k),
        dt,
        int(bool(renormalize)),
        _GELU[gelu_approximate],
        int(forced),
    )
    _call("moe", st)
    if not ri:
        return out
    return MoEResult(out, lg, pr, tw, idx.astype(np.int64), fc1, act, eo, ws)


def mean_pool(x, mask=None, *, out=None):
    """Masked mean over tokens: x (T,H) -> (H,) or x (B,T,H) -> (B,H); mask (T,) / (B,T) or None.

    sum(mask * x) / max(count, 1e-9): zeros when no token is set."""
    _arr("x", x, np.float32, ndim=(2, 3))
    if x.ndim == 2:
        B, (T, C) = 1, x.shape
        oshape = (C,)
    else:
        B, T, C = x.shape
        oshape = (B, C)
    m = _mask_u8("mask", mask, x.shape[:-1])
    out = _out("out", out, oshape, [("x", x)])
    _call("mean_pool", lib.ak_mean_pool(_p(out), _p(x), _p(m, "uint8_t *"), B, T, C))
    return out


def l2_normalize(x, eps: float = 1e-12, *, out=None):
    """x / max(||x||_2, eps) over the last axis. out may be x."""
    T, C = _rows("x", x)
    eps = _float("eps", eps)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if out is not x:
        out = _out("out", out, x.shape, [("x", x)])
    _call("l2_normalize", lib.ak_l2_normalize(_p(out), _p(x), T, C, eps))
    return out


# ------------------------------------------------- MoE parts as separate ops
def topk(probs, k: int, renormalize: bool = False):
    """Top-k of probs (T,E) per row: (weights (T,k) f32, indices (T,k) int64), descending probability,
    ties to the lower expert index; renormalize divides the weights by their sum."""
    T, E = _rows("probs", probs)
    _arr("probs", probs, np.float32, ndim=2)
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= E:
        raise ValueError(f"k must be an int in [1, {E}], got {k!r}")
    w = np.empty((T, k), np.float32)
    idx = np.empty((T, k), np.int64)
    _call("topk", lib.ak_topk(_p(w), _p(idx, "int64_t *"), _p(probs), T, E, int(k), int(bool(renormalize))))
    return w, idx


def _indices(name, idx, T, E):
    if not isinstance(idx, np.ndarray) or idx.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer numpy.ndarray")
    if idx.ndim != 2 or idx.shape[0] != T:
        raise ValueError(f"{name} must have shape ({T}, k), got {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= E):
        raise ValueError(f"{name} must be in [0, {E})")
    return np.ascontiguousarray(idx, dtype=np.int64)


def _expert_weight(name, w, scales_name, scales, scale_shape, trans):
    wbuf, dt, shape = _weight(name, w, 3, trans)
    if dt == 3:
        if scales is None:
            raise ValueError(f"{scales_name} is required for int8 {name}")
        _arr(scales_name, scales, np.float32, shape=scale_shape(shape))
    elif scales is not None:
        raise ValueError(f"{scales_name} is only used with int8 {name}")
    return wbuf, dt


def expert_up(h, indices, w1, *, scales=None):
    """Per-slot expert up projection: out (T,k,F)[t,j] = h (T,H)[t] @ w1[indices[t,j]]^T, w1 (E,F,H)."""
    _arr("h", h, np.float32, ndim=2)
    T, H = h.shape
    w1buf, dt = _expert_weight("w1", w1, "scales", scales, lambda s: (s[0], s[1]), trans=True)
    E, F, H1 = w1.shape
    if H1 != H:
        raise ValueError(f"w1 must have shape (E, F, {H}), got {w1.shape}")
    idx = _indices("indices", indices, T, E)
    K = idx.shape[1]
    out = np.empty((T, K, F), np.float32)
    _call(
        "expert_up",
        lib.ak_expert_up(_p(out), _p(h), _p(idx, "int64_t *"), _p(w1buf, "void *"), _p(scales), T, K, H, F, E, dt),
    )
    return out


def expert_down(act, indices, w2, *, scales=None):
    """Per-slot expert down projection: out (T,k,H)[t,j] = act (T,k,F)[t,j] @ w2[indices[t,j]], w2 (E,F,H)."""
    _arr("act", act, np.float32, ndim=3)
    T, K, F = act.shape
    w2buf, dt = _expert_weight("w2", w2, "scales", scales, lambda s: (s[0], s[2]), trans=False)
    E, F1, H = w2.shape
    if F1 != F:
        raise ValueError(f"w2 must have shape (E, {F}, H), got {w2.shape}")
    idx = _indices("indices", indices, T, E)
    if idx.shape[1] != K:
        raise ValueError(f"indices must have shape ({T}, {K}), got {idx.shape}")
    out = np.empty((T, K, H), np.float32)
    _call(
        "expert_down",
        lib.ak_expert_down(_p(out), _p(act), _p(idx, "int64_t *"), _p(w2buf, "void *"), _p(scales), T, K, F, H, E, dt),
    )
    return out


def moe_combine(expert_out, weights, bias=None):
    """Weighted sum over slots: out (T,H) = sum_j weights (T,k)[:, j] * expert_out (T,k,H)[:, j] (+ bias (H,))."""
    _arr("expert_out", expert_out, np.float32, ndim=3)
    T, K, H = expert_out.shape
    _arr("weights", weights, np.float32, shape=(T, K))
    if bias is not None:
        _arr("bias", bias, np.float32, shape=(H,))
    out = np.empty((T, H), np.float32)
    _call("moe_combine", lib.ak_moe_combine(_p(out), _p(expert_out), _p(weights), _p(bias), T, K, H))
    return out


# ---------------------------------------------------------------- comparison
COMPARE_FIELDS = (
    "n_valid", "nan_eng", "inf_eng", "nan_ref", "inf_ref", "argmax", "max_ulp",
    "max_abs", "sum_abs", "sum_sq_err", "sum_sq_ref", "sum_sq_eng", "dot",
)  # fmt: skip


def compare_sums(eng, ref, *, naive: bool = False) -> dict:
    """One-pass error sums of eng against ref (same shape, float32): ak_compare_result as a dict."""
    res = compare_result(eng, ref, naive=naive)
    return {k: getattr(res, k) for k in COMPARE_FIELDS}


def compare_result(eng, ref, *, naive: bool = False):
    """:func:`compare_sums` as the ak_compare_result struct itself (fields COMPARE_FIELDS, read as attributes):
    called once per (prompt, node) of every run (actdiff.compare.metrics.compare), where building the dict of its
    13 fields cost a third of the call. The checks take :func:`_is`'s quick form, _arr's only to name what is
    wrong."""
    if not (_is(eng, np.float32) and _is(ref, np.float32) and ref.shape == eng.shape):
        _arr("eng", eng, np.float32)
        _arr("ref", ref, np.float32, shape=eng.shape)
    res = ffi.new("ak_compare_result *")
    fn = lib.ak_compare_naive if naive else lib.ak_compare
    _call("compare", fn(res, ffi.from_buffer("float[]", eng), ffi.from_buffer("float[]", ref), eng.size))
    return res


def rel_l2_f32(a, b) -> float:
    """||a - b|| / ||b|| of two float32 arrays of one shape, accumulated in double (ak_rel_l2)."""
    if not (_is(a, np.float32) and _is(b, np.float32) and b.shape == a.shape):
        _arr("a", a, np.float32)
        _arr("b", b, np.float32, shape=a.shape)
    res = ffi.new("double *")
    _call("rel_l2", lib.ak_rel_l2(res, ffi.from_buffer("float[]", a), ffi.from_buffer("float[]", b), a.size))
    return float(res[0])


def erf_f64(x, *, naive: bool = False) -> np.ndarray:
    """erf of float64 values, elementwise, any shape (float64 out): ak_erf_f64, glibc's vector erf (libmvec) on
    the avx512 and avx2 paths, libm's on the scalar path or where libmvec is missing (:func:`erf_f64_path`);
    within 5 ULP of libm's erf, a value's result independent of the array around it. ``naive``: libm's erf in a
    plain loop."""
    return _elementwise("erf_f64", lib.ak_erf_f64_naive if naive else lib.ak_erf_f64, x, np.float64)


def _elementwise(op: str, fn, x, dtype, *extra) -> np.ndarray:
    """``fn(out, x, n, *extra)``, a C op of one value per value, on ``x`` as C-contiguous ``dtype`` (float32 or
    float64) values of any shape; ``out`` has ``x``'s shape."""
    x = np.asarray(x, dtype=dtype)
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)  # (not for all: it makes a 0-d array 1-d)
    y = np.empty_like(x)
    ctype = "double[]" if x.dtype == np.float64 else "float[]"
    _call(op, fn(ffi.from_buffer(ctype, y), ffi.from_buffer(ctype, x), x.size, *extra))
    return y


def round_f16(x, *, naive: bool = False) -> np.ndarray:
    """float32 values rounded to float16 precision, as float32 (any shape): ak_round_f16, the values
    ``x.astype(float16).astype(float32)`` gives (a NaN stays a NaN, quiet) at a twentieth of its time on the avx512
    and avx2 paths. ``naive``: the scalar code."""
    return _elementwise("round_f16", lib.ak_round_f16_naive if naive else lib.ak_round_f16, x, np.float32)


def f32_to_f16(x, *, naive: bool = False) -> np.ndarray:
    """float32 values to float16 (any shape): ak_convert_f32_f16, ``x.astype(float16)`` bit for bit, NaN payloads
    included, 20-40x faster on the avx512 and avx2 paths (numpy converts value by value in software). Only float32
    in: a float64 value through float32 would be rounded twice, which numpy's own conversion is not. ``naive``: the
    scalar code."""
    fn = lib.ak_convert_f32_f16_naive if naive else lib.ak_convert_f32_f16
    return _convert("f32_to_f16", fn, x, (np.float32, "float[]"), (np.float16, "uint16_t[]"))


def f16_to_f32(h, *, naive: bool = False) -> np.ndarray:
    """float16 values to float32 (any shape), exact: ak_convert_f16_f32, ``h.astype(float32)`` bit for bit, NaN
    payloads included. ``naive``: the scalar code."""
    fn = lib.ak_convert_f16_f32_naive if naive else lib.ak_convert_f16_f32
    return _convert("f16_to_f32", fn, h, (np.float16, "uint16_t[]"), (np.float32, "float[]"))


def cast(a: np.ndarray, dtype) -> np.ndarray:
    """``a.astype(dtype, copy=False)``, with float32 <-> float16 by :func:`f32_to_f16` / :func:`f16_to_f32`
    (numpy's bits, NaN payloads included, 20-40x faster): an ONNX Runtime float16 variant's every dumped value and
    every input and output of its replays (actdiff.onnxrt), the engine's float16 weights."""
    dtype = np.dtype(dtype)
    if a.dtype == dtype:
        return a
    if a.dtype == np.float32 and dtype == np.float16:
        return f32_to_f16(a)
    if a.dtype == np.float16 and dtype == np.float32:
        return f16_to_f32(a)
    return a.astype(dtype)


def _convert(op: str, fn, x, src: tuple, dst: tuple) -> np.ndarray:
    """``fn(out, x, n)`` on ``x`` of the dtype ``src[0]`` (any shape, copied where not C-contiguous) into a new
    array of ``dst[0]``; ``src[1]``, ``dst[1]``: their C buffer types."""
    x = np.asarray(x)
    if x.dtype != src[0]:
        raise TypeError(f"{op} converts {np.dtype(src[0]).name} values, got {x.dtype}")
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    y = np.empty(x.shape, dst[0])
    _call(op, fn(ffi.from_buffer(dst[1], y), ffi.from_buffer(src[1], x), x.size))
    return y


_ROUND_FORMATS = {"fp16": 1, "bf16": 2}  # AK_ROUND_F16, AK_ROUND_BF16


def round_f64(x, precision: str, *, naive: bool = False) -> np.ndarray:
    """float64 values rounded to ``precision`` ("fp16": to the nearest float16 straight from float64, as numpy's
    ``astype(float16)``; "bf16": to float32, then to bfloat16, nearest even each time), as float64, any shape; a
    NaN stays a NaN. ak_round_f64; ``naive``: its scalar code."""
    if precision not in _ROUND_FORMATS:
        raise ValueError(f"round_f64: precision {precision!r} is not one of {', '.join(_ROUND_FORMATS)}")
    fn = lib.ak_round_f64_naive if naive else lib.ak_round_f64
    return _elementwise("round_f64", fn, x, np.float64, _ROUND_FORMATS[precision])


_QUANT_PER = {"tensor": 0, "row": 1, "column": 2}  # AK_QUANT_TENSOR, AK_QUANT_ROW, AK_QUANT_COLUMN


def quantise_f64(x, scale, zp, qmin: float, qmax: float, per: str, *, dequantise: bool = False, naive: bool = False):
    """Uniform affine quantisation of float64 values ``x`` (rows, cols), as ONNX QuantizeLinear:
    q = clip(rint(float32(x) / scale) + zp, qmin, qmax) with ``scale`` float32 and ``zp`` (whole numbers) one per
    ``per``: "tensor" (one value), "row" (rows of them) or "column" (cols); returns q, or (q - zp) * scale where
    ``dequantise`` (DequantizeLinear), float64 (rows, cols). A NaN stays a NaN. ak_quantise_f64: one pass, the bits
    of actdiff.compare.refops.quantise_int's numpy passes; ``naive``: its plain loop."""
    if per not in _QUANT_PER:
        raise ValueError(f"quantise_f64: per {per!r} is not one of {', '.join(_QUANT_PER)}")
    _arr("x", x, np.float64, ndim=2)
    rows, cols = x.shape
    n = {"tensor": 1, "row": rows, "column": cols}[per]
    s = np.ascontiguousarray(np.asarray(scale, np.float32).reshape(-1))
    z = np.ascontiguousarray(np.broadcast_to(np.asarray(zp, np.float64).reshape(-1), s.shape))
    if s.shape != (n,):
        raise ValueError(f"quantise_f64: {s.size} scale(s) for per {per!r} of a {rows} x {cols} tensor (needs {n})")
    out = np.empty((rows, cols), np.float64)
    fn = lib.ak_quantise_f64_naive if naive else lib.ak_quantise_f64
    args = (rows, cols, _QUANT_PER[per], float(qmin), float(qmax), int(bool(dequantise)))
    _call("quantise_f64", fn(_p(out, "double *"), _p(x, "double *"), _p(s), _p(z, "double *"), *args))
    return out


def erf_f64_path() -> str:
    """The ISA path whose erf :func:`erf_f64` runs now: the current path's libmvec erf, or "scalar" (libm's)."""
    isa = ffi.new("int *")
    _call("erf_f64_impl", lib.ak_erf_f64_impl(isa))
    return _ISA_BY_ID[int(isa[0])]


def perturb_f64(y, s, g, budget: float, ref=None, *, naive: bool = False):
    """The propagated budget's perturbation of ``y`` (float64 [T, F]; actdiff.compare.propagation._perturbed):
    ``s`` the per-feature draws (float32 [F]), ``g`` the per-element ones (float32, T*F of them), ``ref``
    (float32 [T, F]) or None. Returns (out, (sum (out - ref)^2, sum ref^2) or None), or None where ||y|| is 0 or
    not finite (nothing to scale). ak_perturb_f64; ``naive``: its plain-loop reference."""
    ok = _is(y, np.float64, 2) and _is(s, np.float32, 1) and _is(g, np.float32, 1)
    if not ok or s.shape[0] != y.shape[1] or g.shape[0] != y.size or max(y.shape) > _INT_MAX:
        _arr("y", y, np.float64, ndim=2)
        _arr("s", s, np.float32, shape=(y.shape[1],))
        _arr("g", g, np.float32, shape=(y.size,))
    if ref is not None and not (_is(ref, np.float32, 2) and ref.shape == y.shape):
        _arr("ref", ref, np.float32, shape=y.shape)
    T, F = y.shape
    out = np.empty((T, F), np.float64)
    err, done = ffi.new("double[2]"), ffi.new("int *")
    fn = lib.ak_perturb_f64_naive if naive else lib.ak_perturb_f64
    ref_p = ffi.NULL if ref is None else ffi.from_buffer("float[]", ref)
    _call("perturb_f64", fn(ffi.from_buffer("double[]", out), err, done, ffi.from_buffer("double[]", y),
                            ffi.from_buffer("float[]", s), ffi.from_buffer("float[]", g), ref_p, float(budget), T,
                            F))  # fmt: skip
    if not done[0]:
        return None
    return out, ((err[0], err[1]) if ref is not None else None)


def fletcher32(data, *, naive: bool = False) -> int:
    """HDF5's Fletcher-32 checksum of the bytes of ``data`` (any C-contiguous buffer: bytes, a memoryview, an
    array), the value HDF5's fletcher32 filter stores after each chunk (ak_fletcher32; ``naive``: HDF5's loop)."""
    buf = memoryview(data)
    if not buf.c_contiguous:
        raise ValueError("fletcher32: data must be C-contiguous")
    res = ffi.new("uint32_t *")
    fn = lib.ak_fletcher32_naive if naive else lib.ak_fletcher32
    _call("fletcher32", fn(res, _p(buf.cast("B"), "void *"), buf.nbytes))
    return int(res[0])

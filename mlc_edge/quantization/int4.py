"""Group-wise 4-bit weights in AutoAWQ's GEMM layout, and the linear layer that reads them.

The layout (``Int4Layout``; the README's "4-bit weights" section says why) stores a
linear layer ``y = x @ W``, ``W`` of shape ``[K, N]`` (in, out), as three tensors:

    qweight  int32 [K, N/8]      8 nibbles a word; column n of a row is in the word
                                 n // 8, nibble ``AWQ_NIBBLE_OF_COLUMN[n % 8]``
    qzeros   int32 [K/g, N/8]    the zero point of each group of g rows, packed the same
    scales   fp    [K/g, N]      the step of each group

    W[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n]

On CPUs whose decode kernel reads them so (``Int4Layout.tiles``, chosen per target:
``mlc_edge.compiler.build.spec_for_target``), ``qweight`` is stored in *tiles* instead:

    qweight  int32 [K/g, N/64, g * 8]   tile [t, u] holds words 8u .. 8u + 7 of the
                                        group's g rows, row after row

the same words, reordered so that a decode GEMV, which reads 8 words of every row of a
group before the next 8, reads memory in address order (what that gains:
``schedules/cpu/int4_gemv_avx2.py``). A layer whose ``N / 8`` words are not a multiple of
8 keeps its rows.

This is exactly AutoAWQ's GEMM format (``WQLinear_GEMM``: it packs column
``AWQ_PACK_ORDER[i]`` of each group of 8 into nibble i, and unpacks with the inverse
order 0,4,1,5,2,6,3,7), so an AWQ checkpoint's ``qweight``/``qzeros`` are stored with
their bits unchanged. The nibble of column j is ``4 * AWQ_NIBBLE_OF_COLUMN[j]`` bits up,
which is ``16 * (j & 1) + 4 * (j >> 1)``: kernels compute the shift without a table.

``pack_int4``/``unpack_int4`` and ``quantize_rtn``/``dequantize`` are plain numpy; the
tests check them against independent implementations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..errors import UserError

# Nibble i of a word holds column AWQ_PACK_ORDER[i] of its group of 8 (AutoAWQ's order).
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Column j of a group of 8 sits in nibble AWQ_NIBBLE_OF_COLUMN[j] (the inverse).
AWQ_NIBBLE_OF_COLUMN = tuple(AWQ_PACK_ORDER.index(j) for j in range(8))
TILE_WORDS = 8  # words of a row in one CPU tile (module docstring): 64 columns


@dataclass(frozen=True)
class Int4Layout:
    """How a scheme stores a linear layer's weight in 4 bits (see the module docstring)."""

    group_size: int
    bits: int = 4
    pack_factor: int = 8  # values per int32 word
    nibble_order: tuple[int, ...] = AWQ_PACK_ORDER
    symmetric: bool = False  # zero points stored (AWQ's are trained values)
    tiles: bool = False  # qweight in CPU tiles where its words allow (module docstring)

    def tiled(self, out_features: int) -> bool:
        """Whether a layer with ``out_features`` outputs stores its qweight in tiles."""
        return self.tiles and (out_features // self.pack_factor) % TILE_WORDS == 0

    def shapes(self, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
        """The stored tensors' shapes for a ``[in, out]`` weight: qweight, qzeros, scales."""
        groups = in_features // self.group_size
        packed = out_features // self.pack_factor
        qweight: tuple[int, ...] = (in_features, packed)
        if self.tiled(out_features):
            qweight = (groups, packed // TILE_WORDS, self.group_size * TILE_WORDS)
        return {"qweight": qweight, "qzeros": (groups, packed), "scales": (groups, out_features)}

    def check(self, in_features: int, out_features: int, scheme_name: str) -> None:
        """One error line when a linear layer of this size cannot be stored."""
        if in_features % self.group_size:
            raise UserError(
                f"{scheme_name}: a linear layer has {in_features} inputs, not a multiple of "
                f"the group size {self.group_size}; choose a scheme whose group size divides "
                "it (q4f16t: 32, q4f16t-g128: 128) or q0f16t"
            )
        if out_features % self.pack_factor:
            raise UserError(
                f"{scheme_name}: a linear layer has {out_features} outputs, not a multiple of "
                f"{self.pack_factor} (8 4-bit values share a 32-bit word); use q0f16t for "
                "this model"
            )


PART_NAMES = ("qweight", "qzeros", "scales")


def model_parameters(part: str, shape: tuple[int, ...]) -> int:
    """How many of the model's weights a stored part holds: ``qweight``'s words 8 each,
    ``qzeros`` and ``scales`` none (they describe the weights; counting them, or the words
    as one each, would put 32 bits or more per weight in tensor-cache.json)."""
    if part == "qweight":
        return int(np.prod(shape)) * 8
    return 0


def pack_int4(values: np.ndarray) -> np.ndarray:
    """``[R, C]`` integers in 0..15 → int32 ``[R, C/8]`` in AWQ's nibble order."""
    values = np.asarray(values)
    rows, cols = values.shape
    if cols % 8:
        raise ValueError(f"cannot pack {cols} columns into 32-bit words of 8")
    if values.min(initial=0) < 0 or values.max(initial=0) > 15:
        raise ValueError("4-bit values must lie in 0..15")
    groups = values.astype(np.uint32).reshape(rows, cols // 8, 8)
    words = np.zeros((rows, cols // 8), dtype=np.uint32)
    for nibble, column in enumerate(AWQ_PACK_ORDER):
        words |= groups[:, :, column] << np.uint32(4 * nibble)
    return words.view(np.int32)


def qweight_rows(shape: tuple[int, ...]) -> int:
    """K, the input rows, of a stored ``qweight`` of this shape (rows or tiles)."""
    return shape[0] if len(shape) == 2 else shape[0] * shape[2] // TILE_WORDS


def tile_qweight(qweight: np.ndarray, group_size: int) -> np.ndarray:
    """int32 ``[K, W]`` words in rows → ``[K/g, W/8, g * 8]`` in tiles (module docstring)."""
    k, words = qweight.shape
    groups, strips = k // group_size, words // TILE_WORDS
    tiles = qweight.reshape(groups, group_size, strips, TILE_WORDS).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(tiles).reshape(groups, strips, group_size * TILE_WORDS)


def untile_qweight(tiles: np.ndarray) -> np.ndarray:
    """``tile_qweight`` undone: ``[K/g, W/8, g * 8]`` → ``[K, W]``."""
    groups, strips, span = tiles.shape
    size = span // TILE_WORDS
    rows = tiles.reshape(groups, strips, size, TILE_WORDS).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(rows).reshape(groups * size, strips * TILE_WORDS)


def unpack_int4(words: np.ndarray) -> np.ndarray:
    """int32 ``[R, C/8]`` in AWQ's nibble order → uint8 ``[R, C]`` in 0..15."""
    words = np.ascontiguousarray(words, dtype=np.int32).view(np.uint32)
    rows, packed = words.shape
    out = np.empty((rows, packed, 8), dtype=np.uint8)
    for column in range(8):
        shift = np.uint32(4 * AWQ_NIBBLE_OF_COLUMN[column])
        out[:, :, column] = (words >> shift) & np.uint32(0xF)
    return out.reshape(rows, packed * 8)


def quantize_rtn(
    weight_kn: np.ndarray, group_size: int, scale_dtype: str, rows_per_chunk: int = 256
) -> dict[str, np.ndarray]:
    """Round-to-nearest asymmetric 4-bit quantization of a ``[K, N]`` weight, per group of
    ``group_size`` rows and per column (AutoAWQ's zero-point rule: the group's range
    [min, max], widened to hold 0, is mapped onto 0..15). Returns the stored tensors.

    The scales are rounded to ``scale_dtype`` before the values are rounded, so the
    stored tensors dequantize to the nearest grid point of the scales actually stored.
    Rows are quantized ``rows_per_chunk`` at a time (whole groups), so the fp32
    temporaries stay small beside the weight itself.
    """
    k, n = weight_kn.shape
    out = {
        "qweight": np.empty((k, n // 8), dtype=np.int32),
        "qzeros": np.empty((k // group_size, n // 8), dtype=np.int32),
        "scales": np.empty((k // group_size, n), dtype=scale_dtype),
    }
    step_rows = max(1, rows_per_chunk // group_size) * group_size
    for r0 in range(0, k, step_rows):
        r1 = min(k, r0 + step_rows)
        g0, g1 = r0 // group_size, r1 // group_size
        w = np.array(weight_kn[r0:r1], dtype=np.float32)  # a copy: changed in place below
        w = w.reshape(g1 - g0, group_size, n)
        high = np.maximum(w.max(axis=1), 0.0)
        low = np.minimum(w.min(axis=1), 0.0)
        scales = ((high - low) / 15.0).astype(scale_dtype)
        step = np.maximum(scales.astype(np.float32), np.float32(1e-8))  # an all-zero group
        zeros = np.clip(np.round(-low / step), 0, 15)
        w /= step[:, None, :]
        np.round(w, out=w)
        w += zeros[:, None, :]
        np.clip(w, 0, 15, out=w)
        out["qweight"][r0:r1] = pack_int4(w.reshape(r1 - r0, n).astype(np.uint8))
        out["qzeros"][g0:g1] = pack_int4(zeros.astype(np.uint8))
        out["scales"][g0:g1] = scales
    return out


def dequantize(
    qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, group_size: int
) -> np.ndarray:
    """The ``[K, N]`` fp32 weight the stored tensors stand for (qweight in rows or tiles)."""
    if qweight.ndim == 3:
        qweight = untile_qweight(qweight)
    q = unpack_int4(qweight).astype(np.float32)
    z = np.repeat(unpack_int4(qzeros).astype(np.float32), group_size, axis=0)
    s = np.repeat(np.asarray(scales, dtype=np.float32), group_size, axis=0)
    return (q - z) * s


def dequantize_te(
    qweight: te.Tensor, qzeros: te.Tensor, scales: te.Tensor, group_size: int, dtype: str
) -> te.Tensor:
    """The weight ``[K, N]`` in ``dtype`` as an expression of the stored tensors.

    Kept an expression (not a stored copy): FuseOps puts it into the matmul that reads it,
    and ``RequireFusedDequantize`` refuses a build where it did not.
    """
    packed = qzeros.shape[1]
    k, n = qzeros.shape[0] * group_size, packed * 8
    tiled = len(qweight.shape) == 3

    def element(row: tirx.PrimExpr, col: tirx.PrimExpr) -> tirx.PrimExpr:
        lane = col % 8
        # 4 * AWQ_NIBBLE_OF_COLUMN[lane], in int32 like the words it shifts
        shift = ((lane % 2) * 16 + (lane // 2) * 4).astype("int32")
        word = col // 8
        group = row // group_size
        if tiled:
            at = (row % group_size) * TILE_WORDS + word % TILE_WORDS
            stored = qweight[group, word // TILE_WORDS, at]
        else:
            stored = qweight[row, word]
        q = (stored >> shift) & 0xF
        z = (qzeros[group, word] >> shift) & 0xF
        return (q - z).astype(dtype) * scales[group, col].astype(dtype)

    return te.compute((k, n), element, name=DEQUANTIZE_NAME)


DEQUANTIZE_NAME = "dequantize_int4"


class Int4KNLinear(nn.Module):
    """``y = x @ dequant(qweight, qzeros, scales) (+ b)``: ``Int4Layout``, weight ``[K, N]``.

    The integer tensors keep int32 when the model is cast to its dtype (``to``).
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: str, layout: Int4Layout
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.layout = layout
        self.dtype = dtype
        shapes = layout.shapes(in_features, out_features)
        self.qweight = nn.Parameter(shapes["qweight"], "int32")
        self.qzeros = nn.Parameter(shapes["qzeros"], "int32")
        self.scales = nn.Parameter(shapes["scales"], dtype)
        self.bias = nn.Parameter((out_features,), dtype) if bias else None

    def to(self, dtype: str | None = None) -> None:
        if dtype is None:
            return
        self.dtype = dtype
        self.scales.to(dtype)
        if self.bias is not None:
            self.bias.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        group, dtype = self.layout.group_size, self.dtype
        # The weight is dequantized in fp32 ((q - z) * s is exact there) and the matmul
        # accumulates in fp32 whatever the model's dtype; fp16 activations are widened as
        # they are read and the result rounded once. FuseInt4Matmul makes all of it one
        # kernel. (Dequantizing to fp16 instead costs a rounding per weight, and on CPUs
        # without fp16 arithmetic a software conversion per multiply.)
        weight = op.tensor_expr_op(
            lambda qw, qz, s: dequantize_te(qw, qz, s, group, "float32"),
            name_hint=DEQUANTIZE_NAME,
            args=[self.qweight, self.qzeros, self.scales],
        )
        if dtype == "float32":
            y = op.matmul(x, weight)
        else:
            y = op.matmul(x.astype("float32"), weight).astype(dtype)
        return y + self.bias if self.bias is not None else y

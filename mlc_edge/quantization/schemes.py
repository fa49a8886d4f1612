"""Weight schemes: no quantization, and group-wise 4-bit.

A scheme decides three things: the dtype of the model, the layout a linear layer's
weight is stored in (``linear_weight_layout``, as MLC-LLM's quantization classes declare
it), and how a Hugging Face tensor becomes that stored tensor. Adding a scheme is adding
one small class here; nothing else branches on the scheme's name.

- ``q0f16t`` (default): fp16, linear weights stored transposed ``[in, out]`` ("KN") and
  used by ``matmul(x, w)`` directly. No transpose at run time, and the layout Adreno's
  prefill handles without the multi-second first-prefill stall seen with "NK".
- ``q0f32t``: the same in fp32, for exact comparisons against transformers.
- ``q0f16``: fp16 in PyTorch's ``[out, in]`` layout; the transpose is fused into the
  matmul by ``FuseTransposeMatmul``. Kept for comparison with MLC-LLM's stock scheme.
- ``q4f16t`` / ``q4f16t-g128``: every linear layer in 4 bits, KN, groups of 32 / 128 rows
  along K with fp16 scales and zero points (``int4.Int4Layout``: AutoAWQ's GEMM layout),
  the output layer too (``int4_head``), in the same layout, so the same kernels run it. A
  tied model keeps its fp16 embedding table for the lookup and gets a 4-bit copy of it as
  its output layer (``lm_head``; ``mlc_edge.models.parameters.weight_sources``). The
  embedding stays fp16. ``q4f32t``: the same in fp32 compute, for exact tests.
- ``q4f16t-hf`` / ``q4f16t-g128-hf`` / ``q4f32t-hf``: the same, but the output layer stays
  in the float dtype (``head_linear``), tied when the model is: what an AWQ checkpoint
  holds, reproduced exactly.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import ClassVar, Literal

import numpy as np
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..errors import UserError
from .int4 import Int4KNLinear, Int4Layout

# A linear weight's stored layout: "KN" is [in, out] (K, the reduction axis, first: used by
# ``matmul(x, w)`` as it is); "NK" is PyTorch's [out, in].
LinearLayout = Literal["KN", "NK"]


class _LayoutLinear(nn.Module):
    """``y = x @ W (+ b)`` with ``W`` stored in the subclass's ``layout``."""

    layout: ClassVar[LinearLayout]

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: str):
        self.in_features = in_features
        self.out_features = out_features
        shape = (in_features, out_features) if self.layout == "KN" else (out_features, in_features)
        self.weight = nn.Parameter(shape, dtype)
        self.bias = nn.Parameter((out_features,), dtype) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight if self.layout == "KN" else op.permute_dims(self.weight)
        y = op.matmul(x, w)
        return y + self.bias if self.bias is not None else y


class KNLinear(_LayoutLinear):
    """``y = x @ W (+ b)`` with ``W`` stored ``[in, out]``."""

    layout = "KN"


class NKLinear(_LayoutLinear):
    """``y = x @ W.T (+ b)`` with ``W`` stored ``[out, in]`` as PyTorch does."""

    layout = "NK"


class WeightScheme:
    """Base of the no-quantization schemes: subclasses set the class attributes.

    ``max_alloc_bytes`` is the largest buffer of the device the weights are stored for:
    an embedding / output layer above it is stored in pieces (``mlc_edge.models.vocab``).
    None (no limit) for the shared instances; ``with_max_alloc`` gives a limited copy.
    """

    name: str
    dtype: str
    # How a linear layer's weight is stored: the converter and the model read it here.
    linear_weight_layout: LinearLayout
    linear_class: type[nn.Module]
    max_alloc_bytes: int | None = None
    # The 4-bit layout of linear weights; None: stored as one tensor in ``dtype``.
    int4_layout: Int4Layout | None = None
    # The output layer in ``int4_layout`` too (its own 4-bit parameters even when the
    # checkpoint ties it to the embedding); False: in ``dtype``, tied when the model is.
    int4_head: bool = False

    def with_max_alloc(self, max_alloc_bytes: int | None) -> WeightScheme:
        """This scheme for a device whose buffers hold at most ``max_alloc_bytes``."""
        if max_alloc_bytes == self.max_alloc_bytes:
            return self
        limited = copy.copy(self)
        limited.max_alloc_bytes = None if max_alloc_bytes is None else int(max_alloc_bytes)
        return limited

    def with_int4_tiles(self, tiles: bool) -> WeightScheme:
        """This scheme with its 4-bit ``qweight`` stored in CPU tiles or in rows
        (``Int4Layout.tiles``); a scheme without 4-bit weights is returned as it is."""
        if self.int4_layout is None or self.int4_layout.tiles == tiles:
            return self
        tiled = copy.copy(self)
        tiled.int4_layout = dataclasses.replace(self.int4_layout, tiles=tiles)
        return tiled

    def linear(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        return self.linear_class(in_features, out_features, bias, self.dtype)

    def head_linear(self, in_features: int, out_features: int) -> nn.Module:
        """The untied output layer: a linear layer, never quantized."""
        return self.linear(in_features, out_features, bias=False)

    def convert_linear_weight(self, weight: np.ndarray) -> np.ndarray:
        """A Hugging Face ``[out, in]`` weight as this scheme stores it."""
        stored = weight.T if self.linear_weight_layout == "KN" else weight
        return np.ascontiguousarray(stored, dtype=self.dtype)

    def hf_shape(self, stored_shape: tuple[int, ...], is_linear_weight: bool) -> tuple[int, ...]:
        """The shape of the Hugging Face tensor that this scheme stores as ``stored_shape``."""
        if is_linear_weight and self.linear_weight_layout == "KN":
            return tuple(reversed(stored_shape))
        return tuple(stored_shape)

    def convert_plain(self, tensor: np.ndarray) -> np.ndarray:
        """Any other tensor (embedding, norm weights, biases): a cast only."""
        return np.ascontiguousarray(tensor, dtype=self.dtype)


class _Transposed(WeightScheme):
    linear_weight_layout = "KN"
    linear_class = KNLinear


class Q0F16T(_Transposed):
    name = "q0f16t"
    dtype = "float16"


class Q0F32T(_Transposed):
    name = "q0f32t"
    dtype = "float32"


class Q0F16(WeightScheme):
    name = "q0f16"
    dtype = "float16"
    linear_weight_layout = "NK"
    linear_class = NKLinear


class _Int4(_Transposed):
    """4-bit linear weights (``int4_layout``), the output layer included unless a subclass
    clears ``int4_head``."""

    int4_head = True

    def linear(self, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        assert self.int4_layout is not None
        self.int4_layout.check(in_features, out_features, self.name)
        return Int4KNLinear(in_features, out_features, bias, self.dtype, self.int4_layout)

    def head_linear(self, in_features: int, out_features: int) -> nn.Module:
        if self.int4_head:
            assert self.int4_layout is not None
            if out_features % self.int4_layout.pack_factor:
                # The "-hf" scheme keeps the output layer in floats: it fits there.
                raise UserError(
                    f"{self.name}: the output layer has {out_features} outputs (the "
                    f"vocabulary, or a piece of it), not a multiple of "
                    f"{self.int4_layout.pack_factor} (8 4-bit values share a 32-bit word); "
                    f"use {self.name}-hf, which keeps it in {self.dtype}"
                )
            return self.linear(in_features, out_features, bias=False)
        return KNLinear(in_features, out_features, False, self.dtype)


class Q4F16T(_Int4):
    name = "q4f16t"
    dtype = "float16"
    int4_layout = Int4Layout(group_size=32)


class Q4F16TG128(_Int4):
    name = "q4f16t-g128"
    dtype = "float16"
    int4_layout = Int4Layout(group_size=128)


class Q4F32T(_Int4):
    name = "q4f32t"
    dtype = "float32"
    int4_layout = Int4Layout(group_size=32)


class Q4F16THF(Q4F16T):
    name = "q4f16t-hf"
    int4_head = False


class Q4F16TG128HF(Q4F16TG128):
    name = "q4f16t-g128-hf"
    int4_head = False


class Q4F32THF(Q4F32T):
    name = "q4f32t-hf"
    int4_head = False


SCHEMES: dict[str, WeightScheme] = {
    s.name: s
    for s in (
        Q0F16T(),
        Q0F32T(),
        Q0F16(),
        Q4F16T(),
        Q4F16TG128(),
        Q4F32T(),
        Q4F16THF(),
        Q4F16TG128HF(),
        Q4F32THF(),
    )
}


def get_scheme(name: str) -> WeightScheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise UserError(
            f"unknown quantization '{name}': choose one of {', '.join(SCHEMES)}"
        ) from None

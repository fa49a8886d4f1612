"""No kernel may write a dequantized 4-bit weight to memory.

A 4-bit weight is only worth its bits if every kernel reads the packed words and unpacks
them in registers. If ``FuseInt4Matmul`` missed a matmul (a new pattern, a TVM upgrade),
``FuseTIR`` leaves a PrimFunc whose ``dequantize_int4`` block writes its output buffer: an
fp16 copy of the weight written and read back on every call. It builds and runs, only
slower and with more memory, so nothing else would notice; this guard, run right after
``FuseTIR`` (``compile_pipeline`` in ``mlc_edge/compiler/build.py``), refuses the build.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import IRModule, s_tir, tirx

from ...errors import UserError
from ...quantization.int4 import DEQUANTIZE_NAME


def functions_writing_dequantized(mod: IRModule) -> list[str]:
    """Names of the PrimFuncs in which a dequantize block writes a function argument."""
    found: list[str] = []
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        params = list(func.params)  # TVM 0.27: a PrimFunc's parameters are its buffers
        hits: list[bool] = []

        def visit(block: s_tir.SBlock, params=params, hits=hits) -> None:
            if block.name_hint.startswith(DEQUANTIZE_NAME) and any(
                p.same_as(w.source) for w in block.writes for p in params
            ):
                hits.append(True)

        tvm_ffi.structural_walk(func.body, [(s_tir.SBlock, visit)])
        if hits:
            found.append(gv.name_hint)
    return sorted(found)


@tvm.transform.module_pass(opt_level=0, name="RequireFusedDequantize")
class RequireFusedDequantize:
    """Refuse a module in which a 4-bit weight is dequantized into a buffer of its own."""

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        names = functions_writing_dequantized(mod)
        if names:
            raise UserError(
                f"function '{names[0]}' writes a dequantized 4-bit weight to memory instead "
                "of unpacking it inside the matmul that reads it (FuseInt4Matmul did not "
                "fuse it); this is a bug in mlc-edge's 4-bit support: report it, or use "
                "q0f16t meanwhile"
            )
        return mod

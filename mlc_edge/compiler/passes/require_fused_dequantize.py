"""No kernel may write a dequantized 4-bit weight to memory.

A 4-bit weight is only worth its bits if every kernel reads the packed words and unpacks
them in registers. If ``FuseInt4Matmul`` missed a matmul (a new pattern, a TVM upgrade),
``FuseTIR`` leaves a PrimFunc whose ``dequantize_int4`` block writes its output buffer: an
fp16 copy of the weight written and read back on every call. It builds and runs, only
slower and with more memory, so nothing else would notice. This guard runs twice in
``compile_pipeline`` (``mlc_edge/compiler/build.py``): right after ``FuseTIR`` (no
dequantize block may write a function argument) and right after the schedule rules (nor
any buffer in global memory: a rule must unpack the words into registers or local memory,
not stage a dequantized copy of the weight for a later kernel).
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import IRModule, s_tir, tirx

from ...errors import UserError
from ...quantization.int4 import DEQUANTIZE_NAME


def functions_writing_dequantized(mod: IRModule, scheduled: bool = False) -> list[str]:
    """Names of the PrimFuncs in which a dequantize block writes a function argument or,
    once ``scheduled``, any buffer in global memory."""
    found: list[str] = []
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        params = list(func.params)  # TVM 0.27: a PrimFunc's parameters are its buffers
        hits: list[bool] = []

        def visit(block: s_tir.SBlock, params=params, hits=hits) -> None:
            if not block.name_hint.startswith(DEQUANTIZE_NAME):
                return
            for w in block.writes:
                buffer = w.source
                is_param = any(p.same_as(buffer) for p in params)
                if is_param or (scheduled and buffer.scope() == "global"):
                    hits.append(True)

        tvm_ffi.structural_walk(func.body, [(s_tir.SBlock, visit)])
        if hits:
            found.append(gv.name_hint)
    return sorted(found)


@tvm.transform.module_pass(opt_level=0, name="RequireFusedDequantize")
class RequireFusedDequantize:
    """Refuse a module in which a 4-bit weight is dequantized into a buffer of its own;
    ``scheduled``: the module after the schedule rules (see the module docstring)."""

    def __init__(self, scheduled: bool = False):
        self.scheduled = scheduled

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        names = functions_writing_dequantized(mod, self.scheduled)
        if names:
            raise UserError(
                f"function '{names[0]}' writes a dequantized 4-bit weight to memory instead "
                "of unpacking it inside the matmul that reads it (not fused by "
                "FuseInt4Matmul, or staged in memory by a schedule rule); this is a bug "
                "in mlc-edge's 4-bit support: report it, or use q0f16t meanwhile"
            )
        return mod

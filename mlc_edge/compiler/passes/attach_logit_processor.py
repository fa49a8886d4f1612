"""Add the runtime's in-place logit processors to the module.

The runtime looks them up on the VM module, which exposes Relax functions only, so
each TIR kernel (``<name>_tir``) gets a Relax function of the runtime's name that calls
it in place on the logits.
"""

import tvm
from tvm import IRModule, relax

from ..logit_processor import logit_processor_funcs


@tvm.transform.module_pass(opt_level=0, name="AttachLogitProcessor")
class AttachLogitProcessor:
    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        bb = relax.BlockBuilder(mod)
        for name, prim_func in logit_processor_funcs().items():
            kernel = bb.add_func(prim_func, f"{name}_tir")
            sizes: dict[str, tvm.tirx.Var] = {}  # Relax shapes are int64, TIR's int32

            def size(dim, sizes=sizes):
                if isinstance(dim, tvm.tirx.IntImm):
                    return tvm.tirx.IntImm("int64", int(dim))
                # A derived size (the bitmask's width) is just another symbol here.
                key = dim.name if isinstance(dim, tvm.tirx.Var) else f"d{len(sizes)}"
                return sizes.setdefault(key, tvm.tirx.Var(key, "int64"))

            params = [
                relax.Var(str(p.name), relax.TensorType([size(d) for d in p.shape], str(p.dtype)))
                for p in prim_func.params
            ]
            with bb.function(name, params):
                # Arg 0 (the logits) is updated in place and returned.
                out = bb.emit(relax.call_tir_inplace(kernel, params, [0], params[0].ty))
                bb.emit_func_output(out)
        return bb.get()

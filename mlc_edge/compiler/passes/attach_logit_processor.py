"""Add the runtime's in-place logit processors to the module."""

import tvm
from tvm import IRModule

from ..logit_processor import logit_processor_funcs


@tvm.transform.module_pass(opt_level=0, name="AttachLogitProcessor")
class AttachLogitProcessor:
    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        mod = mod.clone()
        for name, func in logit_processor_funcs().items():
            mod[name] = func.with_attr("global_symbol", name)
        return mod

"""Give every symbolic size an upper bound so memory is planned once, statically.

Without bounds, ``StaticPlanBlockMemory`` cannot size buffers whose shape depends on
``seq_len`` or ``batch_size``, and they are allocated afresh on every call. With
``prefill_chunk_size`` and ``max_batch_size`` as bounds every temporary gets one fixed
slot, and the plan's total is the ``memory_usage`` the runtime budgets for.
"""

import tvm
from tvm import IRModule, relax


@tvm.transform.module_pass(opt_level=0, name="AttachVarBounds")
class AttachVarBounds:
    def __init__(self, bounds: dict[str, int]):
        self.bounds = bounds

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        mod = mod.clone()
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                func = func.with_attr("tir_var_upper_bound", self.bounds)
                # Outputs of dynamic shape are planned too (the logits, the embeddings).
                func = func.with_attr("relax.memory_plan_dynamic_func_output", True)
                mod[gv] = func
        return mod

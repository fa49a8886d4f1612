"""No kernel may launch more threads per work-group than the device allows.

OpenCL refuses such a launch at run time (``CL_INVALID_WORK_GROUP_SIZE``), on the phone,
after the app has loaded the model. Schedules pick their thread counts from the TVM
target, but pre-scheduled kernels (the KV cache's attention) and rules with fixed sizes
do not always ask: this pass checks the result, right after the schedules.
"""

from __future__ import annotations

import tvm
from tvm import IRModule

from ...errors import UserError
from .require_kernels import device_prim_funcs, kernel_regions


@tvm.transform.module_pass(opt_level=0, name="CheckWorkGroupSize")
class CheckWorkGroupSize:
    def __init__(self, max_work_group_size: int, device_name: str):
        self.max_work_group_size = max_work_group_size
        self.device_name = device_name

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        limit = self.max_work_group_size
        for name, func in device_prim_funcs(mod):
            for i, kernel in enumerate(kernel_regions(func).kernels):
                size = kernel.work_group_size()
                threads = " x ".join(
                    f"{tag}={extent}" for tag, extent in sorted(kernel.thread_extents.items())
                )
                which = f"kernel {i} of function '{name}'" if i else f"function '{name}'"
                if size is None:
                    raise UserError(
                        f"{which} has a work-group size that is not a constant ({threads}); "
                        f"it cannot be checked against {self.device_name}'s limit of {limit}: "
                        "give its threadIdx loops constant extents"
                    )
                if size > limit:
                    raise UserError(
                        f"{which} uses work-groups of {size} threads ({threads}) but "
                        f"{self.device_name} allows at most {limit}; lower the threads its "
                        "schedule binds (the target's schedule_threads) or pick the matching "
                        "--target"
                    )
        return mod

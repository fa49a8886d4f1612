"""Add the GPU sampler's functions (``compiler/gpu_sampler.py``) for the device types whose
engine samples on the GPU (CUDA, Vulkan, Metal; docs/runtime-contract.md). OpenCL and CPU
sample on the CPU: their libraries are left as they are.
"""

import tvm
from tvm import IRModule, relax

from ..contract import uses_gpu_sampler
from ..gpu_sampler import attach_gpu_sampler


@tvm.transform.module_pass(opt_level=0, name="AttachGPUSampler")
class AttachGPUSampler:
    def __init__(self, device: str):
        self.device = device

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        if not uses_gpu_sampler(self.device):
            return mod
        bb = relax.BlockBuilder(mod)
        attach_gpu_sampler(bb)
        # argsort and cumsum become the target's sort and scan kernels.
        return relax.backend.DispatchSortScan()(bb.get())

"""Compiler passes of our own: one pass a file, each for one reason."""

import tvm_ffi

from ...errors import UserError
from .attach_gpu_sampler import AttachGPUSampler
from .attach_logit_processor import AttachLogitProcessor
from .attach_metadata import AttachMetadata, memory_usage
from .attach_var_bounds import AttachVarBounds
from .check_allocation_limit import CheckAllocationLimit
from .check_work_group_size import CheckWorkGroupSize
from .fuse_int4_matmul import FuseInt4Matmul
from .mark_shape_funcs_noalias import MarkShapeFuncsNoAlias
from .require_fused_dequantize import RequireFusedDequantize
from .require_kernels import RequireKernels

# The guards raise UserError inside passes that TVM runs from C++; registered, the error
# comes back out of relax.build as a UserError (one line for the CLI), not a RuntimeError.
tvm_ffi.register_error("UserError", UserError)

__all__ = [
    "AttachGPUSampler",
    "AttachLogitProcessor",
    "AttachMetadata",
    "AttachVarBounds",
    "CheckAllocationLimit",
    "CheckWorkGroupSize",
    "FuseInt4Matmul",
    "MarkShapeFuncsNoAlias",
    "RequireFusedDequantize",
    "RequireKernels",
    "memory_usage",
]

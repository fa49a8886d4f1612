"""Run a model's OpenCL kernels on this machine's OpenCL device and check them.

What it offers::

    model_checker(spec, target_spec)    every kernel of a model, ready to check or time
    KernelChecker.check(name)           one function's kernels vs. the CPU, per test case
    KernelChecker.time_function(...)    device time of one function's kernels
    verify(load_source(path))           what ``mlc-edge verify`` runs
"""

from .check import (
    CaseResult,
    KernelChecker,
    Launch,
    NotCheckedFunction,
    VerifyReport,
    compare,
)
from .inputs import NotChecked, Prepared, Recipe, Sizes
from .model import VerifySource, default_sizes, load_source, model_checker, verify
from .opencl import OpenCLRunner, half_as_float

__all__ = [
    "CaseResult",
    "KernelChecker",
    "Launch",
    "NotChecked",
    "NotCheckedFunction",
    "OpenCLRunner",
    "Prepared",
    "Recipe",
    "Sizes",
    "VerifyReport",
    "VerifySource",
    "compare",
    "default_sizes",
    "half_as_float",
    "load_source",
    "model_checker",
    "verify",
]

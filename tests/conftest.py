import os
import sys
from pathlib import Path

# tests/ holds helpers (tiny_models) imported by the test files; benchmarks/ the real
# models' shapes (model_shapes), shared with the benchmarks.
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

# Every OpenCL implementation installed (Intel's CPU runtime from pip too) is visible to
# the ICD loader only when it is pointed at them before the first platform query.
from mlc_edge.verify.devices import available_devices, prepare_environment  # noqa: E402

prepare_environment()
# The OpenCL tests that do not name a device run on PoCL where it is installed (CI): the
# float rewrite's checks, as before Intel's runtime was in .[dev]; test_verify_fp16.py
# asks for Intel by name. MLC_EDGE_OPENCL_DEVICE=intel runs them all in real fp16.
if "MLC_EDGE_OPENCL_DEVICE" not in os.environ and any(
    d.implementation == "pocl" for d in available_devices()
):
    os.environ["MLC_EDGE_OPENCL_DEVICE"] = "pocl"

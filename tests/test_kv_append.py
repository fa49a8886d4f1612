"""The KV cache's append kernel (new tokens' K/V into their page slots): ours vs. TVM's.

TVM's GPU kernel reads ``position_map[token]`` before its ``token < ntoken`` guard
(mlc_edge/models/kv_cache_kernels.py). Ours runs on the OpenCL device and is compared
with numpy's scatter; Oclgrind (tests/test_oclgrind.py) shows the invalid read is gone.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm_ffi
from helpers import opencl_missing

from mlc_edge.compiler.targets import get_target
from mlc_edge.models.kv_cache_kernels import TRANSPOSE_APPEND, transpose_append
from mlc_edge.verify import OpenCLRunner
from mlc_edge.verify.lower import lower_for_device

needs_opencl = pytest.mark.skipif(opencl_missing() is not None, reason=str(opencl_missing()))

NUM_PAGES = 5
PAGE = 16


def _inputs(ntoken: int, heads: int, head_dim: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    slots = rng.permutation(NUM_PAGES * PAGE)[:ntoken].astype("int32")
    if ntoken > 2:
        slots[1] = -1  # a token the cache does not keep (the runtime marks it -1)
    return {
        "pages": rng.standard_normal((NUM_PAGES, 2, heads, PAGE, head_dim)).astype(dtype),
        "k_data": rng.standard_normal((ntoken, heads, head_dim)).astype(dtype),
        "v_data": rng.standard_normal((ntoken, heads, head_dim)).astype(dtype),
        "position_map": slots,
    }


def _reference(a):
    pages = a["pages"].copy()
    for t, slot in enumerate(a["position_map"]):
        if slot != -1:
            pages[slot // PAGE, 0, :, slot % PAGE, :] = a["k_data"][t]
            pages[slot // PAGE, 1, :, slot % PAGE, :] = a["v_data"][t]
    return pages


@needs_opencl
@pytest.mark.parametrize(
    ("ntoken", "heads", "head_dim"), [(1, 2, 16), (7, 2, 16), (16, 8, 64), (13, 8, 128), (3, 3, 96)]
)
def test_ours_writes_every_kept_token_into_its_slot(ntoken, heads, head_dim):
    target = get_target("android-opencl").tvm_target()
    runner = OpenCLRunner()
    func = transpose_append(heads, head_dim, "float16")
    lowered = lower_for_device({TRANSPOSE_APPEND: func}, target)[TRANSPOSE_APPEND]
    arrays = _inputs(ntoken, heads, head_dim, runner.host_dtype("float16"))
    out, launches = runner.run(
        lowered,
        arrays,
        lowered.host_env({"ntoken": ntoken, "num_pages": NUM_PAGES}),
        written=["pages"],
    )
    # exact: a copy
    np.testing.assert_array_equal(out["pages"], _reference(arrays))
    ((global_size, local_size),) = [launch for _, launch in launches]
    # 8 values (16 bytes) a work-item: every head_dim here is a multiple of 8
    assert global_size[0] >= ntoken * heads * head_dim // 8 and local_size[0] == 256


def test_the_model_builds_its_kv_cache_with_our_append_kernel(tmp_path):
    from test_merge_state import _tiny_module

    mod, kv, _ = _tiny_module(tmp_path, "android-opencl")
    ours = transpose_append(kv.num_key_value_heads, kv.head_dim, "float16")
    assert tvm_ffi.structural_equal(mod[TRANSPOSE_APPEND], ours)
    cpu, _, _ = _tiny_module(tmp_path / "cpu", "cpu")
    assert not tvm_ffi.structural_equal(cpu[TRANSPOSE_APPEND], ours)  # TVM's serial one

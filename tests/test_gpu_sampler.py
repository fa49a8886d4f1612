"""The GPU sampler's functions (``compiler/gpu_sampler.py``), compiled for the CPU and
checked against numpy: a CUDA library carries the same Relax functions, with the target's
kernels."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from mlc_edge.compiler.contract import GPU_SAMPLER_FUNCTIONS
from mlc_edge.compiler.gpu_sampler import attach_gpu_sampler

VOCAB = 1000


@pytest.fixture(scope="module")
def vm():
    bb = relax.BlockBuilder()
    names = {gv.name_hint for gv in attach_gpu_sampler(bb)}
    assert names == GPU_SAMPLER_FUNCTIONS
    target = tvm.target.Target({"kind": "llvm"})
    with target:
        mod = relax.backend.DispatchSortScan()(bb.get())
    return relax.VirtualMachine(relax.build(mod, target), tvm.cpu())


def t(array) -> tvm.runtime.Tensor:
    return tvm.runtime.tensor(np.ascontiguousarray(array))


@pytest.fixture(scope="module")
def probs() -> np.ndarray:
    """Three rows over 1000 tokens, distinct values, a third of them zero."""
    rng = np.random.default_rng(0)
    p = rng.random((3, VOCAB)) ** 4
    p[rng.random((3, VOCAB)) < 0.3] = 0
    return (p / p.sum(axis=1, keepdims=True)).astype("float32")


def nucleus(row: np.ndarray, top_p: float) -> np.ndarray:
    """The top-p nucleus of one row, renormalised: the most probable tokens until their
    mass reaches ``top_p``, and any token as probable as the last one kept."""
    order = np.argsort(-row, kind="stable")
    kept, mass = [], 0.0
    for token in order:
        if mass >= top_p:
            break
        kept.append(token)
        mass += float(row[token])
    cutoff = row[kept[-1]]
    out = np.where(row >= cutoff, row, 0).astype("float64")
    return out / out.sum()


def test_multinomial_draws_follow_the_probabilities(vm, probs):
    n = 20_000
    uniform = ((np.arange(n) + 0.5) / n).astype("float32")  # an even grid over [0, 1)
    for row in range(3):
        tokens = vm["multinomial_from_uniform"](
            t(probs), t(uniform), t(np.full(n, row, "int32"))
        ).numpy()
        frequency = np.bincount(tokens, minlength=VOCAB) / n
        np.testing.assert_allclose(frequency, probs[row], atol=1.5 / n)
        assert probs[row][tokens].min() > 0  # never a token of probability 0
    # By hand: cumulative [0.1, 0.6, 0.6, 1.0]; the first entry above u.
    small = np.array([[0.1, 0.5, 0.0, 0.4], [0, 0, 1, 0]], "float32")
    got = vm["multinomial_from_uniform"](
        t(small),
        t(np.array([0.05, 0.1, 0.65, 0.0, 0.999], "float32")),
        t(np.array([0, 0, 0, 1, 1], "int32")),
    ).numpy()
    assert got.tolist() == [0, 1, 3, 2, 2]


def test_argsort_and_take_probs(vm, probs):
    sorted_probs, sorted_ids = vm["argsort_probs"](t(probs))
    sorted_probs, sorted_ids = sorted_probs.numpy(), sorted_ids.numpy()
    np.testing.assert_array_equal(sorted_probs, -np.sort(-probs, axis=1))
    np.testing.assert_array_equal(np.take_along_axis(probs, sorted_ids, 1), sorted_probs)
    assert sorted(sorted_ids[1]) == list(range(VOCAB))

    rows, tokens = np.array([2, 0], "int32"), np.array([17, 999], "int32")
    offsets = np.array([0, 1, 2 * VOCAB + 4], "int32")  # rank 0, 1 of row 0; rank 4 of row 2
    sampled, top_probs, top_ids = (
        x.numpy()
        for x in vm["sampler_take_probs"](t(probs), t(sorted_ids), t(rows), t(tokens), t(offsets))
    )
    np.testing.assert_array_equal(sampled, [probs[2, 17], probs[0, 999]])
    np.testing.assert_array_equal(top_ids, [sorted_ids[0, 0], sorted_ids[0, 1], sorted_ids[2, 4]])
    np.testing.assert_array_equal(
        top_probs, [sorted_probs[0, 0], sorted_probs[0, 1], sorted_probs[2, 4]]
    )


def test_top_p_sampling_and_renormalization(vm, probs):
    top_p = np.array([0.5, 0.9, 1.0], "float32")
    sorted_probs, sorted_ids = vm["argsort_probs"](t(probs))
    renormalized = vm["renormalize_by_top_p"](
        t(probs), t(top_p), t(np.zeros((3, 3), "float32"))
    ).numpy()
    n = 20_000
    uniform = ((np.arange(n) + 0.5) / n).astype("float32")
    for row in range(3):
        expected = nucleus(probs[row], float(top_p[row]))
        np.testing.assert_allclose(renormalized[row], expected, rtol=1e-5, atol=1e-7)
        tokens = vm["sample_with_top_p"](
            sorted_probs, sorted_ids, t(uniform), t(np.full(n, row, "int32")), t(top_p)
        ).numpy()
        frequency = np.bincount(tokens, minlength=VOCAB) / n
        np.testing.assert_allclose(frequency, expected, atol=1.5 / n)
    # By hand: sorted 0.5, 0.4, 0.1; top_p 0.5 keeps only the first, 0.9 the first two.
    small = np.array([[0.1, 0.5, 0.0, 0.4]], "float32")
    sp, si = vm["argsort_probs"](t(small))
    for p, u, token in ((0.5, 0.99, 1), (0.9, 0.5, 1), (0.9, 0.6, 3), (1.0, 0.95, 0)):
        got = vm["sample_with_top_p"](
            sp,
            si,
            t(np.array([u], "float32")),
            t(np.array([0], "int32")),
            t(np.array([p], "float32")),
        ).numpy()
        assert got.tolist() == [token], (p, u)
    got = vm["renormalize_by_top_p"](
        t(small), t(np.array([0.9], "float32")), t(np.zeros((1, 3), "float32"))
    ).numpy()
    np.testing.assert_allclose(got, [[0, 0.5 / 0.9, 0, 0.4 / 0.9]], rtol=1e-6)

"""Schedule rules for the desktop CPU (llvm) target.

``cpu_rules()`` is what ``tvm.s_tir.dlight.ApplyDefaultSchedule(*cpu_rules())`` takes:

0. :class:`Int4DecodeGEMVVNNIBytes` (``int4_gemv_vnni_bytes.py``) - on AVX-512 VNNI, an fp16
   4-bit layer's fused dequantize + matmul with one activation row (decode) and groups of
   up to 32 rows: byte dot products over 4 rows, the activations as 15-bit integers per
   group, the group's rows summed in registers.
   :class:`Int4DecodeGEMVVNNI` (``int4_gemv_vnni.py``) - the same with larger groups
   (``q4f16t-g128``): 16-bit dot products over 2 rows, the activations as int16.
   :class:`Int4DecodeGEMVAVX2` (``int4_gemv_avx2.py``) - on AVX2 without VNNI, the same
   for groups of up to 32 rows: 16-bit dot products (``vpmaddwd``) over 2 rows, the
   activations as 15-bit integers per group, the group's rows summed in registers; where
   it serves, the weights are stored in CPU tiles (``reads_tiles``;
   ``mlc_edge.quantization.int4``), which it alone reads (on any AVX2 CPU).
   :class:`Int4DecodeGEMV` (``int4_gemv.py``) - the other one-row 4-bit matmuls (fp32
   compute, other CPUs): rewritten per group, the nibbles masked in place.
   :class:`Int4Matmul` (``int4.py``) - the other 4-bit matmuls (prefill, batch decode): MatmulKN's
   loop nest, the packed words unpacked in its vector loop (a function it cannot tile: the
   dequantization inlined into the loads, then as ``ParallelSpatial``).
1. :class:`MatmulKN` - matmul/GEMV with the weight stored ``[K, N]`` (our linear layers),
   parallel over column chunks and vectorized over n, fp16 accumulated in fp32.
2. :class:`MatmulNK` - matmul/GEMV with the weight stored ``[N, K]`` (``nn.Linear`` after
   ``FuseTransposeMatmul``, tied embeddings): dot products vectorized over k.
3. ``dl.cpu.GEMV()`` - TVM's rule for other inner-reduction GEMVs. It is kept as a fallback
   only: it vectorizes across output rows and unrolls the reduction, which runs ~7x slower
   than MatmulNK and took LLVM 6 s to 5 min to compile on small shapes.
4. :class:`ParallelSpatial` - everything else with enough work (element-wise, norms,
   softmax, embedding ``take``...): its outer data-parallel loops run on the thread pool.

A function no rule takes stays as it is: unscheduled llvm code is slow but correct.

Build note (TVM 0.27): LLVM code generation drops ``noalias`` from every kernel of a module
as soon as one PrimFunc in it lacks ``tirx.noalias``, and the relax VM's shape functions
lack it. Without ``noalias`` LLVM keeps storing the prefill accumulator tile on every k
step (16-row prefill 6.0 ms instead of 3.4 ms for 2048x8192 fp32; decode GEMV is memory
bound and barely changes). Marking the functions with ``tirx.is_host_func`` (the shape
functions, one int64 buffer each) ``tirx.noalias`` after the relax pipeline restores it:
``benchmarks/cpu_gemv.py --noalias-fix`` shows the effect.
"""

from __future__ import annotations

import re

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import get_extent, try_inline_contiguous_spatial
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.s_tir.schedule import ScheduleError
from tvm.target import Target

from ..kn_pattern import match_kn_matmul, match_matmul
from .matmul_kn import CPURule, MatmulKN, MatmulNK, vector_bytes

__all__ = [
    "MatmulKN",
    "MatmulNK",
    "ParallelSpatial",
    "cpu_rules",
    "match_kn_matmul",
    "match_matmul",
    "vector_bytes",
]


def _has_parallel_or_threads(func: tirx.PrimFunc) -> bool:
    """Whether the function already uses parallel loops or thread bindings (scheduled)."""
    text = func.script()
    return "T.parallel(" in text or "T.thread_binding(" in text or "T.launch_thread(" in text


# Element-wise math LLVM lowers to a libm call per value (it has no vector form here).
_MATH_CALL = re.compile(r"\bT\.(exp|exp2|sigmoid|tanh|erf|pow|log|log2|sin|cos)\(")


def _calls_math(block: tirx.Stmt) -> bool:
    """Whether ``block`` calls one of those functions (TVM 0.27 has no Python visitor
    for TIR: its script is searched, as ``_has_parallel_or_threads`` does)."""
    return _MATH_CALL.search(block.script()) is not None


class ParallelSpatial(CPURule):
    """Run the outer data-parallel loops of each loop nest on the thread pool.

    Only loops that bind data-parallel block iterators are fused and parallelized (TVM's
    ``parallel`` primitive checks that too), so reductions stay serial inside one task and
    the result does not change. Nests with little work are left serial: waking the pool
    costs more than a few thousand scalar iterations. An iteration that calls a libm
    function (``exp``, ``sigmoid``...) counts as ``call_weight`` of them: decode's SiLU
    (8,192 sigmoids for Llama-3.2-1B) took 24 us a layer serial, 13 us on two threads.

    Parameters
    ----------
    min_work : int
        Minimum number of innermost iterations of a nest worth parallelizing.
    symbolic_guess : int
        Extent assumed for a symbolic loop (seq_len / batch) when estimating the work.
    call_weight : int
        What an iteration with a math-library call counts for in that estimate.
    """

    def __init__(self, min_work: int = 1 << 15, symbolic_guess: int = 16, call_weight: int = 8):
        self.min_work = min_work
        self.symbolic_guess = symbolic_guess
        self.call_weight = call_weight

    def _extent(self, sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> int:
        extent = get_extent(sch, loop)
        return extent if isinstance(extent, int) else self.symbolic_guess

    def schedule_func(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        if _has_parallel_or_threads(func):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = try_inline_contiguous_spatial(sch, infos)
        if not infos:
            return None
        # Loops shared by several blocks are left alone: the blocks may depend on each other
        # across iterations of a shared loop.
        nests = []
        for info in infos:
            loops = sch.get_loops(info.block_rv)
            if loops and len(loops) == len(info.iters):
                nests.append((info, loops, sch.get(loops[0])))
        changed = False
        for info, loops, outer in nests:
            if sum(1 for _, _, o in nests if o.same_as(outer)) > 1:
                continue
            lead = []
            for loop, it in zip(loops, info.iters, strict=True):
                if it.kind != "S":
                    break
                lead.append(loop)
            if not lead:
                continue
            work = self.call_weight if _calls_math(sch.get(info.block_rv)) else 1
            for loop in loops:
                work *= self._extent(sch, loop)
            par_extent = 1
            for loop in lead:
                par_extent *= self._extent(sch, loop)
            if work < self.min_work or par_extent < 2:
                continue
            try:
                fused = sch.fuse(*lead) if len(lead) > 1 else lead[0]
                sch.parallel(fused)
            except ScheduleError:  # the primitive refused: keep the nest serial
                continue
            changed = True
        return sch if changed else None


def cpu_rules() -> list[CPURule | CPUScheduleRule]:
    """The CPU schedule rules in priority order, for ``dl.ApplyDefaultSchedule(*cpu_rules())``."""
    from .int4 import Int4Matmul  # falls back to ParallelSpatial, defined above
    from .int4_gemv import Int4DecodeGEMV
    from .int4_gemv_avx2 import Int4DecodeGEMVAVX2
    from .int4_gemv_vnni import Int4DecodeGEMVVNNI
    from .int4_gemv_vnni_bytes import Int4DecodeGEMVVNNIBytes

    return [
        Int4DecodeGEMVVNNIBytes(),
        Int4DecodeGEMVVNNI(),
        Int4DecodeGEMVAVX2(),
        Int4DecodeGEMV(),
        Int4Matmul(),
        MatmulKN(),
        MatmulNK(),
        dl.cpu.GEMV(),
        ParallelSpatial(),
    ]

"""GPU memory plans of a bundle and MLC's load prediction (``mlc-edge memory``)."""

from .engine_estimate import EngineEstimate, estimate_engine_memory
from .plan import (
    OUR_FLOOR_BYTES,
    PAGE_SIZE,
    RUNTIME_OVERHEAD_BYTES,
    UPSTREAM_FLOOR_BYTES,
    LoadPrediction,
    MemoryPlan,
    WeightBreakdown,
    kv_tokens,
    make_plan,
    parse_size,
    predict_load,
    weight_breakdown,
)
from .report import table
from .sources import mlc_default_sizes, plan_from_bundle, plan_from_config

__all__ = [
    "OUR_FLOOR_BYTES",
    "PAGE_SIZE",
    "RUNTIME_OVERHEAD_BYTES",
    "UPSTREAM_FLOOR_BYTES",
    "LoadPrediction",
    "MemoryPlan",
    "WeightBreakdown",
    "kv_tokens",
    "make_plan",
    "parse_size",
    "predict_load",
    "weight_breakdown",
    "table",
    "mlc_default_sizes",
    "plan_from_bundle",
    "plan_from_config",
    "EngineEstimate",
    "estimate_engine_memory",
]

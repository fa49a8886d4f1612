"""Model families mlc-edge compiles, found from a config.json's ``architectures``.

A family is one folder here whose ``__init__.py`` declares ``FAMILY`` (a ``ModelFamily``)
and one line in ``FAMILIES``; what families share lives beside them (``hf_config.py``,
``layers.py``, ``llama_style.py``, ``decoder.py``), never in a sibling family.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from . import llama, phi, qwen2, qwen3
from .base import ModelFamily, ParamSource
from .decoder import DecoderLM, KVCacheShape
from .hf_config import RuntimeSizes

# Searched in this order; the error for an unknown architecture lists them in it too.
FAMILIES: tuple[ModelFamily, ...] = (llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, phi.FAMILY)


def find_family(hf_config: dict[str, Any]) -> ModelFamily:
    archs = hf_config.get("architectures") or []
    for family in FAMILIES:
        if any(a in family.architectures for a in archs):
            return family
    supported = ", ".join(a for f in FAMILIES for a in f.architectures)
    named = ", ".join(archs) if archs else f"model_type '{hf_config.get('model_type')}'"
    raise UserError(f"architecture {named} is not supported; supported: {supported}")


def family_by_model_type(model_type: str) -> ModelFamily | None:
    """The family whose bundles have ``model_type``, or None."""
    return next((f for f in FAMILIES if f.model_type == model_type), None)


__all__ = [
    "FAMILIES",
    "DecoderLM",
    "KVCacheShape",
    "ModelFamily",
    "ParamSource",
    "RuntimeSizes",
    "family_by_model_type",
    "find_family",
]

"""Compiler passes of our own: one pass a file, each for one reason."""

from .attach_logit_processor import AttachLogitProcessor
from .attach_metadata import AttachMetadata, memory_usage
from .attach_var_bounds import AttachVarBounds

__all__ = ["AttachLogitProcessor", "AttachMetadata", "AttachVarBounds", "memory_usage"]

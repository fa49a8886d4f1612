"""Run a bundle on this machine the way MLC-LLM's engine runs it on the phone."""

from .engine import Engine, GenerationResult
from .sampler import Sampler

__all__ = ["Engine", "GenerationResult", "Sampler"]

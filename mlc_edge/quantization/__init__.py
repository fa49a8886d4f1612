"""Weight schemes: how a Hugging Face weight is stored in the bundle and used by the model."""

from .schemes import SCHEMES, WeightScheme, get_scheme

__all__ = ["SCHEMES", "WeightScheme", "get_scheme"]

"""Model families (adapters) and model loading."""

from secateur.models.base import Adapter, Geometry, LinearView, get_adapter
from secateur.models.loading import ALIASES, DEFAULT_MODEL, LoadedModel, load_model

__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "Adapter",
    "Geometry",
    "LinearView",
    "LoadedModel",
    "get_adapter",
    "load_model",
]

"""zoo: the classic convolutional networks in JAX/Flax, with their training and weights."""

from zoo.features import feature_maps
from zoo.registry import ModelInfo, create_model, list_models, model_info, register_model
from zoo.summary import summary

__all__ = ["ModelInfo", "create_model", "feature_maps", "list_models", "model_info",
           "register_model", "summary"]

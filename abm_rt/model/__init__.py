"""PyTorch reference ABM: the oracle every other backend is checked against."""
from .abm import ABM, count_parameters, initialize, scaled_random_model
from .config import ModelConfig, feature_size
from .decoder import DecoderBranch, FeatureCache, StepOutput
from .encoder import DenseEncoder, feature_mask

__all__ = ["ABM", "ModelConfig", "DecoderBranch", "DenseEncoder", "FeatureCache", "StepOutput",
           "count_parameters", "initialize", "scaled_random_model", "feature_mask", "feature_size"]

"""nn.Modules only: the hybrid ConvNeXtV2 + separable self-attention classifier and its parts."""
from .attention import SeparableSelfAttention
from .hybrid import PRESETS, HybridConvNeXtV2
from .pretrained import PretrainedWeightsError, load_pretrained_weights

__all__ = ["HybridConvNeXtV2", "PRESETS", "SeparableSelfAttention", "PretrainedWeightsError",
           "load_pretrained_weights"]

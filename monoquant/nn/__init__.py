"""Quantized layer classes that replace float layers in place, and the registry that lists them."""

from .conv import QuantConv1d, QuantConv2d, QuantConv3d
from .conv_transpose import QuantConvTranspose2d
from .embedding import QuantEmbedding
from .hf_conv1d import QuantHFConv1D
from .linear import QuantLinear
from .module import QuantModule
from .registry import LAYERS, layer_class, quant_class_for, register_layer, replaces

__all__ = ["LAYERS", "QuantConv1d", "QuantConv2d", "QuantConv3d", "QuantConvTranspose2d", "QuantEmbedding",
           "QuantHFConv1D", "QuantLinear", "QuantModule", "layer_class", "quant_class_for", "register_layer",
           "replaces"]

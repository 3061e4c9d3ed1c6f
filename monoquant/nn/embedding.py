"""``QuantEmbedding``: a drop-in replacement for ``nn.Embedding`` whose table is stored quantized.

The table ``[num_embeddings, embedding_dim]`` is stored like a linear layer's weight ``[out, in]``: INT8 with
one scale per row, INT4 group-wise along the embedding dimension (or any registered format), so a language-model
head tied to the embedding can share the very same buffers. A lookup gathers only the requested rows of the
stored table and dequantizes those (:meth:`WeightSpec.take_rows`), never the whole table.

Embeddings stay float unless the config names a format for them: ``QuantConfig(weights=..., embeddings=mq.Int8())``.
``max_norm`` (which renormalises looked-up rows in place) cannot be honoured by a quantized table, so such layers
stay float with that reason; ``padding_idx`` is kept (the padding row is stored like any other; it is zero in a
trained model and quantizes to exactly zero). ``scale_grad_by_freq`` and ``sparse`` only affect gradients, which
quantized tables do not receive.

An index outside the table raises :class:`~monoquant.InputError`; in a graph compiled by torch.compile the
check is the gather's own (a ``RuntimeError``: index out of bounds), as reading it back would break the graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, InputError
from ..formats import Int8, WeightSpec
from .module import QuantModule
from .registry import register_layer


@register_layer
class QuantEmbedding(QuantModule):
    """``table[ids]`` with the table stored quantized; see the module docstring."""

    float_module_type = nn.Embedding
    GEOMETRY = ("num_embeddings", "embedding_dim", "padding_idx")
    quantizes_inputs = False  # inputs are indices
    kernel_family = "embedding"
    config_field = "embeddings"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        bias: bool = False,
        spec: WeightSpec | None = None,
        *,
        group_size: int | None = None,
        compute_dtype: torch.dtype | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if bias:
            raise ConfigError("an embedding has no bias; pass bias=False")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self._init_quant((num_embeddings, embedding_dim), spec or Int8(), bias=False, group_size=group_size,
                         compute_dtype=compute_dtype, device=device, dtype=dtype)

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        if getattr(module, "max_norm", None) is not None:
            return ("max_norm renormalises looked-up rows in place, which a quantized table cannot do; set "
                    "max_norm=None to quantize it")
        return None

    def make_float(self) -> nn.Module:
        return nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx,
                            device=self.qweight.device, dtype=self.float_dtype)

    float_weight_ranks = (2,)
    supports_gptq = False  # its input is indices: there is no Hessian of inputs to compensate rounding with

    @classmethod
    def empty_for_weight(cls, shape: tuple[int, ...], bias: bool, spec: WeightSpec, **kwargs: Any) -> QuantModule:
        return cls(shape[0], shape[1], bias=bias, spec=spec, **kwargs)

    def input_spec(self) -> tuple[int | None, int]:
        return None, -1

    def check_input(self, x: object, features: int | None, dim: int = -1) -> None:
        """Refuse anything but integer indices (range checks come with the lookup)."""
        if not isinstance(x, torch.Tensor) or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"QuantEmbedding looks up integer indices, got {what}; pass a LongTensor of token ids")

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return x  # indices: no input scale

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # the float type's name: keyword callers work
        ids = self.prepare_input(input)
        flat = ids.reshape(-1).long()
        if flat.numel() and not torch.compiler.is_compiling():  # traced: the gather itself checks the bounds
            lo, hi = (int(v) for v in torch.aminmax(flat))  # one reduction (and one device sync) per lookup
            if lo < 0 or hi >= self.num_embeddings:
                raise InputError(f"QuantEmbedding has {self.num_embeddings} rows but got indices from {lo} to {hi}")
        self.last_kernel = "gather_dequant"
        dtype = self.compute_dtype or self.float_dtype
        rows = self.spec.take_rows(self.stored, flat)
        out = torch.empty(flat.numel(), self.embedding_dim, dtype=dtype, device=self.qweight.device)
        self.spec.dequantize_into(out, rows, 0, self.spec.dequant_params(rows, dtype), self.group_size)
        return out.to(self.float_dtype).reshape(*ids.shape, self.embedding_dim)

    def kernel_summary(self) -> str:
        return "gather_dequant"

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}" + super().extra_repr()

"""``QuantLinear``: a drop-in replacement for ``nn.Linear`` with integer (or half) weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import call_plans, kernels, ops
from ..errors import SerializationError
from ..formats import Int8, WeightSpec
from .module import QuantModule
from .registry import register_layer


@register_layer
class QuantLinear(QuantModule):
    """``y = x W^T + b`` with ``W`` stored quantized; see :mod:`monoquant.kernels` for how it is computed.

    Build one with :meth:`from_float` (or let :func:`monoquant.quantize_` do it). The constructor makes an
    empty layer of the right shapes, which is what :func:`monoquant.load` fills from a file.

    ``input_permutation`` (``None`` unless set; an int64 ``[in_features]`` buffer, saved and loaded with the
    layer) reorders the input features before the stored weight is applied: ``y = x[..., p] W_p^T + b`` where
    ``W_p = W[:, p]`` is what the buffers hold. Act-order checkpoints from the Hub (GPTQ ``g_idx``) keep their
    group layout this way (:mod:`monoquant.hub_formats`); :attr:`weight` and :meth:`to_float` give ``W``.
    """

    float_module_type = nn.Linear
    GEOMETRY = ("in_features", "out_features")
    kernel_family = "linear"
    supports_input_scale = True
    float_weight_ranks = (2,)
    rank_fallback = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        spec: WeightSpec | None = None,
        *,
        group_size: int | None = None,
        compute_dtype: torch.dtype | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._init_quant((out_features, in_features), spec or Int8(), bias=bias, group_size=group_size,
                         compute_dtype=compute_dtype, device=device, dtype=dtype)
        self.register_buffer("input_permutation", None)

    @classmethod
    def empty_for_weight(cls, shape: tuple[int, ...], bias: bool, spec: WeightSpec, **kwargs: Any) -> QuantModule:
        out_features, in_features = shape
        return cls(in_features, out_features, bias, spec, **kwargs)

    def input_spec(self) -> tuple[int | None, int]:
        return self.in_features, -1

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """Reorder the input features (``input_permutation``, when set), then apply the input scale."""
        perm = self._buffers["input_permutation"]  # not self.input_permutation: nn.Module's __getattr__, per call
        if perm is not None:
            x = x.index_select(-1, perm)
        return self.scale_input(x)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # the float type's name: keyword callers work
        run = call_plans.lookup(self, input, True)  # an input like one before: one lookup, then the kernel
        if run is not None:
            return run(self, input)
        x = self.prepare_input(input)
        if torch.compiler.is_compiling():  # one custom op per layer for torch.compile / torch.export
            return ops.linear(self, x)
        return kernels.linear(self, x, raw_ok=x is input)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        perm = self.input_permutation
        if perm is None or perm.device.type == "meta":
            return
        if perm.dim() != 1 or not torch.equal(perm.sort().values, torch.arange(self.in_features, device=perm.device)):
            raise SerializationError(f"{prefix}input_permutation is not a permutation of the {self.in_features} "
                                     "input features; the file is corrupt (save the model again)")

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized float weight in the input order of the float layer (see ``input_permutation``)."""
        w = super().weight
        if self.input_permutation is None or self.gptq is not None:
            return w
        return w.index_select(1, torch.argsort(self.input_permutation))

    def kernel_summary(self) -> str:
        return kernels.kernel_summary(self)

    def storage_bytes(self) -> int:
        """The stored buffers (:meth:`QuantModule.storage_bytes`) plus the dequantized weight a small layer keeps
        for its float path (:func:`monoquant.kernels.kept_float_bytes`: at most
        :data:`~monoquant.kernels.FLOAT_WEIGHT_CACHE_BYTES`, counted whether or not a forward has built it yet)."""
        return super().storage_bytes() + kernels.kept_float_bytes(self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}" + \
            super().extra_repr()

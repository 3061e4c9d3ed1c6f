"""im2col: the input patches a convolution multiplies its kernel with, as rows of a matrix.

A conv of ``groups`` groups computes, for every output position, ``W_g @ patch_g`` where ``W_g`` is the
group's ``[out_channels/groups, in_channels/groups * prod(kernel)]`` weight view (the flattening used for
quantization, see :mod:`monoquant.schemes`) and ``patch_g`` the matching input values, flattened in the same
(input channel, kernel position) order. :func:`conv_patches` returns those patches for every group, so a
convolution's GPTQ input statistic is built exactly like a Linear layer's: ``sum patch^T patch`` per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ConvGeometry:
    """What decides which input values meet which kernel weight: per spatial dim, kernel size, stride and
    dilation; ``pads`` in :func:`torch.nn.functional.pad` order (last dim first, left then right; ``'same'``
    already resolved); ``padding_mode`` (``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``);
    ``groups``."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[int, ...]
    padding_mode: str
    groups: int

    @classmethod
    def of(cls, conv: nn.Module) -> ConvGeometry:
        """The geometry of an ``nn.Conv1d/2d/3d`` or a ``QuantConv1d/2d/3d``."""
        return cls(tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation),
                   tuple(conv._reversed_padding_repeated_twice), conv.padding_mode, conv.groups)

    @property
    def dims(self) -> int:
        return len(self.kernel_size)

    def output_size(self, spatial: tuple[int, ...] | torch.Size) -> list[int]:
        """Output positions per spatial dim for an input of spatial size ``spatial`` (unpadded)."""
        dims = self.dims
        return [(size + self.pads[2 * (dims - 1 - d)] + self.pads[2 * (dims - 1 - d) + 1] - dil * (k - 1) - 1) // s + 1
                for d, (size, k, s, dil) in enumerate(zip(spatial, self.kernel_size, self.stride, self.dilation))]

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """The input patches GPTQ builds a layer's Hessian from (:func:`conv_patches`); a layer whose input
        reaches its kernel otherwise (a transposed convolution) returns a subclass that overrides this."""
        return conv_patches(x, self)


def conv_patches(x: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """``[groups, rows, in_channels/groups * prod(kernel)]`` input patches of a conv for input ``x``.

    ``x`` is ``[batch, channels, *spatial]`` or unbatched ``[channels, *spatial]``; ``rows`` is batch times
    the number of output positions. Row ``r`` of group ``g`` dotted with row ``o`` of the weight's 2-D view
    (``o`` in group ``g``) is output channel ``o`` at position ``r``, bias excluded.
    """
    dims = geometry.dims
    if x.dim() == dims + 1:
        x = x.unsqueeze(0)
    if any(geometry.pads):
        mode = "constant" if geometry.padding_mode == "zeros" else geometry.padding_mode
        x = F.pad(x, list(geometry.pads), mode=mode)
    for d, (k, s, dil) in enumerate(zip(geometry.kernel_size, geometry.stride, geometry.dilation)):
        # windows along spatial dim d, appended as a new last dim; keep every dil-th value of each window
        x = x.unfold(2 + d, dil * (k - 1) + 1, s)[..., ::dil]
    batch, channels = x.shape[:2]
    groups = geometry.groups
    # [B, G, C/G, *out, *kernel] -> [G, B, *out, C/G, *kernel]
    x = x.reshape(batch, groups, channels // groups, *x.shape[2:])
    out_dims = list(range(3, 3 + dims))
    x = x.permute(1, 0, *out_dims, 2, *range(3 + dims, 3 + 2 * dims))
    return x.reshape(groups, -1, channels // groups * int(torch.Size(geometry.kernel_size).numel()))

"""INT4 <-> bytes.

Canonical stored layout (the only one written to buffers and files)::

    packed[n, j] = (q[n, 2j] & 0xF) | ((q[n, 2j + 1] & 0xF) << 4)        dtype uint8, shape [N, ceil(K / 2)]

i.e. two unsigned 4-bit codes per byte, the **low nibble holds the even column**, rows are output
channels and columns run along the input dimension. When ``K`` is odd the last byte's high nibble is 0
and is ignored by :func:`unpack_int4`. Kernel-specific layouts (the CPU/CUDA ``int4pack`` tiles) are
derived from this one at first use by :mod:`monoquant.kernels` and never stored.
"""

from __future__ import annotations

import torch

from .errors import ConfigError


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit codes ``q`` (integer dtype, values 0..15, ``[N, K]``) into ``[N, ceil(K/2)]`` uint8."""
    if q.dim() != 2:
        raise ConfigError(f"pack_int4 expects a 2-D [out, in] tensor, got shape {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ConfigError("pack_int4 expects codes in 0..15; offset signed codes by +8 first")
    q = q.to(torch.uint8)
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[N, ceil(cols/2)]`` uint8 -> ``[N, cols]`` uint8 codes."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != (cols + 1) // 2:
        raise ConfigError(
            f"unpack_int4 expects a [N, {(cols + 1) // 2}] uint8 tensor for {cols} columns, "
            f"got {tuple(packed.shape)} {packed.dtype}"
        )
    out = torch.empty(packed.shape[0], packed.shape[1], 2, dtype=torch.uint8, device=packed.device)
    torch.bitwise_and(packed, 0xF, out=out[..., 0])
    torch.bitwise_right_shift(packed, 4, out=out[..., 1])
    return out.reshape(packed.shape[0], 2 * packed.shape[1])[:, :cols]

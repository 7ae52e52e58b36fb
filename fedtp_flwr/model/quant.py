"""Absmax quantization of 2-D weights: how the frozen context of a slice travels and is held in memory.

A tensor [rows, cols] is cut into groups: each row (group_size None) or each run of `group_size`
consecutive columns of a row (the last run may be shorter). Each group g gets one scale
s_g = max|x in g| / qmax, and each element x of g is stored as q = round(x / s_g), clamped to
[-qmax, qmax]; it dequantizes to q * s_g. Hence the error bound, per element:

    |x - dequantize(quantize(x))| <= s_g / 2        (up to float32 rounding, ~1e-6 relative)

and an all-zero group has s_g = 0 and dequantizes to exact zeros (nothing divides by zero).

Layouts (what `to_arrays` carries; the receiver knows bits and group_size from the run config and the
shape from ModelArgs, and `QTensor.from_arrays` checks every array against them):

| bits | "q"                                   | "scale"                       | bytes / parameter    |
|------|---------------------------------------|-------------------------------|----------------------|
| 8    | int8 [rows, cols], values in [-127, 127] | float32 [rows, n_groups]   | 1 + 4 / group width  |
| 4    | uint8 [rows, ceil(cols/2)], 2 per byte   | float32 [rows, n_groups]   | 0.5 + 4 / group width|
| 16   | bfloat16 [rows, cols] (int16 on the wire) | none                      | 2                    |

n_groups is 1 per row, or ceil(cols / group_size). 4-bit packing: byte j of a row holds column 2j in its
low nibble and column 2j+1 in its high nibble, each as q + 8 (1..15); an odd last column's missing
partner is stored as 8 (zero).

Scales are float32, not bfloat16: per row (cols in the thousands for Llama 3.2) they cost under 0.2% of
the int4 payload either way, and at group_size 128 float32 costs 0.031 bytes/parameter against 0.016
(6% vs 3% of int4). bfloat16 would round the scale after it is chosen, so the bound above would need a
round-up rule and could clamp; float32 keeps it exact for that small price.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch

from .rows import row_slices, rows_per_block

BITS = (4, 8, 16)
QMAX = {8: 127, 4: 7}


@dataclass(frozen=True)
class QTensor:
    """A quantized 2-D tensor: `data` and `scale` in the layout of the module docstring."""

    data: torch.Tensor
    scale: Optional[torch.Tensor]  # float32 [rows, n_groups]; None for bits=16
    bits: int
    shape: tuple[int, int]  # the original [rows, cols]
    group_size: Optional[int]  # None: one scale per row

    @property
    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        return n + (0 if self.scale is None else self.scale.numel() * self.scale.element_size())

    def rows(self, index: torch.Tensor | slice) -> "QTensor":
        """The QTensor of rows `index` (an int64 index tensor or a slice): data and scales are stored per row,
        so any rows can be dequantized without the rest (an embedding lookup, a block of output rows)."""
        data = self.data[index]
        scale = None if self.scale is None else self.scale[index]
        return QTensor(data, scale, self.bits, (data.shape[0], self.shape[1]), self.group_size)

    def to(self, device) -> "QTensor":
        scale = None if self.scale is None else self.scale.to(device)
        return QTensor(self.data.to(device), scale, self.bits, self.shape, self.group_size)

    def to_arrays(self) -> dict[str, torch.Tensor]:
        """{"q": data, "scale": scale} as plain-numpy dtypes (bf16 data is viewed as int16, bit for bit)."""
        data = self.data.view(torch.int16) if self.bits == 16 else self.data
        out = {"q": data.detach().cpu().contiguous()}
        if self.scale is not None:
            out["scale"] = self.scale.detach().cpu().contiguous()
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, torch.Tensor | np.ndarray], bits: int, shape: tuple[int, int],
                    group_size: Optional[int]) -> "QTensor":
        """Inverse of `to_arrays`. Refuses arrays whose keys, dtypes or shapes differ from the layout that
        bits, shape and group_size imply, and scales that are negative or not finite. No copy."""
        data_shape, data_dtype, scale_shape = layout(shape, bits, group_size)
        expected_keys = {"q"} if scale_shape is None else {"q", "scale"}
        if set(arrays) != expected_keys:
            raise ValueError(f"{bits}-bit arrays must have keys {sorted(expected_keys)}, got {sorted(arrays)}")
        wire_dtype = torch.int16 if bits == 16 else data_dtype
        data = torch.as_tensor(arrays["q"])
        _check_array("q", data, wire_dtype, data_shape)
        data = data.view(torch.bfloat16) if bits == 16 else data
        scale = None
        if scale_shape is not None:
            scale = torch.as_tensor(arrays["scale"])
            _check_array("scale", scale, torch.float32, scale_shape)
            if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
                raise ValueError("scales must be finite and >= 0")
        return cls(data, scale, bits, tuple(shape), group_size)


def _check_array(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise ValueError(f"array {name!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {tuple(shape)}")


def _check(bits: int, group_size: Optional[int]) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    if group_size is not None and (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1):
        raise ValueError(f"group_size must be a positive integer or None (one scale per row), got {group_size!r}")


def _groups(cols: int, group_size: Optional[int]) -> tuple[int, int]:
    """(n_groups, group width). Per row: one group as wide as the row (at least 1, so cols=0 works)."""
    if group_size is None:
        return 1, max(cols, 1)
    return math.ceil(cols / group_size), group_size


def layout(shape: tuple[int, int], bits: int, group_size: Optional[int]):
    """(data shape, data dtype, scale shape or None) of a QTensor of `shape`."""
    _check(bits, group_size)
    rows, cols = shape
    if bits == 16:
        return (rows, cols), torch.bfloat16, None
    n_groups, _ = _groups(cols, group_size)
    data_shape = (rows, cols) if bits == 8 else (rows, (cols + 1) // 2)
    return data_shape, (torch.int8 if bits == 8 else torch.uint8), (rows, n_groups)


def quantized_nbytes(shape: tuple[int, int], bits: int, group_size: Optional[int]) -> int:
    """Bytes a QTensor of `shape` holds, without building it."""
    data_shape, dtype, scale_shape = layout(shape, bits, group_size)
    n = math.prod(data_shape) * torch.empty((), dtype=dtype).element_size()
    return n + (0 if scale_shape is None else 4 * math.prod(scale_shape))


def _grouped(x: torch.Tensor, n_groups: int, width: int) -> torch.Tensor:
    """[rows, cols] -> [rows, n_groups, width], zero-padding the last group."""
    pad = n_groups * width - x.shape[1]
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(x.shape[0], n_groups, width)


@torch.no_grad()
def quantize(t: torch.Tensor, bits: int, group_size: Optional[int] = None,
             generator: Optional[torch.Generator] = None) -> QTensor:
    """Absmax-quantize a 2-D float tensor (see the module docstring for the layout and the error bound).

    With `generator`, stochastic rounding: q = floor(x / s + u), u ~ U[0, 1) from the generator, so that the
    dequantized value is x in expectation (an unbiased update; the bound becomes |error| < s_g)."""
    _check(bits, group_size)
    if t.dim() != 2 or not t.is_floating_point():
        raise ValueError(f"quantize takes a 2-D float tensor, got {t.dtype} {tuple(t.shape)}")
    rows, cols = t.shape
    if bits == 16:
        return QTensor(t.detach().to(torch.bfloat16).contiguous(), None, 16, (rows, cols), group_size)
    if not bool(torch.isfinite(t).all()):
        raise ValueError("quantize: the tensor has non-finite values")
    qmax = QMAX[bits]
    n_groups, width = _groups(cols, group_size)
    x = _grouped(t.detach().float(), n_groups, width)  # (rows, n_groups, width)
    scale = x.abs().amax(dim=-1) / qmax  # (rows, n_groups); 0 for an all-zero group
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    if generator is None:
        q = torch.round(x / divisor[..., None])
    else:
        noise = torch.rand(x.shape, generator=generator, device=x.device)
        q = torch.floor(x / divisor[..., None] + noise)
    q = q.clamp_(-qmax, qmax).to(torch.int8)
    q = q.reshape(rows, n_groups * width)[:, :cols]
    data = q.contiguous() if bits == 8 else _pack_int4(q)
    return QTensor(data, scale.contiguous(), bits, (rows, cols), group_size)


def quantize_rows(t: torch.Tensor, bits: int, group_size: Optional[int] = None,
                  generator: Optional[torch.Generator] = None, block_values: int = 2**22) -> QTensor:
    """`quantize`, a block of rows at a time (rows are quantized independently, so the result is the same
    layout): the float32 temporaries stay at a block's size, not the tensor's (a 3B embedding is 394M values)."""
    if t.shape[0] <= rows_per_block(t.shape[1], block_values):
        return quantize(t, bits, group_size, generator)
    parts = [quantize(t[rows], bits, group_size, generator) for rows in row_slices(t.shape[0], t.shape[1], block_values)]
    scale = None if bits == 16 else torch.cat([p.scale for p in parts])
    return QTensor(torch.cat([p.data for p in parts]), scale, bits, tuple(t.shape), group_size)


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [rows, cols] tensor that `q` stands for, in `dtype` (a new tensor; `q` is left as it is)."""
    rows, cols = q.shape
    if q.bits == 16:
        return q.data.to(dtype)
    values = q.data if q.bits == 8 else _unpack_int4(q.data, cols)
    n_groups, width = _groups(cols, q.group_size)
    x = _grouped(values.to(torch.float32), n_groups, width) * q.scale[..., None]
    return x.reshape(rows, n_groups * width)[:, :cols].to(dtype)


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [rows, cols] in [-7, 7] -> uint8 [rows, ceil(cols/2)]: low nibble even column, high odd."""
    rows, cols = q.shape
    if cols % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    u = (q + 8).to(torch.uint8).reshape(rows, q.shape[1] // 2, 2)
    return (u[..., 0] | (u[..., 1] << 4)).contiguous()


def _unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of _pack_int4: uint8 [rows, ceil(cols/2)] -> int8 [rows, cols]."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], 2 * packed.shape[1])[:, :cols]

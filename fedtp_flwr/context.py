"""Context mode: a client trains its tensor-parallel slice inside the full-width model.

Every split linear of the full model becomes a `FrozenContextLinear`: a trainable parameter `weight`
holding this rank's block, plus the other ranks' blocks ("the rest") frozen in low-bit form
(`quant.QTensor`, absmax int8/int4 or bf16). Replicated parameters (embeddings, norms, output) are
ordinary trainable parameters. So the model's state dict is exactly the rank's slice, as
`sharding.shard` returns it, and the reply code uploads it unchanged; the rest never leaves the client.

Memory: the rest is held low-bit (non-persistent buffers, never in the state dict). Each forward and
each backward of a layer dequantizes its rest into a transient full weight; a custom autograd function
saves only the layer input and the slice for backward, so no dequantized copy lives between the
forward and the backward either (plain autograd through torch.cat + F.linear would keep every layer's
full fp32 weight until backward). The backward also computes the weight gradient of the slice only.

What a round needs on each side (the strategy and client glue):
- server: `quantize_rest(context_rest(full_state, args, rank, W), bits, group_size)`, sent with
  `rest_to_arrays` next to the slice;
- client: `rest_from_arrays(arrays, args, W, bits, group_size)` and
  `build_context_model(args, rank, W, slice_state, rest_q, device)`, then `train_local` as usual.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .model import ModelArgs, Transformer
from .quant import QTensor, dequantize, quantize
from .sharding import REPLICATE, Split, check_world_size, rule_for, shard, slice_shapes


# ------------------------------------------------------------------------------------------- the rest


def split_names(args: ModelArgs) -> list[str]:
    """State-dict names of the parameters the plan splits, in model order."""
    with torch.device("meta"):
        names = list(Transformer(args).state_dict())
    return [n for n in names if rule_for(n) is not REPLICATE]


def rest_shapes(args: ModelArgs, world_size: int) -> dict[str, tuple[int, int]]:
    """Shape of every split parameter with one rank's block removed (the same for every rank)."""
    sliced = slice_shapes(args, world_size)
    with torch.device("meta"):
        full = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    out = {}
    for name in split_names(args):
        dim = rule_for(name).dim
        shape = list(full[name])
        shape[dim] -= sliced[name][dim]
        out[name] = tuple(shape)
    return out


def context_rest(full_state: Mapping[str, torch.Tensor], args: ModelArgs, rank: int,
                 world_size: int) -> dict[str, torch.Tensor]:
    """For each split parameter: the full tensor with rank's block removed (the other ranks' blocks,
    in rank order, concatenated along the plan's split dim). A new tensor per parameter."""
    sliced = shard(full_state, args, rank, world_size)  # checks the keys, shapes, rank and world size
    out = {}
    for name, t in full_state.items():
        rule = rule_for(name)
        if rule is REPLICATE:
            continue
        size = sliced[name].shape[rule.dim]
        before = t.narrow(rule.dim, 0, rank * size)
        after = t.narrow(rule.dim, (rank + 1) * size, t.shape[rule.dim] - (rank + 1) * size)
        out[name] = torch.cat((before, after), dim=rule.dim)
    return out


def quantize_rest(rest: Mapping[str, torch.Tensor], bits: int, group_size: Optional[int] = None) -> dict[str, QTensor]:
    """`quant.quantize` of every tensor of `rest` (see quant.py for the layout and the error bound)."""
    return {name: quantize(t, bits, group_size) for name, t in rest.items()}


def rest_to_arrays(rest_q: Mapping[str, QTensor]) -> dict[str, torch.Tensor]:
    """Flat {"<param name>:q": ..., "<param name>:scale": ...}, plain numpy dtypes, for an ArrayRecord."""
    return {f"{name}:{part}": t for name, q in rest_q.items() for part, t in q.to_arrays().items()}


def rest_from_arrays(arrays: Mapping[str, torch.Tensor], args: ModelArgs, world_size: int, bits: int,
                     group_size: Optional[int] = None) -> dict[str, QTensor]:
    """Inverse of `rest_to_arrays`, checked against what the receiver knows: the full ModelArgs, the world
    size, bits and group_size. Refuses a missing or unknown key and any dtype or shape that differs."""
    shapes = rest_shapes(args, world_size)
    grouped: dict[str, dict[str, torch.Tensor]] = {name: {} for name in shapes}
    for key, t in arrays.items():
        name, _, part = key.rpartition(":")
        if name not in grouped:
            raise ValueError(f"context array {key!r} names no split parameter of this model")
        grouped[name][part] = t
    return {name: QTensor.from_arrays(parts, bits, shapes[name], group_size) for name, parts in grouped.items()}


# ---------------------------------------------------------------------------------------- the linear


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """What nn.Linear would compute in: the autocast dtype when autocast is on, else the weight's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


class _ContextLinearFn(torch.autograd.Function):
    """y = x @ full^T with full = the dequantized rest and the slice, rebuilt in forward and in backward.
    Saves x and the slice only; returns gradients for x and the slice (none for the frozen rest)."""

    @staticmethod
    def forward(ctx, x, weight, layer):
        dtype = _compute_dtype(x, weight)
        xc = x.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(xc, layer.full_weight(weight, dtype))
        ctx.layer, ctx.dtype, ctx.x_dtype = layer, dtype, x.dtype
        ctx.save_for_backward(xc, weight)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        xc, weight = ctx.saved_tensors
        layer, dtype = ctx.layer, ctx.dtype
        grad_x = grad_w = None
        with torch.autocast(grad_y.device.type, enabled=False):
            g = grad_y.to(dtype)
            if ctx.needs_input_grad[0]:
                grad_x = (g @ layer.full_weight(weight, dtype)).to(ctx.x_dtype)  # (..., in)
            if ctx.needs_input_grad[1]:
                g2, x2 = g.reshape(-1, g.shape[-1]), xc.reshape(-1, xc.shape[-1])
                lo, size = layer.rank * weight.shape[layer.split.dim], weight.shape[layer.split.dim]
                if layer.split.dim == 0:  # the slice's output rows
                    grad_w = g2.narrow(1, lo, size).t() @ x2
                else:  # the slice's input columns
                    grad_w = g2.t() @ x2.narrow(1, lo, size)
                grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w, None


class FrozenContextLinear(nn.Linear):
    """A full-width bias-free linear [out_features, in_features] whose `weight` parameter is only this
    rank's block along `split.dim`; the other ranks' blocks are a frozen QTensor held in non-persistent
    buffers (`rest_data`, `rest_scale`), so `state_dict()` is {"weight": slice} and nothing else.

    A subclass of nn.Linear so that code treating linear weights alike (AdamW weight decay in
    `training.param_groups`) treats the slice as it treats the same weight of the full model."""

    def __init__(self, in_features: int, out_features: int, split: Split, rank: int, world_size: int,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device="meta")
        full = [out_features, in_features]
        if full[split.dim] % world_size:
            raise ValueError(f"dim {split.dim} of a {tuple(full)} weight does not divide by world size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.split, self.rank, self.world_size = split, rank, world_size
        block = list(full)
        block[split.dim] //= world_size
        self.weight = nn.Parameter(torch.empty(block, device=device, dtype=dtype))
        rest = list(full)
        rest[split.dim] -= block[split.dim]
        self.rest_shape = tuple(rest)
        self.rest_bits: Optional[int] = None
        self.rest_group_size: Optional[int] = None
        self.register_buffer("rest_data", None, persistent=False)
        self.register_buffer("rest_scale", None, persistent=False)

    def load_rest(self, rest: QTensor) -> None:
        """Hold `rest` (moved to the weight's device, kept low-bit) as the frozen blocks."""
        if tuple(rest.shape) != self.rest_shape:
            raise ValueError(f"the frozen rest has shape {tuple(rest.shape)}, this layer needs {self.rest_shape}")
        rest = rest.to(self.weight.device)
        self.rest_data, self.rest_scale = rest.data, rest.scale
        self.rest_bits, self.rest_group_size = rest.bits, rest.group_size

    @property
    def rest(self) -> QTensor:
        if self.rest_data is None:
            raise RuntimeError("FrozenContextLinear has no frozen rest; call load_rest first")
        return QTensor(self.rest_data, self.rest_scale, self.rest_bits, self.rest_shape, self.rest_group_size)

    def full_weight(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The full [out, in] weight in `dtype`: the dequantized rest with `weight` inserted at this rank's
        position along the split dim. A new, transient tensor."""
        rest = dequantize(self.rest, dtype)
        dim, lo = self.split.dim, self.rank * weight.shape[self.split.dim]
        before, after = rest.narrow(dim, 0, lo), rest.narrow(dim, lo, rest.shape[dim] - lo)
        return torch.cat((before, weight.to(dtype), after), dim=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ContextLinearFn.apply(x, self.weight, self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, split_dim={self.split.dim}, "
                f"rank={self.rank}/{self.world_size}, rest_bits={self.rest_bits}")


# ----------------------------------------------------------------------------------------- the model


def build_context_model(args: ModelArgs, rank: int, world_size: int, slice_state: Mapping[str, torch.Tensor],
                        rest_q: Mapping[str, QTensor], device="cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """The full-width Transformer(args) for `rank`: every split linear a FrozenContextLinear holding the
    slice (trainable, in `dtype`) and `rest_q` (frozen, low-bit); replicated parameters trainable.

    `slice_state` is what `shard(full, args, rank, world_size)` returns; `state_dict()` of the result has
    exactly its keys and shapes. Built on the meta device, so the full model is never allocated."""
    check_world_size(args, world_size)
    expected = set(split_names(args))
    if set(rest_q) != expected:
        diff = sorted(set(rest_q) ^ expected)
        raise KeyError(f"the frozen rest must hold exactly the split parameters; differs in {diff[:5]}")
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
        for name in expected:
            path = name.removesuffix(".weight")
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            old = getattr(parent, attr)
            setattr(parent, attr, FrozenContextLinear(old.in_features, old.out_features, rule_for(name), rank,
                                                      world_size, dtype=dtype))
    model = model.to_empty(device=device)
    model.load_state_dict(slice_state, strict=True)
    for name in expected:
        model.get_submodule(name.removesuffix(".weight")).load_rest(rest_q[name])
    return model

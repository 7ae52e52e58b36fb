"""Context mode: a client trains its tensor-parallel slice inside the full-width model.

Every split linear of the full model becomes a `FrozenContextLinear`: a trainable parameter `weight`
holding this rank's block, plus the other ranks' blocks ("the rest") frozen in low-bit form
(`quant.QTensor`, absmax int8/int4 or bf16). Replicated parameters (embeddings, norms, output) are
ordinary trainable parameters. So the model's state dict is exactly the rank's slice, as
`sharding.shard` returns it, and the reply code uploads it unchanged; the rest never leaves the client.
With `vocab_parallel`, `tok_embeddings` and `output` are split by vocabulary rows too: the output becomes a
FrozenContextLinear (its frozen rows are dequantized a block of rows at a time, so the softmax covers the
whole vocabulary without the full weight), the embedding a `FrozenContextEmbedding` (a token of another
rank reads its frozen row, dequantized alone).

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

import contextlib
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .quant import QTensor, dequantize, quantize
from .rows import row_slices
from .sharding import REPLICATE, Split, block, block_position, check_world_size, full_shapes, rule_for, shard, slice_shapes
from .transformer import ModelArgs, Transformer

# Bit widths of the frozen rest (context-bits): int4, int8, or bfloat16 (quant.py's layouts). Listed here, not taken
# from quant.BITS, so that a layout added to quant.py for another use does not become a context width unnoticed.
CONTEXT_BITS = (4, 8, 16)

# ------------------------------------------------------------------------------------------- the rest


def split_names(args: ModelArgs, vocab_parallel: bool = False) -> list[str]:
    """State-dict names of the parameters the plan splits, in model order."""
    return [n for n in full_shapes(args) if rule_for(n, vocab_parallel) is not REPLICATE]


def rest_shapes(args: ModelArgs, world_size: int, vocab_parallel: bool = False) -> dict[str, tuple[int, int]]:
    """Shape of every split parameter with one rank's block removed (the same for every rank)."""
    sliced = slice_shapes(args, world_size, vocab_parallel)
    full = full_shapes(args)
    out = {}
    for name in split_names(args, vocab_parallel):
        dim = rule_for(name, vocab_parallel).dim
        shape = list(full[name])
        shape[dim] -= sliced[name][dim]
        out[name] = tuple(shape)
    return out


def context_rest(full_state: Mapping[str, torch.Tensor], args: ModelArgs, rank: int,
                 world_size: int, vocab_parallel: bool = False) -> dict[str, torch.Tensor]:
    """For each split parameter: the full tensor with rank's block removed (the other ranks' blocks,
    in rank order, concatenated along the plan's split dim). A new tensor per parameter."""
    shard(full_state, args, rank, world_size, vocab_parallel)  # checks the keys, shapes, rank and world size
    out = {}
    for name, t in full_state.items():
        rule = rule_for(name, vocab_parallel)
        if rule is REPLICATE:
            continue
        lo, size = block(args, rule, rank, world_size)
        before = t.narrow(rule.dim, 0, lo)
        after = t.narrow(rule.dim, lo + size, t.shape[rule.dim] - lo - size)
        out[name] = torch.cat((before, after), dim=rule.dim)
    return out


def quantize_rest(rest: Mapping[str, torch.Tensor], bits: int, group_size: Optional[int] = None) -> dict[str, QTensor]:
    """`quant.quantize` of every tensor of `rest` (see quant.py for the layout and the error bound)."""
    return {name: quantize(t, bits, group_size) for name, t in rest.items()}


def rest_to_arrays(rest_q: Mapping[str, QTensor]) -> dict[str, torch.Tensor]:
    """Flat {"<param name>:q": ..., "<param name>:scale": ...}, plain numpy dtypes, for an ArrayRecord."""
    return {f"{name}:{part}": t for name, q in rest_q.items() for part, t in q.to_arrays().items()}


def rest_from_arrays(arrays: Mapping[str, torch.Tensor], args: ModelArgs, world_size: int, bits: int,
                     group_size: Optional[int] = None, vocab_parallel: bool = False) -> dict[str, QTensor]:
    """Inverse of `rest_to_arrays`, checked against what the receiver knows: the full ModelArgs, the world
    size, bits, group_size and vocab_parallel. Refuses a missing or unknown key and any dtype or shape that
    differs."""
    shapes = rest_shapes(args, world_size, vocab_parallel)
    grouped: dict[str, dict[str, torch.Tensor]] = {name: {} for name in shapes}
    for key, t in arrays.items():
        name, _, part = key.rpartition(":")
        if name not in grouped:
            raise ValueError(f"context array {key!r} names no split parameter of this model")
        grouped[name][part] = t
    return {name: QTensor.from_arrays(parts, bits, shapes[name], group_size) for name, parts in grouped.items()}


# ---------------------------------------------------------------------------------------- the linear


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """What nn.Linear would compute in: the autocast dtype when autocast is on, else the weight's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def no_autocast(device: torch.device):
    """Autocast off on `device` (a no-op context on devices autocast does not know, e.g. meta)."""
    if device.type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class _ContextLinearFn(torch.autograd.Function):
    """y = x @ full^T with full = the dequantized rest and the slice, rebuilt in forward and in backward.
    Saves x and the slice only; returns gradients for x and the slice (none for the frozen rest)."""

    @staticmethod
    def forward(ctx, x, weight, layer):
        dtype = compute_dtype(x, weight)
        xc = x.to(dtype)
        with no_autocast(x.device):
            y = layer.matmul(xc, weight, dtype)
        ctx.layer, ctx.dtype, ctx.x_dtype = layer, dtype, x.dtype
        ctx.save_for_backward(xc, weight)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        xc, weight = ctx.saved_tensors
        layer, dtype = ctx.layer, ctx.dtype
        grad_x = grad_w = None
        with no_autocast(grad_y.device):
            g = grad_y.to(dtype)
            if ctx.needs_input_grad[0]:
                grad_x = layer.matmul_t(g, weight, dtype).to(ctx.x_dtype)  # (..., in)
            if ctx.needs_input_grad[1]:
                grad_w = layer.slice_grad(g, xc).to(weight.dtype)
        return grad_x, grad_w, None


# Values of a full weight rebuilt at once (a block of its rows): dequantizing takes ~9 B per value
# (the codes, a float32 copy, the scaled float32), so this bounds a context layer's transient to ~20 MB
# however large the layer (the 3B's 128k-row output at W=8 holds 345M frozen values).
ROW_BLOCK_VALUES = 2**21
DEQUANT_BYTES_PER_VALUE = 9


class _FrozenRest:
    """The frozen low-bit part of a context layer: a QTensor kept in non-persistent buffers (`rest_data`,
    `rest_scale`), so it moves with the module but never enters the state dict."""

    def _init_rest(self, rest_shape: tuple[int, int]) -> None:
        self.rest_shape = tuple(rest_shape)
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
            raise RuntimeError(f"{type(self).__name__} has no frozen rest; call load_rest first")
        return QTensor(self.rest_data, self.rest_scale, self.rest_bits, self.rest_shape, self.rest_group_size)


class RestAdapter(nn.Module):
    """A low-rank update of a context layer's frozen rest: delta = b @ a, with a [rank, rest columns] and
    b [rest rows, rank], so every element outside this rank's block can move while the rest itself stays frozen
    and low-bit. The product is never formed on the client: the layer applies x -> (x @ a^T) @ b^T.

    Init as LoRA: a ~ U(-1/sqrt(cols), 1/sqrt(cols)) (kaiming-uniform with a = sqrt(5), as nn.Linear and peft),
    b = 0, so the model starts as received. The server folds each client's product into the full model
    (server/aggregation.py), the next round's rest is quantized from it, and the adapter restarts."""

    def __init__(self, rest_shape: tuple[int, int], rank: int, device=None, dtype=None):
        super().__init__()
        rows, cols = rest_shape
        self.a = nn.Parameter(torch.empty(rank, cols, device=device, dtype=dtype))
        self.b = nn.Parameter(torch.zeros(rows, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.a, a=5 ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.a), self.b)  # (..., cols) -> (..., rank) -> (..., rows)


def rest_adapter_shapes(rest_shape: tuple[int, int], rank: int) -> dict[str, tuple[int, int]]:
    """{"a": [rank, rest cols], "b": [rest rows, rank]}: what RestAdapter holds (and a client uploads)."""
    return {"a": (rank, rest_shape[1]), "b": (rest_shape[0], rank)}


ADAPTER = "rest_adapter"  # a context layer's child module: its factors are "<layer>.rest_adapter.a" / ".b"


def adapter_key(weight_name: str, factor: str) -> str:
    """'layers.0.attention.wq.weight', 'a' -> 'layers.0.attention.wq.rest_adapter.a' (its state-dict key)."""
    return f"{weight_name.removesuffix('.weight')}.{ADAPTER}.{factor}"


def adapter_target(key: str) -> tuple[str, str] | None:
    """The inverse of adapter_key: (weight name, factor), or None for any other key."""
    layer, sep, factor = key.rpartition(f".{ADAPTER}.")
    return (f"{layer}.weight", factor) if sep and factor in ("a", "b") else None


def adapted_names(args: ModelArgs, vocab_parallel: bool = False) -> list[str]:
    """The split parameters that get a rest adapter: every split linear of the transformer blocks (wq, wk, wv,
    wo, w1, w2, w3); never the vocabulary rows (tok_embeddings, output), which stay as they are."""
    return [n for n in split_names(args, vocab_parallel) if n.startswith("layers.")]


def adapter_shapes(args: ModelArgs, world_size: int, rank: int, vocab_parallel: bool = False) -> dict[str, tuple]:
    """State-dict key -> shape of every rest-adapter factor of one client (the same for every rank)."""
    rest = rest_shapes(args, world_size, vocab_parallel)
    return {adapter_key(n, f): s for n in adapted_names(args, vocab_parallel)
            for f, s in rest_adapter_shapes(rest[n], rank).items()}


def adapter_pairs(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Weight name -> (a, b) of every rest adapter whose two factors are in `state` (e.g. a client's reply)."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        if (target := adapter_target(key)) is not None:
            found.setdefault(target[0], {})[target[1]] = t
    return {name: (f["a"], f["b"]) for name, f in found.items() if len(f) == 2}


def adapter_update_sq_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    """||b @ a||_F^2 in float64 without forming the product: tr(a^T b^T b a) = sum((b^T b) * (a a^T)), two
    [rank, rank] matrices."""
    a, b = a.double(), b.double()
    return float(((b.T @ b) * (a @ a.T)).sum())


def rest_positions(rank: int, world_size: int, size: int) -> list[tuple[int, int]]:
    """(other rank, start of its block inside the rest) along the split dim, in rank order: the rest is the
    other ranks' blocks concatenated (context_rest), so rank r's block starts at r * size before `rank`, and
    at (r - 1) * size after it. With kv replica groups, call it with (block index, block count) of
    `sharding.block_position`: the rest of a kv weight is the other groups' kv heads."""
    return [(r, (r if r < rank else r - 1) * size) for r in range(world_size) if r != rank]


class FrozenContextLinear(_FrozenRest, nn.Linear):
    """A full-width bias-free linear [out_features, in_features] whose `weight` parameter is only this
    rank's block along `split.dim`; the other ranks' blocks are a frozen QTensor held in non-persistent
    buffers (`rest_data`, `rest_scale`), so `state_dict()` is {"weight": slice} and nothing else.

    `rank` and `world_size` are the block's index and the number of blocks along the split: a client's rank and W,
    except for the kv weights at W beyond the kv heads, where they are its kv head and n_kv_heads
    (sharding.block_position).

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
        self._init_rest(tuple(rest))

    def full_weight(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The full [out, in] weight in `dtype`: the dequantized rest with `weight` inserted at this rank's
        position along the split dim. A new, transient tensor."""
        rest = dequantize(self.rest, dtype)
        dim, lo = self.split.dim, self.rank * weight.shape[self.split.dim]
        before, after = rest.narrow(dim, 0, lo), rest.narrow(dim, lo, rest.shape[dim] - lo)
        return torch.cat((before, weight.to(dtype), after), dim=dim)

    def _row_blocks(self, weight: torch.Tensor, dtype: torch.dtype):
        """(first output row, [rows, in] block of the full weight in `dtype`), covering it in row order, at
        most ROW_BLOCK_VALUES values each: the rest dequantized a block of rows at a time, the slice in its
        place (its own rows for an output split; its columns of every row for an input split)."""
        size = weight.shape[self.split.dim]
        lo, rest, per_row = self.rank * size, self.rest, self.in_features
        if self.split.dim == 1:
            for rows in row_slices(self.out_features, per_row, ROW_BLOCK_VALUES):
                frozen = dequantize(rest.rows(rows), dtype)  # [rows, in - size]
                yield rows.start, torch.cat((frozen[:, :lo], weight[rows].to(dtype), frozen[:, lo:]), dim=1)
            return
        for start, stop, offset in ((0, lo, 0), (lo, self.rest_shape[0], size)):
            for rows in row_slices(stop, per_row, ROW_BLOCK_VALUES, start):
                yield rows.start + offset, dequantize(rest.rows(rows), dtype)
            if offset == 0:
                for rows in row_slices(size, per_row, ROW_BLOCK_VALUES):
                    yield lo + rows.start, weight[rows].to(dtype)

    def matmul(self, x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x [..., in] @ full^T -> [..., out] in `dtype`, a block of the full weight at a time."""
        return torch.cat([F.linear(x, w) for _, w in self._row_blocks(weight, dtype)], dim=-1)

    def matmul_t(self, g: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """g [..., out] @ full -> [..., in]: the input gradient of `matmul`."""
        out = None
        for r, w in self._row_blocks(weight, dtype):
            # F.linear against the block transposed (a copy of the block, [in, rows]), not g @ w: torch's CPU
            # bfloat16 matmul of that layout ran 10-15x slower without native bf16 (AVX2; 0.3 vs 3.3 s a block)
            part = F.linear(g.narrow(-1, r, w.shape[0]), w.t().contiguous())
            out = part if out is None else out.add_(part)
        return out

    def slice_grad(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gradient of the slice from g [..., out] and x [..., in] (both in the compute dtype)."""
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        size = self.weight.shape[self.split.dim]
        lo = self.rank * size
        if self.split.dim == 0:  # the slice's output rows
            return g2.narrow(1, lo, size).t() @ x2
        return g2.t() @ x2.narrow(1, lo, size)  # the slice's input columns

    def add_rest_adapter(self, rank: int) -> RestAdapter:
        """Give the frozen rest a trainable low-rank update (RestAdapter), on the slice's device and dtype."""
        self.rest_adapter = RestAdapter(self.rest_shape, rank, device=self.weight.device, dtype=self.weight.dtype)
        return self.rest_adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _ContextLinearFn.apply(x, self.weight, self)
        adapter = getattr(self, ADAPTER, None)
        if adapter is None:
            return y
        size = self.weight.shape[self.split.dim]
        lo = self.rank * size
        if self.split.dim == 1:  # the rest is the input columns outside the slice
            rest_x = torch.cat((x[..., :lo], x[..., lo + size:]), dim=-1)  # (..., in - size)
            return y + adapter(rest_x.to(y.dtype))
        z = adapter(x.to(y.dtype))  # (..., out - size): the output rows outside the slice
        return y + torch.cat((z[..., :lo], z.new_zeros(*z.shape[:-1], size), z[..., lo:]), dim=-1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, split_dim={self.split.dim}, "
                f"rank={self.rank}/{self.world_size}, rest_bits={self.rest_bits}")


class FrozenContextEmbedding(_FrozenRest, nn.Embedding):
    """A full [vocab, dim] embedding whose `weight` parameter is only this rank's block of rows
    (vocabulary-parallel); the other rows are a frozen QTensor in non-persistent buffers, so `state_dict()`
    is {"weight": block}. A token in the block reads its trainable row; any other token reads its frozen row,
    dequantized alone (the full table is never built)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, world_size: int, device=None, dtype=None):
        super().__init__(num_embeddings, embedding_dim, device="meta")
        if num_embeddings % world_size:
            raise ValueError(f"vocabulary {num_embeddings} does not divide by world size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.rank, self.world_size = rank, world_size
        size = num_embeddings // world_size
        self.weight = nn.Parameter(torch.empty(size, embedding_dim, device=device, dtype=dtype))
        self._init_rest((num_embeddings - size, embedding_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        size = self.weight.shape[0]
        lo = self.rank * size
        own = (tokens >= lo) & (tokens < lo + size)  # (B, T)
        mine = F.embedding((tokens - lo).clamp(0, size - 1), self.weight)  # (B, T, dim); zero grad where not own
        rest_index = torch.where(tokens >= lo + size, tokens - size, tokens).clamp(0, self.rest_shape[0] - 1)
        frozen = dequantize(self.rest.rows(rest_index.flatten()), self.weight.dtype).view(*tokens.shape, -1)
        return torch.where(own[..., None], mine, frozen)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}/{self.world_size}, rest_bits={self.rest_bits}"


# ----------------------------------------------------------------------------------------- the model


def build_context_model(args: ModelArgs, rank: int, world_size: int, slice_state: Mapping[str, torch.Tensor],
                        rest_q: Mapping[str, QTensor], device="cpu", dtype: torch.dtype = torch.float32,
                        vocab_parallel: bool = False, rest_adapter_rank: int = 0) -> Transformer:
    """The full-width Transformer(args) for `rank`: every split linear a FrozenContextLinear holding the
    slice (trainable, in `dtype`) and `rest_q` (frozen, low-bit); replicated parameters trainable.

    With `vocab_parallel`, `tok_embeddings` is a FrozenContextEmbedding and `output` a FrozenContextLinear
    split by vocabulary rows, so the softmax still covers the whole vocabulary.

    `slice_state` is what `shard(full, args, rank, world_size, vocab_parallel)` returns; `state_dict()` of
    the result has exactly its keys and shapes, plus, with `rest_adapter_rank` > 0, the factors of a RestAdapter
    on every split linear of the blocks (`adapter_shapes`; initialised from torch's current RNG). Built on the
    meta device, so the full model is never allocated."""
    check_world_size(args, world_size, vocab_parallel)
    expected = set(split_names(args, vocab_parallel))
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
            if isinstance(old, nn.Embedding):
                new = FrozenContextEmbedding(old.num_embeddings, old.embedding_dim, rank, world_size, dtype=dtype)
            else:
                rule = rule_for(name, vocab_parallel)
                index, count = block_position(args, rule, rank, world_size)  # (rank, W) unless kv heads replicate
                new = FrozenContextLinear(old.in_features, old.out_features, rule, index, count, dtype=dtype)
            setattr(parent, attr, new)
    model = model.to_empty(device=device)
    model.load_state_dict(slice_state, strict=True)
    for name in expected:
        model.get_submodule(name.removesuffix(".weight")).load_rest(rest_q[name])
    if rest_adapter_rank:
        for name in adapted_names(args, vocab_parallel):
            model.get_submodule(name.removesuffix(".weight")).add_rest_adapter(rest_adapter_rank)
    return model

"""The tensor-parallel sharding plan: one table, read by shard_args, shard and merge.

No other module knows a split dimension. nn.Linear weights are [out, in], so a column-parallel
(output-split) linear is cut along dim 0 and a row-parallel (input-split) one along dim 1.

Contiguous blocks keep grouped-query attention intact: rank k holds kv heads
[k*n_kv/W, (k+1)*n_kv/W) and exactly the query heads that read them (query head h reads kv head
h // (n_heads/n_kv_heads)), so a slice is itself a valid, smaller Llama.

World sizes beyond the kv heads (as Megatron-LM does): W may also be a multiple of n_kv_heads (still dividing
n_heads and the FFN size). Each kv head is then held by W / n_kv_heads consecutive ranks, a "replica group":
rank k holds kv head k // (W / n_kv_heads) and the n_heads / W query heads of that head that are its own. The kv
head's rows are then one block held by several ranks, which the server merges like a replicated parameter within
the group (a weighted mean). `block_position` is where a rank's block is found; `block` its rows.

Vocabulary parallelism (`vocab_parallel=True`, context mode only): `tok_embeddings` and `output` are split
by vocabulary rows too (rank k holds rows [k*V/W, (k+1)*V/W)). A context-mode client has every other row
in its frozen low-bit context, so its softmax still runs over the whole vocabulary. An independent
sub-model has no other rows, so there the same rules read as "replicate" (`vocab_parallel=False`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Mapping, Optional

import torch

from .transformer import ModelArgs


@dataclass(frozen=True)
class Split:
    dim: int  # 0: output rows (column-parallel), 1: input columns (row-parallel)
    unit: str  # what is divided among ranks: "heads", "kv_heads", "hidden" or "vocab"


REPLICATE = None

# parameter-name pattern -> Split, or REPLICATE. Every state-dict key must match exactly one rule.
SHARDING_PLAN: dict[str, Optional[Split]] = {
    r"layers\.\d+\.attention\.wq\.weight": Split(0, "heads"),
    r"layers\.\d+\.attention\.wk\.weight": Split(0, "kv_heads"),
    r"layers\.\d+\.attention\.wv\.weight": Split(0, "kv_heads"),
    r"layers\.\d+\.attention\.wo\.weight": Split(1, "heads"),
    r"layers\.\d+\.feed_forward\.w1\.weight": Split(0, "hidden"),
    r"layers\.\d+\.feed_forward\.w3\.weight": Split(0, "hidden"),
    r"layers\.\d+\.feed_forward\.w2\.weight": Split(1, "hidden"),
    r"tok_embeddings\.weight": Split(0, "vocab"),  # [vocab, dim]: split only when vocab_parallel
    r"output\.weight": Split(0, "vocab"),  # [vocab, dim]: split only when vocab_parallel
    r"layers\.\d+\.(attention_norm|ffn_norm)\.weight": REPLICATE,
    r"norm\.weight": REPLICATE,
}
_COMPILED = [(re.compile(p), rule) for p, rule in SHARDING_PLAN.items()]


def rule_for(name: str, vocab_parallel: bool = False) -> Optional[Split]:
    """The plan's rule for a parameter name; an unknown name is an error, never a silent copy.
    Vocabulary rules read as REPLICATE unless `vocab_parallel`."""
    matches = [rule for pattern, rule in _COMPILED if pattern.fullmatch(name)]
    if len(matches) != 1:
        raise KeyError(
            f"parameter {name!r} matches {len(matches)} sharding rules (expected exactly 1); "
            f"rules: {list(SHARDING_PLAN)}"
        )
    rule = matches[0]
    if rule is not REPLICATE and rule.unit == "vocab" and not vocab_parallel:
        return REPLICATE
    return rule


def is_split(name: str, vocab_parallel: bool = False) -> bool:
    return rule_for(name, vocab_parallel) is not REPLICATE


def valid_world_sizes(args: ModelArgs, vocab_parallel: bool = False) -> list[int]:
    """World sizes that divide n_heads and hidden_dim (and vocab_size if vocab_parallel) and either divide
    n_kv_heads or are a multiple of it (each kv head then held by a replica group of W / n_kv_heads ranks)."""
    return [w for w in range(1, args.n_heads + 1) if _divides(args, w, vocab_parallel)]


def _divides(args: ModelArgs, w: int, vocab_parallel: bool = False) -> bool:
    units = (args.n_heads, args.hidden_dim) + ((args.vocab_size,) if vocab_parallel else ())
    kv = args.n_kv_heads % w == 0 or w % args.n_kv_heads == 0
    return kv and all(u % w == 0 for u in units)


def block_count(args: ModelArgs, unit: str, world_size: int) -> int:
    """How many distinct blocks a split unit is cut into: W, except kv heads at W > n_kv_heads (one block per kv
    head, each held by a replica group of W / n_kv_heads ranks)."""
    return args.n_kv_heads if unit == "kv_heads" and world_size > args.n_kv_heads else world_size


def block_position(args: ModelArgs, rule: Split, rank: int, world_size: int) -> tuple[int, int]:
    """(index of rank's block, number of blocks) along `rule`'s unit: (rank, W) except for replicated kv heads."""
    count = block_count(args, rule.unit, world_size)
    return rank // (world_size // count), count


def check_world_size(args: ModelArgs, world_size: int, vocab_parallel: bool = False) -> None:
    """Refuses a world size that does not divide every split unit (vocabularies of other sizes are refused,
    not split into unequal blocks: every rank's slice has one shape, which the reply checks rely on)."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1 or not _divides(
            args, world_size, vocab_parallel):
        vocab = f", and vocab_size={args.vocab_size} (vocabulary-parallel)" if vocab_parallel else ""
        raise ValueError(
            f"world size {world_size!r} must divide n_heads={args.n_heads} and the FFN hidden size "
            f"{args.hidden_dim}{vocab}, and divide n_kv_heads={args.n_kv_heads} or be a multiple of it; valid world "
            f"sizes: "
            f"{valid_world_sizes(args, vocab_parallel)}"
        )


def shard_args(args: ModelArgs, world_size: int) -> ModelArgs:
    """ModelArgs of one rank's sub-model: 1/W of the heads and FFN units, and 1/W of the kv heads (one kv head
    when W is a multiple of n_kv_heads); same dim and head_dim."""
    check_world_size(args, world_size)
    return replace(
        args,
        n_heads=args.n_heads // world_size,
        n_kv_heads=args.n_kv_heads // block_count(args, "kv_heads", world_size),
        head_dim=args.head_dim,
        hidden_dim=args.hidden_dim // world_size,
    )


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")


def shard(state_dict: Mapping[str, torch.Tensor], args: ModelArgs, rank: int, world_size: int,
          vocab_parallel: bool = False) -> dict[str, torch.Tensor]:
    """Rank `rank`'s slice of a full state dict. Returns views (no copy of the model): split parameters
    are narrowed along their split dim; replicated parameters are the same tensors."""
    check_world_size(args, world_size, vocab_parallel)
    _check_rank(rank, world_size)
    out = {}
    for name, t in state_dict.items():
        rule = rule_for(name, vocab_parallel)
        if rule is REPLICATE:
            out[name] = t
        else:
            full = _unit_rows(args, rule.unit)
            if t.dim() != 2 or t.shape[rule.dim] != full:
                raise ValueError(
                    f"parameter {name!r} has shape {tuple(t.shape)}; the plan splits dim {rule.dim}, "
                    f"which must be {full} for these ModelArgs"
                )
            lo, size = block(args, rule, rank, world_size)
            out[name] = t.narrow(rule.dim, lo, size)
    return out


def block(args: ModelArgs, rule: Split, rank: int, world_size: int) -> tuple[int, int]:
    """(start, size) of rank's contiguous block along `rule`'s split dim: the one place this is computed (the
    ranks of a kv replica group get the same block)."""
    index, count = block_position(args, rule, rank, world_size)
    size = _unit_rows(args, rule.unit) // count
    return index * size, size


def _unit_rows(args: ModelArgs, unit: str) -> int:
    """Full size of a split dimension: heads * head_dim, kv heads * head_dim, or FFN hidden units."""
    return {"heads": args.n_heads * args.head_dim, "kv_heads": args.n_kv_heads * args.head_dim,
            "hidden": args.hidden_dim, "vocab": args.vocab_size}[unit]


def full_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape in the full model, in state-dict order (built on the meta device: no memory)."""
    from .transformer import Transformer

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}


def slice_shapes(args: ModelArgs, world_size: int, vocab_parallel: bool = False) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter of one rank's slice (the same for every rank)."""
    check_world_size(args, world_size, vocab_parallel)
    out = {}
    for name, shape in full_shapes(args).items():
        rule = rule_for(name, vocab_parallel)
        shape = list(shape)
        if rule is not REPLICATE:
            shape[rule.dim] //= block_count(args, rule.unit, world_size)
        out[name] = tuple(shape)
    return out


def split_fraction(args: ModelArgs, vocab_parallel: bool = False) -> float:
    """Fraction of all parameters that the plan splits (78.15% for Llama 3.2 3B; ~100% vocab-parallel)."""
    shapes = full_shapes(args)
    total = sum(math.prod(s) for s in shapes.values())
    return sum(math.prod(s) for k, s in shapes.items() if is_split(k, vocab_parallel)) / total

"""Server-side aggregation of tensor-parallel slices, as plain tensor math (no Flower types).

Replies are folded in one at a time (`WeightedFold`): each one is added into running weighted sums and can
then be released, so the server holds the global model, one set of sums (the size of the model) and the
reply being folded, whatever the number of replies. Both rules below are sums divided once at the end.

Two rules for a split parameter of rank r, whose current global value is `old`:
- per-rank (the user's rule): the weighted mean of the replies that trained rank r,
      new = (sum_{i in r} w_i x_i) / (sum_{i in r} w_i)
- all-clients (FedAvg's view of a partial update): every reply of the round counts, and a reply that did
      not train rank r counts as a zero update for it,
      new = old + (sum_{i in r} w_i (x_i - old)) / (sum_{all j} w_j)
  With context mode's rest adapters (model.context.RestAdapter), a reply that did not train rank r brings
  its adapter's product b_i a_i at rank r's position of its rest instead of a zero update, so every reply
  reaches every element of a split weight (formed block by block, never a whole weight at once):
      new = old + (sum_{i in r} w_i (x_i - old) + sum_{i not in r} w_i (b_i a_i)[r]) / (sum_{all j} w_j)
Replicated parameters are the weighted mean over all replies under both rules,
      new = (sum_i w_i x_i) / (sum_i w_i).
A rank that nobody trained keeps `old` under both rules. With kv replica groups (W a multiple of n_kv_heads,
model/sharding.py) a kv head's block is trained by every rank of its group: "rank r" above then reads "the
block", and per-rank weighting is the weighted mean of the group's replies (a replicated parameter within the
group).

Arithmetic: float32 sums in arrival order, each term added as `acc += x_i (w_i / w_ref)` (w_ref: the first
weight that sum received, so that one reply's sum is x exactly), one division by `sum(w) / w_ref` at the end.
Flower's FedAvg instead scales each term by `w_i / sum(w)` before adding it (`acc = x_0 f_0; acc += x_i f_i`),
which needs the total weight before the first reply is added, i.e. all replies at once. The two agree
exactly with one reply and otherwise differ by float32 rounding only (a few units in the last place;
tests/test_strategy.py bounds it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Sequence

import torch

from fedtp_flwr.config import WEIGHTINGS
from fedtp_flwr.model import ModelArgs
from fedtp_flwr.model.context import adapter_target, rest_positions
from fedtp_flwr.model.quant import QTensor, dequantize
from fedtp_flwr.model.rows import row_slices
from fedtp_flwr.model.sharding import REPLICATE, block, block_position, check_world_size, full_shapes, rule_for

# Elements per block of the server's elementwise passes (fold, update RMS, finiteness check): 4M values,
# 16 MB in float32 / 32 MB in float64, so a pass's temporaries do not grow with the largest tensor
# (Llama 3.2 3B's embedding and output: 128256 x 3072 = 394M values).
BLOCK_VALUES = 1 << 22


def blocks(*tensors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """Matching blocks of same-shaped tensors, as views (writes land in the tensors): runs of dim-0 rows of
    at most BLOCK_VALUES elements, a row too long cut the same way along its next dim. Views, not
    `reshape(-1)`: a rank's block of a row-parallel weight is a column slice, which flattening would copy."""
    t0, n = tensors[0], BLOCK_VALUES
    if any(t.shape != t0.shape for t in tensors):
        raise ValueError(f"blocks of different shapes: {[tuple(t.shape) for t in tensors]}")
    if t0.dim() == 0 or t0.numel() <= n:
        yield tensors
        return
    row = t0.numel() // t0.shape[0]
    if row > n:  # one row is over the budget: cut each row along its own dims
        for i in range(t0.shape[0]):
            yield from blocks(*(t[i] for t in tensors))
        return
    for rows in row_slices(t0.shape[0], row, n):
        yield tuple(t[rows] for t in tensors)


@dataclass
class Contribution:
    rank: int
    state: Mapping[str, torch.Tensor]  # this rank's slice as one node trained it (any float dtype; read only)
    weight: float  # num-examples


class WeightedFold:
    """Running weighted sums of one round's replies: add(c) folds a reply in (it may be released right after);
    result() divides once and returns the new full state dict, in the sums' own memory (no further copy).

    The sums are full-shape float32 tensors allocated at the first add (one model's worth); a split
    parameter's rank-r sum is rank r's block of it (a view), so every rank writes in place."""

    def __init__(self, global_state: Mapping[str, torch.Tensor], args: ModelArgs, world_size: int,
                 weighting: str = "per-rank", vocab_parallel: bool = False):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"merge weighting {weighting!r} is not one of {WEIGHTINGS}")
        self.old, self.args, self.world_size = global_state, args, world_size
        self.weighting, self.vocab_parallel = weighting, vocab_parallel
        self.sums: dict[str, torch.Tensor] | None = None
        # Terms are added as x_i * (w_i / w_ref), w_ref the first weight a sum received (per block of a split
        # parameter, over all replies for replicated ones): a sum of one reply is then x exactly, as in FedAvg.
        # (split parameter, block index) -> w_ref of that block's sum; the block index is the rank's, except for kv
        # heads held by a replica group (sharding.block_position), whose ranks share one block and one sum
        self.block_ref: dict[tuple[str, int], float] = {}
        self.rank_weight = [0.0] * world_size
        self.ref, self.total, self.count = 0.0, 0.0, 0

    def _position(self, name: str, rank: int) -> tuple[int, int]:
        """(index of rank's block of `name`, number of blocks)."""
        return block_position(self.args, rule_for(name, self.vocab_parallel), rank, self.world_size)

    def _ranks(self, name: str, index: int) -> range:
        """The ranks that hold block `index` of `name` (one rank, or a kv replica group)."""
        group = self.world_size // self._position(name, 0)[1]
        return range(index * group, (index + 1) * group)

    def _block(self, state: Mapping[str, torch.Tensor], name: str, index: int) -> torch.Tensor:
        """Block `index` of `name` in `state` (a view)."""
        rule = rule_for(name, self.vocab_parallel)
        lo, size = block(self.args, rule, self._ranks(name, index)[0], self.world_size)
        return state[name].narrow(rule.dim, lo, size)

    def _write(self, name: str, index: int, w: float) -> tuple[bool, float]:
        """(first term of this block's sum?, the factor w / w_ref its term is added with)."""
        first = (name, index) not in self.block_ref
        ref = self.block_ref.setdefault((name, index), w)
        return first, w / ref

    def add(self, c: Contribution, release: bool = False) -> None:
        """Fold c in. release=True empties c.state as it goes (each tensor dropped once added), so that a reply
        nothing else references is freed a tensor at a time while the sums' pages fill."""
        if self.sums is None:  # uninitialized: a page is resident once the first term written to it
            self.sums = {k: torch.empty(t.shape, dtype=torch.float32) for k, t in self.old.items()}
        w = float(c.weight)
        first_replicated = not self.count
        self.ref = self.ref or w
        adapters: dict[str, dict[str, torch.Tensor]] = {}
        for k in list(c.state):
            t = c.state.pop(k) if release else c.state[k]
            if (target := adapter_target(k)) is not None:  # folded below, once both factors are at hand
                adapters.setdefault(target[0], {})[target[1]] = t
                continue
            # Block by block: one block-sized float32 temporary, not one the size of the tensor. Elementwise
            # float32 ops, so the sums are bit for bit those of whole-tensor ops. A sum's first term has weight
            # w_ref (factor 1): it is written, not added to zeros (the same value; one pass instead of two).
            if rule_for(k, self.vocab_parallel) is REPLICATE:
                first, alpha, dst, old = first_replicated, w / self.ref, self.sums[k], self.old[k]
                if isinstance(t, QTensor):  # an uploaded update: the term is old + update
                    pairs = ((dst[rows], old[rows] + d) for rows, d in delta_rows(t, dst.shape))
                else:
                    pairs = blocks(dst, t)
            else:
                index = self._position(k, c.rank)[0]
                first, alpha = self._write(k, index, w)
                dst, old = self._block(self.sums, k, index), self._block(self.old, k, index)
                if isinstance(t, QTensor):
                    per_rank = self.weighting == "per-rank"
                    pairs = ((dst[rows], old[rows] + d if per_rank else d) for rows, d in delta_rows(t, dst.shape))
                elif self.weighting == "all-clients":  # the update x - old
                    pairs = ((d, x.float() - o) for d, x, o in blocks(dst, t, old))
                else:
                    pairs = blocks(dst, t)
            for d, x in pairs:
                if first:
                    d.copy_(x)
                else:
                    d.add_(x.float(), alpha=alpha)
            del t
        for name, factors in adapters.items():
            self._add_adapter(name, c.rank, factors["a"], factors["b"], w)
        self.rank_weight[c.rank] += w
        self.total += w
        self.count += 1

    def _add_adapter(self, name: str, rank: int, a: torch.Tensor, b: torch.Tensor, w: float) -> None:
        """Fold a client's rest-adapter product b @ a (its update of every other rank's block of `name`) into
        those blocks' sums, a block of at most BLOCK_VALUES values of the product at a time."""
        if self.weighting != "all-clients":
            raise ValueError("rest adapters are merged with all-clients weighting only")
        rule = rule_for(name, self.vocab_parallel)
        _, size = block(self.args, rule, rank, self.world_size)
        a, b = a.float(), b.float()  # [r, rest cols], [rest rows, r]: small
        for other, pos in rest_positions(*self._position(name, rank), size):  # other blocks (kv: other groups)
            first, alpha = self._write(name, other, w)
            dst = self._block(self.sums, name, other)
            rows, cols = (b[pos:pos + size], a) if rule.dim == 0 else (b, a[:, pos:pos + size])
            for part in row_slices(rows.shape[0], cols.shape[1], BLOCK_VALUES):
                product = rows[part] @ cols  # [rows of the part, block cols], float32
                if first:
                    dst[part].copy_(product)
                else:
                    dst[part].add_(product, alpha=alpha)

    def result(self) -> dict[str, torch.Tensor]:
        """The merged state dict (float32, the global model's key order). The fold is spent afterwards."""
        if not self.count:
            raise ValueError("no contributions to aggregate")
        out, self.sums = self.sums, None
        for k, t in out.items():
            if rule_for(k, self.vocab_parallel) is REPLICATE:
                if self.total != self.ref:  # x / 1 is x: no pass
                    t.div_(self.total / self.ref)
                continue
            for index in range(self._position(k, 0)[1]):
                dst, ref = self._block(out, k, index), self.block_ref.get((k, index))
                if ref is None:  # nobody's update reached this block
                    dst.copy_(self._block(self.old, k, index))
                elif self.weighting == "per-rank":
                    block_weight = sum(self.rank_weight[r] for r in self._ranks(k, index))
                    if block_weight != ref:  # one reply for the block: already its value
                        dst.div_(block_weight / ref)
                else:
                    dst.div_(self.total / ref).add_(self._block(self.old, k, index))
        return {k: out[k] for k in self.old}


def delta_rows(q: QTensor, shape: torch.Size) -> Iterator[tuple[slice, torch.Tensor]]:
    """An uploaded update (wire.decode_delta: a QTensor of the tensor's rows) dequantized to float32 a block of at
    most BLOCK_VALUES values at a time: (row slice of the tensor, those rows of the update, in its shape)."""
    if len(shape) < 2:
        yield slice(None), dequantize(q).reshape(shape)
        return
    for rows in row_slices(q.shape[0], q.shape[1], BLOCK_VALUES):
        yield rows, dequantize(q.rows(rows)).reshape(rows.stop - rows.start, *shape[1:])


def aggregate_slices(
    global_state: Mapping[str, torch.Tensor],
    contributions: Sequence[Contribution],
    args: ModelArgs,
    world_size: int,
    weighting: str = "per-rank",
    vocab_parallel: bool = False,
) -> dict[str, torch.Tensor]:
    """New full state dict from this round's slices (see the module docstring for the rules): the replies
    folded in, in order, by `WeightedFold` (the server's streaming merge does the same, one reply at a time)."""
    fold = WeightedFold(global_state, args, world_size, weighting, vocab_parallel)
    for c in contributions:
        fold.add(c)
    return fold.result()


def merge(
    shards: Sequence[Mapping[str, torch.Tensor]], args: ModelArgs, weights: Optional[Sequence[float]] = None,
    vocab_parallel: bool = False,
) -> dict[str, torch.Tensor]:
    """Inverse of shard. `shards` are in rank order (len = world size). Split parameters are concatenated;
    replicated parameters are averaged (with `weights`, normalised). With equal weights (the default) and
    W a power of two, merge(shard(...)) is the identity bit for bit.

    A thin caller of the server's merge (`aggregate_slices`, one reply per rank), so the tests of either
    prove the other. Public as `fedtp_flwr.sharding.merge` (docs/architecture.md)."""
    world_size = len(shards)
    check_world_size(args, world_size, vocab_parallel)
    keys = list(shards[0].keys())
    for r, s in enumerate(shards[1:], start=1):
        if set(s.keys()) != set(keys):
            diff = sorted(set(s.keys()) ^ set(keys))
            raise KeyError(f"shard {r} has different keys from shard 0: {diff[:5]}")
    if weights is None:
        weights = [1.0] * world_size
    if len(weights) != world_size or any(not w > 0 for w in weights):
        raise ValueError(f"weights must be {world_size} positive numbers, got {weights}")
    shapes = full_shapes(args)
    unknown = sorted(set(keys) - set(shapes))
    if unknown:
        raise KeyError(f"shards hold parameters the model does not have: {unknown[:5]}")
    # Every rank has a reply, so the "global" state only gives each output its shape and dtype.
    frame = {k: torch.empty(shapes[k], dtype=shards[0][k].dtype, device="meta") for k in keys}
    contributions = [Contribution(r, s, float(w)) for r, (s, w) in enumerate(zip(shards, weights))]
    return aggregate_slices(frame, contributions, args, world_size, "per-rank", vocab_parallel)

"""Token rows and (inputs, targets) batches for next-token training.

A row is the token ids of one example, <|begin_of_text|> ... <|end_of_text|>, cut to at most
`max_seq_len + 1` ids, so inputs = row[:-1] and targets = row[1:] fill at most `max_seq_len` model
positions. Two ways to make rows:

- padded (default): one example per row; a batch is right-padded with `pad_id` to its longest row, and
  targets at padding are IGNORE_INDEX so only real tokens count. Causal attention means real positions
  never see the padding after them, so no attention mask is needed. Examples longer than the row are
  truncated (their tail, including <|end_of_text|>, is dropped; `n_truncated` counts them).
- packed: all examples are joined into one stream and cut into windows of `max_seq_len + 1` ids that
  overlap by one, so every token after the first is a target exactly once and there is no padding;
  the final partial window is dropped. Best for short examples such as the built-in corpus's speeches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import torch

from .errors import DataError
from .files import Example
from .loss import IGNORE_INDEX
from .tokenizer import Tokenizer

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets), int64 [B, T]


@dataclass(frozen=True)
class TokenDataset:
    rows: list[list[int]]  # 2 .. max_seq_len + 1 ids each (all max_seq_len + 1 when packed)
    max_seq_len: int
    pad_id: int
    packed: bool
    n_examples: int
    n_truncated: int

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def n_target_tokens(self) -> int:
        return sum(len(row) - 1 for row in self.rows)


def build_dataset(
    examples: Iterable[Example | str], tokenizer: Tokenizer, max_seq_len: int, *, pack: bool = False
) -> TokenDataset:
    """Tokenize `examples` (with BOS and EOS each) into rows; see the module docstring."""
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    encoded = [
        tokenizer.encode(e if isinstance(e, str) else e.text, bos=True, eos=True) for e in examples
    ]
    if not encoded:
        raise DataError("no examples to tokenize")
    width = max_seq_len + 1
    if pack:
        stream = [token for ids in encoded for token in ids]
        rows = [stream[i : i + width] for i in range(0, len(stream) - width + 1, max_seq_len)]
        if not rows:
            raise DataError(
                f"packing needs at least {width} tokens for max_seq_len={max_seq_len}, "
                f"but the {len(encoded)} examples have {len(stream)}"
            )
        n_truncated = 0
    else:
        rows = [ids[:width] for ids in encoded]
        n_truncated = sum(len(ids) > width for ids in encoded)
    return TokenDataset(rows, max_seq_len, tokenizer.pad_id, pack, len(encoded), n_truncated)


def collate(rows: Sequence[Sequence[int]], pad_id: int) -> Batch:
    """Right-pad `rows` to the longest and shift: inputs = ids[:, :-1], targets = ids[:, 1:] with
    IGNORE_INDEX wherever the target is padding."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    lengths = torch.tensor([len(row) for row in rows])
    is_pad_target = torch.arange(1, width) >= lengths[:, None]  # [B, T]: target j is ids[:, j + 1]
    targets = ids[:, 1:].masked_fill(is_pad_target, IGNORE_INDEX)
    return ids[:, :-1].contiguous(), targets


def iterate_batches(
    dataset: TokenDataset, batch_size: int, seed: int, *, epochs: Optional[int] = None
) -> Iterator[Batch]:
    """Shuffled batches, endlessly (or for `epochs` epochs). Each epoch visits every row once in a
    fresh order drawn from `seed`; its last batch may be smaller. Same seed, same batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(dataset)))
    epoch = 0
    while epochs is None or epoch < epochs:
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield collate([dataset.rows[i] for i in order[start : start + batch_size]], dataset.pad_id)
        epoch += 1


def eval_batches(dataset: TokenDataset, batch_size: int, max_batches: Optional[int] = None) -> list[Batch]:
    """The dataset's rows in order, as a fixed list of batches (the first `max_batches` if given)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, len(dataset), batch_size)
    if max_batches is not None:
        starts = starts[:max_batches]
    return [collate(dataset.rows[s : s + batch_size], dataset.pad_id) for s in starts]

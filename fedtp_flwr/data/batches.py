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

Instruction and chat examples (`chat.Chat`) carry a loss mask: only response tokens are targets, every
other target is IGNORE_INDEX (`TokenDataset.masks`). A dataset that holds any of them packs differently:
whole examples, in order, are placed into rows of at most `max_seq_len + 1` ids (an example starts a new
row when it does not fit; a longer one is truncated to a row of its own), so a response is always in the
same row as its own prompt, and the first token of the next example, a prompt token, is never a target
(no example's prompt is predicted from another's answer). Rows are padded like unpacked ones. Examples
whose response was cut off entirely are dropped (`n_dropped`): they would have no target.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import torch

from .chat import Chat, encode_chat
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
    # Per row, per token: does the loss count it as a target? None: every token after a row's first.
    masks: Optional[list[list[bool]]] = None
    n_dropped: int = 0  # masked examples left without a target by truncation, not in any row

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def n_target_tokens(self) -> int:
        if self.masks is None:
            return sum(len(row) - 1 for row in self.rows)
        return sum(sum(mask[1:]) for mask in self.masks)


def build_dataset(
    examples: Iterable[Example | Chat | str], tokenizer: Tokenizer, max_seq_len: int, *, pack: bool = False
) -> TokenDataset:
    """Tokenize `examples` (text with BOS and EOS each; chats in the Llama 3 chat format) into rows; see
    the module docstring."""
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    examples = list(examples)
    if not examples:
        raise DataError("no examples to tokenize")
    if any(isinstance(e, Chat) for e in examples):
        return _build_masked(examples, tokenizer, max_seq_len, pack)
    encoded = [
        tokenizer.encode(e if isinstance(e, str) else e.text, bos=True, eos=True) for e in examples
    ]
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


def _build_masked(examples: list, tokenizer: Tokenizer, max_seq_len: int, pack: bool) -> TokenDataset:
    """Rows and loss masks of a dataset with chats (text examples: every token but BOS is a target)."""
    width = max_seq_len + 1
    rows: list[list[int]] = []
    masks: list[list[bool]] = []
    n_truncated = n_dropped = 0
    for e in examples:
        if isinstance(e, Chat):
            ids, mask = encode_chat(e, tokenizer)
        else:
            ids = tokenizer.encode(e if isinstance(e, str) else e.text, bos=True, eos=True)
            mask = [False] + [True] * (len(ids) - 1)
        if len(ids) > width:
            n_truncated += 1
            ids, mask = ids[:width], mask[:width]
        if not any(mask[1:]):
            n_dropped += 1
            continue
        if pack and rows and len(rows[-1]) + len(ids) <= width:
            rows[-1] += ids
            masks[-1] += mask
        else:
            rows.append(list(ids))
            masks.append(list(mask))
    if not rows:
        raise DataError(f"none of the {len(examples)} examples has a response token within max_seq_len="
                        f"{max_seq_len} (every response was cut off)")
    return TokenDataset(rows, max_seq_len, tokenizer.pad_id, pack, len(examples) - n_dropped, n_truncated,
                        masks, n_dropped)


def collate(rows: Sequence[Sequence[int]], pad_id: int, masks: Optional[Sequence[Sequence[bool]]] = None) -> Batch:
    """Right-pad `rows` to the longest and shift: inputs = ids[:, :-1], targets = ids[:, 1:] with
    IGNORE_INDEX wherever the target is padding (or, with `masks`, a token whose mask is False)."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    counts = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        counts[i, : len(row)] = True if masks is None else torch.tensor(masks[i], dtype=torch.bool)
    targets = ids[:, 1:].masked_fill(~counts[:, 1:], IGNORE_INDEX)  # target j is ids[:, j + 1]
    return ids[:, :-1].contiguous(), targets


def _rows_batch(dataset: TokenDataset, index: Sequence[int]) -> Batch:
    masks = None if dataset.masks is None else [dataset.masks[i] for i in index]
    return collate([dataset.rows[i] for i in index], dataset.pad_id, masks)


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
            yield _rows_batch(dataset, order[start : start + batch_size])
        epoch += 1


def eval_batches(dataset: TokenDataset, batch_size: int, max_batches: Optional[int] = None) -> list[Batch]:
    """The dataset's rows in order, as a fixed list of batches (the first `max_batches` if given)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, len(dataset), batch_size)
    if max_batches is not None:
        starts = starts[:max_batches]
    return [_rows_batch(dataset, range(s, min(s + batch_size, len(dataset)))) for s in starts]

"""The one definition of the training / evaluation loss: next-token NLL over real (non-padding) tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # target value of padding positions


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed NLL of `targets` [B, T] under `logits` [B, T, V] (in fp32), and the number of target
    tokens that count. Mean loss = sum_nll / n_tokens; over many batches, sum both before dividing."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    sum_nll = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return sum_nll, int((targets != IGNORE_INDEX).sum())


def perplexity(sum_nll: float, n_tokens: int) -> float:
    """exp(mean NLL per real token); inf when that overflows a float."""
    if n_tokens <= 0:
        raise ValueError(f"perplexity needs at least one token, got n_tokens={n_tokens}")
    mean = float(sum_nll) / n_tokens
    return math.exp(mean) if mean < 709.0 else math.inf

"""The next-token loss computed a chunk of tokens at a time, so [tokens, vocab] logits never exist at once.

With Llama 3's 128,256-row output, one 2048-token sequence has 1.05 GB of float32 logits and as much again
for their gradient; a 3B slice at W=8 trains in less than that. `chunked_token_loss` takes the final hidden
states h [B, T, dim] and the output layer, and in forward computes each chunk's logits, its summed NLL, and
drops them; backward recomputes each chunk's logits and turns them into the gradients of h and of the output
weight directly (softmax - one-hot), so the peak is one chunk's [chunk, vocab] float32 logits and their
gradient. The output weight's gradient is accumulated over the chunks (in the weight's dtype) inside one
autograd node and returned once, so a hook that fires when a gradient is ready (the optimizer step in backward) fires once.

The output layer is an nn.Linear (the full vocabulary) or a context.FrozenContextLinear split by vocabulary
rows (the trainable rows plus the frozen low-bit rest, dequantized a block of rows at a time): both give the
softmax over the whole vocabulary. The numbers equal `token_loss(output(h), targets)` up to float rounding.

No maintained fused kernel fits here: Liger's fused linear cross-entropy and Apple's cut-cross-entropy are
Triton (CUDA) kernels over one plain weight, and cannot see the frozen low-bit rows of a vocabulary slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedtp_flwr.data.loss import IGNORE_INDEX
from fedtp_flwr.model.context import compute_dtype, no_autocast


class _PlainHead:
    """The three products chunked_token_loss needs, for an ordinary nn.Linear output layer."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        self.w = weight.to(dtype)  # one copy in the compute dtype for the whole call (as autocast would make)

    def matmul(self, x, weight, dtype):
        return F.linear(x, self.w)

    def matmul_t(self, g, weight, dtype):
        return g @ self.w

    @staticmethod
    def slice_grad(g, x):
        return g.t() @ x


def _head(layer: nn.Module, weight: torch.Tensor, dtype: torch.dtype):
    return layer if hasattr(layer, "slice_grad") else _PlainHead(weight, dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, layer, targets, chunk):
        dtype = compute_dtype(h, weight)
        h2, t2 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        with no_autocast(h.device):
            head = _head(layer, weight, dtype)
            for lo in range(0, h2.shape[0], chunk):
                logits = head.matmul(h2[lo:lo + chunk].to(dtype), weight, dtype).float()  # (chunk, vocab)
                total += F.cross_entropy(logits, t2[lo:lo + chunk], ignore_index=IGNORE_INDEX, reduction="sum")
        ctx.layer, ctx.chunk, ctx.dtype = layer, chunk, dtype
        ctx.save_for_backward(h, weight, targets)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        h, weight, targets = ctx.saved_tensors
        layer, chunk, dtype = ctx.layer, ctx.chunk, ctx.dtype
        h2, t2 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        grad_h = torch.empty_like(h2) if ctx.needs_input_grad[0] else None
        # Accumulated in the weight's dtype, as autograd accumulates a gradient (float32 weights: float32; a
        # bf16 slice: bf16, which keeps the accumulator at half the size of the weight's float32 gradient).
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        with no_autocast(h.device):
            head = _head(layer, weight, dtype)
            for lo in range(0, h2.shape[0], chunk):
                hc, tc = h2[lo:lo + chunk].to(dtype), t2[lo:lo + chunk]
                g = torch.softmax(head.matmul(hc, weight, dtype).float(), dim=-1)  # d(sum NLL)/d(logits)
                valid = tc != IGNORE_INDEX
                rows = valid.nonzero().squeeze(1)
                g[rows, tc[rows]] -= 1.0
                g[~valid] = 0.0
                g = g.mul_(grad_total).to(dtype)
                if grad_h is not None:
                    grad_h[lo:lo + chunk] = head.matmul_t(g, weight, dtype)
                if grad_w is not None:
                    grad_w += head.slice_grad(g, hc).to(weight.dtype)
        grad_h = None if grad_h is None else grad_h.view_as(h)
        return grad_h, grad_w, None, None, None


def chunked_token_loss(hidden: torch.Tensor, output: nn.Module, targets: torch.Tensor,
                       chunk_tokens: int) -> torch.Tensor:
    """Summed NLL of `targets` [B, T] under output(hidden) [B, T, vocab] (data.loss.token_loss's first
    value), computing at most `chunk_tokens` rows of logits at a time (see the module docstring)."""
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} do not match targets {tuple(targets.shape)}")
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    return _ChunkedLinearCrossEntropy.apply(hidden, output.weight, output, targets, chunk_tokens)

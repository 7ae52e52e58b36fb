"""Local training and evaluation: what a client does with its slice, and how the server scores a model.

A batch is `(inputs, targets)`, int64 tensors [B, T]; targets are inputs shifted by one with
IGNORE_INDEX (-100) at padding. Every loss here is token-weighted: the sum of the negative log-likelihood
over the non-ignored target tokens, divided by their number, computed in float32 (`data.loss.token_loss`).

The same code trains the full model, a tensor-parallel slice (the same `Transformer` with fewer heads)
and a model with frozen parameters: only parameters with `requires_grad` are optimised.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from typing import Iterable, Iterator, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from fedtp_flwr.compat import torchao_adamw
from fedtp_flwr.data.loss import IGNORE_INDEX, perplexity, token_loss  # the one definition of the loss
from fedtp_flwr.model.context import RestAdapter
from fedtp_flwr.model.rows import row_slices

from .chunked_loss import chunked_token_loss
from .settings import PRECISIONS, TrainSettings, resolve_device


def _same_device(a: torch.device, b: torch.device) -> bool:
    """torch.device("cuda") names the current GPU, so it equals "cuda:<current>"."""
    def norm(d):
        return torch.device("cuda", torch.cuda.current_device()) if d.type == "cuda" and d.index is None else d
    return norm(a) == norm(b)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for `precision` on `device`, or None for plain fp32 (no autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is invalid; allowed: {PRECISIONS}")
    if precision == "fp32":
        return None
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    return torch.bfloat16


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


# -------------------------------------------------------------------------------------------- batches


def _check_batch(batch, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"{where}: a batch must be a tuple (inputs, targets), got {type(batch).__name__}")
    inputs, targets = batch
    for name, t in (("inputs", inputs), ("targets", targets)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 2:
            is_tensor = isinstance(t, torch.Tensor)
            desc = f"{t.dtype} tensor of shape {tuple(t.shape)}" if is_tensor else type(t).__name__
            raise TypeError(f"{where}: {name} must be an int64 tensor [B, T], got {desc}")
    if inputs.shape != targets.shape:
        raise ValueError(
            f"{where}: inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} differ in shape"
        )
    return inputs, targets


# ------------------------------------------------------------------------------------------ optimizer


def param_groups(model: nn.Module, weight_decay: float, trainable: Optional[set[str]] = None,
                 adapter_lr_factor: float = 1.0) -> list[dict]:
    """AdamW groups: decay on nn.Linear weights (attention, FFN and output), none on everything else
    (RMSNorm weights, tok_embeddings); the factors of context mode's rest adapters (model.context.RestAdapter)
    in a group of their own, without decay and at `adapter_lr_factor` x the learning rate ("lr_scale", which
    set_lr applies). Only parameters with requires_grad, and in `trainable` when given. Each group carries
    "names" (parameter names) for inspection; torch ignores the extra keys."""
    named = dict(model.named_parameters())
    if trainable is not None:
        unknown = sorted(set(trainable) - set(named))
        if unknown:
            raise ValueError(f"trainable names {unknown[:5]} are not parameters of the model")
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    adapters = {id(p) for m in model.modules() if isinstance(m, RestAdapter) for p in m.parameters()}
    decay, no_decay, adapter = ([], []), ([], []), ([], [])
    for name, p in named.items():
        if not p.requires_grad or (trainable is not None and name not in trainable):
            continue
        if id(p) in adapters:
            group = adapter
        else:
            group = decay if id(p) in linear_weights and id(p) not in embeddings else no_decay
        group[0].append(name)
        group[1].append(p)
    groups = [
        {"params": params, "names": names, "weight_decay": wd, "lr_scale": scale}
        for (names, params), wd, scale in ((decay, weight_decay, 1.0), (no_decay, 0.0, 1.0),
                                           (adapter, 0.0, adapter_lr_factor))
        if params
    ]
    if not groups:
        raise ValueError("the model has no trainable parameters (requires_grad and in `trainable`)")
    return groups


def make_optimizer(
    model: nn.Module, settings: TrainSettings, trainable: Optional[set[str]] = None
) -> torch.optim.Optimizer:
    """settings.optimizer over `param_groups`, with torch's AdamW semantics (decoupled weight decay):
    - "adamw" on float32 weights: torch.optim.AdamW (its fused kernel where this torch has one for the
      parameters' device and dtype, else the foreach one: the same math);
    - "adamw8bit" / "adamw4bit", or any optimizer on bfloat16 weights: torchao's AdamW (8-bit / 4-bit
      block-quantized state; bf16 weights updated with stochastic rounding)."""
    groups = param_groups(model, settings.weight_decay, trainable, settings.adapter_lr_factor)
    return _build_optimizer(groups, settings)


def _build_optimizer(groups: list[dict], settings: TrainSettings) -> torch.optim.Optimizer:
    kwargs = dict(lr=settings.learning_rate, betas=settings.betas, eps=settings.eps)
    bf16 = any(p.dtype == torch.bfloat16 for g in groups for p in g["params"])
    if settings.optimizer == "adamw" and not bf16:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError) as e:  # no fused kernel for this device/dtype in this torch
            logging.getLogger(__name__).info("AdamW: no fused kernel here (%s); using the foreach one", e)
            return torch.optim.AdamW(groups, foreach=True, **kwargs)
    device = groups[0]["params"][0].device
    try:
        import torchao.optim  # imported only when chosen: it compiles its step with torch.compile (~30 s on a CPU)
    except ImportError as e:
        raise ValueError(f"optimizer {settings.optimizer!r}{' on bfloat16 weights' if bf16 else ''} needs torchao "
                         f"({e}); pip install torchao, or use optimizer 'adamw' with float32 weights") from None
    if device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        raise ValueError(f"optimizer {settings.optimizer!r}{' on bfloat16 weights' if bf16 else ''} runs torchao's "
                         "step through torch.compile, which on a CPU needs a C++ compiler (c++, g++ or clang++) and "
                         "none is on PATH; install one, or use optimizer 'adamw' with float32 weights")
    cls = {"adamw": torchao_adamw(), "adamw8bit": torchao.optim.AdamW8bit,
           "adamw4bit": torchao.optim.AdamW4bit}[settings.optimizer]
    return cls(groups, bf16_stochastic_round=bf16, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate: `lr` x the group's "lr_scale" (param_groups; 1 when absent). torchao
    keeps it as a tensor, to be filled in place."""
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


# Largest number of values one optimizer step of InBackwardOptimizer updates at once. torchao's low-bit
# steps need temporaries of several bytes per value (measured on the CPU: 26 B for 4-bit, 8 B for 8-bit
# state), so a 3B vocabulary slice (49M values at W=8) would need 1.3 GB for one step; row blocks of at most
# this many values bound it to ~55 MB.
STEP_BLOCK_VALUES = 2**21


class InBackwardOptimizer:
    """The optimizer step taken inside backward (as torchtune's optimizer-in-backward): a hook steps each
    parameter as soon as its gradient is complete and then frees the gradient, so no gradient buffer for
    the whole model ever exists. Global-norm clipping and gradient accumulation are impossible this way
    (TrainSettings refuses them). FedProx's proximal gradient is added in the hook.

    A parameter of more than STEP_BLOCK_VALUES values is stepped as row blocks: each block is a detached
    view of the parameter (sharing its memory) with an optimizer of its own, handed its rows of the
    gradient. AdamW works value by value, so this is the same update (with the same 8-/4-bit quantization
    blocks when a block's size divides by torchao's block size, as at 3B); it only bounds the temporaries.

    Looks like an optimizer to train_local: `param_groups` (for the learning rate), `step()` and
    `zero_grad()` (no-ops: the work happens in backward); call `remove()` to detach the hooks."""

    def __init__(self, model: nn.Module, settings: TrainSettings, trainable: Optional[set[str]] = None):
        self.blocks: dict[nn.Parameter, list[tuple[slice, torch.Tensor, torch.optim.Optimizer]]] = {}
        for group in param_groups(model, settings.weight_decay, trainable, settings.adapter_lr_factor):
            for p in group["params"]:
                # a vector is one block; a matrix is cut into whole rows
                parts = (list(row_slices(p.shape[0], p[0].numel(), STEP_BLOCK_VALUES)) if p.dim() > 1
                         else [slice(0, p.shape[0])])
                blocks = []
                for index in parts:
                    view = p.detach()[index] if len(parts) > 1 else p
                    opt = _build_optimizer([{"params": [view], "weight_decay": group["weight_decay"],
                                             "lr_scale": group["lr_scale"]}], settings)
                    blocks.append((index, view, opt))
                self.blocks[p] = blocks
        self.prox: dict[nn.Parameter, torch.Tensor] = {}
        self.mu = 0.0
        self._hooks = [p.register_post_accumulate_grad_hook(self._step) for p in self.blocks]

    @property
    def param_groups(self) -> list[dict]:
        return [g for blocks in self.blocks.values() for _, _, opt in blocks for g in opt.param_groups]

    @torch.no_grad()
    def _step(self, p: nn.Parameter) -> None:
        if p in self.prox:
            add_proximal_grad([(p, self.prox[p])], self.mu)
        for index, view, opt in self.blocks[p]:
            if view is not p:
                view.grad = p.grad[index]
            opt.step()
            view.grad = None
        p.grad = None

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _optimizer_params(optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


# -------------------------------------------------------------------------------------------- schedule


def lr_at(step: int, settings: TrainSettings, total_steps: Optional[int] = None) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total_steps` (default settings.local_steps).

    Warmup: linear, lr * (step + 1) / warmup_steps for the first warmup_steps steps, so step 0 already
    moves. Then "constant" holds lr; "cosine" follows half a cosine from lr at the end of warmup towards
    min_lr_ratio * lr, reached at step total_steps (so the last step is still above the floor) and held
    beyond. The floor defaults to 10% of the peak, not 0: a schedule that restarts every round should not
    spend the tail of every round at a learning rate near zero.
    """
    lr, warmup = settings.learning_rate, settings.warmup_steps
    total = settings.local_steps if total_steps is None else total_steps
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup:
        return lr * (step + 1) / warmup
    if settings.lr_schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = settings.min_lr_ratio * lr
    return floor + 0.5 * (lr - floor) * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------- FedProx


def _prox_pairs(
    model: nn.Module, params: list[nn.Parameter], reference: dict[str, torch.Tensor]
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, reference) for each name in `reference` whose parameter is being optimised."""
    named = dict(model.named_parameters())
    unknown = sorted(set(reference) - set(named))
    if unknown:
        raise KeyError(f"prox_reference names {unknown[:5]} are not parameters of the model")
    optimised = {id(p) for p in params}
    pairs = []
    for name, ref in reference.items():
        p = named[name]
        if id(p) not in optimised:
            continue
        if ref.shape != p.shape:
            raise ValueError(
                f"prox_reference[{name!r}] has shape {tuple(ref.shape)}, the parameter {tuple(p.shape)}"
            )
        if ref.device == p.device and ref.untyped_storage().data_ptr() == p.untyped_storage().data_ptr():
            raise ValueError(
                f"prox_reference[{name!r}] shares memory with the parameter it anchors (a state_dict() "
                "view?), so the proximal term would always be zero; pass a copy (.clone())"
            )
        pairs.append((p, ref.detach().to(p.device)))
    return pairs


@torch.no_grad()
def add_proximal_grad(pairs: list[tuple[nn.Parameter, torch.Tensor]], mu: float) -> None:
    """grad += mu * (w - w_ref): the gradient of mu/2 * ||w - w_ref||^2, added once per optimizer step
    (no autograd graph, no extra forward)."""
    for p, ref in pairs:
        delta = (p - ref).mul_(mu) if p.dtype == ref.dtype else (p.float() - ref.float()).mul_(mu)
        if p.grad is None:
            p.grad = delta.to(p.dtype)
        else:
            p.grad.add_(delta.to(p.grad.dtype))


# ------------------------------------------------------------------------------------------- training


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_local(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    settings: TrainSettings,
    prox_reference: Optional[dict[str, torch.Tensor]] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> dict:
    """Run settings.local_steps AdamW steps on `model` where it lives, pulling
    local_steps * grad_accum_steps micro-batches from `batches`.

    Token weighting: each optimizer step minimises the mean NLL over all non-ignored target tokens of its
    grad_accum_steps micro-batches. The step's micro-batches are pulled first (token ids only, cheap), their
    tokens counted, and each micro-batch's backward uses sum_nll / (tokens of the whole step). So a step
    over micro-batches b1, b2 gives exactly the gradient of one batch cat(b1, b2), whatever the padding;
    averaging per-micro-batch means instead would over-weight the tokens of short micro-batches.

    FedProx: with proximal_mu > 0 the objective gains mu/2 * sum ||w - w_ref||^2 over the parameters named
    in `prox_reference` (default: a copy of the trainable weights at the start of this call, i.e. the
    weights the server sent); its gradient is added before clipping. The reported loss excludes it.

    `optimizer` defaults to a fresh `make_optimizer(model, settings)` (client optimizer state does not
    survive a round); pass one to optimise a subset or to keep state. Only its parameters are clipped.

    The seed fixes torch's RNG inside this call (forked: the caller's RNG state is left as it was). The
    Llama model has no stochastic layer, so for it the result depends only on the weights and the batches.

    Returns train_loss (token-weighted mean CE of all micro-batches), train_perplexity, num_tokens
    (non-ignored target tokens), num_examples (sequences), steps, seconds, tokens_per_second.
    """
    device = _model_device(model)
    amp_dtype = autocast_dtype(settings.precision, device)  # checked before any hook is registered
    setup = _setup_optimizer(model, settings, optimizer, prox_reference)
    stepper = _Stepper(model, settings, device, amp_dtype, *setup)
    total_nll, total_tokens, total_examples = 0.0, 0, 0
    rng_devices = []  # CUDA generators to fork besides the CPU one
    if device.type == "cuda":
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    start = time.perf_counter()
    with _training_mode(model, settings.gradient_checkpointing, stepper), torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(settings.seed)
        hide = None if settings.progress is None else not settings.progress  # None: tqdm shows it on a tty only
        bar = tqdm(range(settings.local_steps), desc="local training", disable=hide, leave=False)
        for step in bar:  # the bar closes itself when the loop ends or raises
            micro = [_next_batch(batches, step, i, settings) for i in range(settings.grad_accum_steps)]
            nll, tokens, examples, lr = stepper.step(step, micro)
            total_nll, total_tokens, total_examples = total_nll + nll, total_tokens + tokens, total_examples + examples
            bar.set_postfix(loss=f"{nll / tokens:.4f}", lr=f"{lr:.2e}")
    seconds = time.perf_counter() - start
    return {
        "train_loss": total_nll / total_tokens,
        "train_perplexity": perplexity(total_nll, total_tokens),
        "num_tokens": total_tokens,
        "num_examples": total_examples,
        "steps": settings.local_steps,
        "seconds": seconds,
        "tokens_per_second": total_tokens / seconds if seconds > 0 else float("inf"),
    }


def _setup_optimizer(model: nn.Module, settings: TrainSettings, optimizer, prox_reference):
    """-> (optimizer, its parameters, FedProx (param, reference) pairs added after backward, in_backward).
    The default optimizer is a fresh one (stepped inside backward with optimizer-in-backward); with FedProx
    and a step in backward, the proximal term goes into each parameter's hook instead of the pairs."""
    in_backward = optimizer is None and settings.optimizer_in_backward
    if optimizer is None:
        optimizer = InBackwardOptimizer(model, settings) if in_backward else make_optimizer(model, settings)
    params = _optimizer_params(optimizer)
    pairs: list[tuple[nn.Parameter, torch.Tensor]] = []
    if settings.proximal_mu > 0:
        if prox_reference is None:  # the weights as received
            named = {id(p): n for n, p in model.named_parameters()}
            prox_reference = {named[id(p)]: p.detach().clone() for p in params}
        pairs = _prox_pairs(model, params, prox_reference)
        if in_backward:  # added in each parameter's hook, before its step
            optimizer.prox, optimizer.mu, pairs = dict(pairs), settings.proximal_mu, []
    return optimizer, params, pairs, in_backward


class _training_mode:
    """Train mode and the run's gradient checkpointing for the loop; afterwards (also on an error) the step-in-
    backward hooks are removed, the gradients freed and the model's modes restored."""

    def __init__(self, model: nn.Module, gradient_checkpointing: bool, stepper: "_Stepper"):
        self.model, self.checkpointing, self.stepper = model, gradient_checkpointing, stepper

    def __enter__(self):
        m = self.model
        self.was_training, self.was_checkpointing = m.training, getattr(m, "gradient_checkpointing", False)
        m.train()
        if hasattr(m, "gradient_checkpointing"):
            m.gradient_checkpointing = self.checkpointing

    def __exit__(self, *exc):
        if self.stepper.in_backward:
            self.stepper.optimizer.remove()
        self.model.zero_grad(set_to_none=True)
        self.model.train(self.was_training)
        if hasattr(self.model, "gradient_checkpointing"):
            self.model.gradient_checkpointing = self.was_checkpointing
        return False


class _Stepper:
    """One optimizer step over a step's micro-batches (see train_local for the token weighting)."""

    def __init__(self, model, settings: TrainSettings, device, amp_dtype, optimizer, params, pairs, in_backward: bool):
        self.model, self.settings, self.device, self.amp_dtype = model, settings, device, amp_dtype
        self.optimizer, self.params, self.pairs, self.in_backward = optimizer, params, pairs, in_backward

    def step(self, step: int, micro: list) -> tuple[float, int, int, float]:
        """-> (summed NLL, target tokens, sequences, learning rate) of local step `step` (0-based)."""
        s, model, device = self.settings, self.model, self.device
        step_tokens = sum(int((t != IGNORE_INDEX).sum()) for _, t in micro)
        if step_tokens == 0:
            raise ValueError(f"local step {step + 1}: its micro-batches hold no target tokens (all padding)")
        lr = lr_at(step, s)
        set_lr(self.optimizer, lr)
        model.zero_grad(set_to_none=True)
        step_nll, examples = torch.zeros((), device=device), 0
        for inputs, targets in micro:
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            nll = _loss(model, inputs, targets, device, self.amp_dtype, s.loss_chunk_tokens)
            if self.in_backward and not math.isfinite(nll.item()):  # backward would step the weights
                raise FloatingPointError(
                    f"non-finite training loss at local step {step + 1}/{s.local_steps}; the "
                    "weights were not updated. Try a lower learning_rate or precision='fp32'.")
            (nll / step_tokens).backward()
            step_nll += nll.detach()
            examples += inputs.shape[0]
        if self.pairs:
            add_proximal_grad(self.pairs, s.proximal_mu)
        clip = s.max_grad_norm or 0.0
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip) if clip > 0 else torch.zeros((), device=device)
        nll_value, norm_value = torch.stack([step_nll, grad_norm.to(step_nll)]).tolist()  # one sync a step
        if not (math.isfinite(nll_value) and math.isfinite(norm_value)):
            raise FloatingPointError(
                f"non-finite training loss or gradient at local step {step + 1}/{s.local_steps} "
                f"(mean loss {nll_value / step_tokens}, grad norm {norm_value}, lr {lr:.3g}); the weights "
                "were not updated. Try a lower learning_rate, precision='fp32' or max_grad_norm > 0."
            )
        self.optimizer.step()
        return nll_value, step_tokens, examples, lr


def _loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, device: torch.device,
          amp_dtype: Optional[torch.dtype], chunk_tokens: int) -> torch.Tensor:
    """Summed NLL of one micro-batch: from the full logits, or in chunks of `chunk_tokens` (a Transformer)."""
    with _autocast(device, amp_dtype):
        if chunk_tokens > 0 and hasattr(model, "hidden_states"):
            return chunked_token_loss(model.hidden_states(inputs), model.output, targets, chunk_tokens)
        logits = model(inputs)
    return token_loss(logits, targets)[0]


def _next_batch(batches: Iterator, step: int, micro: int, settings: TrainSettings):
    try:
        batch = next(batches)
    except StopIteration:
        needed = settings.local_steps * settings.grad_accum_steps
        got = step * settings.grad_accum_steps + micro
        raise ValueError(
            f"the batch iterator ran out after {got} micro-batches; train_local needs local_steps * "
            f"grad_accum_steps = {needed} (pass an endless iterator, e.g. one that cycles over the data)"
        ) from None
    return _check_batch(batch, f"local step {step + 1}, micro-batch {micro + 1}")


# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: Optional[str | torch.device] = None,
    precision: str = "auto",
) -> dict:
    """Token-weighted mean CE over the non-ignored target tokens of all `batches`, and exp of it.

    `device`: where to evaluate (default: where the model is). A model elsewhere is moved there for the
    evaluation and moved back afterwards. The model is put in eval mode and its previous mode restored.
    """
    home = _model_device(model)
    target = home if device is None else resolve_device(device)
    amp_dtype = autocast_dtype(precision, target)
    was_training = model.training
    moved = not _same_device(target, home)
    if moved:
        model.to(target)
    model.eval()
    sum_nll = torch.zeros((), dtype=torch.float64, device=target)
    n_tokens = 0
    try:
        for i, batch in enumerate(batches):
            inputs, targets = _check_batch(batch, f"evaluation batch {i + 1}")
            n_tokens += int((targets != IGNORE_INDEX).sum())
            inputs, targets = inputs.to(target, non_blocking=True), targets.to(target, non_blocking=True)
            with _autocast(target, amp_dtype):
                logits = model(inputs)
            sum_nll += token_loss(logits, targets)[0].double()
    finally:
        model.train(was_training)
        if moved:
            model.to(home)
    if n_tokens == 0:
        raise ValueError("evaluate: the batches hold no target tokens (empty, or all padding)")
    total = sum_nll.item()
    return {"loss": total / n_tokens, "perplexity": perplexity(total, n_tokens), "num_tokens": n_tokens}

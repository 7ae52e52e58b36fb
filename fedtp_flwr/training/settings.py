"""Hyperparameters of a client's local training (TrainSettings), checked where they are built, and the device
they name. Both apps read these: the ClientApp trains with them, the run configuration checks its training keys
against TrainSettings' own rules, and the ServerApp evaluates on `resolve_device`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Optional

import torch

PRECISIONS = ("auto", "fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine")
# Local optimizers: torch's AdamW (float32 state, 8 B per parameter), or torchao's AdamW with 8-bit or 4-bit
# block-quantized state (~2 B / ~1 B per parameter). All three take bfloat16 weights too: then the update is
# applied with stochastic rounding (torchao), so no float32 master copy is needed.
OPTIMIZERS = ("adamw", "adamw8bit", "adamw4bit")
# dtypes a client may hold its trainable weights in (run-config key client-param-dtype).
PARAM_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


class SettingError(ValueError):
    """An invalid TrainSettings field. `rule` names other fields as {field_name} placeholders, so that the run
    configuration can say the same with its own key names (config.RunConfig checks its training keys here)."""

    def __init__(self, field: str, value: object, rule: str):
        self.field, self.value, self.rule = field, value, rule
        super().__init__(f"TrainSettings.{field}={value!r} is invalid; allowed: {self.rule_with(lambda name: name)}")

    def rule_with(self, name) -> str:
        """The rule with every {field} placeholder written as name(field)."""
        return self.rule.format_map({f.name: name(f.name) for f in fields(TrainSettings)})


@dataclass
class TrainSettings:
    """Hyperparameters of one client's local training in one round.

    `device` is where the client builds its model (`resolve_device(settings.device)`); `train_local`
    itself trains wherever the model already lives and moves each batch there.
    """

    learning_rate: float = 1e-5  # peak learning rate (the seed's default)
    weight_decay: float = 0.01  # AdamW decoupled decay on linear weights only
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: Optional[float] = 1.0  # clip the global grad norm; 0 or None turns clipping off
    lr_schedule: str = "constant"  # "constant" or "cosine", both with optional linear warmup
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to min_lr_ratio * learning_rate (0 decays to zero)
    local_steps: int = 10  # optimizer steps per call of train_local
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; "fp32"; "bf16" (autocast)
    gradient_checkpointing: bool = False  # recompute each block's activations in backward
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    seed: int = 42
    proximal_mu: float = 0.0  # FedProx: adds mu/2 * ||w - w_ref||^2 to the objective
    progress: Optional[bool] = False  # tqdm bar over local steps (None: only when stderr is a terminal)
    optimizer: str = "adamw"  # one of OPTIMIZERS
    optimizer_in_backward: bool = False  # step each parameter as soon as its gradient is ready; no grad buffers
    loss_chunk_tokens: int = 0  # > 0: compute the loss this many tokens at a time (chunked_loss.py); 0: at once
    adapter_lr_factor: float = 1.0  # learning rate of context mode's rest-adapter factors, x learning_rate

    def __post_init__(self):
        def bad(field: str, allowed: str):
            return SettingError(field, getattr(self, field), allowed)

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_real(self.learning_rate) or self.learning_rate <= 0:
            raise bad("learning_rate", "a finite number > 0")
        if not is_real(self.weight_decay) or self.weight_decay < 0:
            raise bad("weight_decay", "a finite number >= 0")
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else None
        if betas is None or len(betas) != 2 or not all(is_real(b) and 0 <= b < 1 for b in betas):
            raise bad("betas", "two numbers in [0, 1)")
        self.betas = (float(betas[0]), float(betas[1]))
        if not is_real(self.eps) or self.eps <= 0:
            raise bad("eps", "a finite number > 0")
        if self.max_grad_norm is not None and (not is_real(self.max_grad_norm) or self.max_grad_norm < 0):
            raise bad("max_grad_norm", "a finite number >= 0, or None (0 and None turn clipping off)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise bad("lr_schedule", f"one of {LR_SCHEDULES}")
        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise bad("warmup_steps", "an integer >= 0")
        if not is_real(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            raise bad("min_lr_ratio", "a number in [0, 1]")
        if not is_int(self.local_steps) or self.local_steps < 1:
            raise bad("local_steps", "an integer >= 1")
        if not is_int(self.grad_accum_steps) or self.grad_accum_steps < 1:
            raise bad("grad_accum_steps", "an integer >= 1")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"one of {PRECISIONS}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise bad("gradient_checkpointing", "True or False")
        if not isinstance(self.device, str) or not _DEVICE_RE.fullmatch(self.device):
            raise bad("device", "'auto', 'cpu', 'cuda' or 'cuda:N'")
        if not is_int(self.seed) or self.seed < 0:
            raise bad("seed", "an integer >= 0")
        if not is_real(self.proximal_mu) or self.proximal_mu < 0:
            raise bad("proximal_mu", "a finite number >= 0")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise bad("progress", "True, False or None (only on a terminal)")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"one of {OPTIMIZERS}")
        if not isinstance(self.optimizer_in_backward, bool):
            raise bad("optimizer_in_backward", "True or False")
        if self.optimizer_in_backward and (self.grad_accum_steps != 1 or self.max_grad_norm):
            raise bad("optimizer_in_backward", "False unless {grad_accum_steps} = 1 and {max_grad_norm} = 0 (it steps each "
                      "parameter during backward, so it cannot accumulate micro-batches or clip the global gradient "
                      f"norm; got {self.grad_accum_steps} and {self.max_grad_norm})")
        if not is_int(self.loss_chunk_tokens) or self.loss_chunk_tokens < 0:
            raise bad("loss_chunk_tokens", "an integer >= 0")
        if not is_real(self.adapter_lr_factor) or self.adapter_lr_factor <= 0:
            raise bad("adapter_lr_factor", "a finite number > 0")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda if available, else cpu. Asking for a GPU that is not there is an error."""
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str) or not _DEVICE_RE.fullmatch(name):
        raise ValueError(f"device {name!r} is invalid; allowed: 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for, but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise ValueError(f"device {name!r} was asked for, but this machine has {n} GPU(s)")
    return device

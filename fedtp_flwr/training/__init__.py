"""Local training and evaluation, used by both apps: a ClientApp trains its slice (`train_local`), the
ServerApp scores the merged model on held-out data (`evaluate`).

    settings.py      TrainSettings (checked hyperparameters), resolve_device
    loop.py          train_local, evaluate, the optimizers (torch AdamW, torchao low-bit AdamW, step in backward)
    chunked_loss.py  the output layer and cross-entropy a chunk of tokens at a time
"""

from .loop import (
                   InBackwardOptimizer,
                   add_proximal_grad,
                   autocast_dtype,
                   evaluate,
                   lr_at,
                   make_optimizer,
                   param_groups,
                   set_lr,
                   train_local,
)
from .settings import LR_SCHEDULES, OPTIMIZERS, PARAM_DTYPES, PRECISIONS, SettingError, TrainSettings, resolve_device

__all__ = [
    "LR_SCHEDULES", "OPTIMIZERS", "PARAM_DTYPES", "PRECISIONS", "InBackwardOptimizer", "SettingError", "TrainSettings",
    "add_proximal_grad", "autocast_dtype", "evaluate", "lr_at", "make_optimizer", "param_groups", "resolve_device",
    "set_lr", "train_local",
]

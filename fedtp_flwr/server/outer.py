"""DiLoCo's outer optimizer as a Flower strategy: Nesterov SGD on the round's pseudo-gradient.

DiLoCo (Douillard et al. 2023) lets each client take many local steps, then treats the change of the averaged
model as a gradient: g = current - averaged, and steps the global model with SGD with Nesterov momentum (outer lr
0.7, momentum 0.9 in the paper), in torch.optim.SGD's convention (dampening 0):

    v = g (first round), else v = momentum * v + g
    new = current - lr * (g + momentum * v)

Flower's FedAvgM is the same rule without the Nesterov term; this subclass keeps FedAvgM's state (current_arrays,
momentum_vector: what a checkpoint holds for an exact resume) and adds the term. The tensor-parallel strategy
hands it one reply holding the merged model, so g is the merged update of the whole model.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg, FedAvgM


class DiLoCo(FedAvgM):
    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        averaged, metrics = FedAvg.aggregate_train(self, server_round, replies)
        if averaged is None:
            return averaged, metrics
        if self.current_arrays is None:
            raise ValueError("DiLoCo: no current model; configure_train must run before aggregate_train")
        keys = list(averaged.keys())
        current = self.current_arrays.to_numpy_ndarrays()
        grad = [old - new for old, new in zip(current, averaged.to_numpy_ndarrays(), strict=True)]
        mu = self.server_momentum
        if self.momentum_vector is None:
            self.momentum_vector = grad
        else:
            self.momentum_vector = [mu * v + g for v, g in zip(self.momentum_vector, grad, strict=True)]
        step = [g + mu * v for g, v in zip(grad, self.momentum_vector, strict=True)]
        new = ArrayRecord({k: Array(np.asarray(old - self.server_learning_rate * s))
                           for k, old, s in zip(keys, current, step, strict=True)})
        self.current_arrays = new
        return new, metrics

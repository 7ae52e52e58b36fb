"""DiLoCo's outer step (server/outer.py) against the reference: torch.optim.SGD with Nesterov momentum on the
pseudo-gradient (current - averaged), round after round; and through the tensor-parallel strategy."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtp_flwr.server.outer import DiLoCo


class _TwoNodes:
    def get_node_ids(self):
        return [1, 2]


def _reply(values, n=3):
    return Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.asarray(values, np.float32))}),
                               "metrics": MetricRecord({"num-examples": n})}), dst_node_id=0,
                   message_type=MessageType.TRAIN)


@pytest.mark.parametrize("lr, momentum", [(0.7, 0.9), (1.0, 0.0), (0.5, 0.5)])
def test_outer_step_is_torch_sgd_with_nesterov_on_the_pseudo_gradient(server_identity, lr, momentum):
    rule = DiLoCo(server_learning_rate=lr, server_momentum=momentum)
    current = np.array([1.0, -2.0, 0.5], np.float32)
    ref = torch.nn.Parameter(torch.tensor(current, dtype=torch.float64))
    sgd = torch.optim.SGD([ref], lr=lr, momentum=momentum, nesterov=momentum > 0)
    rng = np.random.default_rng(0)
    arrays = ArrayRecord({"w": Array(current)})
    for rnd in range(1, 4):
        list(rule.configure_train(rnd, arrays, ConfigRecord(), _TwoNodes()))
        averaged = arrays["w"].numpy() + rng.normal(size=3).astype(np.float32)  # what the clients' merge gave
        arrays, _ = rule.aggregate_train(rnd, [_reply(averaged)])
        sgd.zero_grad()
        ref.grad = ref.detach() - torch.tensor(averaged, dtype=torch.float64)  # pseudo-gradient
        sgd.step()
        np.testing.assert_allclose(arrays["w"].numpy(), ref.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_diloco_differs_from_fedavgm_by_the_nesterov_term(server_identity):
    """The same momentum without Nesterov (Flower's FedAvgM) gives another second step: the term is there."""
    from flwr.serverapp.strategy import FedAvgM

    outs = []
    for rule in (DiLoCo(server_learning_rate=0.7, server_momentum=0.9),
                 FedAvgM(server_learning_rate=0.7, server_momentum=0.9)):
        arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
        for rnd, target in ((1, [1.0, 1.0]), (2, [2.0, 0.0])):
            list(rule.configure_train(rnd, arrays, ConfigRecord(), _TwoNodes()))
            arrays, _ = rule.aggregate_train(rnd, [_reply(target)])
        outs.append(arrays["w"].numpy())
    assert not np.allclose(outs[0], outs[1])

"""Flower ClientApp: train (or evaluate) this node's tensor-parallel slice on its own data."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtp_flwr.client.app import evaluate_reply, train_reply
from fedtp_flwr.config import RunConfig
from fedtp_flwr.identity import IDENTITY_ACTION, identity_reply

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    # settings of the run -> build the slice model, train it on this node's data -> reply with the slice
    return train_reply(msg, RunConfig.from_run_config(context.run_config), context.node_config)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return evaluate_reply(msg, RunConfig.from_run_config(context.run_config), context.node_config)


@app.query(IDENTITY_ACTION)
def identity(msg: Message, context: Context) -> Message:
    # the server orders nodes (ranks, sampling) by this, the same in every run: node-name or partition-id
    return identity_reply(msg, context.node_config)

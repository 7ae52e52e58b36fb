"""Flower ClientApp: train (or evaluate) this node's tensor-parallel slice on its own data."""

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedtp_flwr.client import evaluate_slice, train_slice
from fedtp_flwr.config import RunConfig

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    # 1. settings of the run; 2. build the slice sub-model, train it on local data; 3. reply with the slice
    cfg = RunConfig.from_run_config(context.run_config)
    arrays, metrics = train_slice(msg.content, cfg, context.node_config)
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_run_config(context.run_config)
    metrics = evaluate_slice(msg.content, cfg, context.node_config)
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)

"""ServerApp and ClientApp of the transport benchmark (bench/transport.py): one round trip of a large slice.

ServerApp: 1. build a prefix of the real Llama 3.2 3B world-size-2 slice (its tensors in state-dict order,
random bfloat16 values) of at least `min-bytes`; 2. encode it with fedtp_flwr.wire, check that decoding
gives the same bits, free the tensors; 3. send it to the one node and wait for the echo; 4. check the echo
bit for bit against what was sent; 5. count what Flower put on the wire; 6. write
the measurements (times, own peak RSS) to `result-path`.
ClientApp: decode the slice (fedtp_flwr.wire), re-encode it, send it back with its own times and RSS.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedtp_flwr.model import preset_args
from fedtp_flwr.model.sharding import slice_shapes
from fedtp_flwr.server.memory import reset_peak, status_bytes
from fedtp_flwr.server.pull import pull_replies
from fedtp_flwr.wire import decode, encode, record_nbytes

server = ServerApp()
client = ClientApp()


def slice_prefix(min_bytes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The first tensors of the 3B W=2 slice (state-dict order) whose bfloat16 bytes reach min_bytes."""
    gen = torch.Generator().manual_seed(seed)
    state, total = {}, 0
    for name, shape in slice_shapes(preset_args("llama3.2-3b"), 2).items():
        state[name] = torch.randn(shape, generator=gen, dtype=torch.bfloat16)
        total += state[name].numel() * 2
        if total >= min_bytes:
            return state
    raise ValueError(f"min-bytes={min_bytes} exceeds the whole 3B W=2 slice ({total} B)")


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    wire = str(cfg["wire-dtype"])
    out: dict = {"wire_dtype": wire}
    deadline = time.time() + 60
    while not (nodes := list(grid.get_node_ids())) and time.time() < deadline:
        time.sleep(0.5)
    if not nodes:
        raise RuntimeError("no node connected within 60 s")

    # 1-2. the slice and its ArrayRecord
    out["rss_start"] = status_bytes("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    state = slice_prefix(int(cfg["min-bytes"]))
    out["build_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    record = encode(state, wire)
    out["encode_seconds"] = time.perf_counter() - t0
    out["n_tensors"] = len(state)
    out["tensor_bytes"] = sum(t.numel() * t.element_size() for t in state.values())
    out["payload_bytes"] = record_nbytes(record)
    # The encoding is exact (bf16 bits <-> int16 .npy); from here on the record is the reference, and the
    # tensors are freed, as a server that sends a slice keeps only the encoded record until the reply.
    sent = decode(record, wire, dtype=None, copy=False)
    out["encode_exact"] = all(torch.equal(sent[k].view(torch.int16), state[k].view(torch.int16)) for k in state)
    shapes = {k: (tuple(t.shape), t.dtype) for k, t in state.items()}
    del state, sent
    out["rss_before_send"] = status_bytes("VmRSS")
    out["peak_before_send"] = status_bytes("VmHWM")

    # 3. the round trip through Flower: push, then pull with Flower's pull_messages or fedtp_flwr.server.pull (the
    # peak is reset in between, so each half has its own)
    msg = Message(RecordDict({"arrays": record, "config": ConfigRecord({"wire-dtype": wire})}),
                  dst_node_id=nodes[0], message_type=MessageType.TRAIN)
    how = str(cfg["pull"])
    out["pull"] = how
    t0 = time.perf_counter()
    reset_peak()
    (mid,) = grid.push_messages([msg])
    out["peak_push"] = status_bytes("VmHWM")
    out["rss_after_push"] = status_bytes("VmRSS")
    reset_peak()
    end, replies = time.time() + float(cfg["timeout"]), []
    while not replies and time.time() < end:
        replies = list(grid.pull_messages([mid])) if how == "flower" else pull_replies(grid, mid)
        if not replies:
            time.sleep(0.2)
    out["round_trip_seconds"] = time.perf_counter() - t0
    out["peak_pull"] = status_bytes("VmHWM")
    out["peak_after_round_trip"] = max(out["peak_push"], out["peak_pull"])
    out["rss_after_round_trip"] = status_bytes("VmRSS")
    if len(replies) != 1 or replies[0].has_error():
        raise RuntimeError(f"no valid reply: {[r.error if r.has_error() else 'ok' for r in replies]}")
    reply = replies[0]

    # 4. exact round trip: every bfloat16 bit pattern back where it was
    t0 = time.perf_counter()
    echo = reply.content["arrays"]
    echoed = decode(echo, wire, dtype=None, copy=False)
    out["echo_exact"] = out["encode_exact"] and set(echoed) == set(shapes) and all(
        (tuple(echoed[k].shape), echoed[k].dtype) == shapes[k] and bytes(echo[k].data) == record[k].data for k in shapes)
    out["check_seconds"] = time.perf_counter() - t0
    out["client"] = {k: float(v) for k, v in reply.content["metrics"].items()}
    out["echo_payload_bytes"] = record_nbytes(reply.content["arrays"])

    # 5. what Flower serialized: every unique object (content-addressed chunks) of each message
    if how != "flower":  # fedtp's pull leaves the data in bytearrays; the object ids are those of bytes
        for a in reply.content["arrays"].values():
            a.data = bytes(a.data)
    for name, m in (("down", msg), ("up", reply)):
        objects = get_all_nested_objects(m)
        out[f"{name}_objects"] = len(objects)
        out[f"{name}_object_bytes"] = sum(len(o.deflate()) for o in objects.values())
    out["peak_final"] = max(out["peak_after_round_trip"], status_bytes("VmHWM"))
    Path(str(cfg["result-path"])).write_text(json.dumps(out, indent=2))


@client.train()
def echo(msg: Message, context: Context) -> Message:
    rss0 = status_bytes("VmRSS")
    t0 = time.perf_counter()
    wire = str(msg.content["config"]["wire-dtype"])
    state = decode(msg.content["arrays"], wire, dtype=None, copy=False)  # read-only views of the bytes
    reply = encode(state, wire)
    metrics = MetricRecord({"decode-encode-seconds": time.perf_counter() - t0, "rss-at-start": rss0,
                            "rss-before-reply": status_bytes("VmRSS"), "peak-rss-before-reply": status_bytes("VmHWM"),
                            "num-examples": 1})
    return Message(RecordDict({"arrays": reply, "metrics": metrics}), reply_to=msg)

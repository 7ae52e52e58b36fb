"""Bytes per client per round, in each direction, as Flower 1.42 serializes them.

What travels: Flower deflates a Message into content-addressed objects (Message, RecordDict, ArrayRecord,
ConfigRecord/MetricRecord, one Array per tensor, and each Array's .npy bytes cut into 5 MiB ArrayChunks).
Each unique object is pushed to / pulled from the SuperLink as one protobuf request carrying its deflated
bytes; the message's metadata and object tree travel as protobuf too. This script counts, per message:

  payload  the Arrays' .npy bytes (wire.record_nbytes)
  objects  sum of len(obj.deflate()) over the message's unique objects (what the object store holds)
  wire     objects + protobuf framing: one PushObjectRequest per object (node, run id, object id,
           session id), the message metadata and its object tree. Transport framing below protobuf
           (HTTP/2 frames: 9 B per 16 KiB, ~0.05%; TLS records: ~0.15%) is not counted.

against the analytic size: parameters of the slice (slice_shapes on the meta device) x bytes per element.

Messages are built by the project's own code: server -> client by FederatedTensorParallel.configure_train,
client -> server as client_app builds its reply (trained slice + train metrics).

Two methods, checked against each other:
- full: serialize whole real messages (random weights, so no chunk is deduplicated, as with trained
  weights). Used on models that fit here ("llama3.2-tiny", the 230M "bench" model).
- shape classes: serialize one real tensor of every distinct (shape, wire dtype) at full size, multiply by
  how often it occurs, and add the message envelope measured on the same message with placeholder arrays.
  Exact up to a few bytes of protobuf length prefixes (the check shows the difference); used for the 3B
  and 1B, whose messages do not fit in memory here (3B at W=1 in float32: 14.4 GB).
`--stream` additionally serializes every tensor of one 3B slice (W=2, bfloat16) one at a time, freeing as
it goes: a third, independent count at 3B scale.

    python bench/communication.py                 # ~10 min, < 10 GB of memory (the 70B's embedding)
    python bench/communication.py --quick         # tiny model only (used by the tests)
"""

from __future__ import annotations

import argparse
import logging
import time
import uuid
from functools import lru_cache

import _common
import torch
from flwr.app import Array, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message.message import remove_content_from_message
from flwr.common.serde import message_to_proto
from flwr.proto.message_pb2 import PushObjectRequest  # pylint: disable=no-name-in-module
from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.task_identity import TaskIdentity

from fedtp_flwr.config import RunConfig
from fedtp_flwr.model import ModelArgs, Transformer
from fedtp_flwr.model.sharding import REPLICATE, rule_for, shard, slice_shapes, valid_world_sizes
from fedtp_flwr.server.strategy import FederatedTensorParallel
from fedtp_flwr.wire import encode, record_nbytes

WIRE_DTYPES = ("float32", "bfloat16")  # the two worth reporting (float16 moves as many bytes as bfloat16)
BYTES_PER_ELEMENT = {"float32": 4, "bfloat16": 2, "float16": 2}
# Realistic ids: Flower node and run ids are random 64-bit integers; object-push session ids are uuid4.
NODE_ID, RUN_ID, SESSION_ID = 0xD1A9_55C3_8B7E_0F21, 0x9E3B_4C2A_1F6D_7081, str(uuid.UUID(int=2**127 + 12345))


class FakeGrid:
    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return list(self.node_ids)


def _varint_len(n: int) -> int:
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


# ------------------------------------------------------------------------------------- counting


def object_stats(objects: dict) -> dict[str, int]:
    """objects and their protobuf framing, for a dict object_id -> InflatableObject (unique objects)."""
    content = framing = 0
    node = Node(node_id=NODE_ID)
    for oid, obj in objects.items():
        body = obj.deflate()
        req = PushObjectRequest(node=node, run_id=RUN_ID, object_id=oid, object_content=body, session_id=SESSION_ID)
        content += len(body)
        framing += req.ByteSize() - len(body)
    return {"objects": content, "framing": framing, "n_objects": len(objects)}


def message_stats(msg: Message) -> dict[str, int]:
    """Full count of one message (see the module docstring)."""
    objects = get_all_nested_objects(msg)
    s = object_stats(objects)
    s["framing"] += message_to_proto(remove_content_from_message(msg)).ByteSize() + get_object_tree(msg).ByteSize()
    s["payload"] = record_nbytes(msg.content["arrays"])
    s["wire"] = s["objects"] + s["framing"]
    return s


def array_stats(array) -> dict[str, int]:
    """One Array's share of a message: itself, its chunks, their framing and its object-tree node."""
    s = object_stats(get_all_nested_objects(array))
    tree = get_object_tree(array).ByteSize()
    s["framing"] += 1 + _varint_len(tree) + tree  # field tag + length prefix + subtree
    s["payload"] = len(array.data)
    return s


def _random_tensor(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


@lru_cache(maxsize=None)
def shape_class_stats(shape: tuple[int, ...], wire_dtype: str) -> dict[str, int]:
    """array_stats of a real tensor of this shape (random values), encoded by fedtp_flwr.wire."""
    t = _random_tensor(shape, seed=hash(shape) % 2**31)
    array = encode({"x": t}, wire_dtype)["x"]
    del t
    return array_stats(array)


@lru_cache(maxsize=None)
def raw_class_stats(shape: tuple[int, ...], numpy_dtype: str) -> dict[str, int]:
    """array_stats of a real Array of this shape and numpy dtype, as Flower deflates it. Its bytes are random (no
    two 5 MiB chunks alike, as with trained weights): what Flower sends depends on the bytes' count, the shape and
    the dtype, not on the values, and random bytes cost one copy (the 70B's 2.1 GB embedding fits here)."""
    import numpy as np

    dtype = np.dtype(numpy_dtype)
    g = np.random.default_rng(abs(hash((shape, numpy_dtype))) % 2**31)
    array = Array(np.frombuffer(g.bytes(_numel(shape) * dtype.itemsize), dtype=dtype).reshape(shape))
    return array_stats(array)  # the random bytes are freed once the Array holds its .npy copy


def _add(a: dict, b: dict, sign: int = 1) -> dict:
    return {k: a.get(k, 0) + sign * b.get(k, 0) for k in set(a) | set(b)}


# ------------------------------------------------------------------------------------ messages


def _set_identity() -> None:
    """Messages need a run id, as in a ServerApp process."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 1, 1


def _train_config() -> ConfigRecord:
    # What server.run passes: nothing beyond the strategy's own keys (FedAvg adds server-round).
    return ConfigRecord()


def server_message(args: ModelArgs, state: dict, world_size: int, wire_dtype: str) -> Message:
    """The message FederatedTensorParallel sends to the node of rank 0."""
    cfg = RunConfig(world_size=world_size, wire_dtype=wire_dtype, min_available_nodes=1)
    strategy = FederatedTensorParallel(args, cfg)
    (msg,) = strategy.configure_train(1, encode(state, "float32"), _train_config(), FakeGrid([NODE_ID]))
    return msg


def reply_message(request: Message, slice_state: dict, wire_dtype: str) -> Message:
    """What client_app.train returns: the trained slice and its metrics (same keys as client.train_slice)."""
    metrics = MetricRecord({"num-examples": 1234, "train-loss": 2.5, "train-perplexity": 12.18,
                            "num-tokens": 65536, "tokens-per-second": 1234.5, "rank": 0})
    return Message(RecordDict({"arrays": encode(slice_state, wire_dtype), "metrics": metrics}), reply_to=request)


def _full_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}


def _random_state(args: ModelArgs) -> dict[str, torch.Tensor]:
    return {k: _random_tensor(s, seed=i) for i, (k, s) in enumerate(_full_shapes(args).items())}


def _placeholder_state(args: ModelArgs) -> dict[str, torch.Tensor]:
    """The real keys, with small tensors: real size along a split dim (so shard() accepts them), 2 along
    the other dim, 1 for vectors. Values (i // 128, i % 128) are exact in bfloat16 and differ per key, so no
    two placeholder objects are deduplicated."""
    out = {}
    for i, (k, s) in enumerate(_full_shapes(args).items()):
        rule = rule_for(k)
        if len(s) == 1:
            small = (2,)
        else:
            small = [2] * len(s)
            if rule is not REPLICATE:
                small[rule.dim] = s[rule.dim]
        t = torch.empty(tuple(small))
        t.view(-1)[0::2], t.view(-1)[1::2] = float(i // 128), float(i % 128)
        out[k] = t
    return out


def measure_full(args: ModelArgs, world_size: int, wire_dtype: str) -> dict[str, dict[str, int]]:
    """Serialize the two real messages whole."""
    state = _random_state(args)
    down = server_message(args, state, world_size, wire_dtype)
    slice_state = shard(state, args, 0, world_size)
    up = reply_message(down, slice_state, wire_dtype)
    return {"down": message_stats(down), "up": message_stats(up)}


def measure_by_shape_class(args: ModelArgs, world_size: int, wire_dtype: str) -> dict[str, dict[str, int]]:
    """Envelope (real message, placeholder arrays) + one real serialization per distinct tensor shape."""
    ph_state = _placeholder_state(args)
    down = server_message(args, ph_state, world_size, wire_dtype)
    up = reply_message(down, shard(ph_state, args, 0, world_size), wire_dtype)
    shapes = slice_shapes(args, world_size)
    out = {}
    for direction, msg in (("down", down), ("up", up)):
        total = message_stats(msg)
        for name, array in msg.content["arrays"].items():
            total = _add(total, array_stats(array), -1)  # remove the placeholder ...
            total = _add(total, shape_class_stats(shapes[name], wire_dtype))  # ... add the real tensor
        total["wire"] = total["objects"] + total["framing"]
        out[direction] = total
    return out


def stream_slice(args: ModelArgs, world_size: int, wire_dtype: str) -> dict[str, int]:
    """Serialize every tensor of one slice, one at a time (no cache), summing array_stats."""
    total: dict[str, int] = {}
    for i, (name, shape) in enumerate(slice_shapes(args, world_size).items()):
        t = _random_tensor(shape, seed=10_000 + i)
        total = _add(total, array_stats(encode({name: t}, wire_dtype)[name]))
        del t
    return total


def analytic_bytes(args: ModelArgs, world_size: int, wire_dtype: str) -> int:
    shapes = slice_shapes(args, world_size)
    return sum(_numel(s) for s in shapes.values()) * BYTES_PER_ELEMENT[wire_dtype]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ----------------------------------------------------------------------------------------- main


# ------------------------------------------------------------------------ the 3B recipes with codecs


def recipe_arrays(args: ModelArgs, cfg: RunConfig) -> dict[str, dict[str, tuple[tuple[int, ...], str]]]:
    """{"down": {array: (shape, numpy dtype)}, "up": {...}}: every Array of one client's round, as the strategy
    and the client build them for these settings (slice in the wire dtype or the download codec's layout, the
    frozen rest in context mode, the update or the weights, the rest adapters' factors)."""
    from fedtp_flwr.model.context import adapter_shapes, rest_shapes
    from fedtp_flwr.model.quant import layout
    from fedtp_flwr.wire import NUMPY_DTYPE, delta_shapes

    W, vp = cfg.world_size, cfg.vocab_parallel
    sliced = slice_shapes(args, W, vp)
    wire = NUMPY_DTYPE[cfg.wire_dtype]
    # keys: "<record>/<array>" (the slice's and the rest's arrays share parameter names)
    down = {f"arrays/{k}": v for k, v in ({k: (tuple(s), wire) for k, s in sliced.items()} if cfg.download_bits is None
                                          else delta_shapes(sliced, cfg.download_bits)).items()}
    if cfg.slice_mode == "context" and W > 1:
        for name, shape in rest_shapes(args, W, vp).items():
            data_shape, data_dtype, scale_shape = layout(shape, cfg.context_bits, cfg.context_group_size or None)
            down[f"context/{name}:q"] = (tuple(data_shape), str(data_dtype).removeprefix("torch."))
            if scale_shape is not None:
                down[f"context/{name}:scale"] = (tuple(scale_shape), "float32")
    rank = cfg.effective_rest_adapter_rank
    adapters = {f"arrays/{k}": (tuple(s), wire)
                for k, s in (adapter_shapes(args, W, rank, vp) if rank and W > 1 else {}).items()}
    update = ({k: (tuple(s), wire) for k, s in sliced.items()} if cfg.delta_bits is None
              else delta_shapes(sliced, cfg.delta_bits))
    record = "arrays" if cfg.delta_bits is None else "delta"
    return {"down": down, "up": {**adapters, **{f"{record}/{k}": v for k, v in update.items()}}}


def recipe_round(args: ModelArgs, cfg: RunConfig) -> dict:
    """Bytes of one client's round by shape classes: each distinct (shape, dtype) Array serialized once by Flower,
    times how often it occurs (objects + framing of the arrays; a message's envelope adds a few kB, section 1)."""
    out = {}
    for direction, arrays in recipe_arrays(args, cfg).items():
        total = {}
        for shape, dtype in arrays.values():
            total = _add(total, raw_class_stats(shape, dtype))
        out[direction] = total["objects"] + total["framing"]
    out["total"] = out["down"] + out["up"]
    return out


def recipe_rows(world_sizes) -> tuple[list[dict], dict[str, float]]:
    """The 3B small-GPU recipes (configs/) with each codec option, per W; `recipe_gb` is the recipe as shipped
    (its own codecs), and each row says whether it is that one."""
    import tomllib

    args = _common.model_args("llama3.2-3b")
    variants = {"bf16 both ways": {"upload-codec": "weights", "download-codec": "wire"},
                "up int4-delta": {"upload-codec": "int4-delta", "download-codec": "wire"},
                "up int4-delta, down int8": {"upload-codec": "int4-delta", "download-codec": "int8"},
                "up int4-delta, down int4": {"upload-codec": "int4-delta", "download-codec": "int4"}}
    rows, recipe_gb = [], {}
    for w in world_sizes:
        path = _common.REPO_ROOT / "configs" / f"llama32-3b-small-gpu-w{w}.toml"
        if not path.exists():
            continue
        recipe = tomllib.loads(path.read_text())
        shipped = RunConfig.from_run_config(recipe)
        for name, extra in variants.items():
            cfg = RunConfig.from_run_config({**recipe, **extra})
            r = recipe_round(args, cfg)
            is_recipe = (cfg.upload_codec, cfg.download_codec) == (shipped.upload_codec, shipped.download_codec)
            rows.append({"world_size": w, "variant": name, "upload_codec": cfg.upload_codec,
                         "download_codec": cfg.download_codec, "recipe": is_recipe, **r})
            if is_recipe:
                recipe_gb[str(w)] = r["total"] / 1e9
    return rows, recipe_gb


# ------------------------------------------------ every layout x codec, 3B / 8B / 70B, and federated LoRA r16

MATRIX_MODELS = "llama3.2-3b,llama3.1-8b,llama3.1-70b"
# what a client receives and sends, on top of the 3B W=2 small-GPU recipe's keys (bf16 wire, int4 frozen rest in
# groups of 128, rank-16 rest adapters in context mode)
LAYOUTS = {
    "independent": {"slice-mode": "independent", "rest-adapter-rank": 0, "vocab-parallel": False},
    "context": {"slice-mode": "context", "vocab-parallel": False},
    "context + vocabulary rows": {"slice-mode": "context", "vocab-parallel": True},
}
CODECS = {  # the same precision both ways: up the weights or the update, down the slice
    "bf16": {"upload-codec": "weights", "download-codec": "wire"},
    "int8": {"upload-codec": "int8-delta", "download-codec": "int8"},
    "int4": {"upload-codec": "int4-delta", "download-codec": "int4"},
}
LORA_RANK = 16
LORA_TARGETS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def lora_shapes(args: ModelArgs, rank: int) -> dict[str, tuple[int, int]]:
    """Federated LoRA on every linear of every block (FlowerTune's and this project's LoRA baseline): A [rank, in]
    and B [out, rank] per weight [out, in] of the model's own state dict."""
    out = {}
    for name, shape in _full_shapes(args).items():
        if name.startswith("layers.") and name.removesuffix(".weight").split(".", 2)[2] in LORA_TARGETS:
            out[f"{name}:lora_A"], out[f"{name}:lora_B"] = (rank, shape[1]), (shape[0], rank)
    return out


def matrix_rows(models, world_sizes) -> list[dict]:
    """Bytes per client per round (objects + framing of every Array, by shape classes) for each model, W, layout and
    codec, and federated LoRA r16 in bf16 (W = 1: every client holds the whole frozen model)."""
    import tomllib

    base = tomllib.loads((_common.REPO_ROOT / "configs" / "llama32-3b-small-gpu-w2.toml").read_text())
    rows = []
    for name in models:
        args = _common.model_args(name)
        for w in [w for w in world_sizes if w in valid_world_sizes(args)]:
            for layout, layout_keys in LAYOUTS.items():
                if w == 1 and layout != "independent":
                    continue  # W=1 is FedAvg: no rest, no vocabulary split
                for codec, codec_keys in CODECS.items():
                    cfg = RunConfig.from_run_config({**base, **layout_keys, **codec_keys, "world-size": w})
                    r = recipe_round(args, cfg)
                    rows.append({"model": name, "world_size": w, "layout": "FedAvg" if w == 1 else layout,
                                 "codec": codec, **r})
        shapes = lora_shapes(args, LORA_RANK)
        one_way = sum(st["objects"] + st["framing"] for st in (raw_class_stats(s, "int16") for s in shapes.values()))
        rows.append({"model": name, "world_size": 1, "layout": f"federated LoRA r{LORA_RANK}", "codec": "bf16",
                     "params": sum(_numel(s) for s in shapes.values()), "down": one_way, "up": one_way,
                     "total": 2 * one_way})
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="llama3.2-3b,llama3.2-1b", help="presets counted by shape classes")
    p.add_argument("--check-models", default="llama3.2-tiny,bench",
                   help="models whose messages are serialized whole (and also by shape classes, to check)")
    p.add_argument("--world-sizes", default="1,2,4,8", help="world sizes (those a model does not allow are skipped)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="also serialize a 3B W=2 bfloat16 slice tensor by tensor (~4.4 GB through Flower, ~1 min)")
    p.add_argument("--quick", action="store_true", help="the tiny bench model only: the dry run of the tests")
    p.add_argument("--recipes", action=argparse.BooleanOptionalAction, default=True,
                   help="the 3B small-GPU recipes' bytes per round with each codec (~1 min)")
    p.add_argument("--matrix-models", default=MATRIX_MODELS,
                   help="models for the table of every layout x codec and federated LoRA r16 ('' to skip)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/communication.json)")
    a = p.parse_args(argv)
    if a.quick:
        a.models, a.check_models, a.stream, a.recipes = "bench-tiny", "bench-tiny", False, False
        a.matrix_models = "bench-tiny"
    logging.getLogger("flwr").setLevel(logging.WARNING)  # the strategy logs every message it builds
    _set_identity()
    world_sizes = [int(w) for w in a.world_sizes.split(",")]
    t_start = time.perf_counter()

    # 1. Check: whole real messages vs shape classes vs analytic, on models that fit.
    checks = []
    for name in [m for m in a.check_models.split(",") if m]:
        args = _common.model_args(name)
        for w in [w for w in world_sizes if w in valid_world_sizes(args)]:
            for dt in WIRE_DTYPES:
                full = measure_full(args, w, dt)
                est = measure_by_shape_class(args, w, dt)
                analytic = analytic_bytes(args, w, dt)
                for d in ("down", "up"):
                    checks.append({
                        "model": name, "world_size": w, "wire_dtype": dt, "direction": d, "analytic": analytic,
                        **{f"full_{k}": v for k, v in full[d].items()},
                        "shape_class_wire": est[d]["wire"],
                        "shape_class_minus_full": est[d]["wire"] - full[d]["wire"],
                        "wire_over_analytic": full[d]["wire"] / analytic,
                    })
    _common.table(
        ["model", "W", "wire dtype", "dir", "analytic B", "payload B", "objects B", "wire B", "shape-class - full",
         "wire/analytic"],
        [[c["model"], c["world_size"], c["wire_dtype"], c["direction"], c["analytic"], c["full_payload"],
          c["full_objects"], c["full_wire"], c["shape_class_minus_full"], f"{c['wire_over_analytic']:.6f}"]
         for c in checks],
        title="Check: whole messages serialized by Flower vs the shape-class count vs analytic (bytes)",
    )

    # 2. The real models, by shape classes.
    rows = []
    for name in [m for m in a.models.split(",") if m]:
        args = _common.model_args(name)
        full_fp32 = None
        for w in [w for w in world_sizes if w in valid_world_sizes(args)]:
            for dt in WIRE_DTYPES:
                est = measure_by_shape_class(args, w, dt)
                analytic = analytic_bytes(args, w, dt)
                params = sum(_numel(s) for s in slice_shapes(args, w).values())
                row = {"model": name, "world_size": w, "wire_dtype": dt, "slice_params": params,
                       "analytic": analytic, "down": est["down"], "up": est["up"],
                       "down_over_analytic": est["down"]["wire"] / analytic,
                       "up_over_analytic": est["up"]["wire"] / analytic}
                if w == 1 and dt == "float32":
                    full_fp32 = est
                rows.append(row)
        for row in rows:
            if row["model"] == name and full_fp32 is not None:
                row["down_vs_fedavg_fp32"] = row["down"]["wire"] / full_fp32["down"]["wire"]
                row["up_vs_fedavg_fp32"] = row["up"]["wire"] / full_fp32["up"]["wire"]
    for name in [m for m in a.models.split(",") if m]:
        _common.table(
            ["W", "wire dtype", "slice params", "analytic MB", "server->client MB", "client->server MB",
             "overhead kB (down/up)", "wire/analytic", "vs FedAvg fp32"],
            [[r["world_size"] if r["world_size"] > 1 else "1 (FedAvg)", r["wire_dtype"], r["slice_params"],
              f"{r['analytic'] / 1e6:,.1f}", f"{r['down']['wire'] / 1e6:,.1f}", f"{r['up']['wire'] / 1e6:,.1f}",
              f"{(r['down']['wire'] - r['analytic']) / 1e3:,.0f} / {(r['up']['wire'] - r['analytic']) / 1e3:,.0f}",
              f"{max(r['down_over_analytic'], r['up_over_analytic']):.6f}",
              f"{r.get('down_vs_fedavg_fp32', float('nan')):.3f}"]
             for r in rows if r["model"] == name],
            title=f"{name}: bytes per client per round (MB = 1e6 B), each direction, serialized by Flower "
                  "(shape-class count, checked above against whole messages)",
        )

    # 3. A third count at 3B scale: every tensor of one slice serialized, one at a time.
    stream = None
    if a.stream and "llama3.2-3b" in a.models.split(","):
        args = _common.model_args("llama3.2-3b")
        t0 = time.perf_counter()
        arrays_only = stream_slice(args, 2, "bfloat16")
        seconds = time.perf_counter() - t0
        by_class = {}
        for name, shape in slice_shapes(args, 2).items():
            by_class = _add(by_class, shape_class_stats(shape, "bfloat16"))
        stream = {"model": "llama3.2-3b", "world_size": 2, "wire_dtype": "bfloat16", "seconds": seconds,
                  "streamed_arrays": arrays_only, "shape_class_arrays": by_class,
                  "equal": arrays_only == by_class}
        print(f"\n3B W=2 bfloat16 slice streamed tensor by tensor through Flower's deflate in {seconds:.0f} s: "
              f"{arrays_only['objects'] + arrays_only['framing']:,} B of arrays (objects + framing); "
              f"shape-class count of the same arrays: {by_class['objects'] + by_class['framing']:,} B "
              f"({'identical' if stream['equal'] else 'DIFFERENT'})")

    # 4. The 3B small-GPU recipes, down + up per client per round, with the codecs.
    recipes, recipe_gb = recipe_rows([2, 4, 8]) if a.recipes else ([], {})
    if recipes:
        _common.table(["W", "variant", "down GB", "up GB", "total GB", "at 100 Mbit/s"],
                      [[r["world_size"], r["variant"] + (" (the recipe)" if r["recipe"] else ""), f"{r['down'] / 1e9:.2f}", f"{r['up'] / 1e9:.2f}",
                        f"{r['total'] / 1e9:.2f}", f"{r['total'] * 8 / 100e6 / 60:.1f} min"] for r in recipes],
                      title="Llama 3.2 3B small-GPU recipes (configs/llama32-3b-small-gpu-w*.toml): bytes per client "
                            "per round, serialized by Flower (shape classes), with each codec option")

    # 5. Every layout x codec for the 3B, 8B and 70B, and federated LoRA r16.
    matrix = matrix_rows([m for m in a.matrix_models.split(",") if m], world_sizes)
    for name in dict.fromkeys(r["model"] for r in matrix):
        _common.table(["W", "layout", "codec", "down GB", "up GB", "total GB", "at 100 Mbit/s"],
                      [[r["world_size"], r["layout"], r["codec"], f"{r['down'] / 1e9:.3f}", f"{r['up'] / 1e9:.3f}",
                        f"{r['total'] / 1e9:.3f}", f"{r['total'] * 8 / 100e6 / 60:.1f} min"]
                       for r in matrix if r["model"] == name],
                      title=f"{name}: bytes per client per round, each direction, serialized by Flower (shape "
                            "classes); codec = the slice down and the update (bf16: the weights) up")

    worst = max([c["wire_over_analytic"] for c in checks] + [max(r["down_over_analytic"], r["up_over_analytic"])
                                                              for r in rows])
    summary = {"max_wire_over_analytic": worst, "aim": "serialized bytes within 1% of the analytic slice size",
               "aim_met": worst <= 1.01,
               "max_abs_shape_class_minus_full": max((abs(c["shape_class_minus_full"]) for c in checks), default=None),
               "seconds": time.perf_counter() - t_start}
    print(f"\nworst wire/analytic ratio: {worst:.6f} (aim <= 1.01: {'met' if summary['aim_met'] else 'MISSED'}); "
          f"shape-class count vs whole messages: max |difference| {summary['max_abs_shape_class_minus_full']} B")
    result = {"method": __doc__.split("\n\n")[1:4], "checks": checks, "rows": rows, "stream": stream,
              "summary": summary, "recipes": recipes, "3b_recipe_round_gb": recipe_gb, "matrix": matrix}
    _common.write_results("communication", result, a.out)
    return result


if __name__ == "__main__":
    main()

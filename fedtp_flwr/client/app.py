"""What a node does with its slice: build the sub-model, train or evaluate it on local data, reply.

Local data comes from the node's own config: `data-path` (deployment: a file or folder on that machine,
never sent anywhere), or `partition-id` / `num-partitions` (simulation: a partition of `train-data`,
the built-in corpus by default). Held-out data for client-side evaluation: `eval-data-path`, or the same
partition of `eval-data`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import signal
import threading
from dataclasses import dataclass
from logging import DEBUG, ERROR, INFO, WARNING
from typing import Any, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore import log

from fedtp_flwr.compat import ErrorCode
from fedtp_flwr.config import RunConfig
from fedtp_flwr.data import (
    ByteTokenizer,
    DataError,
    TokenDataset,
    Tokenizer,
    build_dataset,
    builtin_corpus_path,
    eval_batches,
    iterate_batches,
    load_examples,
    load_tokenizer,
    partition_examples,
)
from fedtp_flwr.model import ModelArgs, Transformer
from fedtp_flwr.model.context import adapter_target, build_context_model, rest_from_arrays
from fedtp_flwr.model.sharding import shard_args, slice_shapes
from fedtp_flwr.training import PARAM_DTYPES, TrainSettings, evaluate, resolve_device, train_local
from fedtp_flwr.wire import (
    DOWNLOAD_CODEC_BITS,
    UPLOAD_CODEC_BITS,
    decode,
    dequantized,
    encode,
    encode_delta,
    record_nbytes,
)


@dataclass(frozen=True)
class SliceJob:
    """The per-message part of a node's work, as the server's ConfigRecord states it."""

    rank: int
    world_size: int
    server_round: int
    args: ModelArgs  # the full model's args
    wire_dtype: str
    proximal_mu: float
    slice_mode: str
    context_bits: int
    context_group_size: int  # 0: one scale per row
    vocab_parallel: bool
    rest_adapter_rank: int  # context mode: rank of the rest adapters (0: none)
    upload_codec: str  # "weights", or the update as "int8-delta" / "int4-delta"
    download_codec: str  # "wire": the slice came in wire_dtype; "int8" / "int4": quantized

    @classmethod
    def from_config(cls, config: ConfigRecord) -> "SliceJob":
        """Every key the server always sends is required (a missing one is a protocol error, not a default);
        proximal-mu only comes from FedProx."""
        try:
            return cls(int(config["rank"]), int(config["world-size"]), int(config["server-round"]),
                       ModelArgs.from_params(json.loads(str(config["model-args"]))), str(config["wire-dtype"]),
                       float(config.get("proximal-mu", 0.0)), str(config["slice-mode"]),
                       int(config["context-bits"]), int(config["context-group-size"]), bool(config["vocab-parallel"]),
                       int(config["rest-adapter-rank"]), str(config["upload-codec"]), str(config["download-codec"]))
        except KeyError as e:
            raise ValueError(f"the server's message lacks config key {e}") from None

    def __post_init__(self):
        for key, codec, known in (("upload-codec", self.upload_codec, UPLOAD_CODEC_BITS),
                                  ("download-codec", self.download_codec, DOWNLOAD_CODEC_BITS)):
            if codec not in known:
                raise ValueError(f"the server asks for {key} {codec!r}, which this client does not know "
                                 f"(it knows {list(known)}): the server runs another version of the app")


def build_slice_model(job: SliceJob, content: RecordDict, device: torch.device,
                      dtype: torch.dtype = torch.float32, seed: int = 0) -> Transformer:
    """Independent mode: the rank's sub-model (the same Transformer class, 1/W of the heads and FFN units).
    Context mode: the full-width model, its slice and replicated parameters trainable (in `dtype`), the rest
    of the split layers frozen in low-bit form, plus rest adapters (initialised from `seed`) when the server
    asks for them. Either way state_dict() is exactly what the reply carries: the slice (and the adapters)."""
    slice_state = received_slice(job, content["arrays"], dtype)
    if job.slice_mode == "context":
        if "context" not in content:
            raise ValueError("context mode, but the server's message has no 'context' record")
        arrays = {k: torch.from_numpy(a.numpy()) for k, a in content["context"].items()}
        rest = rest_from_arrays(arrays, job.args, job.world_size, job.context_bits, job.context_group_size or None,
                                job.vocab_parallel)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the adapters' init: reproducible, different per node and round
            return build_context_model(job.args, job.rank, job.world_size, slice_state, rest, device=device,
                                       dtype=dtype, vocab_parallel=job.vocab_parallel,
                                       rest_adapter_rank=job.rest_adapter_rank)
    with torch.device("meta"):  # no memory until the received tensors are assigned
        model = Transformer(shard_args(job.args, job.world_size))
    model.load_state_dict({k: v.to(device) for k, v in slice_state.items()}, strict=True, assign=True)
    return model


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str, checkpoint_dir: str = "") -> Tokenizer | ByteTokenizer:
    """tokenizer-path; empty: the checkpoint-dir folder's own tokenizer (a path on this node), else Llama 3's."""
    return load_tokenizer(path or None, checkpoint_dir or None)


@functools.lru_cache(maxsize=8)
def _dataset(path: str, partition: tuple[int, int] | None, scheme: str, seed: int, tokenizer: tuple[str, str],
             max_seq_len: int, pack: bool, data_format: str) -> TokenDataset:
    examples = load_examples(path, data_format)
    if partition is not None:
        examples = partition_examples(examples, partition[0], partition[1], seed=seed, scheme=scheme)
    return build_dataset(examples, _tokenizer(*tokenizer), max_seq_len, pack=pack)


def local_dataset(cfg: RunConfig, node_config: Mapping[str, Any], split: str = "train",
                  vocab_size: int | None = None) -> TokenDataset:
    """This node's training (or held-out) data; see the module docstring. With `vocab_size` (the model's),
    a tokenizer with more ids is refused: this node's tokenizer file is not the run's."""
    path_key = "data-path" if split == "train" else "eval-data-path"
    tokenizer = (cfg.tokenizer_path, cfg.checkpoint_dir)
    if vocab_size is not None and (n_words := _tokenizer(*tokenizer).n_words) > vocab_size:
        raise DataError(f"this node's tokenizer {_tokenizer(*tokenizer)!r} has {n_words} ids, more than the model's "
                        f"vocab_size {vocab_size}: config keys 'tokenizer-path' / 'checkpoint-dir' name a path that "
                        f"each node reads on its own disk, and here it holds another tokenizer")
    if path_key in node_config:
        return _dataset(str(node_config[path_key]), None, cfg.partitioning, cfg.seed, tokenizer,
                        cfg.max_seq_len, cfg.packing, cfg.data_format)
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise DataError(f"node config has neither {path_key!r} nor partition-id/num-partitions: "
                        f"give this SuperNode --node-config '{path_key}=\"/path/to/data.jsonl\"'")
    source = (cfg.train_data if split == "train" else cfg.eval_data) or str(builtin_corpus_path(split))
    partition = (int(node_config["partition-id"]), int(node_config["num-partitions"]))
    data_format = cfg.data_format if (cfg.train_data if split == "train" else cfg.eval_data) else "text"
    return _dataset(source, partition, cfg.partitioning, cfg.seed, tokenizer, cfg.max_seq_len, cfg.packing,
                    data_format)


def local_step_count(cfg: RunConfig, n_rows: int) -> int:
    """local-steps, or with local-epochs > 0 the optimizer steps that cover that many passes over the data."""
    if cfg.local_epochs <= 0:
        return cfg.local_steps
    return max(1, math.ceil(cfg.local_epochs * n_rows / (cfg.batch_size * cfg.grad_accum_steps)))


def train_settings(cfg: RunConfig, job: SliceJob, seed: int, n_rows: int) -> TrainSettings:
    return cfg.train_settings(local_steps=local_step_count(cfg, n_rows), seed=seed, proximal_mu=job.proximal_mu,
                              progress=None)


def param_dtype(cfg: RunConfig) -> torch.dtype:
    return PARAM_DTYPES[cfg.client_param_dtype]


def node_seed(cfg: RunConfig, node_config: Mapping[str, Any], server_round: int) -> int:
    """A different, reproducible data order for every node and round."""
    pid = int(node_config.get("partition-id", 0))
    return (cfg.seed * 1_000_003 + pid * 7919 + server_round) % (2**31)


def train_slice(content: RecordDict, cfg: RunConfig, node_config: Mapping[str, Any]) -> dict:
    job = SliceJob.from_config(content["config"])
    device = resolve_device(cfg.device)
    data = local_dataset(cfg, node_config, "train", job.args.vocab_size)
    seed = node_seed(cfg, node_config, job.server_round)
    model = build_slice_model(job, content, device, param_dtype(cfg), seed)
    received = content["arrays"]  # what this node was sent: its slice (it has just loaded into the sub-model)
    shapes = slice_shapes(job.args, job.world_size, job.vocab_parallel)
    n_received = sum(math.prod(s) for s in shapes.values())
    log(INFO, "round %d: received the rank %d/%d slice: %d parameters in %d arrays (%.1f MB %s); training on %s, "
        "%d local examples", job.server_round, job.rank, job.world_size, n_received, len(shapes),
        record_nbytes(received) / 1e6, job.wire_dtype if job.download_codec == "wire" else job.download_codec, device,
        data.n_examples)
    if data.n_truncated:
        log(WARNING, "%d of %d local examples are longer than max-seq-len=%d tokens and were cut to it",
            data.n_truncated, data.n_examples, cfg.max_seq_len)
    batches = iterate_batches(data, cfg.batch_size, seed)
    m = train_local(model, batches, train_settings(cfg, job, seed, len(data)))
    metrics = MetricRecord({
        "num-examples": data.n_examples,  # FedAvg's n_k: the size of this node's local dataset
        "train-loss": m["train_loss"], "train-perplexity": m["train_perplexity"],
        "num-tokens": m["num_tokens"], "tokens-per-second": m["tokens_per_second"],
        "slice-parameters": sum(t.numel() for t in model.state_dict().values()),  # the slice, never the model
    })
    return {**upload(model.state_dict(), content["arrays"], job, seed), "metrics": metrics}


def received_slice(job: SliceJob, arrays: ArrayRecord, dtype: torch.dtype | None = torch.float32,
                   names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The slice the server sent (all of it, or `names`): in wire-dtype, or dequantized (download-codec)."""
    if names is not None:
        arrays = ArrayRecord({k: a for k, a in arrays.items() if k.rpartition(":")[0] in names or k in names})
    bits = DOWNLOAD_CODEC_BITS[job.download_codec]
    if bits is None:
        return decode(arrays, job.wire_dtype, dtype=dtype, copy=dtype is not None)
    shapes = slice_shapes(job.args, job.world_size, job.vocab_parallel)
    return dequantized(arrays, {k: shapes[k] for k in (names or shapes)}, bits, dtype or torch.float32)


def upload(state: dict[str, torch.Tensor], received: ArrayRecord, job: SliceJob, seed: int) -> dict[str, ArrayRecord]:
    """What the reply carries of the trained model: {"arrays": the slice in the wire dtype} (upload-codec
    "weights"), or {"arrays": the rest adapters' factors (if any), "delta": the slice's update, low-bit}."""
    bits = UPLOAD_CODEC_BITS[job.upload_codec]
    if bits is None:
        return {"arrays": encode(state, job.wire_dtype)}
    adapters = {k: state.pop(k) for k in list(state) if adapter_target(k) is not None}  # deltas already
    generator = torch.Generator().manual_seed(seed)  # the stochastic rounding: reproducible per node and round
    def start(name):  # what this tensor was at the start: one tensor read from the received record at a time
        return received_slice(job, received, None, [name])[name]

    return {"arrays": encode(adapters, job.wire_dtype), "delta": encode_delta(state, start, bits, generator)}


def evaluate_slice(content: RecordDict, cfg: RunConfig, node_config: Mapping[str, Any]) -> MetricRecord:
    """Slice metrics: this node's model as it trains (sub-model, or slice in its frozen context) on its
    held-out data; not the merged model's quality."""
    job = SliceJob.from_config(content["config"])
    model = build_slice_model(job, content, resolve_device(cfg.device))
    data = local_dataset(cfg, node_config, "eval", job.args.vocab_size)
    res = evaluate(model, eval_batches(data, cfg.max_batch_size, cfg.eval_batches or None), precision=cfg.precision)
    return MetricRecord({"num-tokens": res["num_tokens"], "slice-loss": res["loss"],
                         "slice-perplexity": res["perplexity"]})


class ClientAppStopped(RuntimeError):
    """SIGTERM reached the ClientApp while it worked on a message."""


@contextlib.contextmanager
def stop_on_sigterm():
    """While a message is handled, SIGTERM raises ClientAppStopped, which Flower turns into an error reply.

    Why: a SuperNode (flwr 1.42) pulls its next message only once the current one has a reply, and Flower's own
    SIGTERM handler in flwr-clientapp ends the process without one, so a ClientApp stopped that way wedges its
    SuperNode for every later run. An exception (not SystemExit) becomes the reply instead, and the node is free
    at once. Only in the main thread (the flwr-clientapp process; a simulation's workers run elsewhere); the
    previous handler is back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise ClientAppStopped("the ClientApp was stopped (SIGTERM) while it worked on this message; it answers "
                               "with this error so that its SuperNode can take the next message")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def error_line(e: BaseException, limit: int = 2000) -> str:
    """An exception as one line, its type and message ("DataError: /data/a.jsonl:3: invalid JSON: ..."): what an
    error reply carries, so that the server logs the same line in simulation and in deployment."""
    text = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    line = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return line if len(line) <= limit else line[:limit] + "..."


# Errors whose message is the whole story (bad data, a bad setting, a refused shape, no memory): one line on the
# node, the traceback at DEBUG (FLWR_LOG_LEVEL=DEBUG). Any other exception is a bug: its traceback at ERROR.
USER_ERRORS = (ValueError, MemoryError, torch.OutOfMemoryError)


def error_reply(msg: Message, e: Exception, work: str) -> Message:
    """Flower's error reply (code 2, as for an exception Flower catches) whose reason is `error_line(e)`.

    Why not let Flower catch it: in simulation its reason is Ray's whole remote traceback (thousands of
    characters, cut in the server's log) and Flower logs that traceback twice more; replying here makes the reason
    the one line in both runtimes. The node logs the line (and the traceback, see USER_ERRORS)."""
    line = error_line(e)
    config = msg.content.config_records.get("config")
    where = f"round {config['server-round']}: " if config is not None and "server-round" in config else ""
    if isinstance(e, USER_ERRORS):
        log(ERROR, "%sthis node could not %s: %s", where, work, line)
        log(DEBUG, "the traceback of that error:", exc_info=e)
    else:
        log(ERROR, "%sthis node could not %s: %s", where, work, line, exc_info=e)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=line), reply_to=msg)


def train_reply(msg: Message, cfg: RunConfig, node_config: Mapping[str, Any]) -> Message:
    """The ClientApp's train handler: the server's message in, the reply with the trained slice out (or an
    error reply naming what went wrong)."""
    try:
        with stop_on_sigterm():
            records = train_slice(msg.content, cfg, node_config)
    except ClientAppStopped:
        raise  # Flower's own error reply, and the ClientApp process ends as failed
    except Exception as e:  # noqa: BLE001 - any failure of the node's work becomes the reply
        return error_reply(msg, e, "train its slice")
    return Message(RecordDict(records), reply_to=msg)


def evaluate_reply(msg: Message, cfg: RunConfig, node_config: Mapping[str, Any]) -> Message:
    """The ClientApp's evaluate handler (client-eval): slice metrics on local held-out data (or an error reply)."""
    try:
        with stop_on_sigterm():
            metrics = evaluate_slice(msg.content, cfg, node_config)
    except ClientAppStopped:
        raise
    except Exception as e:  # noqa: BLE001
        return error_reply(msg, e, "evaluate its slice")
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)

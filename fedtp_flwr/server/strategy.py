"""The federated tensor-parallel Strategy: each node gets only its slice; slices are merged back.

It wraps one of Flower's own strategies (`inner`), which keeps doing what it is good at: sampling nodes,
adding its settings to the config (FedProx's proximal-mu) and the server-side update rule (FedAvgM's
momentum, FedAdam/FedYogi/FedAdagrad's adaptive step). This class replaces only what tensor parallelism
changes: what each node is sent (its slice), how replies are checked, and how slices become one model.
The inner strategy then sees a single reply holding the merged model, so its update rule applies to it
exactly as it would to a plain FedAvg average.

Replies stream: `start` pulls them one at a time (streaming.receive) and each is checked, folded into running
sums (aggregation.WeightedFold) and released before the next, so the server's memory does not grow with the
number of clients (docs/server-memory.md). `aggregate_train` does the same over a list.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.app.constants import DEFAULT_TTL
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Result, Strategy
from flwr.supercore import log

from fedtp_flwr.compat import (
    load_strategy_state,
    restore_strategy_state,
    snapshot_strategy_state,
    strategy_baseline,
    strategy_state,
)
from fedtp_flwr.config import AUTO, ETA_PER_LR, RunConfig
from fedtp_flwr.model import ModelArgs
from fedtp_flwr.model.context import adapter_shapes, context_rest, quantize_rest, rest_to_arrays
from fedtp_flwr.model.sharding import shard, slice_shapes
from fedtp_flwr.wire import decode, encode, encode_quantized, record_nbytes

from .identity import NodeOrder, OrderedGrid
from .memory import PhasePeaks
from .outer import DiLoCo
from .pull import discard_replies
from .replies import ReplyError, check_eval_reply, reduce_metrics, safe_text
from .round import TrainRound, repeated, why_dropped
from .streaming import receive


class RunFailed(RuntimeError):
    """The run cannot be called a success: a round had fewer valid replies than min-train-nodes (and
    allow-failed-rounds is off). Raised out of the ServerApp, so Flower records the run as failed."""


# FedAdam's and FedYogi's moment decays (Flower's defaults, and Reddi et al.'s); tau is Flower's 1e-3.
FEDOPT_BETAS = (0.9, 0.99)


def make_inner_strategy(cfg: RunConfig) -> FedAvg:
    """Flower's strategy named by `strategy`, with the run's sampling settings and its server-side settings (auto
    ones resolved to the strategy's measured defaults, config.SERVER_LR / ETA_PER_LR / SERVER_MOMENTUM)."""
    common = dict(fraction_train=cfg.fraction_train, fraction_evaluate=1.0, min_train_nodes=1,
                  min_evaluate_nodes=1, min_available_nodes=cfg.min_available_nodes)
    lr, mu = cfg.effective_server_learning_rate, cfg.effective_server_momentum
    beta_1, beta_2 = FEDOPT_BETAS
    factories = {
        "fedavg": lambda: FedAvg(**common),
        "fedprox": lambda: FedProx(**common, proximal_mu=cfg.proximal_mu),
        "fedavgm": lambda: FedAvgM(**common, server_learning_rate=lr, server_momentum=mu),
        "fedadam": lambda: FedAdam(**common, eta=lr, beta_1=beta_1, beta_2=beta_2),
        "fedyogi": lambda: FedYogi(**common, eta=lr, beta_1=beta_1, beta_2=beta_2),
        "fedadagrad": lambda: FedAdagrad(**common, eta=lr),
        "diloco": lambda: DiLoCo(**common, server_learning_rate=lr, server_momentum=mu),
    }
    return factories[cfg.strategy]()  # config.STRATEGIES names exactly these (tests/test_config.py)


def rule_line(inner: FedAvg) -> str:
    """What the server does with each round's merged model, read from the rule that runs (not from the config)."""
    kind = type(inner)
    if kind is FedAvg:
        return "FedAvg (the merged model as it is: a weighted mean of the replies)"
    if kind is FedProx:
        return f"FedProx (the merged model as it is; the clients add a proximal term, mu {inner.proximal_mu:g})"
    if kind in (FedAvgM, DiLoCo):
        lr, mu = inner.server_learning_rate, inner.server_momentum
        same = "; at lr 1 and momentum 0 this is FedAvg" if lr == 1 and mu == 0 else ""
        if kind is DiLoCo:
            return f"DiLoCo outer step (SGD with Nesterov momentum {mu:g}, lr {lr:g}, on the merged update{same})"
        return f"FedAvgM (SGD with momentum {mu:g}, lr {lr:g}, on the merged update{same})"
    if kind in (FedAdam, FedYogi):
        return (f"{kind.__name__} (eta {inner.eta:g}, beta1 {inner.beta_1:g}, beta2 {inner.beta_2:g}, tau "
                f"{inner.tau:g}, on the merged update)")
    if kind is FedAdagrad:
        return f"FedAdagrad (eta {inner.eta:g}, tau {inner.tau:g}, on the merged update)"
    return kind.__name__


def _as_float32(record: ArrayRecord) -> ArrayRecord:
    """Flower's adaptive rules compute in float64 (numpy scalars); the global model stays float32."""
    return ArrayRecord({k: a if a.dtype == "float32" else Array(a.numpy().astype(np.float32)) for k, a in record.items()})


def _to_checkpoint(value, name: str):
    """A rule's state value as torch.load(weights_only=True) reads it back: numpy arrays as tensors, containers and
    plain values as they are."""
    if isinstance(value, np.ndarray):
        a = np.ascontiguousarray(value)
        return torch.from_numpy(a if a.flags.writeable else a.copy())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _to_checkpoint(v, f"{name}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_checkpoint(v, f"{name}[{i}]") for i, v in enumerate(value))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"the server rule's state {name!r} holds a {type(value).__name__} value, which a checkpoint cannot "
                    "hold (it holds numpy arrays, dicts, lists, tuples, numbers and strings)")


def _from_checkpoint(value):
    """The inverse of _to_checkpoint: tensors become numpy arrays again (copies: a checkpoint may be memory-mapped)."""
    if isinstance(value, torch.Tensor):
        return value.clone().numpy()
    if isinstance(value, dict):
        return {k: _from_checkpoint(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_from_checkpoint(v) for v in value)
    return value


def message_ttl(round_timeout: float) -> float:
    """A message must outlive the wait for its reply: at least round-timeout, plus a margin for sending the
    round's messages before the wait starts; never less than Flower's default (12 hours)."""
    return max(float(DEFAULT_TTL), round_timeout + 600.0)


def assign_ranks(node_ids: Iterable[int], server_round: int, world_size: int,
                 enable_swapping: bool = False, swap_period: int = 2,
                 order: Callable[[int], Any] | None = None) -> dict[int, int]:
    """Node -> rank. Nodes in `order` (a sort key; the server's is the identity each node states, the same in
    every run; default: Flower's id) take ranks 0, 1, ..., W-1, 0, 1, ... (more nodes than W: nodes that share a
    rank are averaged). With swapping, every rank moves by +1 every `swap_period` rounds."""
    shift = (server_round - 1) // swap_period if enable_swapping else 0
    return {node: (i + shift) % world_size for i, node in enumerate(sorted(node_ids, key=order))}


class FederatedTensorParallel(Strategy):
    def __init__(self, args: ModelArgs, cfg: RunConfig, inner: FedAvg | None = None, output_dir: Path | None = None,
                 identify_nodes: bool = False):
        """identify_nodes: ask each node for its identity (a query message; the ServerApp does) and order nodes by
        it, the same in every run; off, nodes are ordered by Flower's ids (a grid that only trains, in tests)."""
        self.args, self.cfg = args, cfg
        self.world_size = cfg.world_size
        self.inner = inner if inner is not None else make_inner_strategy(cfg)
        self._inner_built = strategy_baseline(self.inner)  # what inner_state compares against
        sliced = slice_shapes(args, self.world_size, cfg.vocab_parallel)
        adapters = (adapter_shapes(args, self.world_size, cfg.effective_rest_adapter_rank, cfg.vocab_parallel)
                    if cfg.effective_rest_adapter_rank else {})
        # What a reply's "arrays" record holds (in the wire dtype), and what comes as a low-bit update instead
        # (upload-codec): (shapes, bits), or None when the slice travels as weights.
        self.delta = (sliced, cfg.delta_bits) if cfg.delta_bits else None
        self.expected_shapes = {**adapters} if self.delta else {**sliced, **adapters}
        self.ranks: dict[int, dict[int, int]] = {}  # server round -> node -> rank
        self.current: ArrayRecord | None = None  # the global model sent out this round
        # The metadata of the last round's training messages (the grid fills in their ids when it sends them):
        # only what is needed to tell which node a reply the SuperLink wrote for it stands for.
        self._sent: dict[int, list] = {}
        self._inner_before: dict | None = None  # the inner rule's state before the last aggregate_train
        # Message ids whose replies came too late for their round: removed from the SuperLink unread when they
        # arrive (pull.discard_replies), instead of staying there until the run ends.
        self._late: dict[str, None] = {}
        self.spill_parent = Path(cfg.spill_dir or Path(output_dir or cfg.output_dir or "outputs") / "spill").expanduser()
        self.memory = PhasePeaks()
        # The nodes in an order that is the same in every run (ranks, sampling): by the identity each states.
        self.order = NodeOrder(cfg.round_timeout, message_ttl(cfg.round_timeout), ask=identify_nodes)
        self.failure: str | None = None  # why the last round closed without a merged model (too few replies)
        # server round -> (valid replies merged, "trained" | "skipped" | "refused"): what each round of start() did
        self.rounds_done: dict[int, tuple[int, str]] = {}

    # ----------------------------------------------------------------------------------- messages

    def _rank_records(self, arrays: ArrayRecord, rank: int) -> dict[str, ArrayRecord]:
        """A rank's slice ("arrays", trainable) and, in context mode, the frozen rest of the split layers in
        low-bit form ("context"). Nodes sharing a rank share the records (Flower sends each node a copy)."""
        state = decode(arrays, "float32", dtype=None, copy=False)  # read-only views, no copy of the model
        vocab = self.cfg.vocab_parallel
        sliced = shard(state, self.args, rank, self.world_size, vocab)
        bits = self.cfg.download_bits
        records = {"arrays": encode(sliced, self.cfg.wire_dtype) if bits is None else encode_quantized(sliced, bits)}
        if self.cfg.slice_mode == "context":
            rest = quantize_rest(context_rest(state, self.args, rank, self.world_size, vocab), self.cfg.context_bits,
                                 self.cfg.context_group_size or None)
            records["context"] = ArrayRecord({k: Array(t.numpy()) for k, t in rest_to_arrays(rest).items()})
        return records

    def _message_batches(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, node_ids: list[int],
                         message_type: str) -> Iterator[list[Message]]:
        """The round's messages, one list per rank (its nodes, in id order). Ranks are assigned now; a rank's
        records are built when its list is asked for and dropped when the next one is, so a caller that sends
        each list before asking for the next holds one rank's encoded slice at a time, not W of them."""
        ranks = assign_ranks(node_ids, server_round, self.world_size, self.cfg.enable_swapping, self.cfg.swap_period,
                             order=self.order.key)
        self.ranks[server_round] = ranks
        model_args = json.dumps(self.args.to_params())
        if message_type == MessageType.TRAIN:
            self._sent = {server_round: []}
        missing = sorted(set(range(self.world_size)) - set(ranks.values()))
        if missing:
            log(WARNING, "round %d: %d node(s) for world size %d; rank(s) %s get no node and keep their values",
                server_round, len(node_ids), self.world_size, missing)
        return self._rank_batches(server_round, arrays, config, ranks, message_type, model_args)

    def _rank_batches(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, ranks: dict[int, int],
                      message_type: str, model_args: str) -> Iterator[list[Message]]:
        sent = 0
        node_ids = self.order.sorted(ranks)
        for rank in sorted(set(ranks.values())):
            records = self._rank_records(arrays, rank)
            nodes = [n for n in node_ids if ranks[n] == rank]
            sent += len(nodes) * sum(record_nbytes(rec) for rec in records.values())
            batch = []
            for node in nodes:
                cfg = ConfigRecord(dict(config))
                cfg.update({"rank": rank, "world-size": self.world_size, "server-round": server_round,
                            "model-args": model_args, "wire-dtype": self.cfg.wire_dtype,
                            "slice-mode": self.cfg.slice_mode, "context-bits": self.cfg.context_bits,
                            "context-group-size": self.cfg.context_group_size, "vocab-parallel": self.cfg.vocab_parallel,
                            "rest-adapter-rank": self.cfg.effective_rest_adapter_rank,
                            "upload-codec": self.cfg.upload_codec, "download-codec": self.cfg.download_codec})
                batch.append(Message(content=RecordDict({**records, "config": cfg}), dst_node_id=node,
                                     message_type=message_type, ttl=message_ttl(self.cfg.round_timeout)))
            if message_type == MessageType.TRAIN:
                self._sent[server_round] += [m.metadata for m in batch]  # ids are filled in when sent
            del records
            yield batch
            del batch
        # Logged once every rank's messages are built (the last is being sent): the MB are those of the records.
        log(INFO, "round %d: node -> rank %s; sending %.1f MB (%s slices%s)", server_round,
            {n: ranks[n] for n in node_ids}, sent / 1e6,
            self.cfg.wire_dtype if self.cfg.download_codec == "wire" else self.cfg.download_codec,
            (f" + {self.cfg.context_bits}-bit context" if self.cfg.slice_mode == "context" else "")
            + (f", rank-{self.cfg.effective_rest_adapter_rank} rest adapters" if self.cfg.effective_rest_adapter_rank
               else ""))

    def _messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, node_ids: list[int],
                  message_type: str) -> list[Message]:
        return [m for batch in self._message_batches(server_round, arrays, config, node_ids, message_type)
                for m in batch]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return [m for batch in self._train_batches(server_round, arrays, config, grid) for m in batch]

    def _train_batches(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                       grid: Grid) -> Iterator[list[Message]]:
        # The inner strategy samples the nodes and adds its own settings to the config.
        self.current = arrays
        sampled = list(self.inner.configure_train(server_round, arrays, config, OrderedGrid(grid, self.order)))
        if not sampled:
            return iter(())
        inner_config = sampled[0].content["config"]
        nodes = [m.metadata.dst_node_id for m in sampled]
        del sampled
        return self._message_batches(server_round, arrays, inner_config, nodes, MessageType.TRAIN)

    # -------------------------------------------------------------------------------- aggregation

    def _reply_node(self, server_round: int, msg: Message) -> int:
        """The node a reply stands for. A node the SuperLink lost (no heartbeat) is answered for by the
        SuperLink itself: an error reply with the SuperLink's node id; name the node it was meant for, from
        the message it replies to."""
        node = msg.metadata.src_node_id
        if node not in self.ranks.get(server_round, {}) and msg.has_error():
            sent_to = {md.message_id: md.dst_node_id for md in self._sent.get(server_round, []) if md.message_id}
            node = sent_to.get(msg.metadata.reply_to_message_id, node)
        return node

    def _first_replies(self, server_round: int, replies: Iterable[Message], kind: str) -> list[tuple[int, Message]]:
        """(node, reply) for the first reply of each node; later ones are dropped and named."""
        out, seen = [], set()
        for msg in replies:
            node = self._reply_node(server_round, msg)
            if not repeated(server_round, node, seen, kind):
                out.append((node, msg))
        return out

    def _open_round(self, server_round: int) -> TrainRound:
        global_state = decode(self.current, "float32", dtype=None, copy=False) if self.current is not None else {}
        sent = self._sent.get(server_round, [])
        return TrainRound(server_round, self.ranks.get(server_round, {}), global_state, self.args, self.cfg,
                          self.expected_shapes, self.delta, self.spill_parent,
                          reply_node=lambda msg: self._reply_node(server_round, msg),
                          sent_ids=lambda: {md.message_id for md in sent if md.message_id})

    def _close_round(self, rnd: TrainRound, quorum_ended: bool = False) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The round's merge, through the inner rule: (new global model, the clients' metrics), or (None, None)
        when the round has too few valid replies (self.failure says why)."""
        merged, metrics = rnd.close(quorum_ended)
        self.failure = rnd.failure
        if merged is None:
            return None, None
        merged_record = encode(merged, "float32", release=True)  # never beside its encoded form
        # The inner rule's state (FedAvgM momentum, FedOpt moments) as it was before this round: Flower's rules
        # rebind those attributes to new objects rather than change them in place, so a shallow copy keeps them.
        self._inner_before = snapshot_strategy_state(self.inner)
        if type(self.inner) in (FedAvg, FedProx):
            return merged_record, metrics  # their rule on one reply is the identity
        one_reply = Message(RecordDict({"arrays": merged_record,
                                        "metrics": MetricRecord({"num-examples": rnd.total_weight})}),
                            dst_node_id=0, message_type=MessageType.TRAIN)
        arrays, _ = self.inner.aggregate_train(rnd.number, [one_reply])
        return _as_float32(arrays), metrics

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's Strategy call with a round's replies: each is checked and folded in as it comes out of
        `replies` (start() feeds them straight from the grid instead, one at a time)."""
        rnd = self._open_round(server_round)
        for msg in replies:
            rnd.take(msg)
        return self._close_round(rnd)

    def inner_state(self) -> dict:
        """The inner rule's state between rounds (FedOpt's moments, FedAvgM's momentum, whatever a rule has set or
        changed on itself since it was built; compat.strategy_state) in the plain form a checkpoint holds: tensors
        (sharing memory with the rule's arrays where they can), dicts, lists, numbers. What a checkpoint must hold for
        a resumed run to equal an uninterrupted one."""
        state = strategy_state(self.inner, self._inner_built)
        return {name: _to_checkpoint(value, name) for name, value in state.items()}

    def load_inner_state(self, state: dict) -> None:
        load_strategy_state(self.inner, {name: _from_checkpoint(value) for name, value in state.items()})

    def discard_round(self) -> None:
        """Forget the last aggregate_train: the inner rule's state goes back to what it was before it."""
        before = getattr(self, "_inner_before", None)
        if before is not None:
            restore_strategy_state(self.inner, before)

    # ------------------------------------------------------------------- client-side evaluation

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Off unless client-eval: then each node evaluates its own slice sub-model on its held-out data."""
        if not self.cfg.client_eval:
            return []
        sampled = list(self.inner.configure_evaluate(server_round, arrays, config, OrderedGrid(grid, self.order)))
        nodes = [m.metadata.dst_node_id for m in sampled]
        return self._messages(server_round, arrays, config, nodes, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        ranks = self.ranks.get(server_round, {})
        good = []
        for node, msg in self._first_replies(server_round, replies, "evaluation"):
            try:
                if node not in ranks:
                    raise ReplyError("this node was not sent a slice in this round")
                good.append(check_eval_reply(msg, self.cfg.max_num_examples))
            except Exception as e:  # noqa: BLE001 - ReplyError, or a check we did not foresee
                log(WARNING, "round %d: dropping evaluation reply from node %d: %s", server_round, node, why_dropped(e))
        if not good:
            return None
        return reduce_metrics(good)

    def summary(self) -> None:
        log(INFO, "\t├──> Federated tensor parallel: world size %d, %s slices, %s merge, wire %s, swapping %s",
            self.world_size, self.cfg.slice_mode, self.cfg.effective_merge_weighting, self.cfg.wire_dtype,
            f"every {self.cfg.swap_period} rounds" if self.cfg.enable_swapping else "off")
        if self.cfg.slice_mode == "context" and self.cfg.effective_merge_weighting == "per-rank":
            log(WARNING, "context slices with per-rank merging learn far worse than with all-clients merging in our "
                "benchmark (bench/results/learning_quality.md)")
        if self.cfg.min_available_nodes < self.world_size:
            log(WARNING, "min-available-nodes=%d is less than world-size=%d: a round may start with fewer nodes "
                "than ranks, and the ranks without a node go untrained that round", self.cfg.min_available_nodes,
                self.world_size)
        log(INFO, "\t├──> Untrusted replies: max-num-examples %d, outlier-norm-factor %g, rank-merge %s%s, "
            "max-loss-increase %g", self.cfg.max_num_examples, self.cfg.outlier_norm_factor, self.cfg.rank_merge,
            f" (beta {self.cfg.trimmed_mean_beta:g})" if self.cfg.rank_merge == "trimmed-mean" else "",
            self.cfg.max_loss_increase)
        # Flower's own inner.summary() is not printed: its lines describe what this class replaces (minimum train
        # nodes, record keys) or does not use (FedOpt's eta_l), and FedAvgM's would speak for DiLoCo.
        c = self.cfg
        keys = [("server-learning-rate", c.server_learning_rate, c.effective_server_learning_rate),
                ("server-momentum", c.server_momentum, c.effective_server_momentum)]  # (key, set, used)
        auto = [k for k, value, used in keys if value == AUTO and used is not None]
        per_lr = f", {ETA_PER_LR[c.strategy]:g} x learning-rate" if c.strategy in ETA_PER_LR else ""
        source = f"; {' and '.join(auto)}: the strategy's measured default{per_lr} (bench/results/strategy_defaults.md)"
        log(INFO, "\t├──> Server rule: %s%s", rule_line(self.inner), source if auto else "")
        for key, value, used in keys:
            if value != AUTO and used is None:
                log(WARNING, "%s = %g is not used: strategy %s has no such setting", key, value, c.strategy)
        log(INFO, "\t└──> Sampling: fraction-train %g of the connected nodes each round, starting once %d nodes "
            "are connected", self.cfg.fraction_train, self.cfg.min_available_nodes)

    # ------------------------------------------------------------------------------------ rounds

    def _refuse(self, server_round: int, new: MetricRecord | None, kept: MetricRecord | None) -> str | None:
        """Why the merged model must not become the global model, or None: its held-out loss is not finite,
        or above max-loss-increase x the kept model's."""
        if new is None:
            return None
        loss = float(new["loss"])
        if not math.isfinite(loss):
            return f"its held-out loss is {loss}"
        factor = self.cfg.max_loss_increase
        if factor > 0 and kept is not None and math.isfinite(old := float(kept["loss"])) and loss > factor * old:
            return f"its held-out loss {loss:.4f} is more than {factor:g} x the previous round's {old:.4f} (max-loss-increase)"
        return None

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              first_round: int = 1,
              record_fn: Callable[[int, ArrayRecord, MetricRecord | None, bool], None] | None = None) -> Result:
        """Flower's round loop, able to begin at `first_round` (resume). Round first_round-1 is evaluated
        first (round 0 = the initial model).

        evaluate_fn(round, arrays) evaluates a model on the server's held-out data (a MetricRecord with "loss");
        a merged model it finds non-finite or too much worse than the previous one is refused (the global
        model stays, the inner rule's state too) and the round goes on. record_fn(round, arrays, metrics, trained) is
        called once per round with the global model the round ends with (trained: false when the round was skipped or
        its merge refused: the model is an earlier round's, nothing to checkpoint).

        A round with fewer than min-train-nodes valid replies raises RunFailed (before it records anything), unless
        allow-failed-rounds (then it records no checkpoint). A refused merge (max-loss-increase) is a defence, not a
        failure: the round records the loss of the model it kept. A run in which no round trained raises RunFailed at
        its end. The caller logs rounds_line() last, whatever happened."""
        log(INFO, "Starting %s, rounds %d..%d", type(self).__name__, first_round, num_rounds)
        self.summary()
        result, arrays = Result(), initial_arrays
        del initial_arrays  # a record replaced by a merged one is freed (the caller keeps no reference either)
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        kept = None  # the global model's server-side metrics
        if evaluate_fn:
            kept = evaluate_fn(first_round - 1, arrays)
            if kept is not None:
                result.evaluate_metrics_serverapp[first_round - 1] = kept
        if record_fn:
            record_fn(first_round - 1, arrays, kept, False)
        for rnd in range(first_round, num_rounds + 1):
            t0 = time.time()
            log(INFO, "")
            log(INFO, "[ROUND %d/%d]", rnd, num_rounds)
            self._discard_late(grid)
            self.memory.mark("between rounds")
            new_arrays, train_metrics, merged = self._train_round(rnd, arrays, train_config, grid, timeout)
            outcome = "skipped"
            if new_arrays is not None:
                new_metrics = evaluate_fn(rnd, new_arrays) if evaluate_fn else None
                if (why := self._refuse(rnd, new_metrics, kept)) is not None:
                    log(WARNING, "round %d: refusing the merged model: %s; keeping the previous global model",
                        rnd, why)
                    self.discard_round()
                    outcome = "refused"
                else:
                    arrays = result.arrays = new_arrays
                    kept = new_metrics
                    outcome = "trained"
            self.rounds_done[rnd] = (merged, outcome)
            if outcome == "skipped" and not self.cfg.allow_failed_rounds:
                raise RunFailed(f"{self.failure}: the run stops as failed, and this round writes no checkpoint "
                                "(see the clients' errors above; allow-failed-rounds = true skips such a round and "
                                "goes on)")
            if kept is not None:
                result.evaluate_metrics_serverapp[rnd] = kept
            if train_metrics is not None:
                log(INFO, "\t└──> train metrics: %s", train_metrics)
                result.train_metrics_clientapp[rnd] = train_metrics
            self._evaluate_on_clients(rnd, arrays, evaluate_config, grid, timeout, result)
            self.memory.mark("evaluating")
            if record_fn:  # a refused or skipped round's model is the one an earlier round trained: no checkpoint
                record_fn(rnd, arrays, kept, outcome == "trained")
            self.memory.mark("recording")
            log(INFO, "round %d: ServerApp peak RSS: %s", rnd, self.memory.line())
            log(INFO, "round %d took %.1f s", rnd, time.time() - t0)
        self._discard_late(grid)
        if result.arrays is None:
            result.arrays = arrays
        if not any(o == "trained" for _, o in self.rounds_done.values()):
            raise RunFailed(f"no round trained ({self.rounds_line().removeprefix('fedtp-flwr: ')}): the run ends as "
                            "failed; its global model is the one it started from (a refused merge: see "
                            "max-loss-increase and the strategy's server learning rate; a skipped round: the clients' "
                            "errors above)")
        return result

    def _train_round(self, rnd: int, arrays: ArrayRecord, train_config: ConfigRecord, grid: Grid,
                     timeout: float) -> tuple[ArrayRecord | None, MetricRecord | None, int]:
        """Send the slices, take the replies as they arrive, merge: (merged model or None, train metrics,
        replies merged). Slices go out one rank at a time; replies are pulled one at a time, checked and folded
        in as they arrive (streaming.receive)."""
        batches = self._train_batches(rnd, arrays, ConfigRecord(dict(train_config)), grid)
        this, outstanding = self._open_round(rnd), {}
        sending = True
        for msg in receive(grid, batches, timeout, outstanding, enough=this.quorum_met):
            if sending:
                self.memory.mark("sending")
                sending = False
            this.take(msg)
            del msg  # released before the next reply is pulled
        if sending:
            self.memory.mark("sending")
        new_arrays, train_metrics = self._close_round(this, quorum_ended=bool(outstanding) and this.quorum_met())
        self._late.update(outstanding)
        merged = len(this.accepted) if new_arrays is not None else 0
        del this, batches
        self.memory.mark("receiving and merging")
        return new_arrays, train_metrics, merged

    def _evaluate_on_clients(self, rnd: int, arrays: ArrayRecord, evaluate_config: ConfigRecord, grid: Grid,
                             timeout: float, result: Result) -> None:
        """The clients' slice evaluation of the round's global model (client-eval), into `result`."""
        eval_msgs = list(self.configure_evaluate(rnd, arrays, ConfigRecord(dict(evaluate_config)), grid))
        if not eval_msgs:
            return
        outstanding = {}
        eval_metrics = self.aggregate_evaluate(rnd, list(receive(grid, [eval_msgs], timeout, outstanding)))
        self._late.update(outstanding)
        if eval_metrics is not None:
            log(INFO, "\t└──> slice evaluation (clients): %s", eval_metrics)
            result.evaluate_metrics_clientapp[rnd] = eval_metrics

    def rounds_line(self) -> str:
        """What the rounds of this run did, for the run's last log line."""
        done = self.rounds_done
        trained = sum(o == "trained" for _, o in done.values())
        per = ", ".join(f"{r}: {n} client{'' if n == 1 else 's'}" + ("" if o == "trained" else f" ({o})")
                        for r, (n, o) in sorted(done.items()))
        return f"fedtp-flwr: {trained} of {len(done)} round{'' if len(done) == 1 else 's'} trained ({per or 'none'})"

    def _discard_late(self, grid: Grid) -> None:
        """Remove from the SuperLink, unread, the replies that came after their round ended."""
        if not self._late or not hasattr(grid, "pull_messages"):
            return
        try:
            gone = discard_replies(grid, self._late)
        except Exception as e:  # noqa: BLE001 - housekeeping: the run goes on, the SuperLink drops them at its end
            log(WARNING, "could not remove late replies from the SuperLink (%s); it drops them when the run ends",
                safe_text(e))
            return
        for mid in gone:
            self._late.pop(mid, None)
        if gone:
            log(INFO, "removed %d late repl%s from the SuperLink unread", len(gone), "y" if len(gone) == 1 else "ies")

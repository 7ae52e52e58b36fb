"""One round's training replies, from arrival to the merged model: the one path that both the strategy's own round
loop (`start`, replies streamed from the grid) and Flower's `aggregate_train` (a list of replies) drive.

    rnd = TrainRound(number, ranks, global_state, ...)
    for msg in replies: rnd.take(msg)       # checked, folded in and released (or parked: see below)
    merged, metrics = rnd.close()           # the weighted mean (or a robust rule), the clients' metrics

A checked reply is folded into running weighted sums (aggregation.WeightedFold) and released, so memory does not
grow with the number of replies. A reply is kept only while it waits for the outlier check's median (`waiting`:
the round's first two replies) or, with a robust rank-merge, until the close (`held`: a median needs a rank group
at once); a kept reply is parked on disk (spill.py) and read back a tensor at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.supercore import log

from fedtp_flwr.config import RunConfig
from fedtp_flwr.model import ModelArgs
from fedtp_flwr.wire import record_nbytes

from .aggregation import Contribution, WeightedFold
from .replies import ReplyError, check_reply, reduce_metrics, safe_text
from .robust import outliers, robust_aggregate_slices, update_rms
from .spill import SpillDir, SpilledState


def why_dropped(e: Exception) -> str:
    """A dropped reply's reason for the log (ReplyError texts already escape what the client sent)."""
    return str(e) if isinstance(e, ReplyError) else f"the reply could not be checked ({type(e).__name__}: {safe_text(e)})"


def repeated(server_round: int, node: int, seen: set, kind: str) -> bool:
    """True (and the reply is named as dropped) if `node` already replied in this round; else it is noted."""
    if node in seen:
        log(WARNING, "round %d: dropping %s reply from node %d: a second reply from this node in this "
            "round (only the first counts)", server_round, kind, node)
        return True
    seen.add(node)
    return False


class TrainRound:
    def __init__(self, number: int, ranks: dict[int, int], old: Mapping, args: ModelArgs, cfg: RunConfig,
                 expected_shapes: Mapping[str, tuple[int, ...]], delta, spill_parent: Path,
                 reply_node: Callable[[Message], int], sent_ids: Callable[[], set]):
        self.number, self.ranks, self.old, self.args, self.cfg = number, ranks, old, args, cfg
        self.expected_shapes, self.delta, self.spill_parent = expected_shapes, delta, spill_parent
        self._reply_node, self._sent_ids = reply_node, sent_ids
        # the weighted mean; None with a robust rank-merge
        self.fold = (WeightedFold(old, args, cfg.world_size, cfg.effective_merge_weighting, cfg.vocab_parallel)
                     if cfg.rank_merge == "mean" else None)
        self.judge = cfg.outlier_norm_factor > 0 and len(ranks) >= 3  # the outlier check applies
        self.sent: set | None = None  # this round's message ids, read at the first reply (the grid gives ids when
        # it pushes, after the round opened); empty: ids unknown, as from a test double
        self.seen: set = set()  # nodes that replied (valid or not)
        self.accepted: list = []  # (node, rank, weight, metrics) of each reply merged
        self.waiting: list = []  # (node, Contribution, metrics, index in norms)
        self.held: list = []  # Contributions for a robust rule
        self.norms: list = []  # update RMS of each checked reply, in arrival order
        self.received = 0  # array bytes received
        self.spill: SpillDir | None = None  # where kept replies are parked (made at the first, removed at the close)
        self.failure: str | None = None  # why close() had no merged model

    @property
    def total_weight(self) -> float:
        return sum(w for _, _, w, _ in self.accepted)

    # ---------------------------------------------------------------------------------------- replies

    def take(self, msg: Message) -> None:
        """Check one training reply and fold it in (or hold it); it is not referenced afterwards."""
        node = self._reply_node(msg)
        if self.sent is None:
            self.sent = self._sent_ids()
        if self.sent and msg.metadata.reply_to_message_id not in self.sent:
            log(WARNING, "round %d: dropping training reply from node %d: it answers no message of this round "
                "(a late reply)", self.number, node)
            return
        if repeated(self.number, node, self.seen, "training"):
            return
        if not msg.has_error():
            self.received += sum(record_nbytes(msg.content[r]) for r in ("arrays", "delta")
                                 if r in msg.content and isinstance(msg.content[r], ArrayRecord))
        try:
            if node not in self.ranks and not msg.has_error():  # an error reply: its reason says more
                raise ReplyError("this node was not sent a slice in this round")
            checked = check_reply(msg, self.expected_shapes, self.cfg.wire_dtype, self.cfg.max_num_examples,
                                  self.delta)
        except Exception as e:  # noqa: BLE001 - ReplyError, or a check we did not foresee: no reply stops the run
            log(WARNING, "round %d: dropping reply from node %d (rank %s): %s", self.number, node,
                self.ranks.get(node), why_dropped(e))
            return
        c = Contribution(self.ranks[node], checked.state, checked.num_examples)
        if not self.judge:
            self._accept(node, c, checked.metrics)
            return
        # Outlier check, online: each reply is compared with the median of the round's replies so far (itself
        # included) once there are 3; the first two wait for the third, parked on disk.
        self.norms.append(update_rms(self.old, c, self.args, self.cfg.world_size, self.cfg.vocab_parallel))
        if len(self.norms) < 3:
            c.state = self._park(c.state)
        self.waiting.append((node, c, checked.metrics, len(self.norms) - 1))
        if len(self.norms) < 3:
            return
        bad = outliers(self.norms, self.cfg.outlier_norm_factor)
        waiting, self.waiting = self.waiting, []
        for node, c, metrics, i in waiting:
            if i in bad:
                log(WARNING, "round %d: dropping reply from node %d (rank %d): %s", self.number, node, c.rank, bad[i])
            else:
                self._accept(node, c, metrics)

    def _accept(self, node: int, c: Contribution, metrics: dict) -> None:
        self.accepted.append((node, c.rank, c.weight, metrics))
        if self.fold is not None:
            self.fold.add(c, release=True)  # the fold keeps no reference to the reply
        else:  # a robust rule needs a rank group's replies at once: parked, read back a parameter at a time
            self.held.append(Contribution(c.rank, self._park(c.state), c.weight))

    def _park(self, state):
        """A reply that must wait, parked on disk (spill.py); kept in memory, with a warning, if the disk
        refuses it (nothing is lost either way)."""
        if isinstance(state, SpilledState):
            return state
        try:
            if self.spill is None:
                self.spill = SpillDir(self.spill_parent)
            return self.spill.park(state)
        except OSError as e:
            log(WARNING, "round %d: %s; this reply waits in memory instead", self.number, safe_text(e))
            return state

    def quorum_met(self) -> bool:
        """round-quorum < 1: that fraction of the sampled nodes answered and every rank has a valid reply."""
        q = self.cfg.round_quorum
        if q >= 1 or len(self.seen) < math.ceil(q * len(self.ranks)):
            return False
        valid = {rank for _, rank, _, _ in self.accepted} | {c.rank for _, c, _, _ in self.waiting}
        return set(self.ranks.values()) <= valid

    # ---------------------------------------------------------------------------------------- the close

    def close(self, quorum_ended: bool = False) -> tuple[dict | None, MetricRecord | None]:
        """(the merged state dict, the clients' reduced metrics), or (None, None) with `failure` set when fewer
        than min-train-nodes replies were valid. The parked replies are removed whatever happens."""
        try:
            return self._merge(quorum_ended)
        finally:
            if self.spill is not None:
                self.spill.close()
                self.spill = None

    def _merge(self, quorum_ended: bool) -> tuple[dict | None, MetricRecord | None]:
        for node, c, metrics, _ in self.waiting:  # fewer than 3 replies checked: no median to compare with
            self._accept(node, c, metrics)
        self.waiting = []
        why = (f"before the round ended at round-quorum {self.cfg.round_quorum:g}; a late reply is dropped"
               if quorum_ended else f"within round-timeout {self.cfg.round_timeout:g} s")
        for node in sorted(set(self.ranks) - self.seen):
            log(WARNING, "round %d: no reply from node %d (rank %d) %s", self.number, node, self.ranks[node], why)
        n = len(self.accepted)
        log(INFO, "round %d: %d valid repl%s, %.1f MB received", self.number, n, "y" if n == 1 else "ies",
            self.received / 1e6)
        if n < self.cfg.min_train_nodes:
            self.failure = (f"round {self.number}: {n} valid repl{'y' if n == 1 else 'ies'}, fewer than "
                            f"min-train-nodes={self.cfg.min_train_nodes}")
            log(WARNING, "%s; %s", self.failure, "round skipped, global model kept (allow-failed-rounds)"
                if self.cfg.allow_failed_rounds else "the run stops as failed")
            return None, None
        untrained = sorted(set(range(self.cfg.world_size)) - {rank for _, rank, _, _ in self.accepted})
        if untrained:
            log(WARNING, "round %d: no valid reply for rank(s) %s; their slices keep their values", self.number,
                untrained)
        if self.fold is not None:
            merged = self.fold.result()
        else:
            merged = robust_aggregate_slices(self.old, self.held, self.args, self.cfg.world_size, self.cfg.rank_merge,
                                             self.cfg.trimmed_mean_beta, self.cfg.effective_merge_weighting,
                                             self.cfg.vocab_parallel)
            self.held = []
        return merged, reduce_metrics((w, m) for _, _, w, m in self.accepted)

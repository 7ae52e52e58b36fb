"""One bad client must not be able to damage or stop a run (issue 11).

Most tests run server.run over the in-process grid: three nodes at world size 2, node 3 (rank 0, with node
1) replying as an attacker every round. Each attack must be rejected with a log line naming the node and
the reason, or neutralised; the run completes all rounds, and its final held-out loss is within 1% of the
same run in which node 3's reply is an error (dropped).

Each kind of malformed reply (non-finite values, wrong keys, shapes or dtypes, a .npy header that lies, a
fractional or absent weight, list-valued metrics, extra records) is dropped with its own reason in the quick
table of tests/test_strategy.py (BAD_REPLY_REASONS); the whole runs here are the attacks that need a run: the
outlier check (three replies), weights, the merged-model guard, duplicates, evaluation replies, robust merges.
"""

import math

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedMedian, FedTrimmedAvg

try:
    from conftest import ATTACKER, failing, run_in_process, tampering, with_arrays, with_content, with_metrics
except ImportError:  # collected as a package
    from tests.conftest import ATTACKER, failing, run_in_process, tampering, with_arrays, with_content, with_metrics  # type: ignore

from conftest import FakeGrid

from fedtp_flwr.config import ConfigError, RunConfig
from fedtp_flwr.model import ModelArgs, build_model
from fedtp_flwr.server.aggregation import Contribution
from fedtp_flwr.server.outputs import load_run_checkpoint, read_results, run_folders
from fedtp_flwr.server.strategy import RunFailed
from fedtp_flwr.server.replies import safe_text
from fedtp_flwr.server.robust import outliers, robust_aggregate_slices
from fedtp_flwr.server.strategy import FederatedTensorParallel, message_ttl
from fedtp_flwr.testing.inprocess import InProcessGrid
from fedtp_flwr.wire import decode, encode

ROUNDS = 2


@pytest.fixture(scope="module")
def without_attacker(tmp_path_factory):
    """Final held-out loss of the run in which node 3's reply is an error."""
    return run_in_process(tmp_path_factory.mktemp("dropped"), failing(ATTACKER))[-1][1]


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    return run_in_process(tmp_path_factory.mktemp("honest"))


def attacked(tmp_path, tamper, **overrides):
    history = run_in_process(tmp_path, tampering(ATTACKER, tamper), **overrides)
    assert [r for r, _, _ in history] == list(range(ROUNDS + 1))  # every round ran and was recorded
    (folder,) = run_folders(tmp_path)
    (path,) = (folder / "checkpoints").glob(f"llama32_bytes-small_ws*_round{ROUNDS}.pth")
    ckpt = load_run_checkpoint(path)
    assert all(torch.isfinite(t).all() for t in ckpt["model_state_dict"].values())
    return history


def assert_as_good_as_without_the_attacker(history, without_attacker: float) -> None:
    """The issue's bar: the final held-out loss within 1% of the run whose attacker's replies were dropped."""
    print(f"final held-out loss {history[-1][1]:.6f}, without the attacker {without_attacker:.6f}")
    assert history[-1][1] <= without_attacker * 1.01


def noise(std):
    return lambda t, gen: t + std * torch.randn(t.shape, generator=gen)


def dropped(caplog, reason: str) -> bool:
    return all(f"round {r}: dropping reply from node {ATTACKER} (rank 0): " in caplog.text for r in range(1, ROUNDS + 1)) \
        and reason in caplog.text


# ------------------------------------------------------------------- attacks through server.run

@pytest.mark.slow
def test_gaussian_noise_update_is_dropped_as_an_outlier(tmp_path, caplog, without_attacker):
    history = attacked(tmp_path, lambda r, m: with_arrays(r, m, noise(1.0)))
    assert dropped(caplog, "outlier-norm-factor")
    assert_as_good_as_without_the_attacker(history, without_attacker)


@pytest.mark.slow
def test_huge_finite_values_are_dropped_as_an_outlier(tmp_path, caplog, without_attacker):
    history = attacked(tmp_path, lambda r, m: with_arrays(r, m, lambda t, g: torch.full_like(t, 3e38)))
    assert dropped(caplog, "outlier-norm-factor")
    assert_as_good_as_without_the_attacker(history, without_attacker)


@pytest.mark.slow
def test_astronomical_num_examples_is_refused(tmp_path, caplog, without_attacker):
    history = attacked(tmp_path, lambda r, m: with_metrics(with_arrays(r, m, noise(1.0)), m, **{"num-examples": 10**12}))
    assert dropped(caplog, "num-examples must be an integer in [1, 100000000]")
    assert_as_good_as_without_the_attacker(history, without_attacker)


@pytest.mark.slow
def test_only_the_first_reply_of_a_node_counts(tmp_path, caplog, honest):
    class DuplicatingGrid(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            return replies + [r for r in replies if r.metadata.src_node_id == 1]

    history = run_in_process(tmp_path, grid_cls=DuplicatingGrid)
    assert "dropping training reply from node 1: a second reply from this node" in caplog.text
    assert history == honest


@pytest.mark.slow
def test_evaluation_replies_are_checked(tmp_path, caplog):
    """client-eval: num-tokens 0 (a division by zero in Flower's averaging) and a list-valued metric."""
    bad = lambda r, m: with_metrics(r, m, **{"num-tokens": 0, "slice-loss": [1.0]})  # noqa: E731
    history = run_in_process(tmp_path, tampering(ATTACKER, bad, "evaluate"), **{"client-eval": True})
    assert len(history) == ROUNDS + 1
    assert f"round {ROUNDS}: dropping evaluation reply from node {ATTACKER}: num-tokens" in caplog.text
    assert "slice evaluation (clients)" in caplog.text


@pytest.mark.slow
def test_a_merged_model_with_nan_loss_is_refused_and_the_run_recovers(tmp_path, caplog):
    """Two nodes, so no median to compare against: 3e38 in the attention weights passes every reply check
    and makes the merged model's attention scores, and its held-out loss, NaN. The previous model is kept,
    checkpointed and sent out again, and round 2 trains from it."""
    def huge_attention(reply, msg):
        return with_content(reply, msg, arrays=encode({k: torch.full_like(t, 3e38) if ".attention.w" in k else t
                                                       for k, t in decode(reply.content["arrays"]).items()}))

    # the attacker sends it every round: every merge is refused, nothing trains, and the run ends failed
    with pytest.raises(RunFailed, match="no round trained"):
        run_in_process(tmp_path, tampering(2, huge_attention), n_nodes=2)
    assert "round 1: refusing the merged model: its held-out loss is nan" in caplog.text
    (folder,) = run_folders(tmp_path)
    (history,) = read_results(folder / "experiment_results_llama32.pkl").values()
    assert [r for r, _, _ in history] == [0, 1, 2] and all(math.isfinite(l) for _, l, _ in history)
    assert history[1][1] == history[0][1]  # round 1 kept the initial model
    assert not (folder / "checkpoints").exists() or not any((folder / "checkpoints").iterdir())


@pytest.mark.slow
def test_a_merged_model_much_worse_than_the_last_is_refused(tmp_path, caplog):
    with pytest.raises(RunFailed, match="no round trained"):  # refused every round: nothing trained
        run_in_process(tmp_path, tampering(2, lambda r, m: with_arrays(r, m, noise(1.0))), n_nodes=2)
    (folder,) = run_folders(tmp_path)
    (history,) = read_results(folder / "experiment_results_llama32.pkl").values()
    assert "refusing the merged model: its held-out loss" in caplog.text and "(max-loss-increase)" in caplog.text
    assert all(l <= history[0][1] for _, l, _ in history)


@pytest.mark.slow
def test_median_merge_neutralises_noise_without_the_outlier_check(tmp_path, caplog, without_attacker):
    """rank-merge median with outlier-norm-factor 0, at world size 1: the noisy reply is one of three."""
    base = run_in_process(tmp_path / "base", failing(ATTACKER), **{"world-size": 1, "rank-merge": "median"})
    caplog.clear()
    history = attacked(tmp_path / "attacked", lambda r, m: with_arrays(r, m, noise(1.0)),
                       **{"world-size": 1, "rank-merge": "median", "outlier-norm-factor": 0.0})
    assert "dropping reply" not in caplog.text
    print(f"median merge: held-out loss {history[-1][1]:.4f} with the noisy node, {base[-1][1]:.4f} without it")
    assert history[-1][1] <= base[-1][1] * 1.01


# ------------------------------------------------------------------------------- unit checks

ARGS = ModelArgs(dim=16, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32, multiple_of=8)





def strategy_and_messages(nodes, message_type="train", inner=None, **cfg):
    s = FederatedTensorParallel(ARGS, RunConfig(**{"world_size": 2, **cfg}), inner=inner)
    state = {k: v.detach().clone() for k, v in build_model(ARGS, seed=0).state_dict().items()}
    grid = FakeGrid(nodes)
    if message_type == "train":
        msgs = list(s.configure_train(1, encode(state), ConfigRecord(), grid))
    else:
        msgs = list(s.configure_evaluate(1, encode(state), ConfigRecord(), grid))
    return s, state, msgs


def test_evaluation_reply_with_zero_examples_cannot_crash_the_server(server_identity, caplog):
    s, _, msgs = strategy_and_messages([1, 2], "evaluate", client_eval=True)
    replies = [Message(RecordDict({"metrics": MetricRecord({"num-tokens": 0, "slice-loss": 1.0})}), reply_to=m)
               for m in msgs]
    assert s.aggregate_evaluate(1, replies) is None
    assert "dropping evaluation reply from node 1: num-tokens" in caplog.text


def test_evaluation_metrics_are_weighted_means_of_known_keys(server_identity):
    s, _, msgs = strategy_and_messages([1, 2], "evaluate", client_eval=True)
    replies = [Message(RecordDict({"metrics": MetricRecord({"num-tokens": n, "slice-loss": loss, "other": 5.0})}),
                       reply_to=m) for m, n, loss in zip(msgs, (1, 3), (1.0, 2.0))]
    assert dict(s.aggregate_evaluate(1, replies)) == {"slice-loss": pytest.approx(1.75)}


def test_messages_live_at_least_as_long_as_the_round_timeout(server_identity):
    assert message_ttl(3600.0) == 43200.0  # Flower's default stays the floor
    _, _, msgs = strategy_and_messages([1, 2], round_timeout=3 * 86400.0)
    assert all(m.metadata.ttl >= 3 * 86400.0 for m in msgs)


def test_warning_when_fewer_nodes_may_start_a_round_than_there_are_ranks(caplog):
    FederatedTensorParallel(ARGS, RunConfig(world_size=2, min_available_nodes=1)).summary()
    assert "min-available-nodes=1 is less than world-size=2" in caplog.text
    caplog.clear()
    FederatedTensorParallel(ARGS, RunConfig(world_size=2, min_available_nodes=2)).summary()
    assert "min-available-nodes" not in caplog.text.replace("Untrusted", "")


def test_client_error_text_is_shortened_and_escaped(server_identity, caplog):
    s, _, msgs = strategy_and_messages([1, 2])
    reason = "\x1b[2J\nFAKE LOG LINE: round 1: 2 valid replies\n" + "A" * 100_000
    s.aggregate_train(1, [Message(Error(code=2, reason=reason), reply_to=msgs[0])])
    line = next(l for l in caplog.text.splitlines() if "dropping reply from node 1" in l)
    # one line: the terminal escape dropped, the client's lines joined (replies.error_cause), the rest escaped
    assert "\x1b" not in caplog.text and "[2J" not in caplog.text and "(code 2): FAKE LOG LINE: round 1: 2 valid" in line
    assert len(line) < 800 and "more characters" in line
    assert safe_text("é\u202e") == "\\xe9\\u202e"


def test_refused_merge_leaves_fedadam_moments_as_they_were(server_identity):
    """discard_round restores the inner rule's state (Flower's FedOpt rebinds m_t / v_t each round)."""
    inner = FedAdam(min_available_nodes=1, min_train_nodes=1, eta=0.1)
    s, state, msgs = strategy_and_messages([1, 2], inner=inner)
    replies = []
    for m in msgs:
        sl = decode(m.content["arrays"])
        sl = {k: v + 0.01 for k, v in sl.items()}
        replies.append(Message(RecordDict({"arrays": encode(sl), "metrics": MetricRecord({"num-examples": 5})}),
                               reply_to=m))
    before = (inner.m_t, inner.v_t)
    assert s.aggregate_train(1, replies)[0] is not None and inner.m_t is not before[0]
    s.discard_round()
    assert (inner.m_t, inner.v_t) == before


def test_guard_keeps_the_previous_model_when_the_merged_loss_is_nan(server_identity, caplog):
    s, state, _ = strategy_and_messages([1, 2])

    class Grid(FakeGrid):
        def send_and_receive(self, messages, *, timeout=None):
            return [Message(RecordDict({"arrays": encode({k: v + 0.01 for k, v in decode(m.content["arrays"]).items()}),
                                        "metrics": MetricRecord({"num-examples": 5})}), reply_to=m) for m in messages]

    losses = iter([2.0, float("nan"), 1.9])
    recorded = []
    result = s.start(Grid([1, 2]), encode(state), num_rounds=2,
                     evaluate_fn=lambda rnd, arrays: MetricRecord({"loss": next(losses), "perplexity": 1.0}),
                     record_fn=lambda rnd, arrays, m, trained: recorded.append((rnd, decode(arrays), m["loss"])))
    assert "round 1: refusing the merged model: its held-out loss is nan" in caplog.text
    assert [(r, l) for r, _, l in recorded] == [(0, 2.0), (1, 2.0), (2, 1.9)]
    assert all(torch.equal(recorded[1][1][k], state[k]) for k in state)  # round 1 ended with the initial model
    assert not torch.equal(decode(result.arrays)["norm.weight"], state["norm.weight"])  # round 2 was accepted


def _contributions(state, n, world_size=1, seed=0):
    from fedtp_flwr.model.sharding import shard

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        rank = i % world_size
        sl = shard(state, ARGS, rank, world_size)
        out.append(Contribution(rank, {k: v + torch.randn(v.shape, generator=g) for k, v in sl.items()}, i + 1))
    return out


@pytest.mark.parametrize("rule,flower", [("median", FedMedian()), ("trimmed-mean", FedTrimmedAvg(beta=0.2))])
def test_world_size_one_robust_merge_equals_flowers_strategy(server_identity, rule, flower):
    _, state, msgs = strategy_and_messages([1, 2, 3, 4, 5], world_size=1)
    contribs = _contributions(state, 5)
    ours = robust_aggregate_slices(state, contribs, ARGS, 1, rule, 0.2)
    replies = [Message(RecordDict({"arrays": encode(c.state), "metrics": MetricRecord({"num-examples": c.weight})}),
                       reply_to=m) for c, m in zip(contribs, msgs)]
    theirs = decode(flower.aggregate_train(1, replies)[0])
    assert all(torch.equal(ours[k], theirs[k]) for k in state)


def test_robust_merge_is_per_rank_group(server_identity):
    state = {k: v.detach().clone() for k, v in build_model(ARGS, seed=0).state_dict().items()}
    contribs = _contributions(state, 6, world_size=2)
    merged = robust_aggregate_slices(state, contribs, ARGS, 2, "median")
    from fedtp_flwr.model.sharding import shard

    for rank in range(2):
        group = [c for c in contribs if c.rank == rank]
        got = shard(merged, ARGS, rank, 2)
        k = "layers.0.feed_forward.w1.weight"
        assert torch.equal(got[k], torch.stack([c.state[k] for c in group]).median(dim=0).values)  # 3: the middle one


def test_outliers_need_three_replies_and_name_the_part():
    assert outliers([{"split": 1.0, "replicated": 1.0}, {"split": 100.0, "replicated": 1.0}], 10.0) == {}
    norms = [{"split": 1.0, "replicated": 1.0}, {"split": 1.2, "replicated": 50.0}, {"split": 0.9, "replicated": 1.1}]
    bad = outliers(norms, 10.0)
    assert list(bad) == [1] and "replicated layers" in bad[1]
    assert outliers(norms, 0.0) == {}


@pytest.mark.parametrize("key,value,match", [("trimmed-mean-beta", 0.5, r"\[0, 0.5\)"),
                                             ("max-loss-increase", 0.5, ">= 1"),
                                             ("rank-merge", "krum", "choose one of"),
                                             ("max-num-examples", 0, ">= 1")])
def test_robustness_keys_are_checked(key, value, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_run_config({key: value})


@pytest.mark.parametrize("content", [
    '{"text": "ok"}\n{"PRIVATE-KEY": "PRIVATE TEXT"}\n',  # no "text": the keys it has are content too
    '{"text": "x", "source": ["PRIVATE TEXT"]}\n',
    '{"text": "ok"}\n{"text": "PRIVATE TEXT", "source": 7, "PRIVATE-KEY": 1}\n',
    '{"text": PRIVATE TEXT}\n',
])
def test_data_file_errors_never_echo_the_files_content(tmp_path, content):
    from fedtp_flwr.data import DataError, load_examples

    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        load_examples(path)
    assert "PRIVATE" not in str(e.value) and f"{path}:" in str(e.value)


def test_tokenizer_file_errors_never_echo_the_files_content(tmp_path):
    from fedtp_flwr.data import DataError, Tokenizer

    bad = tmp_path / "tokenizer.model"
    bad.write_text("IQ== 0\nPRIVATE TEXT\n")
    with pytest.raises(DataError) as e:
        Tokenizer(bad)
    assert "PRIVATE" not in str(e.value) and f"{bad}:2: not a tiktoken BPE file" in str(e.value)


def test_a_reply_that_breaks_an_unforeseen_check_is_dropped_not_fatal(server_identity, caplog, monkeypatch):
    import fedtp_flwr.server.round as round_module

    s, _, msgs = strategy_and_messages([1, 2])

    def explode(*args, **kwargs):
        raise KeyError("\x1bsomething nobody foresaw")

    monkeypatch.setattr(round_module, "check_reply", explode)
    reply = Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msgs[0])
    assert s.aggregate_train(1, [reply]) == (None, None)
    assert "dropping reply from node 1 (rank 0): the reply could not be checked (KeyError" in caplog.text
    assert "\x1b" not in caplog.text

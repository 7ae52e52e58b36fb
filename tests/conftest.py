"""Fixtures and helpers shared by the test modules (import the helpers with ``from conftest import ...``).

- ``no_leftover_processes``: fails a test that leaves a process behind (the end-to-end Flower tests use it);
- the settings of a small run of the real app and the checks of its outputs and logs, shared by
  test_flower_simulation.py and test_flower_deployment.py.
"""

from __future__ import annotations

import ast
import itertools
import json
import math
import pickle
import re
import time
import uuid
from pathlib import Path

import pytest
import torch

from fedtp_flwr.model import ModelArgs, Transformer, build_model, preset_args
from fedtp_flwr.model.sharding import slice_shapes
from fedtp_flwr.server.outputs import read_results, run_folders
from fedtp_flwr.testing import flower_harness as fh

APP_DIR = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
ROUNDS = 2
LR = 0.001
SEED = 42


def small_config(output_dir: Path, **overrides) -> dict:
    """A quick run: tiny preset, 3 local steps of 2 x 32 tokens, 2 x 4 x 32 held-out tokens.
    output-dir must be absolute: a relative one resolves against the ServerApp process's directory."""
    return {"num-server-rounds": ROUNDS, "world-size": WORLD_SIZE, "local-steps": 3, "batch-size": 2,
            "max-seq-len": 32, "eval-batches": 2, "max-batch-size": 4, "learning-rate": LR, "seed": SEED,
            "output-dir": str(output_dir.resolve()), **overrides}


MARKER = "FEDTP_E2E_TEST_ID"


@pytest.fixture
def no_leftover_processes(monkeypatch: pytest.MonkeyPatch):
    """Fail a test that leaves a process behind (found by a marker every started process inherits)."""
    test_id = uuid.uuid4().hex
    monkeypatch.setenv(MARKER, test_id)
    yield
    deadline = time.monotonic() + 10
    while (ours := fh.processes_with_env(MARKER, test_id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ours, f"processes left behind: {ours}"


# ------------------------------------------------------------------------------------------- log parsing

RANKS_RE = re.compile(r"round (\d+): node -> rank \{([^}]*)\}; sending ([\d.]+) MB \((\w+) slices")
CLIENT_RE = re.compile(r"round (\d+): received the rank (\d+)/(\d+) slice: (\d+) parameters in (\d+) arrays "
                       r"\(([\d.]+) MB (\w+)\); training on (\S+), (\d+) local examples")
METRICS_RE = re.compile(r"train metrics: (\{[^}]*\})")
EVAL_RE = re.compile(r"round (\d+): held-out loss ([\d.]+), perplexity ([\d.]+)")


def node_ranks(log_text: str) -> dict[int, dict[int, int]]:
    """round -> {node id: rank}, from the strategy's per-round line."""
    out = {}
    for m in RANKS_RE.finditer(log_text):
        pairs = [p.split(":") for p in m.group(2).split(",") if p.strip()]
        out[int(m.group(1))] = {int(n): int(r) for n, r in pairs}
    return out


def sent_mb(log_text: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(3)) for m in RANKS_RE.finditer(log_text)}


def client_lines(text: str) -> list[dict]:
    return [dict(round=int(m.group(1)), rank=int(m.group(2)), world_size=int(m.group(3)), params=int(m.group(4)),
                 arrays=int(m.group(5)), mb=float(m.group(6)), wire=m.group(7), device=m.group(8),
                 examples=int(m.group(9))) for m in CLIENT_RE.finditer(text)]


def train_metrics(log_text: str) -> list[dict]:
    return [ast.literal_eval(m.group(1)) for m in METRICS_RE.finditer(log_text)]


# ---------------------------------------------------------------------------------------- output checks

def slice_parameter_count(world_size: int = WORLD_SIZE) -> tuple[int, int]:
    """(parameters, arrays) of one rank's slice of llama3.2-tiny (the same for every rank)."""
    shapes = slice_shapes(preset_args("llama3.2-tiny"), world_size)
    return sum(math.prod(s) for s in shapes.values()), len(shapes)


def full_parameter_count() -> int:
    return sum(t.numel() for t in build_model(preset_args("llama3.2-tiny"), device="meta", seed=None).parameters())


def check_outputs(parent: Path, rounds: int, world_size: int = WORLD_SIZE) -> list[tuple[int, float, float]]:
    """The seed's three outputs in the one run folder under output-dir `parent`, its run.json saying completed, and
    its entry in the merged results file; returns the results history [(round, loss, perplexity)]."""
    (out,) = run_folders(parent)
    key = (world_size, LR, False, rounds, SEED)
    results = read_results(out / "experiment_results_llama32.pkl")  # refuses anything but plain data
    assert results == pickle.loads((out / "experiment_results_llama32.pkl").read_bytes())
    assert list(results) == [key]
    assert read_results(parent / "experiment_results_llama32.pkl") == results  # merged: the one completed run
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    history = results[key]
    assert isinstance(history, list) and all(isinstance(h, tuple) and len(h) == 3 for h in history)
    assert [r for r, _, _ in history] == list(range(rounds + 1))
    assert all(math.isfinite(loss) and ppl > 1 for _, loss, ppl in history)

    lines = (out / f"eval_res_llama32_ws{world_size}_r{rounds}.txt").read_text().splitlines()
    assert len(lines) == rounds + 1
    for (r, loss, ppl), line in zip(history, lines):
        m = re.fullmatch(r"Round: (\d+), Loss: ([0-9.eE+-]+), Perplexity: ([0-9.eE+-]+)", line)
        assert m, line
        assert int(m.group(1)) == r
        assert float(m.group(2)) == pytest.approx(loss, rel=1e-4)
        assert float(m.group(3)) == pytest.approx(ppl, rel=1e-4)

    full_shapes = {k: tuple(v.shape) for k, v in
                   build_model(preset_args("llama3.2-tiny"), device="meta", seed=None).state_dict().items()}
    for r in range(1, rounds + 1):
        path = out / "checkpoints" / f"llama32_tiny_ws{world_size}_lr{LR}_round{r}.pth"
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert {"model_state_dict", "experiment_key", "round", "config"} <= set(ckpt)
        assert ckpt["round"] == r
        assert tuple(ckpt["experiment_key"]) == key
        assert ckpt["config"]["world-size"] == world_size and ckpt["config"]["num-server-rounds"] == rounds
        state = ckpt["model_state_dict"]
        assert {k: tuple(v.shape) for k, v in state.items()} == full_shapes
        assert all(torch.isfinite(v).all() for v in state.values())
    return history


def check_slices(log_text: str, client_text: str, rounds: list[int], nodes: int = 2) -> dict[int, dict[int, int]]:
    """Each node got a slice of the expected shapes and never the full model, by three independent records:
    the strategy's bytes sent, each client's own log line, and the clients' aggregated slice-parameters."""
    slice_params, slice_arrays = slice_parameter_count()
    full = full_parameter_count()
    assert slice_params < full
    ranks = node_ranks(log_text)
    assert sorted(ranks) == rounds, log_text[-4000:]
    for rnd in rounds:
        assert len(ranks[rnd]) == nodes and sorted(set(ranks[rnd].values())) == list(range(WORLD_SIZE))
        # the server sent one float32 slice per node (the log rounds to 0.1 MB; .npy headers add ~3 kB per slice)
        assert sent_mb(log_text)[rnd] == pytest.approx(nodes * slice_params * 4 / 1e6, abs=0.1)
        assert sent_mb(log_text)[rnd] < nodes * full * 4 / 1e6 - 1.0
    lines = client_lines(client_text)
    assert lines, client_text[-4000:]
    for line in lines:  # what each client says it received (after loading it into its slice sub-model)
        assert line["params"] == slice_params and line["arrays"] == slice_arrays, line
        assert line["world_size"] == WORLD_SIZE and line["wire"] == "float32"
        assert line["mb"] == pytest.approx(slice_params * 4 / 1e6, abs=0.1)
    # both ranks reported a slice in the first round (later lines may still be in flight in simulation)
    assert {ln["rank"] for ln in lines if ln["round"] == rounds[0]} == set(range(WORLD_SIZE)), lines
    metrics = train_metrics(log_text)
    assert len(metrics) == len(rounds)
    for m in metrics:  # weighted mean over the nodes of what each one received: every node got one slice
        assert m["slice-parameters"] == pytest.approx(slice_params)
    return ranks


# ------------------------------------------------------------------------- context-mode test models
# (test_context.py, test_vocab_parallel.py)

CONTEXT_ARGS = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=256, multiple_of=32)


@torch.no_grad()
def random_model(seed: int = 0) -> Transformer:
    """Fan-in scaled weights (every block contributes visibly), rounded to bf16 so that a bf16 rest holds
    them exactly and the 16-bit comparisons can be exact."""
    model = build_model(CONTEXT_ARGS, seed=None)
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_((1 + 0.1 * noise if p.ndim == 1 else noise / math.sqrt(p.shape[1])).bfloat16().float())
    return model


def tokens(seed: int = 0, shape=(2, 16)) -> torch.Tensor:
    return torch.randint(0, CONTEXT_ARGS.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------------ two float32 optimizer steps agree

FLOAT32_EPS = torch.finfo(torch.float32).eps  # 2**-23: one ulp at 1.0


def step_tolerance(start: torch.Tensor, lr: float, steps: int = 1) -> torch.Tensor:
    """How far apart two float32 implementations of the same AdamW steps from `start` may end, element-wise:
    steps * eps32 * (2 |start| + 5 lr).

    Per step each one rounds the weight twice (the decay w * (1 - lr * wd), then the update: half an ulp of |w|
    each), and the update lr * m_hat / (sqrt(v_hat) + eps), at most lr, carries about five roundings of its own
    (the moments, sqrt, bias corrections, + eps, the division: half an ulp each); two implementations can round
    each the other way. Gradients that differ in their last bits (another summation order, the chunked loss) barely
    move the first step's m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps), about +-1 unless |g| is near eps. Measured
    (torch 2.13, a 2-core CPU): at most 0.49 of this bound. An absolute atol is the wrong shape: 1e-7 is under one ulp at 1.0 (1.19e-7, where
    the norms' weights sit) and some 60 ulps at the 0.02 of the other weights."""
    return steps * FLOAT32_EPS * (2 * start.double().abs() + 5 * lr)


def assert_same_steps(got: dict, want: dict, start: dict, lr: float, steps: int = 1) -> None:
    """Two state dicts after the same float32 optimizer steps from `start` agree within step_tolerance."""
    assert got.keys() == want.keys()
    for name, w in want.items():
        err = (got[name].double() - w.double()).abs()
        ratio = float((err / step_tolerance(start[name], lr, steps)).max())
        assert ratio <= 1, f"{name}: {ratio:.2f} x the float32 step tolerance (max error {float(err.max()):.3g})"




# ------------------------------------------------------------------- untrusted clients (in-process runs)
# (test_untrusted_clients.py): a small byte-level run of server.run over the in-process grid, and handlers
# that make one node reply as an attacker would.

ATTACK_RUN = {"model": "bytes-small", "tokenizer-path": "bytes", "num-server-rounds": 2, "world-size": 2,
              "local-steps": 2, "batch-size": 2, "max-seq-len": 32, "eval-batches": 2, "max-batch-size": 4,
              "learning-rate": 1e-3, "min-available-nodes": 2}
ATTACKER = 3  # node 3 shares rank 0 with node 1 when three nodes run at world size 2


def run_in_process(out: Path, handler=None, n_nodes: int = 3, grid_cls=None, **overrides) -> list[tuple]:
    """server.run of ATTACK_RUN (+ overrides) over the in-process grid; -> the results history
    [(round, held-out loss, perplexity)]."""
    from fedtp_flwr.server.app import run
    from fedtp_flwr.testing.inprocess import InProcessGrid, handle

    cfg = {**ATTACK_RUN, "output-dir": str(out), **overrides}
    grid = (grid_cls or InProcessGrid)([{"partition-id": i, "num-partitions": n_nodes} for i in range(n_nodes)], cfg,
                                      handler=handler or handle)
    run_id = next(_RUN_IDS)
    run(grid, cfg, run_id=run_id)
    results = read_results(out / f"run-{run_id}" / "experiment_results_llama32.pkl")  # this run's entry
    (history,) = results.values()
    return history


_RUN_IDS = itertools.count(1)


def tampering(node: int, tamper, message_type: str = "train"):
    """A handler: every node replies honestly, except that `node`'s replies to `message_type` messages pass
    through tamper(reply, msg) -> the reply it sends instead."""
    from fedtp_flwr.testing.inprocess import handle

    def handler(msg, cfg, node_config):
        reply = handle(msg, cfg, node_config)
        if msg.metadata.dst_node_id == node and msg.metadata.message_type == message_type:
            return tamper(reply, msg)
        return reply

    return handler


def failing(node: int):
    """A handler whose `node` raises (its reply is an error: the run without that node's updates)."""
    from fedtp_flwr.testing.inprocess import handle

    def handler(msg, cfg, node_config):
        if msg.metadata.dst_node_id == node:
            raise RuntimeError("this node's reply is dropped (test baseline)")
        return handle(msg, cfg, node_config)

    return handler


def with_content(reply, msg, **records):
    """A reply to `msg` with the records of `reply`, some replaced (or added: records keep this order)."""
    from flwr.app import Message, RecordDict

    return Message(RecordDict({**dict(reply.content.items()), **records}), reply_to=msg)


def with_arrays(reply, msg, change, seed: int = 0):
    """A reply whose float32 slice is change(tensor, generator) of the honest one."""
    from fedtp_flwr.wire import decode, encode

    gen = torch.Generator().manual_seed(seed)
    state = {k: change(t, gen) for k, t in decode(reply.content["arrays"], "float32").items()}
    return with_content(reply, msg, arrays=encode(state, "float32"))


def with_metrics(reply, msg, **metrics):
    from flwr.app import MetricRecord

    return with_content(reply, msg, metrics=MetricRecord({**dict(reply.content["metrics"].items()), **metrics}))


# ---------------------------------------------------------------------- strategy unit tests (no grid)
# (test_strategy.py, test_untrusted_clients.py)


@pytest.fixture
def server_identity():
    """Messages need a run id, as in a ServerApp process."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


class FakeGrid:
    """The one Grid call a strategy's configure_* makes: the connected node ids."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return list(self.node_ids)


# ---------------------------------------------------------------------------------------------------------
# Hugging Face Llama folders with their own small trained tokenizer (test_hf_folder.py, test_generate.py)

LLAMA3_CHAT_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                        "<|end_header_id|>", "<|eot_id|>"]
SMOL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # SmolLM-style (49k-vocabulary Llama models)

COUNTRIES = [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Peru", "Lima"),
             ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Egypt", "Cairo"), ("Cuba", "Havana"), ("Iran", "Tehran"),
             ("Oman", "Muscat"), ("Mali", "Bamako")]


def train_tokenizer(specials: list[str], vocab_size: int = 400):
    """A byte-level BPE trained on the chat data's own words (deterministic, well under a second)."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [f"What is the capital of {c}? The capital of {c} is {k}." for c, k in COUNTRIES] * 3
    tok.train_from_iterator(text + ["user assistant system\n\n"], trainer)
    return tok


def make_folder(path: Path, *, specials=LLAMA3_CHAT_SPECIALS, tokenizer_config=None, vocab_size=None,
                heads=(9, 3), tied=True, seed=0) -> Path:
    """config.json + model.safetensors (transformers' own save_pretrained) + tokenizer.json (+ config)."""
    import transformers

    tok = train_tokenizer(specials)
    n_words = tok.get_vocab_size(with_added_tokens=True)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size or n_words, hidden_size=8 * heads[0], intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=heads[0], num_key_value_heads=heads[1], max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied,
        bos_token_id=tok.token_to_id(specials[0]), eos_token_id=tok.token_to_id(specials[1]))
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    if tokenizer_config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return path

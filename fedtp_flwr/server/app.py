"""The server's side of a run: initial model, held-out evaluation of the merged model, outputs, rounds."""

from __future__ import annotations

import json
import random
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from fedtp_flwr.config import ConfigError, RunConfig
from fedtp_flwr.data import build_dataset, builtin_corpus_path, eval_batches, load_examples, load_tokenizer
from fedtp_flwr.model import ModelArgs, build_model, preset_args
from fedtp_flwr.model.checkpoint import load_checkpoint
from fedtp_flwr.model.sharding import check_world_size
from fedtp_flwr.training import evaluate, resolve_device
from fedtp_flwr.wire import decode, encode

from .memory import memory_gb
from .outputs import RunOutputs, load_run_checkpoint, new_run_folder
from .strategy import FederatedTensorParallel


def experiment_key(cfg: RunConfig) -> tuple:
    """The seed's results key: (world_size, lr, enable_swapping, rounds, seed)."""
    return (cfg.world_size, cfg.learning_rate, cfg.enable_swapping, cfg.num_server_rounds, cfg.seed)


def model_name(cfg: RunConfig) -> str:
    return Path(cfg.checkpoint_dir).name if cfg.checkpoint_dir else cfg.model



def initial_state(cfg: RunConfig) -> tuple[ModelArgs, dict[str, torch.Tensor], int, list, dict]:
    """(args, state, first round, history, resume extras): from resume-from, checkpoint-dir, or the preset
    with seeded init. The extras are what a checkpoint holds beyond the model (the `random` module's state,
    the inner strategy's state); empty when not resuming."""
    if cfg.resume_from:
        ckpt = load_run_checkpoint(cfg.resume_from)
        stored = ckpt["config"]
        args = ModelArgs.from_params(json.loads(stored["model-args"]))
        now = cfg.to_dict()
        # a key the checkpoint predates is not compared; num-server-rounds may grow: a run can be extended
        for key in sorted(set(now) - RunConfig.resume_may_differ()):
            if key in stored and stored[key] != now[key]:
                raise ConfigError(f"resume-from {cfg.resume_from}: the checkpoint was written with {key}="
                                  f"{stored[key]!r}, this run has {now[key]!r}")
        if int(ckpt["round"]) >= cfg.num_server_rounds:
            raise ConfigError(f"resume-from {cfg.resume_from}: the checkpoint is of round {int(ckpt['round'])}, and "
                              f"num-server-rounds={cfg.num_server_rounds} leaves no round to train (raise it to "
                              "extend the run)")
        state = {k: v.float() for k, v in ckpt["model_state_dict"].items()}
        extras = {k: ckpt[k] for k in ("random_state", "strategy_state") if k in ckpt}
        return args, state, int(ckpt["round"]) + 1, [tuple(h) for h in ckpt.get("history", [])], extras
    if cfg.checkpoint_dir:
        args, state = load_checkpoint(cfg.checkpoint_dir)
        return args, {k: v.float() for k, v in state.items()}, 1, [], {}
    try:
        args = preset_args(cfg.model)
    except ValueError as e:
        raise ConfigError(f"config key 'model': {e}") from None
    check_config_world_size(args, cfg)  # before spending minutes initialising a large model
    model = build_model(args, seed=cfg.seed)
    return args, {k: v.detach() for k, v in model.state_dict().items()}, 1, [], {}


def _as_tuples(x):
    """random.getstate() comes back from a checkpoint as written (tuples); lists are accepted too."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def check_config_world_size(args: ModelArgs, cfg: RunConfig) -> None:
    try:
        check_world_size(args, cfg.world_size, cfg.vocab_parallel)
    except ValueError as e:
        raise ConfigError(f"config key 'world-size': {e}") from None


DEFAULT_OUTPUTS = "outputs"


def output_parent(cfg: RunConfig) -> Path:
    """The folder that holds the runs' folders and their merged results file: output-dir, or ./outputs."""
    return Path(cfg.output_dir or DEFAULT_OUTPUTS).expanduser().resolve()


def run_folder_name(run_id: int | None) -> str:
    """run-<Flower's run id>; outside Flower run-<UTC time> (made unique when the folder is made)."""
    return f"run-{run_id}" if run_id is not None else "run-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def resolve_output_dirs(cfg: RunConfig, run_id: int | None) -> tuple[Path, Path]:
    """(this run's folder, the folder of the merged results .pkl): <output-dir>/run-<id> and <output-dir>. A new
    folder for every run, a resumed one too (it never writes into the run it continues). Not made here."""
    parent = output_parent(cfg)
    return parent / run_folder_name(run_id), parent


def run(grid: Grid, run_config: dict[str, Any], run_id: int | None = None) -> None:
    """The ServerApp's work (server_app.py passes Flower's run id, which names the run's output folder)."""
    cfg = RunConfig.from_run_config(run_config)
    rss_at_start = memory_gb("VmRSS")
    random.seed(cfg.seed)  # Flower samples nodes with the `random` module (fraction-train < 1)
    args, state, first_round, history, extras = initial_state(cfg)
    if "random_state" in extras:  # where the uninterrupted run's sampling would be now
        random.setstate(_as_tuples(extras["random_state"]))
    check_config_world_size(args, cfg)
    device = resolve_device(cfg.device)

    # Held-out data, and where the merged weights are evaluated: on the CPU in the evaluated record's own memory
    # (a model on the meta device is assigned the record's read-only views; no float32 copy of the model), on a
    # GPU in a model built there once and loaded from the record each round.
    tokenizer = load_tokenizer(cfg.tokenizer_path or None, cfg.checkpoint_dir or None)
    source = "'checkpoint-dir' (the folder's own tokenizer)" if cfg.checkpoint_dir and not cfg.tokenizer_path \
        else "'tokenizer-path'"
    if tokenizer.n_words > args.vocab_size:
        raise ConfigError(f"config key {source}: the tokenizer ({tokenizer!r}) has {tokenizer.n_words} ids, "
                          f"more than the model's vocab_size {args.vocab_size} (config key 'model' / "
                          f"'checkpoint-dir': {model_name(cfg)})")
    eval_path = cfg.eval_data or str(builtin_corpus_path("eval"))
    data_format = cfg.data_format if cfg.eval_data else "text"  # the built-in corpus is text
    held_out = build_dataset(load_examples(eval_path, data_format), tokenizer, cfg.max_seq_len, pack=cfg.packing)
    log(INFO, "fedtp-flwr: tokenizer %r; held-out %s: %d examples, %d target tokens%s", tokenizer, eval_path,
        held_out.n_examples, held_out.n_target_tokens, " (responses only)" if held_out.masks is not None else "")
    batches = eval_batches(held_out, cfg.max_batch_size, cfg.eval_batches or None)
    eval_model = build_model(args, device=device, seed=None) if device.type != "cpu" else None

    planned_dir, results_dir = resolve_output_dirs(cfg, run_id)
    out_dir = new_run_folder(results_dir, planned_dir.name)
    config = {**cfg.to_dict(), "model-args": json.dumps(args.to_params())}
    outputs = RunOutputs(out_dir, experiment_key(cfg), cfg.world_size, cfg.num_server_rounds, cfg.learning_rate,
                         model_name(cfg), config, cfg.checkpoint_every, cfg.keep_checkpoints, results_dir)
    for stale in outputs.remove_stale_temp_files():
        log(WARNING, "removed %s, a temp file an interrupted run left behind", stale)
    resumed_from = str(Path(cfg.resume_from).expanduser().resolve()) if cfg.resume_from else None
    for line in outputs.start_from(history, resumed_from, first_round - 1 if resumed_from else None):
        log(INFO, "fedtp-flwr: resumed run: %s", line)
    outputs.write_run_record(**{"run-id": run_id, "status": "running", "reason": None, "resumed-from": resumed_from,
                                "experiment-key": list(experiment_key(cfg)), "strategy": cfg.strategy,
                                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": config})
    log(INFO, "fedtp-flwr: %s (%.1fM parameters), world size %d, rounds %d..%d, outputs in %s", model_name(cfg),
        sum(t.numel() for t in state.values()) / 1e6, cfg.world_size, first_round, cfg.num_server_rounds, out_dir)

    def evaluate_fn(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        state = decode(arrays, "float32", dtype=None, copy=False)  # read-only views of the record's bytes
        if eval_model is None:
            model = build_model(args, device="meta", seed=None)
            model.load_state_dict(state, assign=True)  # evaluation only reads the weights
        else:
            model = eval_model
            model.load_state_dict(state)
        res = evaluate(model, batches, precision=cfg.precision)
        del model, state  # nothing keeps the evaluated record alive (a refused merge is released)
        log(INFO, "round %d: held-out loss %.4f, perplexity %.2f (%d tokens)", rnd, res["loss"],
            res["perplexity"], res["num_tokens"])
        return MetricRecord({"loss": res["loss"], "perplexity": res["perplexity"]})

    def record_fn(rnd: int, arrays: ArrayRecord, metrics: MetricRecord, trained: bool) -> None:
        """The round's results; its checkpoint only when the round trained (a refused or skipped round ends with an
        earlier round's model: a checkpoint of it under this round would look like a trained one)."""
        state = decode(arrays, "float32", dtype=None, copy=False) if rnd >= first_round and trained else None
        outputs.record(rnd, metrics["loss"], metrics["perplexity"], state,
                       {"random_state": random.getstate(), "strategy_state": strategy.inner_state()})

    strategy = FederatedTensorParallel(args, cfg, output_dir=out_dir, identify_nodes=True)
    if "strategy_state" in extras:
        strategy.load_inner_state(extras["strategy_state"])
    initial = [encode(state, release=True)]  # from here on the model exists only as the strategy's global record
    del state
    try:
        strategy.start(grid, initial.pop(), num_rounds=cfg.num_server_rounds, timeout=cfg.round_timeout,
                       evaluate_fn=evaluate_fn, record_fn=record_fn, first_round=first_round)
    except BaseException as e:  # a failed run (RunFailed, or anything else) is recorded so, and not merged
        outputs.write_run_record(status="failed", reason=f"{type(e).__name__}: {e}", **_ended(strategy))
        log(WARNING, "%s", strategy.rounds_line())
        raise
    outputs.write_run_record(status="completed", **_ended(strategy))
    log(INFO, "fedtp-flwr: wrote %s, %s and %s; %s", outputs.results_path, outputs.eval_path,
        outputs.checkpoint_path(cfg.num_server_rounds).parent, outputs.publish())
    peak = strategy.memory.overall()
    if peak is not None and rss_at_start is not None:  # bench/server_scaling.py reads this line
        log(INFO, "fedtp-flwr: ServerApp memory: peak RSS %.3f GB, RSS at start %.3f GB", peak, rss_at_start)
    log(INFO, "%s", strategy.rounds_line())  # the ServerApp's last line: what the run trained


def _ended(strategy: FederatedTensorParallel) -> dict:
    """run.json's closing fields."""
    return {"ended": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rounds": strategy.rounds_line()}

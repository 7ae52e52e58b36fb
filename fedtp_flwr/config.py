"""The run configuration: flat kebab-case keys, parsed and checked once into a typed object.

Every key lives in pyproject.toml's [tool.flwr.app.config] with the default below (a test keeps the two
in step). An invalid value stops the run with a message naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

# Each set of choices is declared once, next to the code that implements it, in a module both apps load (the
# server's merge rules are declared here instead, so that the ClientApp never imports the server's code).
from fedtp_flwr.data.files import FORMATS as DATA_FORMATS
from fedtp_flwr.data.partition import SCHEMES
from fedtp_flwr.model.context import CONTEXT_BITS
from fedtp_flwr.training.settings import LR_SCHEDULES, OPTIMIZERS, PARAM_DTYPES, PRECISIONS, SettingError, TrainSettings
from fedtp_flwr.wire import DELTA_GROUP, DOWNLOAD_CODEC_BITS, UPLOAD_CODEC_BITS, WIRE_DTYPES

# Flower strategies the server can wrap (strategy.make_inner_strategy builds each; a test keeps the two equal).
STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "diloco")
# server-learning-rate and server-momentum left at auto (-1): each strategy's own values, measured on the built-in
# corpus with the default model by bench/strategy_defaults.py (bench/results/strategy_defaults.md; of the settings whose
# held-out loss fell every round, the lowest after 3 rounds; tests/test_config.py keeps these equal to its choice).
# FedAvgM's and DiLoCo's lr multiplies the merged update, so it is a plain number. FedOpt's eta is a step per weight
# (m / sqrt(v) is about the sign of the update, whatever its size), so it has to scale with how far the clients move a
# weight: its auto value is ETA_PER_LR x learning-rate (measured at learning-rate 1e-3; a fixed 0.03 at the 3B
# recipes' 1e-5 would move every weight of a pretrained model by ~0.02 in the first round). FedAvg and FedProx have
# no server step, and the FedOpt rules no momentum (their betas are fixed, server/strategy.py).
AUTO = -1
SERVER_LR = {"fedavgm": 1.0, "diloco": 1.0}
ETA_PER_LR = {"fedadam": 30.0, "fedyogi": 30.0, "fedadagrad": 10.0}
SERVER_MOMENTUM = {"fedavgm": 0.9, "diloco": 0.9}
SLICE_MODES = ("independent", "context")
UPLOAD_CODECS = tuple(UPLOAD_CODEC_BITS)  # client/app.py encodes, server/replies.py checks
DOWNLOAD_CODECS = tuple(DOWNLOAD_CODEC_BITS)  # server/strategy.py encodes, client/app.py decodes
# rest-adapter-rank's auto value (bench/adapter_comparison.py ran rank 16 at 10x the learning rate)
AUTO_REST_ADAPTER_RANK = 16
WEIGHTINGS = ("per-rank", "all-clients")  # server/aggregation.py: how a split parameter's replies are weighted
ROBUST_RULES = ("median", "trimmed-mean")  # server/robust.py: coordinate-wise rules within a rank group
MERGE_WEIGHTINGS = ("auto",) + WEIGHTINGS
RANK_MERGES = ("mean",) + ROBUST_RULES


def _defaults_text(*tables: dict, unit: str = "") -> str:
    """A defaults table for a key's help: "fedavgm 1, diloco 1"."""
    return ", ".join(f"{name} {value:g}{unit}" for table in tables for name, value in table.items())


def _key(name: str, default: Any, help: str, choices: tuple = (), minimum: float | None = None,
         exclusive_min: bool = False, train: bool = False, resume_may_differ: bool = False,
         advanced: bool = False) -> Any:
    """A run-config key. Per-key facts live here: `train`, a client's TrainSettings takes the value as it is
    (the field of the same name; TrainSettings' own checks are its rules, run at start by __post_init__, so each
    rule is written once); `resume_may_differ`, a resumed run may change it (every other key changes the math,
    so it must equal the checkpoint's); `advanced`, a key few runs set (defence tuning, memory and traffic
    options a recipe sets, bookkeeping): docs/configuration.md lists it in its second table."""
    meta = dict(key=name, help=help, choices=choices, minimum=minimum, exclusive_min=exclusive_min, train=train,
                resume_may_differ=resume_may_differ, advanced=advanced)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunConfig:
    # -- federation
    num_server_rounds: int = _key("num-server-rounds", 3, "federated rounds", minimum=1, resume_may_differ=True)
    world_size: int = _key("world-size", 2, "tensor-parallel degree W (must divide n_heads and the FFN size, and divide n_kv_heads or be a multiple of it)", minimum=1)
    enable_swapping: bool = _key("enable-swapping", False, "rotate every node's rank by +1 every swap-period rounds", advanced=True)
    swap_period: int = _key("swap-period", 2, "rounds between rank rotations", minimum=1, advanced=True)
    strategy: str = _key("strategy", "fedavg", "the server's rule on the merged model: Flower's class of that name, or diloco, DiLoCo's outer Nesterov SGD on the merged update (server/outer.py)", choices=STRATEGIES)
    proximal_mu: float = _key("proximal-mu", 0.01, "FedProx proximal weight mu", train=True, advanced=True)
    server_learning_rate: float = _key("server-learning-rate", -1.0, "the server's step on the merged update: FedAvgM / DiLoCo (outer) lr, FedAdam / FedYogi / FedAdagrad eta (fedavg, fedprox: none); -1, auto: the strategy's default measured in bench/results/strategy_defaults.md (" + _defaults_text(SERVER_LR) + "; " + _defaults_text(ETA_PER_LR, unit=" x learning-rate") + "; DiLoCo's paper: 0.7)", minimum=-1.0)
    server_momentum: float = _key("server-momentum", -1.0, "FedAvgM momentum, DiLoCo Nesterov momentum (other strategies: none); -1, auto: the strategy's measured default (" + _defaults_text(SERVER_MOMENTUM) + "; DiLoCo's paper: 0.9)", minimum=-1.0)
    fraction_train: float = _key("fraction-train", 1.0, "fraction of connected nodes sampled per round", minimum=0.0, exclusive_min=True)
    min_train_nodes: int = _key("min-train-nodes", 1, "fewest valid replies a round needs; fewer: the run stops as failed (or, with allow-failed-rounds, the round is skipped)", minimum=1)
    allow_failed_rounds: bool = _key("allow-failed-rounds", False, "a round with fewer than min-train-nodes valid replies keeps the global model and the run goes on (false: the run stops and ends as failed)", advanced=True)
    min_available_nodes: int = _key("min-available-nodes", 2, "nodes to wait for before a round starts", minimum=1, resume_may_differ=True)
    round_timeout: float = _key("round-timeout", 3600.0, "seconds to wait for replies in a round", minimum=0.0, exclusive_min=True, resume_may_differ=True)
    round_quorum: float = _key("round-quorum", 1.0, "end a round early once this fraction of its sampled nodes answered and every rank has a valid reply; later replies are dropped (1: wait for every node or round-timeout)", minimum=0.0, exclusive_min=True, advanced=True)
    upload_codec: str = _key("upload-codec", "weights", "what a client uploads of its slice: the trained weights in wire-dtype, or the update (trained - received) as blockwise absmax int8 / int4 with stochastic rounding, " f"{DELTA_GROUP} values per float32 scale (about 1/4 / 1/8 of float32), decoded by the server block by block into the same merge", choices=UPLOAD_CODECS)
    download_codec: str = _key("download-codec", "wire", "how the server sends a client its slice: in wire-dtype, or blockwise absmax int8 / int4 (" f"{DELTA_GROUP} values per float32 scale); the client trains from the dequantized slice and uploads its update, which the server adds to its float32 master (needs an upload-codec delta)", choices=DOWNLOAD_CODECS)
    wire_dtype: str = _key("wire-dtype", "float32", "dtype of slices on the wire", choices=tuple(WIRE_DTYPES))
    slice_mode: str = _key("slice-mode", "independent", "independent sub-models or slices trained in a frozen context", choices=SLICE_MODES)
    context_bits: int = _key("context-bits", 8, "bits of the frozen context in context mode", choices=CONTEXT_BITS)
    context_group_size: int = _key("context-group-size", 64, "columns per absmax scale of the frozen context (0: one scale per row)", minimum=0, advanced=True)
    merge_weighting: str = _key("merge-weighting", "auto", "per-rank or all-clients (auto: per-rank if independent, all-clients if context)", choices=MERGE_WEIGHTINGS, advanced=True)
    rest_adapter_rank: int = _key("rest-adapter-rank", -1, "context mode: rank of a low-rank adapter each client trains over the frozen rest of every split linear of the blocks; the server folds each client's product into every element outside its slice, so every client's update reaches every weight (0: off; -1, auto: 16 in context mode with the all-clients mean, else off)", minimum=-1)
    adapter_lr_factor: float = _key("rest-adapter-lr-factor", 10.0, "learning rate of the rest adapters' factors, as a multiple of learning-rate", minimum=0.0, exclusive_min=True, train=True, advanced=True)
    vocab_parallel: bool = _key("vocab-parallel", False, "context mode: split tok_embeddings and output by vocabulary rows too (W must divide the vocabulary)")
    client_eval: bool = _key("client-eval", False, "each node also evaluates its slice sub-model on its local held-out data", resume_may_differ=True)
    # -- untrusted clients
    max_num_examples: int = _key("max-num-examples", 100_000_000, "largest weight a reply may claim (a training reply's num-examples, a client-eval reply's num-tokens); a reply claiming more is dropped", minimum=1, advanced=True)
    outlier_norm_factor: float = _key("outlier-norm-factor", 10.0, "drop a reply whose update norm (its rank slice, or the replicated layers) exceeds this multiple of the round's median, when >= 3 replies compare (0: off)", minimum=0.0, advanced=True)
    rank_merge: str = _key("rank-merge", "mean", "merge within a rank group and for the replicated layers: num-examples-weighted mean, or unweighted coordinate-wise median / trimmed mean (Flower's FedMedian / FedTrimmedAvg math)", choices=RANK_MERGES, advanced=True)
    trimmed_mean_beta: float = _key("trimmed-mean-beta", 0.2, "rank-merge trimmed-mean: fraction cut from each tail, in [0, 0.5)", minimum=0.0, advanced=True)
    max_loss_increase: float = _key("max-loss-increase", 1.5, "keep the previous model when the merged model's held-out loss is non-finite or above this multiple of the previous round's (0: only non-finite losses are refused)", minimum=0.0, advanced=True)
    spill_dir: str = _key("spill-dir", "", "where the server parks replies that must wait (the outlier check's first two, a robust rank-merge's) instead of holding them in memory; removed at each round's end (empty: the run's output folder /spill)", advanced=True)
    # -- model and data
    model: str = _key("model", "llama3.2-tiny", "model preset (ignored when checkpoint-dir is set)")
    checkpoint_dir: str = _key("checkpoint-dir", "", "Meta (params.json) or Hugging Face (config.json) checkpoint directory")
    tokenizer_path: str = _key("tokenizer-path", "", 'a Hugging Face tokenizer.json, a tiktoken tokenizer.model, or "bytes" (UTF-8 bytes, 260 ids, for small models); empty: the checkpoint-dir folder\'s own tokenizer if it has one, else the Llama 3 one llama-models ships')
    train_data: str = _key("train-data", "", "training .txt/.jsonl file or directory; empty: the built-in corpus")
    eval_data: str = _key("eval-data", "", "held-out .txt/.jsonl file or directory; empty: the built-in corpus")
    data_format: str = _key("data-format", "auto", "records of the .jsonl data: text, alpaca (instruction, input, output) or chat (messages); alpaca and chat are rendered in the tokenizer folder's own chat template (else the Llama 3 chat format) with the loss on the responses only; auto: detected per file", choices=DATA_FORMATS)
    partitioning: str = _key("partitioning", "iid", "how simulation partitions split train-data", choices=SCHEMES, advanced=True)
    packing: bool = _key("packing", True, "pack examples into full max-seq-len sequences (no padding)", advanced=True)
    max_seq_len: int = _key("max-seq-len", 64, "tokens per training sequence", minimum=2)
    eval_batches: int = _key("eval-batches", 8, "held-out batches per evaluation (0: all)", minimum=0)
    # -- local training
    learning_rate: float = _key("learning-rate", 1e-3, "client AdamW learning rate", train=True)
    weight_decay: float = _key("weight-decay", 0.01, "AdamW weight decay (not on norms and embeddings)", train=True)
    batch_size: int = _key("batch-size", 4, "sequences per micro-batch", minimum=1)
    max_batch_size: int = _key("max-batch-size", 8, "sequences per evaluation batch", minimum=1, advanced=True)
    local_steps: int = _key("local-steps", 10, "optimizer steps per client per round", train=True)
    local_epochs: float = _key("local-epochs", 0.0, "passes over the node's data per round; replaces local-steps when > 0", minimum=0.0, advanced=True)
    grad_accum_steps: int = _key("grad-accum-steps", 1, "micro-batches per optimizer step", train=True, advanced=True)
    max_grad_norm: float = _key("max-grad-norm", 1.0, "gradient clipping norm (0: off)", train=True)
    lr_schedule: str = _key("lr-schedule", "constant", "local learning-rate schedule", choices=LR_SCHEDULES, train=True)
    warmup_steps: int = _key("warmup-steps", 0, "linear warmup steps of the local schedule", train=True, advanced=True)
    gradient_checkpointing: bool = _key("gradient-checkpointing", False, "recompute activations in backward", train=True)
    optimizer: str = _key("optimizer", "adamw", "client optimizer: torch AdamW (float32 state), torchao AdamW with 8-bit or 4-bit state", choices=OPTIMIZERS, train=True)
    client_param_dtype: str = _key("client-param-dtype", "float32", "dtype of the client's trainable weights (bfloat16: updated with stochastic rounding, no float32 master copy)", choices=tuple(PARAM_DTYPES), advanced=True)
    optimizer_in_backward: bool = _key("optimizer-in-backward", False, "step each parameter inside backward, holding no gradient buffers (needs max-grad-norm = 0, grad-accum-steps = 1)", train=True, advanced=True)
    loss_chunk_tokens: int = _key("loss-chunk-tokens", 1024, "tokens whose logits are computed at once in training (0: all at once)", train=True, advanced=True)
    device: str = _key("device", "auto", "auto (CUDA when available), cpu, cuda or cuda:N", train=True, resume_may_differ=True)
    precision: str = _key("precision", "auto", "auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16", choices=PRECISIONS, train=True, advanced=True)
    seed: int = _key("seed", 42, "seed for init, data order and sampling", train=True)
    # -- outputs
    output_dir: str = _key("output-dir", "", "the folder of the runs' folders (empty: ./outputs): each run, a resumed one too, writes into a new <output-dir>/run-<run id>/ (run.json, results, eval files, checkpoints); <output-dir>/experiment_results_llama32.pkl merges the completed runs' results, never replacing one", resume_may_differ=True)
    checkpoint_every: int = _key("checkpoint-every", 1, "write a checkpoint every N rounds (the last round always; 0: only the last)", minimum=0, resume_may_differ=True, advanced=True)
    keep_checkpoints: int = _key("keep-checkpoints", 0, "keep only this run's N latest checkpoints, deleting earlier ones (0: keep all)", minimum=0, resume_may_differ=True, advanced=True)
    resume_from: str = _key("resume-from", "", "a checkpoint .pth of this run to continue from (next round)", resume_may_differ=True)

    def __post_init__(self):
        """Checks that involve several keys, and the training keys' rules (TrainSettings'; each other key alone
        is checked by from_run_config)."""
        try:
            self.train_settings()
        except SettingError as e:
            keys = {f.name: f.metadata["key"] for f in fields(self)}
            raise ConfigError(f"config key {keys[e.field]!r}: {e.value!r} is not allowed; it must be "
                              f"{e.rule_with(lambda name: repr(keys.get(name, name)))}") from None
        if self.vocab_parallel and self.slice_mode != "context":
            raise ConfigError('config key \'vocab-parallel\': true needs slice-mode = "context": an independent '
                              "sub-model has no other vocabulary rows to take its softmax over")
        if self.rest_adapter_rank > 0 and not self._adapter_fits:
            raise ConfigError(f"config key 'rest-adapter-rank': {self.rest_adapter_rank} needs slice-mode = \"context\", "
                              "merge-weighting = \"all-clients\" (or \"auto\") and rank-merge = \"mean\": the adapter "
                              "updates the weights outside a client's slice, which only the all-clients mean weighs in "
                              f"(got slice-mode {self.slice_mode!r}, merge-weighting {self.merge_weighting!r}, "
                              f"rank-merge {self.rank_merge!r})")
        if self.upload_codec != "weights" and self.rank_merge != "mean":
            raise ConfigError(f"config key 'upload-codec': {self.upload_codec!r} needs rank-merge = \"mean\" (the robust "
                              f"rules read the replies' rows as weights; got rank-merge {self.rank_merge!r})")
        if self.download_codec != "wire" and self.upload_codec == "weights":
            raise ConfigError(f"config key 'download-codec': {self.download_codec!r} needs upload-codec = \"int8-delta\" or "
                              "\"int4-delta\": a client that starts from a low-bit slice must upload its update (the "
                              "server adds it to its float32 master), not weights the server would average as they are")
        if self.server_learning_rate != AUTO and not self.server_learning_rate > 0:
            raise ConfigError(f"config key 'server-learning-rate': {self.server_learning_rate!r} is not allowed; it "
                              "must be > 0, or -1 (auto: the strategy's measured default)")
        if self.server_momentum != AUTO and not self.server_momentum >= 0:
            raise ConfigError(f"config key 'server-momentum': {self.server_momentum!r} is not allowed; it must be "
                              ">= 0, or -1 (auto: the strategy's measured default)")
        if not self.trimmed_mean_beta < 0.5:
            raise ConfigError(f"config key 'trimmed-mean-beta': {self.trimmed_mean_beta!r} is not allowed; it must be in "
                              "[0, 0.5) (the fraction cut from each tail)")
        if self.round_quorum > 1:
            raise ConfigError(f"config key 'round-quorum': {self.round_quorum!r} is not allowed; it must be in (0, 1] "
                              "(a fraction of the round's sampled nodes)")
        if 0 < self.max_loss_increase < 1:
            raise ConfigError(f"config key 'max-loss-increase': {self.max_loss_increase!r} is not allowed; it must be 0 "
                              "(off) or >= 1 (a factor on the previous round's held-out loss)")

    def train_settings(self, **overrides) -> TrainSettings:
        """The TrainSettings of this run's `train` keys (each is the field of the same name), with `overrides`
        (what only a client knows: its seed, its step count, FedProx's mu from the server)."""
        return TrainSettings(**{**{f.name: getattr(self, f.name) for f in fields(self) if f.metadata["train"]},
                                **overrides})

    @classmethod
    def resume_may_differ(cls) -> set[str]:
        """Keys a resumed run may change (the rest must equal the checkpoint's)."""
        return {k for k, f in cls.keys().items() if f.metadata["resume_may_differ"]}

    @property
    def delta_bits(self) -> int | None:
        """Bits of an uploaded update (upload-codec), or None when the weights travel."""
        return UPLOAD_CODEC_BITS[self.upload_codec]

    @property
    def download_bits(self) -> int | None:
        """Bits of the slice a client is sent (download-codec), or None when it travels in wire-dtype."""
        return DOWNLOAD_CODEC_BITS[self.download_codec]

    @property
    def _adapter_fits(self) -> bool:
        return self.slice_mode == "context" and self.effective_merge_weighting == "all-clients" \
            and self.rank_merge == "mean"

    @property
    def effective_rest_adapter_rank(self) -> int:
        """rest-adapter-rank, with auto (-1) resolved: AUTO_REST_ADAPTER_RANK where the adapter applies, else 0."""
        if self.rest_adapter_rank >= 0:
            return self.rest_adapter_rank
        return AUTO_REST_ADAPTER_RANK if self._adapter_fits else 0

    @property
    def effective_server_learning_rate(self) -> float | None:
        """server-learning-rate with auto (-1) resolved: SERVER_LR, or ETA_PER_LR x learning-rate for the FedOpt rules;
        None for a strategy without a server step (fedavg, fedprox), which ignores the key."""
        if self.strategy not in SERVER_LR and self.strategy not in ETA_PER_LR:
            return None
        if self.server_learning_rate != AUTO:
            return self.server_learning_rate
        return SERVER_LR[self.strategy] if self.strategy in SERVER_LR else ETA_PER_LR[self.strategy] * self.learning_rate

    @property
    def effective_server_momentum(self) -> float | None:
        """server-momentum with auto (-1) resolved to SERVER_MOMENTUM; None for a strategy without server momentum,
        which ignores the key (fedavg, fedprox; fedadam, fedyogi, fedadagrad: their betas are fixed)."""
        if self.strategy not in SERVER_MOMENTUM:
            return None
        return SERVER_MOMENTUM[self.strategy] if self.server_momentum == AUTO else self.server_momentum

    @property
    def effective_merge_weighting(self) -> str:
        if self.merge_weighting != "auto":
            return self.merge_weighting
        return "all-clients" if self.slice_mode == "context" else "per-rank"

    @classmethod
    def keys(cls) -> dict[str, dataclasses.Field]:
        return {f.metadata["key"]: f for f in fields(cls)}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        """Parse Flower's context.run_config (missing keys take their defaults)."""
        known = cls.keys()
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ConfigError("; ".join(unknown_key(k) for k in unknown))
        values = {}
        for key, f in known.items():
            if key in run_config:
                values[f.name] = _coerce(key, run_config[key], type(f.default), f.metadata)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """kebab-case key -> value, as in pyproject.toml (stored in checkpoints and messages)."""
        return {f.metadata["key"]: getattr(self, f.name) for f in fields(self)}


class ConfigError(ValueError):
    pass


def unknown_key(key: str) -> str:
    """What to say about a key that is not the app's: the closest valid key, if one is close."""
    known = list(RunConfig.keys())
    spelled = key.strip().lower().replace("_", "-")  # learning_rate, Learning-Rate: the key in its own spelling
    close = [spelled] if spelled in known else difflib.get_close_matches(spelled, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else "python -m fedtp_flwr.config lists the keys"
    return f"unknown config key {key!r}: {hint}"


def _coerce(key: str, value: Any, kind: type, meta: Mapping[str, Any]) -> Any:
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[kind]
    if not ok:
        raise ConfigError(f"config key {key!r}: expected {kind.__name__}, got {value!r} ({type(value).__name__})")
    value = kind(value)
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(f"config key {key!r}: {value!r} is not allowed; choose one of {list(meta['choices'])}")
    minimum = meta["minimum"]
    if minimum is not None and (value < minimum or (meta["exclusive_min"] and value == minimum)):
        bound = f"> {minimum}" if meta["exclusive_min"] else f">= {minimum}"
        raise ConfigError(f"config key {key!r}: {value!r} is not allowed; it must be {bound}")
    return value


def markdown_table(advanced: bool = False) -> str:
    """One of the two key tables of docs/configuration.md (python -m fedtp_flwr.config): the keys most runs set, or
    with `advanced` the others."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, f in RunConfig.keys().items():
        if f.metadata["advanced"] != advanced:
            continue
        d = f.default
        shown = ("true" if d else "false") if isinstance(d, bool) else (f'"{d}"' if isinstance(d, str) else repr(d))
        allowed = f" ({', '.join(map(str, f.metadata['choices']))})" if f.metadata["choices"] else ""
        rows.append(f"| `{key}` | `{shown}` | {f.metadata['help']}{allowed} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table(), markdown_table(advanced=True), sep="\n\n")

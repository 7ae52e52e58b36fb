"""Export a run checkpoint to Hugging Face or Meta format.

    python -m fedtp_flwr.tools.export outputs/checkpoints/llama32_tiny_ws2_lr0.001_round3.pth out/hf --format hf
    python -m fedtp_flwr.tools.export <checkpoint.pth> out/meta --format meta
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


from fedtp_flwr.data import load_tokenizer
from fedtp_flwr.model import ModelArgs
from fedtp_flwr.model.checkpoint import export_hf, save_meta_checkpoint
from fedtp_flwr.server.outputs import load_run_checkpoint
from fedtp_flwr.wire import WIRE_DTYPES

DTYPES = WIRE_DTYPES  # the float dtypes this project reads and writes


def export_run_checkpoint(path: str | Path, out_dir: str | Path, fmt: str = "hf", dtype: str = "bfloat16") -> Path:
    ckpt = load_run_checkpoint(path)
    args = ModelArgs.from_params(json.loads(ckpt["config"]["model-args"]))
    state = {k: v.to(DTYPES[dtype]) for k, v in ckpt["model_state_dict"].items()}
    if fmt == "hf":
        return export_hf(state, args, out_dir, tokenizer=run_tokenizer(ckpt["config"], args.vocab_size))
    return save_meta_checkpoint(state, args, out_dir)


def run_tokenizer(config: dict, vocab_size: int):
    """The run's tokenizer (its tokenizer-path / checkpoint-dir), to export beside the weights; None when it
    cannot be read here or does not fit the model (the export then has weights and config only)."""
    try:
        tokenizer = load_tokenizer(config.get("tokenizer-path") or None, config.get("checkpoint-dir") or None)
    except (OSError, ValueError) as e:
        print(f"note: the run's tokenizer was not exported ({e})")
        return None
    return tokenizer if tokenizer.n_words <= vocab_size else None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a .pth written by a fedtp-flwr run")
    p.add_argument("out_dir")
    p.add_argument("--format", choices=("hf", "meta"), default="hf")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    a = p.parse_args(argv)
    out = export_run_checkpoint(a.checkpoint, a.out_dir, a.format, a.dtype)
    print(f"wrote {a.format} checkpoint to {out}")


if __name__ == "__main__":
    main()

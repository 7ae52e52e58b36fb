"""Turn a GGUF Llama file into a Hugging Face folder the app fine-tunes (run config `checkpoint-dir`).

    pip install -e ".[gguf]"        # transformers and gguf: only this command needs them
    python -m fedtp_flwr.tools.gguf_to_hf path/to/model.gguf path/to/out-folder

transformers reads the file (`from_pretrained(..., gguf_file=...)`: model and tokenizer) and dequantizes
every weight; this writes them in float32 as model.safetensors (tied embeddings stored once), with
config.json, generation_config.json and the tokenizer (tokenizer.json, tokenizer_config.json and the chat
template the file carries, in chat_template.jinja or tokenizer_config.json). The weights are the GGUF's
dequantized values: as good as the quantized file, not as the model it was quantized from.

Only Llama-architecture files that this app's model can represent are converted (`args_from_hf_config`
is checked before the weights are read); the output folder must not exist or be empty.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fedtp_flwr.model.checkpoint import HF_WEIGHTS, CheckpointError, args_from_hf_config
from fedtp_flwr.model.sharding import valid_world_sizes

GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file


class ConversionError(ValueError):
    """A GGUF file this command cannot convert, or an output folder it will not write into."""


def _check_paths(gguf_file: Path, out_dir: Path) -> None:
    if not gguf_file.is_file():
        raise ConversionError(f"{gguf_file}: no such file")
    with open(gguf_file, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ConversionError(f"{gguf_file}: not a GGUF file (it does not start with {GGUF_MAGIC!r})")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConversionError(f"{out_dir}: already exists and is not an empty folder; name a new one")


def _load_kwargs() -> dict:
    """Ask for a dense, dequantized model. transformers 5 may otherwise keep the weights packed in GGUF blocks
    (when the `kernels` package is installed); 4.x always dequantizes and has no GgufConfig."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def convert(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Write the Hugging Face folder of `gguf_file` into `out_dir` (see the module docstring)."""
    try:
        from safetensors.torch import save_file
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ConversionError(f"converting a GGUF file needs transformers and gguf ({e}): "
                              f'pip install "fedtp-flwr[gguf]"') from None
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    _check_paths(gguf_file, out_dir)
    folder, name = str(gguf_file.parent.resolve()), gguf_file.name

    # 1. The architecture, from the file's metadata: refuse what the app cannot train before dequantizing.
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except (ValueError, KeyError) as e:  # transformers' error for an architecture it cannot read from GGUF
        raise ConversionError(f"{gguf_file}: transformers cannot read its architecture ({e})") from None
    if config.model_type != "llama":
        raise ConversionError(f"{gguf_file}: architecture {config.model_type!r} is not Llama "
                              "(this app fine-tunes Llama-architecture models only)")
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    try:
        args_from_hf_config(config_dict, str(gguf_file))
    except CheckpointError as e:
        raise ConversionError(str(e)) from None

    # 2. Model and tokenizer, as transformers reads them (each reads the file's metadata again; passing the config
    # saves the model a third read).
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, local_files_only=True,
                                                 **_load_kwargs())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)

    # 3. Write the folder. save_pretrained refuses a model loaded through the GGUF quantizer, so the weights go
    # through safetensors and the config is rebuilt without its quantization_config.
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as model.embed_tokens.weight
    save_file(state, str(out_dir / HF_WEIGHTS), metadata={"format": "pt"})
    clean = type(config).from_dict(config_dict)
    clean.architectures = ["LlamaForCausalLM"]
    clean.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def summary(out_dir: Path) -> str:
    """One line on what the folder holds: the shapes a run config needs (world sizes) and its chat template."""
    import json

    from fedtp_flwr.data.tokenizer import load_tokenizer

    config = json.loads((out_dir / "config.json").read_text())
    args = args_from_hf_config(config)
    tokenizer = load_tokenizer(None, out_dir)
    template = "its own" if getattr(tokenizer, "chat_template", None) else "none (chat data: Llama 3's format)"
    return (f"dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads / {args.n_kv_heads} kv heads, "
            f"vocab {args.vocab_size}, tied embeddings {bool(config.get('tie_word_embeddings'))}; "
            f"world-size in {valid_world_sizes(args)}; chat template: {template}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gguf_file", help="a .gguf file of a Llama-architecture model")
    p.add_argument("out_dir", help="a new (or empty) folder for the Hugging Face files")
    a = p.parse_args(argv)
    start = time.perf_counter()
    try:
        out = convert(a.gguf_file, a.out_dir)
    except ConversionError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s: {summary(out)}")
    print(f"fine-tune it with: flwr run . --stream --run-config 'checkpoint-dir=\"{out.resolve()}\" world-size=W'")


if __name__ == "__main__":
    main()

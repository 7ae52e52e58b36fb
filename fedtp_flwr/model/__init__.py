"""The model and how it is cut, used by both apps.

    transformer.py  ModelArgs (Meta's params.json keys), Transformer, presets
    sharding.py     the tensor-parallel plan: shard_args, shard, the shapes of a slice
    quant.py        absmax int8 / int4 / bf16 tensors (the frozen rest of context mode)
    rows.py         cutting a tensor into blocks of whole rows (every blocked pass, server and client)
    context.py      context mode: a slice trained inside a frozen low-bit copy of the rest
    checkpoint.py   Meta and Hugging Face checkpoints: load, check, convert, export
"""

from .transformer import ModelArgs, Transformer, build_model, count_parameters, ffn_hidden_dim, preset_args

__all__ = ["ModelArgs", "Transformer", "build_model", "count_parameters", "ffn_hidden_dim", "preset_args"]

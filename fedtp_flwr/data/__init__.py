"""Data for federated fine-tuning: tokenizer, text files, token batches, loss, client partitions.

    examples = load_examples(builtin_corpus_path("train"))           # or a .txt / .jsonl path
    # instruction / chat JSONL: load_examples(path, "auto") -> Chat records, loss on the responses only
    mine = partition_examples(examples, partition_id, num_partitions, seed=seed, scheme="by-source")
    dataset = build_dataset(mine, Tokenizer(), max_seq_len=512, pack=True)
    for inputs, targets in itertools.islice(iterate_batches(dataset, batch_size, seed), steps):
        sum_nll, n_tokens = token_loss(model(inputs), targets)
"""

from .batches import Batch, TokenDataset, build_dataset, collate, eval_batches, iterate_batches
from .chat import Chat, encode_chat, encode_prompt
from .corpus import builtin_corpus_path
from .errors import DataError
from .files import FORMATS, Example, load_examples
from .loss import IGNORE_INDEX, perplexity, token_loss
from .partition import partition_examples
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "Batch",
    "ByteTokenizer",
    "Chat",
    "DataError",
    "Example",
    "HFTokenizer",
    "TokenDataset",
    "Tokenizer",
    "build_dataset",
    "builtin_corpus_path",
    "collate",
    "encode_chat",
    "encode_prompt",
    "eval_batches",
    "iterate_batches",
    "load_examples",
    "load_tokenizer",
    "partition_examples",
    "perplexity",
    "token_loss",
]

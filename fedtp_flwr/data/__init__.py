"""Data for federated fine-tuning: tokenizer, text files, token batches, loss, client partitions.

    examples = load_examples(builtin_corpus_path("train"))           # or a .txt / .jsonl path
    mine = partition_examples(examples, partition_id, num_partitions, seed=seed, scheme="by-source")
    dataset = build_dataset(mine, Tokenizer(), max_seq_len=512, pack=True)
    for inputs, targets in itertools.islice(iterate_batches(dataset, batch_size, seed), steps):
        sum_nll, n_tokens = token_loss(model(inputs), targets)
"""

from .batches import Batch, TokenDataset, build_dataset, collate, eval_batches, iterate_batches
from .corpus import builtin_corpus_path
from .errors import DataError
from .files import Example, load_examples
from .loss import IGNORE_INDEX, perplexity, token_loss
from .partition import partition_examples
from .tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "ByteTokenizer",
    "DataError",
    "Example",
    "TokenDataset",
    "Tokenizer",
    "build_dataset",
    "builtin_corpus_path",
    "collate",
    "eval_batches",
    "iterate_batches",
    "load_examples",
    "load_tokenizer",
    "partition_examples",
    "perplexity",
    "token_loss",
]

"""Data pipeline: sentencepiece tokenizer, Megatron's indexed dataset (.bin/.idx), GPT datasets,
blends and the pretraining sampler. See docs/data.md."""
from .blended import BlendedDataset
from .builders import build_gpt_datasets, parse_data_path, parse_split
from .gpt_dataset import GPTDataset
from .indexed_dataset import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter, optimal_dtype
from .sampler import PretrainingSampler, build_pretraining_data_loader
from .tokenizer import SentencePieceTokenizer

__all__ = [
    "BlendedDataset", "GPTDataset", "IndexedDataset", "IndexedDatasetError", "IndexedDatasetWriter",
    "PretrainingSampler", "SentencePieceTokenizer", "build_gpt_datasets", "build_pretraining_data_loader",
    "optimal_dtype", "parse_data_path", "parse_split",
]

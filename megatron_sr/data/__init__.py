"""Data pipeline: Megatron's tokenizer types (sentencepiece, GPT-2 BPE, Hugging Face, null), Megatron's
indexed dataset (.bin/.idx), GPT datasets, blends and the pretraining sampler. See docs/data.md.

Names are imported on first use, so the tools (which need neither torch nor the GPT dataset) start fast.
"""
import importlib

_EXPORTS = {
    "SentencePieceTokenizer": "tokenizer",
    "build_tokenizer": "tokenizers", "Tokenizer": "tokenizers", "GPT2BPETokenizer": "tokenizers",
    "HuggingFaceTokenizer": "tokenizers", "NullTokenizer": "tokenizers",
    "IndexedDataset": "indexed_dataset", "IndexedDatasetError": "indexed_dataset",
    "IndexedDatasetWriter": "indexed_dataset", "optimal_dtype": "indexed_dataset",
    "GPTDataset": "gpt_dataset", "BlendedDataset": "blended",
    "build_gpt_datasets": "builders", "parse_data_path": "builders", "parse_split": "builders",
    "PretrainingSampler": "sampler", "build_pretraining_data_loader": "sampler",
    "DataInputError": "corpus",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))

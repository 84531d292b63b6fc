"""Interoperability with Megatron-LM's own code (megatron-core, installed by requirements-dev.txt): its reader
and writer of .bin/.idx, and its GPTDataset / BlendedDataset sample order. Skips where megatron.core is not
importable (it is a dev dependency, not a runtime one); tests/test_data_megatron_order.py checks the order
without it."""
import warnings

import numpy as np
import pytest
from data_helpers import write_synthetic

from megatron_sr.data import IndexedDataset

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset")


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_reads_ours_and_writes_the_same_bytes(tmp_path, dtype):
    import torch
    docs = write_synthetic(str(tmp_path / "ours"), [5, 0, 17, 1, 300, 2], dtype=dtype)
    theirs = mcore.IndexedDataset(str(tmp_path / "ours"))
    assert len(theirs) == len(docs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(theirs[i], d)
    builder = mcore.IndexedDatasetBuilder(str(tmp_path / "mc.bin"), dtype=dtype)
    for d in docs:
        builder.add_document(torch.tensor(d), [len(d)])
    builder.finalize(str(tmp_path / "mc.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"mc{ext}").read_bytes() == (tmp_path / f"ours{ext}").read_bytes()
    ours = IndexedDataset(str(tmp_path / "mc"))
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ours[i], d)


# ---- Megatron's sample order: our datasets against megatron-core's, built as pretrain_gpt.py builds them ----

class _FakeTokenizer:
    """What GPTDatasetConfig reads of a tokenizer: no vocabulary size (the .idx gives the dtype), an eod id,
    no pad id (so megatron-core pads with -1 and never rewrites a token), and its identity for the cache key."""
    vocab_size = None
    eod = 0
    unique_identifiers = {"class": "FakeTokenizer"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(11)
    lengths = {"a": rng.integers(1, 60, size=2000), "b": rng.integers(1, 90, size=1200),
               "c": rng.integers(1, 30, size=1500)}
    lengths["a"][:1900:97] = 0  # empty documents in the train range (a split with no tokens would hang Megatron)
    for seed, (name, n) in enumerate(lengths.items()):
        write_synthetic(str(root / name), n, seed=seed)
    return root


def _train_samples_per_epoch(prefix: str, split: str, seq_length: int) -> int:
    from megatron_sr.data.builders import parse_split
    from megatron_sr.data.megatron_order import samples_in, split_boundaries
    lengths = IndexedDataset(prefix).sequence_lengths
    bounds = split_boundaries(parse_split(split), len(lengths))
    return samples_in(int(lengths[bounds[0]:bounds[1]].sum()), seq_length)


def _megatron_datasets(blend, split, seq_length, seed, sizes, cache):
    """pretrain_gpt.py's train_valid_test_datasets_provider, less the attention masks (which change no token)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    config = GPTDatasetConfig(random_seed=seed, sequence_length=seq_length, blend=blend, split=split,
                              tokenizer=_FakeTokenizer(), reset_position_ids=False, reset_attention_mask=False,
                              eod_mask_loss=False, create_attention_mask=False, path_to_cache=cache,
                              mmap_bin_files=True)
    return BlendedMegatronDatasetBuilder(GPTDataset, list(sizes), lambda: True, config).build()


def _assert_same_indices(ours, theirs):
    from megatron.core.datasets.blended_dataset import BlendedDataset
    if isinstance(theirs, BlendedDataset):
        for name in ("dataset_index", "dataset_sample_index"):
            a, b = getattr(ours, name), getattr(theirs, name)
            assert a.dtype == b.dtype and np.array_equal(a, b), name
        assert len(ours.datasets) == len(theirs.datasets)
        for part_ours, part_theirs in zip(ours.datasets, theirs.datasets):
            _assert_same_indices(part_ours, part_theirs)
        return
    for name in ("document_index", "sample_index", "shuffle_index"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name


FIRST_N = 2000

# (data path with A, B, C for the prefixes, split, sequence length, seed, train samples as a function of the
# train split's samples per epoch P, valid, test)
ORDER_CASES = {
    "one-epoch": (["A"], "969,30,1", 16, 1234, lambda p: p // 3, 80, 10),
    "seq127-final-epoch-separate": (["A"], "98,2,0", 127, 7, lambda p: 2 * p + p // 5, 30, 0),
    # just above and just below the 80% threshold of the final epoch
    "final-epoch-shuffled-with-the-rest": (["A"], "1,0,0", 16, 7, lambda p: 2 * p + 85 * p // 100, 0, 0),
    "final-epoch-separate": (["A"], "1,0,0", 16, 1234, lambda p: 2 * p + 75 * p // 100, 0, 0),
    "blend-of-two": (["0.7", "A", "0.3", "B"], "969,30,1", 16, 1234, lambda p: 3000, 100, 10),
    "blend-of-three": (["5", "A", "2", "B", "3", "C"], "98,2,0", 127, 7, lambda p: 1500, 40, 0),
    "blend-without-weights": (["A", "B"], "969,30,1", 16, 7, lambda p: 2000, 50, 5),
    "one-weighted-prefix": (["1", "A"], "969,30,1", 127, 1234, lambda p: 2 * p + p // 2, 20, 3),
}


@pytest.mark.parametrize("case", list(ORDER_CASES))
def test_samples_are_megatron_cores(corpus, tmp_path, monkeypatch, case):
    import torch
    from megatron.core.datasets.utils import get_blend_from_list

    from megatron_sr.data import build_gpt_datasets
    from megatron_sr.data.megatron_order import samples_before_separate_final_epoch
    # megatron-core's BlendedDataset asks torch.distributed for the rank when it caches; pretrain_gpt.py builds
    # the datasets on rank 0, which is what this stands for
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *args, **kwargs: 0)
    data_path, split, seq_length, seed, train, valid, test = ORDER_CASES[case]
    data_path = [str(corpus / x.lower()) if x in "ABC" else x for x in data_path]
    sizes = (train(_train_samples_per_epoch(str(corpus / "a"), split, seq_length)), valid, test)
    ours = build_gpt_datasets(data_path, split, seq_length, seed, sizes, cache_dir=str(tmp_path / "ours"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _megatron_datasets(get_blend_from_list(data_path), split, seq_length, seed, sizes,
                                    str(tmp_path / "theirs"))
    if case.startswith(("final-epoch", "seq127-final")):  # the case tests the branch its name says
        d = ours[0]
        before = samples_before_separate_final_epoch(int(d.indexed.sequence_lengths[d.documents].sum()),
                                                     seq_length, len(d.document_index) // len(d.documents),
                                                     sizes[0])
        assert (before is not None) == case.endswith("separate")
    for name, n, a, b in zip(("train", "valid", "test"), sizes, ours, theirs):
        if n == 0:  # megatron-core builds one epoch where 0 samples are asked for; we build nothing
            assert a is None
            continue
        assert b is not None and a is not None and len(a) == len(b), name
        _assert_same_indices(a, b)
        for k in range(min(len(a), FIRST_N)):
            theirs_k = b[k]
            expected = torch.cat([theirs_k["tokens"], theirs_k["labels"][-1:]])
            assert torch.equal(a[k]["tokens"], expected), (name, k)

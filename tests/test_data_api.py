"""The data package's public API: tokenizer, indexed dataset, GPT dataset, splits, blends, sampler."""
import numpy as np
import pytest
import torch
from data_helpers import small_tokenizer_model, write_synthetic

from megatron_sr.data import IndexedDataset, SentencePieceTokenizer, build_gpt_datasets, build_pretraining_data_loader
from megatron_sr.data.blended import build_blending_indices
from megatron_sr.data.builders import parse_data_path, parse_split, split_boundaries


@pytest.fixture(scope="module")
def tokenizer():
    return SentencePieceTokenizer(small_tokenizer_model())


@pytest.mark.parametrize("text", [
    "", "\n", " hello  world \n\n\tx\r\n", "  leading", "trailing  \r\n", "é ü 漢字 \x00\x01",
    "marker \u2581 in ▁▁text▁", "a\u2028b\x0c\x1b[0m",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
])
def test_tokenizer_round_trip_exact(tokenizer, text):
    ids = tokenizer.tokenize(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.detokenize(ids) == text


def test_tokenizer_special_ids(tokenizer):
    assert tokenizer.vocab_size == 1000
    assert tokenizer.eod_id == 2 and tokenizer.pad_id == 3
    assert tokenizer.id_to_piece(tokenizer.eod_id) == "<eod>"
    assert tokenizer.eod_id not in tokenizer.tokenize("<eod> <pad> text")
    assert tokenizer.detokenize(tokenizer.tokenize("ab") + [tokenizer.eod_id]) == "ab"


def test_indexed_dataset_read_back(tmp_path):
    docs = write_synthetic(str(tmp_path / "d"), [5, 0, 17, 1, 300])
    ds = IndexedDataset(str(tmp_path / "d"))
    assert len(ds) == 5 and ds.dtype == np.uint16
    assert list(ds.sequence_lengths) == [5, 0, 17, 1, 300]
    assert list(ds.document_indices) == [0, 1, 2, 3, 4, 5]
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    np.testing.assert_array_equal(ds.get(4, offset=10, length=7), docs[4][10:17])
    np.testing.assert_array_equal(ds.get(2, offset=3), docs[2][3:])
    with pytest.raises(IndexError):
        ds.get(0, offset=3, length=5)
    with pytest.raises(IndexError):
        ds[5]


def _stream(ds):
    """The token stream of a GPT dataset's document index."""
    return np.concatenate([ds.indexed[int(d)] for d in ds.document_index]).astype(np.int64)


def test_gpt_samples_are_consecutive_windows_of_the_shuffled_stream(tmp_path):
    rng = np.random.default_rng(1)
    write_synthetic(str(tmp_path / "d"), rng.integers(0, 40, size=50))
    train, valid, test = build_gpt_datasets([str(tmp_path / "d")], "1,0,0", seq_length=16, seed=7,
                                            num_samples=(200, 0, 0))
    assert valid is None and test is None
    assert len(train) >= 200
    stream = _stream(train)
    # Megatron shuffles all epochs together (the last one apart when it is separate): every document
    # appears once per epoch over the whole index, not within each block of 50
    epochs = len(train.document_index) // 50
    assert epochs > 1 and np.array_equal(np.bincount(train.document_index, minlength=50), np.full(50, epochs))
    assert sorted(train.shuffle_index) == list(range(len(train)))
    for i in range(len(train)):
        item = train[i]["tokens"]
        assert item.dtype == torch.int64 and item.shape == (17,)
        j = int(train.shuffle_index[i])
        np.testing.assert_array_equal(item.numpy(), stream[j * 16: j * 16 + 17])


def test_gpt_datasets_deterministic_and_seeded(tmp_path):
    write_synthetic(str(tmp_path / "d"), [30] * 40)
    a = build_gpt_datasets([str(tmp_path / "d")], "969,30,1", 8, 3, (50, 5, 0))
    b = build_gpt_datasets([str(tmp_path / "d")], "969,30,1", 8, 3, (50, 5, 0))
    c = build_gpt_datasets([str(tmp_path / "d")], "969,30,1", 8, 4, (50, 5, 0))
    assert a[2] is None  # test asked for 0 samples
    for i in range(50):
        assert torch.equal(a[0][i]["tokens"], b[0][i]["tokens"])
    assert any(not torch.equal(a[0][i]["tokens"], c[0][i]["tokens"]) for i in range(50))
    assert len(a[1]) >= 5


def test_split_boundaries():
    assert split_boundaries(parse_split("969,30,1"), 1000) == [0, 969, 999, 1000]
    assert split_boundaries(parse_split("98,2"), 10) == [0, 10, 10, 10]
    assert split_boundaries(parse_split("1,1,1"), 10)[-1] == 10
    with pytest.raises(ValueError, match="--split"):
        parse_split("a,b")


def test_split_with_no_documents_gives_none(tmp_path):
    write_synthetic(str(tmp_path / "d"), [30] * 10)
    train, valid, test = build_gpt_datasets([str(tmp_path / "d")], "98,2,0", 8, 0, (10, 10, 10))
    assert train is not None and valid is None and test is None


def test_parse_data_path():
    assert parse_data_path(["P"]) == (["P"], None)
    assert parse_data_path("0.5 A 0.5 B") == (["A", "B"], [0.5, 0.5])
    assert parse_data_path(["0.7", "A", "0.3", "B"]) == (["A", "B"], [0.7, 0.3])
    with pytest.raises(ValueError, match="--data-path"):
        parse_data_path(["0.7", "A", "B"])


def test_blending_indices_track_weights():
    w = np.array([0.7, 0.2, 0.1])
    ds, ks = build_blending_indices(w, 10000)
    counts = np.zeros(3)
    for n in (1, 10, 999, 10000):
        counts = np.bincount(ds[:n], minlength=3)
        assert np.all(np.abs(counts - w * n) <= 1.0 + 1e-9)
    for d in range(3):  # each dataset's samples are taken in order 0, 1, 2, ...
        assert list(ks[ds == d]) == list(range(int((ds == d).sum())))


def test_blend_reads_from_its_parts(tmp_path):
    write_synthetic(str(tmp_path / "a"), [20] * 30, vocab=100)            # tokens < 100
    docs_b = write_synthetic(str(tmp_path / "b"), [20] * 30, vocab=100, seed=1)
    # make b distinguishable: shift its ids into [500, 600)
    from megatron_sr.data import IndexedDatasetWriter
    with IndexedDatasetWriter(str(tmp_path / "b"), np.uint16) as wr:
        for d in docs_b:
            wr.add_document(d + 500)
    train, _, _ = build_gpt_datasets(["0.75", str(tmp_path / "a"), "0.25", str(tmp_path / "b")], "1,0,0",
                                     seq_length=10, seed=0, num_samples=(400, 0, 0))
    assert len(train) == 400
    from_b = [bool(train[i]["tokens"].min() >= 500) for i in range(400)]
    from_a = [bool(train[i]["tokens"].max() < 100) for i in range(400)]
    assert all(a != b for a, b in zip(from_a, from_b))
    assert abs(sum(from_b) - 100) <= 1


def test_index_cache_reused_and_keyed(tmp_path):
    write_synthetic(str(tmp_path / "d"), [25] * 20)
    cache = tmp_path / "cache"
    a, _, _ = build_gpt_datasets([str(tmp_path / "d")], "1", 8, 0, (30, 0, 0), cache_dir=str(cache))
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 4 and not any(".tmp" in f for f in files)
    b, _, _ = build_gpt_datasets([str(tmp_path / "d")], "1", 8, 0, (30, 0, 0), cache_dir=str(cache))
    assert isinstance(b.shuffle_index, np.memmap)  # loaded, not rebuilt
    np.testing.assert_array_equal(a.sample_index, b.sample_index)
    build_gpt_datasets([str(tmp_path / "d")], "1", 9, 0, (30, 0, 0), cache_dir=str(cache))
    build_gpt_datasets([str(tmp_path / "d")], "1", 8, 1, (30, 0, 0), cache_dir=str(cache))
    assert len(list(cache.iterdir())) == 12
    write_synthetic(str(tmp_path / "d"), [25] * 19 + [26])  # data changed: new key
    build_gpt_datasets([str(tmp_path / "d")], "1", 8, 0, (30, 0, 0), cache_dir=str(cache))
    assert len(list(cache.iterdir())) == 16


class _Range(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"tokens": torch.full((3,), i, dtype=torch.long)}


def _ids(loader):
    return [batch["tokens"][:, 0].tolist() for batch in loader]


def test_sampler_cuts_global_batches_over_ranks():
    ds = _Range(50)
    r0 = _ids(build_pretraining_data_loader(ds, 0, 2, 0, 3))
    r1 = _ids(build_pretraining_data_loader(ds, 0, 2, 1, 3))
    r2 = _ids(build_pretraining_data_loader(ds, 0, 2, 2, 3))
    assert r0[:2] == [[0, 1], [6, 7]] and r1[:2] == [[2, 3], [8, 9]] and r2[:2] == [[4, 5], [10, 11]]
    assert len(r0) == len(r1) == len(r2) == 8  # 48 of 50 samples: the incomplete group is dropped
    batch = next(iter(build_pretraining_data_loader(ds, 0, 2, 0, 3)))
    assert batch["tokens"].shape == (2, 3) and batch["tokens"].dtype == torch.int64


def test_sampler_resumes_from_consumed_samples():
    ds = _Range(100)
    full = _ids(build_pretraining_data_loader(ds, 0, 4, 1, 2))
    resumed = _ids(build_pretraining_data_loader(ds, 5 * 8, 4, 1, 2))
    assert resumed == full[5:]
    assert build_pretraining_data_loader(None, 0, 1, 0, 1) is None


def test_indexed_dataset_pickles_by_path(tmp_path):
    import pickle
    write_synthetic(str(tmp_path / "d"), [1000] * 50)
    ds = IndexedDataset(str(tmp_path / "d"))
    blob = pickle.dumps(ds)
    assert len(blob) < 1000  # not the 100 kB of tokens
    np.testing.assert_array_equal(pickle.loads(blob)[7], ds[7])


def test_loader_over_gpt_dataset_with_workers_and_resume(tmp_path):
    write_synthetic(str(tmp_path / "d"), np.random.default_rng(0).integers(1, 60, size=80))
    train, _, _ = build_gpt_datasets([str(tmp_path / "d")], "1", 12, 5, (64, 0, 0))
    expected = torch.stack([train[i]["tokens"] for i in range(len(train))])
    # dp=2, mbs=3: rank r gets samples [6k + 3r, 6k + 3r + 3) of each step k
    for rank in (0, 1):
        batches = list(build_pretraining_data_loader(train, 0, 3, rank, 2, num_workers=2))
        assert all(b["tokens"].shape == (3, 13) for b in batches)
        for k, b in enumerate(batches):
            assert torch.equal(b["tokens"], expected[6 * k + 3 * rank: 6 * k + 3 * rank + 3])
        resumed = list(build_pretraining_data_loader(train, 4 * 6, 3, rank, 2))
        assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(resumed, batches[4:], strict=True))


def test_blend_without_weights_weighs_by_samples_of_one_epoch(tmp_path):
    write_synthetic(str(tmp_path / "a"), [30] * 30)   # 900 tokens: (900 - 1) // 8 = 112 samples in one epoch
    write_synthetic(str(tmp_path / "b"), [30] * 10)   # 300 tokens: 37 samples
    train, _, _ = build_gpt_datasets([str(tmp_path / "a"), str(tmp_path / "b")], "1", 8, 0, (100, 0, 0))
    assert [len(d) for d in train.datasets] == [112, 37] and len(train) == 100
    assert np.allclose(train.weights, [112 / 149, 37 / 149])
    assert abs(int((train.dataset_index == 1).sum()) - 100 * 37 / 149) <= 1
    with pytest.raises(ValueError, match="holds 149 samples, fewer than the 200 asked for"):
        build_gpt_datasets([str(tmp_path / "a"), str(tmp_path / "b")], "1", 8, 0, (200, 0, 0))

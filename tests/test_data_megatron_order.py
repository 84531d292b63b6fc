"""megatron-core's sample order, checked without megatron-core: closed-form values on tiny corpora and an
independent token walk (tests/test_data_megatron_interop.py compares with megatron-core itself)."""
import numpy as np
import pytest
from data_helpers import write_synthetic

from megatron_sr.data import build_gpt_datasets
from megatron_sr.data import megatron_order as mo
from megatron_sr.data.builders import parse_split


def token_walk_sample_index(lengths_in_order, seq_length):
    """Sample starts found by walking the documents token by token (the helper's loop, written from its
    description): each sample takes seq_length + 1 tokens and the next one starts on its last token."""
    total = int(sum(lengths_in_order))
    rows = [(0, 0)]
    pos, offset = 0, 0
    for _ in range((total - 1) // seq_length):
        need = seq_length  # tokens to move forward to reach the next sample's first token
        while True:
            left = lengths_in_order[pos] - offset  # tokens from here to the end of this document
            if need < left:
                offset += need
                break
            need -= left
            pos, offset = pos + 1, 0
        rows.append((pos, offset))
    return np.array(rows)


def test_sample_index_closed_form():
    # documents in document-index order: lengths 3, 0, 5, 2 | 3, 0, 5, 2 (two epochs, 20 tokens)
    lengths = np.array([3, 0, 5, 2], dtype=np.int32)
    doc_index = np.array([0, 1, 2, 3, 0, 1, 2, 3], dtype=np.int32)
    index = mo.build_sample_index(lengths, doc_index, 4, 20)
    # token 4 is offset 1 of document index position 2 (the empty document is stepped over), token 8 is the
    # first of position 3, 12 is offset 2 of position 4, 16 is offset 3 of position 6; (20 - 1) // 4 = 4 samples
    assert index.tolist() == [[0, 0], [2, 1], [3, 0], [4, 2], [6, 3]]
    assert index.dtype == np.int32
    # a sample ending on a document's last token: the next one starts on that token
    assert mo.build_sample_index(np.array([5, 4], dtype=np.int32), np.array([0, 1], np.int32), 4, 9).tolist() == [
        [0, 0], [0, 4], [1, 3]]
    # row 0 is (0, 0) even when the first document is empty
    assert mo.build_sample_index(np.array([0, 9], dtype=np.int32), np.array([0, 1], np.int32), 4, 9)[0].tolist() == [
        0, 0]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("seq_length", [1, 5, 17, 50])  # 50: fewer samples than documents / 4 (searched for)
def test_sample_index_matches_a_token_walk(seed, seq_length):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 12, size=40).astype(np.int32)
    lengths[-1] = 3
    doc_index = rng.permutation(np.tile(np.arange(40, dtype=np.int32), 3))
    total = 3 * int(lengths.sum())
    ours = mo.build_sample_index(lengths, doc_index, seq_length, total)
    walk = token_walk_sample_index([int(lengths[d]) for d in doc_index], seq_length)
    np.testing.assert_array_equal(ours, walk)


def test_epochs_and_separate_final_epoch_closed_form():
    # 100 tokens per epoch, sequence 10: 9 samples per epoch, (200 - 1) // 10 = 19 in two
    assert mo.num_epochs_needed(100, 10, 9) == 1 and mo.num_epochs_needed(100, 10, 10) == 2
    assert mo.num_epochs_needed(100, 10, None) == 1
    # 10 samples: 9 before the final epoch, 1 from it, fewer than int(0.8 * 9) = 7: the final epoch is separate
    assert mo.samples_before_separate_final_epoch(100, 10, 2, 10) == 9
    # 16 samples take 7 from the final epoch: not fewer than 7, shuffled with the others
    assert mo.samples_before_separate_final_epoch(100, 10, 2, 16) is None
    assert mo.samples_before_separate_final_epoch(100, 10, 1, 5) is None


def test_document_and_shuffle_index_of_a_separate_final_epoch():
    lengths = np.full(10, 10, dtype=np.int32)
    documents = np.arange(10)
    doc_index, sample_index, shuffle_index = mo.build_gpt_indices(lengths, documents, 10, 3, 10)
    assert doc_index.dtype == np.int32 and shuffle_index.dtype == np.uint32
    # the first epoch and the last one are each a shuffle of the documents
    assert sorted(doc_index[:10]) == list(range(10)) and sorted(doc_index[10:]) == list(range(10))
    # the 9 samples before the final epoch are shuffled among themselves, the 10 after among themselves
    assert len(shuffle_index) == 19
    assert sorted(shuffle_index[:9]) == list(range(9)) and sorted(shuffle_index[9:]) == list(range(9, 19))
    # one RandomState(seed) draws the two document shuffles, then the two sample shuffles
    rng = np.random.RandomState(3)
    expected = [np.arange(10, dtype=np.int32) for _ in range(2)] + [np.arange(9), np.arange(9, 19)]
    for part in expected:
        rng.shuffle(part)
    np.testing.assert_array_equal(doc_index, np.concatenate(expected[:2]))
    np.testing.assert_array_equal(shuffle_index, np.concatenate(expected[2:]))


def test_epochs_shuffled_together_when_the_final_epoch_is_not_separate():
    lengths = np.full(10, 10, dtype=np.int32)
    doc_index, _, shuffle_index = mo.build_gpt_indices(lengths, np.arange(10), 10, 5, 16)
    rng = np.random.RandomState(5)
    expected = np.tile(np.arange(10, dtype=np.int32), 2)
    rng.shuffle(expected)
    np.testing.assert_array_equal(doc_index, expected)
    assert sorted(shuffle_index) == list(range(19))


def test_blending_indices_closed_form():
    # draw t goes to the dataset with the largest w * max(t, 1) - draws so far, the first one on ties
    ds, within = mo.build_blending_indices([0.75, 0.25], 10)
    assert ds.tolist() == [0, 1, 0, 0, 0, 1, 0, 0, 0, 1]
    assert within.tolist() == [0, 0, 1, 2, 3, 1, 4, 5, 6, 2]
    assert mo.build_blending_indices([0.5, 0.5], 6)[0].tolist() == [0, 1, 0, 1, 0, 1]
    assert ds.dtype == np.int16 and within.dtype == np.int64


def test_blend_sample_counts_and_split_closed_form():
    assert mo.blend_sample_counts([0.7, 0.3], 1000) == [700, 300]
    assert mo.blend_sample_counts([0.7, 0.3], 1000, mo.MID_LEVEL_DATASET_SURPLUS) == [704, 302]  # 703.5, 301.5
    assert mo.split_boundaries(parse_split("969,30,1"), 1000) == [0, 969, 999, 1000]
    assert mo.split_boundaries(parse_split("1,1,1"), 10) == [0, 3, 7, 10]
    assert mo.split_boundaries(parse_split("1,1"), 5) == [0, 2, 5, 5]  # round(2.5) is 2: ties to even


def test_weighted_blend_sizes(tmp_path):
    write_synthetic(str(tmp_path / "a"), [40] * 60)
    write_synthetic(str(tmp_path / "b"), [40] * 60, seed=1)
    train, _, _ = build_gpt_datasets(["7", str(tmp_path / "a"), "3", str(tmp_path / "b")], "1", 16, 0, (333, 0, 0))
    # shares ceil(333 * 0.7) = 234 and ceil(333 * 0.3) = 100 (the blend holds their sum); each part is asked
    # for its share plus 0.5%: 236 and 101 samples
    assert len(train) == 334
    assert [d.cfg.num_samples for d in train.datasets] == [236, 101]
    # one prefix with a weight is a blend too (Megatron builds a BlendedDataset over it)
    single, _, _ = build_gpt_datasets(["1", str(tmp_path / "a")], "1", 16, 0, (333, 0, 0))
    assert single.datasets[0].cfg.num_samples == 335 and len(single) == 333


def test_cache_key_changes_with_the_algorithm_version(tmp_path, monkeypatch):
    from megatron_sr.data import gpt_dataset
    write_synthetic(str(tmp_path / "d"), [25] * 20)
    cache = tmp_path / "cache"
    build_gpt_datasets([str(tmp_path / "d")], "1", 8, 0, (30, 0, 0), cache_dir=str(cache))
    monkeypatch.setattr(gpt_dataset, "INDEX_ALGORITHM_VERSION", gpt_dataset.INDEX_ALGORITHM_VERSION - 1)
    build_gpt_datasets([str(tmp_path / "d")], "1", 8, 0, (30, 0, 0), cache_dir=str(cache))
    assert len(list(cache.iterdir())) == 8  # the older version's files are other files, never read


def test_blend_indices_cached_and_keyed(tmp_path):
    write_synthetic(str(tmp_path / "a"), [40] * 60)
    write_synthetic(str(tmp_path / "b"), [40] * 60, seed=1)
    cache = tmp_path / "cache"
    path = ["0.6", str(tmp_path / "a"), "0.4", str(tmp_path / "b")]
    first, _, _ = build_gpt_datasets(path, "1", 16, 0, (100, 0, 0), cache_dir=str(cache))
    again, _, _ = build_gpt_datasets(path, "1", 16, 0, (100, 0, 0), cache_dir=str(cache))
    assert isinstance(again.dataset_index, np.memmap)  # loaded, not rebuilt
    np.testing.assert_array_equal(first.dataset_index, again.dataset_index)
    blends = sorted(cache.glob("BlendedDataset_*_description.json"))
    assert len(blends) == 1
    build_gpt_datasets(["0.5", str(tmp_path / "a"), "0.5", str(tmp_path / "b")], "1", 16, 0, (100, 0, 0),
                       cache_dir=str(cache))
    build_gpt_datasets(path, "1", 16, 0, (101, 0, 0), cache_dir=str(cache))
    assert len(sorted(cache.glob("BlendedDataset_*_description.json"))) == 3

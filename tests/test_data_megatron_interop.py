"""Interoperability with Megatron-LM's own reader and writer (megatron-core). Skips unless megatron.core is
importable (it is not a dependency): `pip install --no-deps --target /tmp/mcore megatron-core` and run with
PYTHONPATH=/tmp/mcore to check it."""
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

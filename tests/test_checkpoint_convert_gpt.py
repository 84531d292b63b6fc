"""Conversion on the real GPT model: a checkpoint written by (tp 2, pp 2, dp 2) ranks merges into exactly
the one-process model (the init does not depend on the layout) and re-splits into what (tp 2, pp 1)
ranks build; a (1, 1) checkpoint loads at pp 2 with the tied-embedding copy re-created."""

import pytest
import torch
from multiproc import run_ranks

from megatron_sr.checkpoint.convert import read_full_checkpoint
from megatron_sr.checkpoint.sharded import load_checkpoint, save_checkpoint
from megatron_sr.config import Config, ModelConfig, finalize
from megatron_sr.distributed.factory import build_data_parallel
from megatron_sr.model import build_model_chunks
from megatron_sr.optimizer.sr_streams import assign_sr_streams
from megatron_sr.parallel import parallel_state as ps

_TOOL_ARGS = ["--target-tensor-parallel-size", "2", "--target-pipeline-model-parallel-size", "1"]


def _cfg(tp, pp):
    # vocab 128 pads to 128 at tp 1 and tp 2 alike (a multiple of 64 * tp)
    cfg = Config(model=ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16,
                                   vocab_size=128, make_vocab_size_divisible_by=64))
    cfg.data.mock_data = True
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    cfg.parallel.use_distributed_optimizer = True
    return finalize(cfg)


def _build(cfg):
    (model,) = build_model_chunks(cfg)
    assign_sr_streams([model])
    return build_data_parallel(model, cfg.optimizer, seed=cfg.training.seed, use_distributed_optimizer=True)


def _save(root, tp, pp):
    ps.initialize_model_parallel(tp, pp)
    cfg = _cfg(tp, pp)
    ddp, opt = _build(cfg)
    save_checkpoint(root, 7, ddp, opt, common={"config": cfg.to_dict()})


def _load_and_compare(root, tp, pp):
    ps.initialize_model_parallel(tp, pp)
    cfg = _cfg(tp, pp)
    fresh = {k: v.clone() for k, v in build_model_chunks(cfg)[0].state_dict().items()}
    ddp, opt = _build(cfg)
    with torch.no_grad():
        for p in ddp.module.parameters():
            p.zero_()
    load_checkpoint(root, ddp, opt)
    loaded = ddp.module.state_dict()
    return sorted(fresh) == sorted(loaded) and all(torch.equal(fresh[k], loaded[k]) for k in fresh)


@pytest.mark.slow
def test_gpt_checkpoint_tp2_pp2_dp2_merges_to_the_one_process_model_and_resplits(tmp_path):
    import importlib.util
    from pathlib import Path

    run_ranks(8, _save, str(tmp_path / "a"), 2, 2)
    full = read_full_checkpoint(tmp_path / "a")
    assert full.ties == {"output_layer.weight": "embedding.word_embeddings.weight"}
    one = build_model_chunks(_cfg(1, 1))[0].state_dict()
    assert list(full.tensors) == list(one), "names or order differ from the one-process model"
    for name, tensor in one.items():
        assert torch.equal(full.tensors[name], tensor), name

    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", Path(__file__).resolve().parents[1] / "tools" / "convert_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--load", str(tmp_path / "a"), "--save", str(tmp_path / "b"), *_TOOL_ARGS]) == 0
    assert run_ranks(4, _load_and_compare, str(tmp_path / "b"), 2, 1) == [True] * 4
    # a one-stage checkpoint loads into two stages (resharded by the loader; the tied copy is re-created)
    assert tool.main(["--load", str(tmp_path / "a"), "--save", str(tmp_path / "c"),
                      "--target-tensor-parallel-size", "1", "--target-pipeline-model-parallel-size", "1"]) == 0
    assert run_ranks(2, _load_and_compare, str(tmp_path / "c"), 1, 2) == [True] * 2

"""tools/convert_checkpoint.py: merge to full tensors and re-split at other tp/pp sizes, losslessly; export.

The model here marks its tensor-parallel partition dims by hand (what the parallel layers do), so the
conversion logic is tested independently of the tensor-parallel layers themselves.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from multiproc import run_ranks
from torch import nn

from megatron_sr.checkpoint.convert import FullModel, read_full_checkpoint, write_checkpoint
from megatron_sr.checkpoint.sharded import load_checkpoint, save_checkpoint
from megatron_sr.config import OptimizerConfig
from megatron_sr.distributed import DDPConfig, DistributedDataParallel, DistributedOptimizer
from megatron_sr.optimizer.sr_streams import assign_sr_streams
from megatron_sr.parallel import parallel_state as ps

_TOOL = Path(__file__).resolve().parents[1] / "tools" / "convert_checkpoint.py"
WIDTH, LAYERS, BATCH = 8, 4, 8


def _tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", _TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(6, WIDTH)
        self.decoder = nn.ModuleList(nn.ModuleDict({"fc": nn.Linear(WIDTH, WIDTH), "norm": nn.LayerNorm(WIDTH)})
                                    for _ in range(LAYERS))
        self.head = nn.Linear(WIDTH, 6)
        for name, p in self.named_parameters():  # column-parallel fc, row-parallel head, the rest replicated
            p.partition_dim = 0 if ".fc." in name else (1 if name == "head.weight" else -1)
            p.tensor_model_parallel = p.partition_dim >= 0

    def forward(self, x):
        h = self.embed(x)
        for layer in self.decoder:
            h = layer["norm"](h + torch.tanh(layer["fc"](h)))
        return self.head(h)


def _build():
    model = Tiny()
    assign_sr_streams([model])
    ddp = DistributedDataParallel(model, DDPConfig(grad_dtype=torch.float32, use_distributed_optimizer=True,
                                                   bucket_size=64))
    return ddp, DistributedOptimizer(ddp, OptimizerConfig(lr=1e-2, weight_decay=0.1, clip_grad=0.0, precision="fp32"),
                                     seed=1234)


def _steps(ddp, opt, first, n):
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    losses = []
    for s in range(first, first + n):
        g = torch.Generator().manual_seed(s)
        x, y = torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 6, generator=g)
        opt.zero_grad()
        loss = nn.functional.mse_loss(ddp(x.chunk(dp)[rank]), y.chunk(dp)[rank])
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        if dp > 1:
            dist.all_reduce(total, group=ps.get_data_parallel_group())
        losses.append(total.item() / dp)
    return losses


def _train_save_continue(root):
    ps.initialize_model_parallel(1, 1)
    ddp, opt = _build()
    _steps(ddp, opt, 0, 2)
    save_checkpoint(root, 2, ddp, opt, common={"config": {"hidden_size": WIDTH}})
    return _steps(ddp, opt, 2, 2)


@pytest.mark.slow
def test_convert_dp2_to_tp2_pp2_and_back_continues_and_exports(tmp_path):
    ref = run_ranks(2, _train_save_continue, str(tmp_path / "a"))[0]
    tool = _tool()
    assert tool.main(["--load", str(tmp_path / "a"), "--save", str(tmp_path / "b"),
                      "--target-tensor-parallel-size", "2", "--target-pipeline-model-parallel-size", "2"]) == 0
    b = tmp_path / "b" / "iter_0000002"
    s00 = torch.load(b / "mp_rank_00_000" / "model.pt", weights_only=False)["model"]
    s11 = torch.load(b / "mp_rank_01_001" / "model.pt", weights_only=False)["model"]
    assert "embed.weight" in s00 and "decoder.1.fc.weight" in s00 and "decoder.2.fc.weight" not in s00
    assert "head.weight" in s11 and "decoder.0.fc.weight" in s11 and "embed.weight" not in s11  # local numbers
    assert s00["decoder.0.fc.weight"].shape == (WIDTH // 2, WIDTH) and s11["head.weight"].shape == (6, WIDTH // 2)

    assert tool.main(["--load", str(tmp_path / "b"), "--save", str(tmp_path / "c"),
                      "--target-tensor-parallel-size", "1", "--target-pipeline-model-parallel-size", "1",
                      "--export", str(tmp_path / "model.pt")]) == 0
    a_full, c_full = read_full_checkpoint(tmp_path / "a"), read_full_checkpoint(tmp_path / "c")
    assert list(a_full.tensors) == list(c_full.tensors)
    for name, t in a_full.tensors.items():
        assert torch.equal(t, c_full.tensors[name])
        for k, v in a_full.optimizer[name].items():
            assert torch.equal(v, c_full.optimizer[name][k])

    ddp, opt = _build()  # one process, dp = 1
    load_checkpoint(tmp_path / "c", ddp, opt)
    torch.testing.assert_close(torch.tensor(_steps(ddp, opt, 2, 2)), torch.tensor(ref), rtol=1e-5, atol=0)

    exported = torch.load(tmp_path / "model.pt", weights_only=False)
    assert exported["format"] == "megatron_sr.export/1" and exported["config"] == {"hidden_size": WIDTH}
    model = Tiny()
    model.load_state_dict(exported["model"])
    for name, p in model.named_parameters():
        assert torch.equal(p, a_full.tensors[name])


def test_tied_copy_round_trip_and_bad_input(tmp_path, capsys):
    emb = torch.randn(8, 4)
    full = FullModel({"embedding.weight": emb, "layers.0.w": torch.randn(4, 4), "layers.1.w": torch.randn(4, 4),
                      "final_norm.weight": torch.ones(4)},
                     {"embedding.weight": 0, "layers.0.w": 0, "layers.1.w": 0, "final_norm.weight": -1,
                      "output.weight": 0},
                     {"embedding.weight": "pre", "layers.0.w": "layer", "layers.1.w": "layer",
                      "final_norm.weight": "post", "output.weight": "post"},
                     ties={"output.weight": "embedding.weight"}, iteration=3)
    write_checkpoint(full, tmp_path / "pp2", tp=2, pp=2)
    last = torch.load(tmp_path / "pp2" / "iter_0000003" / "mp_rank_01_001" / "model.pt", weights_only=False)
    assert last["params"]["output.weight"]["shared_embedding_copy"] is True
    assert torch.equal(last["model"]["output.weight"], emb.chunk(2)[1])
    back = read_full_checkpoint(tmp_path / "pp2")
    assert back.ties == {"output.weight": "embedding.weight"} and "output.weight" not in back.tensors
    assert list(back.tensors) == list(full.tensors)
    with pytest.raises(ValueError, match="do not divide"):
        write_checkpoint(full, tmp_path / "pp3", tp=1, pp=3)
    assert _tool().main(["--load", str(tmp_path / "missing"), "--export", str(tmp_path / "x.pt")]) == 2
    assert "missing" in capsys.readouterr().err


def test_vocab_repadding_for_another_tensor_parallel_size():
    from megatron_sr.checkpoint.convert import padded_vocab_for, repad_vocab

    common = {"config": {"model": {"vocab_size": 100, "make_vocab_size_divisible_by": 64}}}
    assert padded_vocab_for(common, 1) == 128 and padded_vocab_for(common, 4) == 256
    assert padded_vocab_for({}, 2) is None
    emb = torch.randn(128, 4)
    full = FullModel({"embedding.word_embeddings.weight": emb.clone(), "norm.weight": torch.ones(4)},
                     {"embedding.word_embeddings.weight": 0, "norm.weight": -1},
                     {"embedding.word_embeddings.weight": "pre", "norm.weight": "post"},
                     optimizer={"embedding.word_embeddings.weight": {"exp_avg": emb.clone()}})
    assert repad_vocab(full, 256) == 128
    w = full.tensors["embedding.word_embeddings.weight"]
    assert w.shape == (256, 4) and torch.equal(w[:128], emb) and not w[128:].any()
    assert full.optimizer["embedding.word_embeddings.weight"]["exp_avg"].shape == (256, 4)
    repad_vocab(full, 100)
    assert torch.equal(full.tensors["embedding.word_embeddings.weight"], emb[:100])
    assert full.tensors["norm.weight"].shape == (4,)

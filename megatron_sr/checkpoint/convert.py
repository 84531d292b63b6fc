"""Checkpoint conversion between parallel layouts: merge every shard to full tensors, then re-split.

Merging (read_full_checkpoint):
- tensor parallel: a parameter with `partition_dim >= 0` is the concatenation of the tp ranks' slices
  along that dim (the layers cut `full.chunk(tp, dim)`); a replicated one is taken from tp rank 0;
- pipeline parallel: names containing `decoder.<n>.` or `layers.<n>.` are transformer layers; stage-local numbers
  (every stage starting at 0, Megatron's style) are turned into global ones. Other names are "pre"
  (before the first layer: embeddings, first stage) or "post" (after the last: final norm, output).
  The last stage's copy of a tied embedding (`shared_embedding_copy`) is recorded as a tie to the first
  stage's parameter holding the same values and dropped from the full model;
- optimizer states (stored per named piece) are assembled per parameter and merged the same way.
Splitting (write_checkpoint) inverts all that for any tp, pp (layers must divide by pp). The optimizer
state goes into one unsharded file per model-parallel rank, which loads at any dp size.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..distributed.distributed_optimizer import STATE_FORMAT, merge_state_dicts
from ..model import padded_vocab_size
from ..parallel.partition import partition
from .layout import (
    SHARDED_FORMAT,
    SINGLE_FILE,
    SINGLE_FORMAT,
    atomic_torch_save,
    atomic_write_text,
    iteration_dir,
    load_file,
    mp_rank_dir,
    publish_iteration,
    read_metadata,
    resolve_iteration_dir,
    staging_dir,
)

# transformer layers: a ModuleList named `decoder` (megatron_sr/model/gpt.py) or `layers` (Megatron)
LAYER = re.compile(r"^(.*?\b(?:decoder|layers)\.)(\d+)(\..*)$")
STATE_KEYS = ("exp_avg", "exp_avg_sq", "master")


@dataclass
class FullModel:
    """A whole model (tp = pp = 1) with what re-splitting needs."""

    tensors: dict[str, torch.Tensor]  # global names, in pre / layers / post order
    partition_dim: dict[str, int]
    section: dict[str, str]  # "pre", "layer" or "post"
    ties: dict[str, str] = field(default_factory=dict)  # last-stage copy name -> first-stage source name
    optimizer: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # name -> state -> full tensor
    step: int = 0
    lr: float = 0.0
    common: dict = field(default_factory=dict)
    iteration: int = 0
    layer_numbering: str = "local"
    partition_known: bool = True  # False: read from a one-process checkpoint without partition dims

    @property
    def num_layers(self) -> int:
        return len({int(LAYER.match(n).group(2)) for n, s in self.section.items() if s == "layer"})


def _states_by_name(shard_dir: Path, local: dict[str, torch.Tensor]) -> tuple[dict, int, float]:
    files = sorted(shard_dir.glob("optim_dp_*.pt"))
    if not files:
        return {}, 0, 0.0
    state = merge_state_dicts([load_file(f) for f in files])
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{shard_dir}: optimizer state is not {STATE_FORMAT}")
    out: dict[str, dict[str, torch.Tensor]] = {}
    covered: dict[str, torch.Tensor] = {}
    keys = [k for k in STATE_KEYS if state.get(k) is not None]
    for sp in state["pieces"]:
        name, n, off = sp["name"], sp["numel"], sp["offset"]
        numel = local[name].numel()
        entry = out.setdefault(name, {k: torch.zeros(numel, dtype=state[k].dtype) for k in keys})
        mask = covered.setdefault(name, torch.zeros(numel, dtype=torch.bool))
        for k in keys:
            entry[k][off:off + n] = state[k][sp["state_offset"]:sp["state_offset"] + n]
        mask[off:off + n] = True
    for name, entry in out.items():
        if not covered[name].all():
            raise ValueError(f"{shard_dir}: the optimizer state of {name} is incomplete")
        for k in keys:
            entry[k] = entry[k].view(local[name].shape)
    return out, int(state["step"]), float(state["lr"])


def _merge_tp(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return torch.cat(parts, dim=dim) if dim >= 0 and len(parts) > 1 else parts[0]


def _pattern(name: str) -> str:
    m = LAYER.match(name)
    return f"{m.group(1)}*{m.group(3)}" if m else name


def read_single_process_checkpoint(directory: Path, partition_dims: dict[str, int] | None) -> FullModel:
    """The one-process trainer's file (model, SRAdamW state, config) as a FullModel. It stores no
    partition dims: they come from `partition_dims` (names of a model of any stage; layer numbers
    ignored), else they stay unknown and only tp = 1 targets are possible."""
    path = directory / SINGLE_FILE
    payload = load_file(path)
    if payload.get("format") != SINGLE_FORMAT or "model" not in payload:
        raise ValueError(f"{path}: expected a one-chunk {SINGLE_FORMAT} checkpoint")
    dims = {_pattern(n): d for n, d in (partition_dims or {}).items()}
    full = FullModel({}, {}, {}, iteration=payload["iteration"], partition_known=partition_dims is not None,
                     common={"consumed_train_samples": payload.get("consumed_train_samples", 0),
                             "skipped_iters": payload.get("skipped_iters", 0), "config": payload.get("config")})
    seen_layer = False
    for name, tensor in payload["model"].items():
        seen_layer |= bool(LAYER.match(name))
        full.tensors[name] = tensor
        # vocabulary-parallel weights always split dim 0; other stages' names need no dim on this rank
        full.partition_dim[name] = dims.get(_pattern(name), 0 if name.endswith(VOCAB_NAMES) else -1)
        full.section[name] = "layer" if LAYER.match(name) else ("post" if seen_layer else "pre")
    opt = payload.get("optimizer") or {}
    if "names" in opt:
        full.step, full.lr = int(opt["step"]), float(opt["lr"])
        for i, name in enumerate(opt["names"]):
            full.optimizer[name] = {k: opt[k][i] for k in STATE_KEYS if opt.get(k) is not None}
    return full


def read_full_checkpoint(path: str | Path, partition_dims: dict[str, int] | None = None) -> FullModel:
    directory = resolve_iteration_dir(path)
    meta = read_metadata(directory)
    if meta.get("single_process"):
        return read_single_process_checkpoint(directory, partition_dims)
    tp, pp = meta["tp"], meta["pp"]
    stages = []
    for p in range(pp):
        shards = [load_file(directory / mp_rank_dir(t, p, pp) / "model.pt")
                  for t in range(tp)]
        states = [_states_by_name(directory / mp_rank_dir(t, p, pp), shards[t]["model"]) for t in range(tp)]
        tensors, pdim, opt, copies = {}, {}, {}, set()
        for name in shards[0]["model"]:
            info = shards[0]["params"].get(name, {"partition_dim": -1, "shared_embedding_copy": False})
            pdim[name] = info["partition_dim"]
            tensors[name] = _merge_tp([s["model"][name] for s in shards], pdim[name])
            if info["shared_embedding_copy"]:
                copies.add(name)
            if name in states[0][0]:
                opt[name] = {k: _merge_tp([st[0][name][k] for st in states], pdim[name]) for k in states[0][0][name]}
        stages.append((tensors, pdim, opt, copies))
    step, lr = states[0][1], states[0][2]
    full = FullModel({}, {}, {}, step=step, lr=lr, iteration=meta["iteration"],
                     common=load_file(directory / "common.pt"))
    layer_offset, post = 0, []
    for p, (tensors, pdim, opt, copies) in enumerate(stages):
        numbers = sorted({int(LAYER.match(n).group(2)) for n in tensors if LAYER.match(n)})
        if p > 0 and numbers and numbers[0] > 0:
            full.layer_numbering = "global"
        shift = layer_offset if full.layer_numbering == "local" else 0
        seen_layer = False
        for name, tensor in tensors.items():
            m = LAYER.match(name)
            if m:
                seen_layer = True
                gname, section = f"{m.group(1)}{int(m.group(2)) + shift}{m.group(3)}", "layer"
            else:
                gname, section = name, ("post" if seen_layer or (p > 0 and p == pp - 1) else "pre")
            if name in copies:
                full.ties[gname] = _find_tie_source(tensor, stages[0][0], name)
                post.append((gname, None, pdim[name], None))
                continue
            if section == "post":
                post.append((gname, tensor, pdim[name], opt.get(name)))
                continue
            full.tensors[gname], full.partition_dim[gname], full.section[gname] = tensor, pdim[name], section
            if name in opt:
                full.optimizer[gname] = opt[name]
        layer_offset += len(numbers)
    for gname, tensor, dim, state in post:  # post-layer names go last, after every layer
        full.partition_dim[gname], full.section[gname] = dim, "post"
        if tensor is not None:
            full.tensors[gname] = tensor
            if state is not None:
                full.optimizer[gname] = state
    return full


def _find_tie_source(copy: torch.Tensor, first_stage: dict[str, torch.Tensor], name: str) -> str:
    for cand, tensor in first_stage.items():
        if tensor.shape == copy.shape and torch.equal(tensor, copy):
            return cand
    raise ValueError(f"tied embedding copy {name}: no first-stage parameter holds the same values")


def split_stage_names(full: FullModel, pp: int) -> list[list[tuple[str, str]]]:
    """For each target stage, (global name, local name) in order."""
    layers = full.num_layers
    if layers % pp:
        raise ValueError(f"{layers} transformer layers do not divide into {pp} pipeline stages")
    per = layers // pp
    stages: list[list[tuple[str, str]]] = [[] for _ in range(pp)]
    for name, section in full.section.items():
        if section == "pre":
            stages[0].append((name, name))
        elif section == "post":
            if name in full.ties and pp == 1:
                continue  # with one stage the tied output layer is the embedding itself
            stages[pp - 1].append((name, name))
        else:
            m = LAYER.match(name)
            n = int(m.group(2))
            local = n - (n // per) * per if full.layer_numbering == "local" else n
            stages[n // per].append((name, f"{m.group(1)}{local}{m.group(3)}"))
    return stages


def _tp_slice(t: torch.Tensor, dim: int, tp: int, rank: int) -> torch.Tensor:
    return t.clone() if dim < 0 else partition(t, dim, tp, rank).clone()


def rank_shard(full: FullModel, names: list[tuple[str, str]], tp: int, t: int) -> tuple[dict, dict | None]:
    """(model.pt payload, optimizer state or None) of tp rank t of a stage holding `names`."""
    if tp > 1 and not full.partition_known:
        raise ValueError("this one-process checkpoint stores no tensor-parallel partition dims: load it under "
                         "torchrun at the target layout (the loader reshards it), or convert to tp 1")
    model, params, pieces, flats, offset = {}, {}, [], {k: [] for k in STATE_KEYS}, 0
    for gname, local in names:
        source = full.ties.get(gname, gname)
        dim = full.partition_dim[gname]
        model[local] = _tp_slice(full.tensors[source], dim, tp, t)
        params[local] = {"partition_dim": dim, "shared_embedding_copy": gname in full.ties}
        state = full.optimizer.get(source)
        if state is None:
            continue
        n = model[local].numel()
        pieces.append({"name": local, "offset": 0, "numel": n, "state_offset": offset})
        offset += n
        for k in STATE_KEYS:
            flats[k].append(_tp_slice(state[k], dim, tp, t).reshape(-1) if k in state else None)
    shard = {"model": model, "params": params, "tp_rank": t, "tp": tp}
    if not full.optimizer:
        return shard, None
    cat = {k: (torch.cat(v) if v and all(x is not None for x in v) else None) for k, v in flats.items()}
    return shard, {"format": STATE_FORMAT, "step": full.step, "lr": full.lr, "pieces": pieces,
                   "exp_avg": cat["exp_avg"], "exp_avg_sq": cat["exp_avg_sq"], "master": cat["master"]}


def write_checkpoint(full: FullModel, root: str | Path, *, tp: int, pp: int, dp: int = 1,
                     distributed_optimizer: bool = True) -> Path:
    """Write `full` as a checkpoint for layout (tp, pp, dp) under root (atomic: temp dir, then rename)."""
    root = Path(root)
    final = iteration_dir(root, full.iteration)
    if final.exists():
        raise FileExistsError(f"{final} already exists; choose an empty output directory")
    tmp = staging_dir(final)
    for p, names in enumerate(split_stage_names(full, pp)):
        for t in range(tp):
            shard_dir = tmp / mp_rank_dir(t, p, pp)
            shard_dir.mkdir()
            shard, optim = rank_shard(full, names, tp, t)
            atomic_torch_save(dict(shard, pp_rank=p, pp=pp), shard_dir / "model.pt")
            if optim is not None:
                atomic_torch_save(optim, shard_dir / "optim_dp_000.pt")
    meta = {"format": SHARDED_FORMAT, "iteration": full.iteration, "tp": tp, "pp": pp, "dp": dp,
            "distributed_optimizer": distributed_optimizer}
    atomic_write_text(json.dumps(meta, indent=1), tmp / "metadata.json")
    atomic_torch_save(full.common, tmp / "common.pt")
    publish_iteration(tmp, final, full.iteration)
    return final


def resharded_for_rank(directory: Path, tp: int, pp: int, tp_rank: int, pp_rank: int,
                       tied_copies: list[str] = (), partition_dims: dict[str, int] | None = None
                       ) -> tuple[dict, dict | None, dict]:
    """Read a checkpoint of any layout whole and cut out (model shard, optimizer state) of one rank of
    layout (tp, pp), vocabulary padding recomputed for tp, plus the checkpoint's common state: what
    loading at another layout needs.
    `tied_copies`: this rank's tied-embedding copies (a pp = 1 checkpoint has none to split);
    `partition_dims`: this rank's parameters' partition dims (a one-process checkpoint does not store them)."""
    full = read_full_checkpoint(directory, partition_dims)
    for name in tied_copies:
        if name not in full.ties:
            sources = [n for n in full.tensors if n.endswith("word_embeddings.weight")]
            if len(sources) != 1:
                raise ValueError(f"{directory}: cannot tell which parameter the tied copy {name} copies")
            full.ties[name], full.section[name] = sources[0], "post"
            full.partition_dim[name] = full.partition_dim[sources[0]]
    padded = padded_vocab_for(full.common, tp)
    if padded is not None:
        repad_vocab(full, padded)
    names = split_stage_names(full, pp)[pp_rank]
    shard, optim = rank_shard(full, names, tp, tp_rank)
    return dict(shard, pp_rank=pp_rank, pp=pp), optim, full.common


def export_tensors(full: FullModel) -> dict[str, torch.Tensor]:
    """The single-file model: full tensors by global name, tied copies left out (they are the embedding)."""
    return {n: t.contiguous() for n, t in full.tensors.items()}


VOCAB_NAMES = ("word_embeddings.weight", "output_layer.weight")


def padded_vocab_for(common: dict, tp: int) -> int | None:
    """The padded vocabulary a tp-way model builds (Megatron: a multiple of divisible_by * tp), from the
    trainer config saved in common.pt; None when the config is not there."""
    model = (common.get("config") or {}).get("model") if isinstance(common, dict) else None
    if not isinstance(model, dict) or not model.get("vocab_size"):
        return None
    return padded_vocab_size(int(model["vocab_size"]), int(model.get("make_vocab_size_divisible_by", 128)), tp)


def repad_vocab(full: FullModel, padded: int) -> int:
    """Trim or zero-pad the vocabulary rows of the embedding/output weights (and their optimizer states)
    to `padded`; returns the old size. Rows past the real vocabulary are never a target token."""
    names = [n for n in full.tensors if n.endswith(VOCAB_NAMES) and full.partition_dim.get(n) == 0]
    if not names:
        raise ValueError("no vocabulary-parallel weight (word_embeddings.weight / output_layer.weight) found")
    old = full.tensors[names[0]].shape[0]

    def resize(t: torch.Tensor) -> torch.Tensor:
        if padded <= t.shape[0]:
            return t[:padded].clone()
        return torch.cat([t, t.new_zeros((padded - t.shape[0],) + tuple(t.shape[1:]))])

    for name in names:
        if full.tensors[name].shape[0] != old:
            raise ValueError(f"{name} has {full.tensors[name].shape[0]} rows, expected {old}")
        full.tensors[name] = resize(full.tensors[name])
        if name in full.optimizer:
            full.optimizer[name] = {k: resize(v) for k, v in full.optimizer[name].items()}
    return old

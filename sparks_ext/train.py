"""``python -m sparks_ext train``: training recipes for binary and sub-bit networks.

The ReActNet recipe (Liu et al., ECCV 2020), as the Sparks paper trains its ResNet-18:
- stage 1: binary activations, real-valued weights; stage 2: binary (1-bit, Sparks or signed)
  weights, starting from stage 1's final weights. ``--stage one`` trains binary weights and
  activations from scratch in a single stage;
- distillation from a real-valued teacher with ReActNet's distribution loss (the cross-entropy
  of the student's class distribution against the teacher's); the teacher is a float model
  trained first by the same command (``--teacher train``) or any torch checkpoint;
- Adam with the learning rate decayed linearly (or by a cosine) to 0 over each stage, weight
  decay 1e-5 in stage 1 and 0 in stage 2; label smoothing; Bop as an alternative optimizer for
  1-bit weights;
- the Sinkhorn temperature of the learned selections follows
  :class:`~sparks_ext.selection.TemperatureSchedule` over the stage's steps.

Scale and operations: data-parallel under ``torchrun`` (gloo on CPU, NCCL on GPU; ``--batch-size``
is the global batch, split over the ranks, so N processes take the same steps as one; the
selection is identical on every rank because DDP broadcasts rank 0's buffers, which seed the
Gumbel noise), SyncBatchNorm as an option, mixed precision (bf16 autocast on CPU, fp16 or bf16 on
GPU), a checkpoint every epoch with an exact resume (model, optimizer, scheduler, step, epoch,
RNG states; data order and augmentation are functions of (seed, epoch, index)), the best model
kept, metrics as JSON lines and CSV, a progress bar, and at the end the trained network
converted, saved in the compact format and summarised.

Output folder (``--out``)::

    teacher/  stage1/  stage2/   one folder per trained stage (or final/ for --stage one):
        last.pt  best.pt  metrics.jsonl  metrics.csv  result.json
    model.spk                    the final network, converted, in the compact format
    summary.txt                  its per-layer table
    result.json                  accuracies, bits per weight, sizes, timings
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import json
import math
import os
import random
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["TrainConfig", "train", "build_model", "distillation_loss", "add_arguments",
           "config_from_args", "MODELS", "CONVS", "STAGES"]

MODELS = ("smallcnn", "resnet18", "resnet18-cifar")
CONVS = ("float", "binary", "sparks", "signed")
STAGES = ("auto", "two", "one", "1", "2")
SCHEDULES = ("linear", "cosine", "constant")
OPTIMIZERS = ("adam", "bop")
EXPORTS = ("last", "best")
CHECKPOINT_FORMAT = "sparks_ext.train/1"
# Fields that may differ between a run and its resumption without changing what it computes
# (epochs does change the learning-rate schedule from the resumed step on: it is the run length).
_RESUMABLE = {"epochs", "stage1_epochs", "teacher_epochs", "workers", "quiet", "resume", "threads",
              "stop_after", "frequency_eval", "export"}


@dataclass
class TrainConfig:
    """Everything a training run depends on; ``python -m sparks_ext train --help`` describes
    each field (the flag is the field name with dashes)."""
    data: str = "digits"
    out: str = "runs/train"
    model: str = "smallcnn"
    conv: str = "sparks"
    n_codewords: Optional[int] = 32
    width: int = 32
    image_size: Optional[int] = None
    augment: str = "auto"
    stage: str = "auto"
    epochs: int = 20
    stage1_epochs: Optional[int] = None
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: str = "linear"
    warmup_epochs: float = 0.0
    weight_decay: Optional[float] = None
    optimizer: str = "adam"
    bop_gamma: float = 1e-4
    bop_tau: float = 1e-8
    label_smoothing: float = 0.1
    tau_start: float = 1.0
    tau_end: float = 0.05
    init: Optional[str] = None
    teacher: Optional[str] = None
    teacher_model: Optional[str] = None
    teacher_epochs: Optional[int] = None
    distill_weight: float = 1.0
    distill_temperature: float = 1.0
    workers: int = 0
    amp: bool = False
    amp_dtype: str = "auto"
    sync_bn: bool = False
    device: str = "auto"
    seed: int = 0
    threads: Optional[int] = None
    export: str = "last"
    frequency_eval: list = field(default_factory=list)
    resume: bool = False
    quiet: bool = False
    stop_after: Optional[int] = None

    def validate(self) -> "TrainConfig":
        def choice(name, options):
            if getattr(self, name) not in options:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(map(str, options))}; "
                                 f"got {getattr(self, name)!r}")

        def positive_int(name, allow_none=False):
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")

        def number(name, low, high=math.inf, low_open=False, high_open=False):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < low or value > high or (low_open and value == low) or (high_open and value == high):
                lo, hi = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
                raise ValueError(f"--{name.replace('_', '-')} must be in {lo}{low}, {high}{hi}, got {value!r}")

        for name, options in (("model", MODELS), ("conv", CONVS), ("stage", STAGES),
                              ("lr_schedule", SCHEDULES), ("optimizer", OPTIMIZERS), ("export", EXPORTS),
                              ("amp_dtype", ("auto", "bf16", "fp16")), ("device", ("auto", "cpu", "cuda"))):
            choice(name, options)
        if not isinstance(self.data, str) or not self.data:
            raise ValueError("--data must be 'digits' or an image-folder directory")
        if not isinstance(self.out, str) or not self.out:
            raise ValueError("--out must be a directory path")
        for name in ("epochs", "batch_size", "width"):
            positive_int(name)
        for name in ("stage1_epochs", "teacher_epochs", "image_size", "threads", "stop_after"):
            positive_int(name, allow_none=True)
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"--workers must be a non-negative integer, got {self.workers!r}")
        if self.image_size is not None and self.image_size < 4:
            raise ValueError(f"--image-size must be at least 4, got {self.image_size}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 31:
            raise ValueError(f"--seed must be an integer in [0, 2^31), got {self.seed!r}")
        number("lr", 0, low_open=True)
        number("warmup_epochs", 0)
        if self.weight_decay is not None:
            number("weight_decay", 0)
        number("bop_gamma", 0, 1, low_open=True)
        number("bop_tau", 0)
        number("label_smoothing", 0, 1, high_open=True)
        number("tau_start", 0, low_open=True)
        number("tau_end", 0, low_open=True)
        number("distill_weight", 0, 1)
        number("distill_temperature", 0, low_open=True)
        if self.conv == "sparks":
            if self.n_codewords is None:
                raise ValueError("--conv sparks needs --n-codewords (1..512 for 3x3 kernels)")
            positive_int("n_codewords")
            if self.n_codewords > 512:
                raise ValueError(f"--n-codewords must be in [1, 512] for 3x3 kernels, got {self.n_codewords}")
        elif self.conv == "signed":
            positive_int("n_codewords", allow_none=True)
            if self.n_codewords is not None and self.n_codewords > 512:
                raise ValueError(f"--n-codewords must be in [1, 512] for 3x3 kernels, got {self.n_codewords}")
        if self.model == "smallcnn" and self.image_size not in (None, 8, 28):
            raise ValueError(f"--model smallcnn takes 8x8 or 28x28 images; got --image-size {self.image_size}")
        if self.optimizer == "bop" and self.conv != "binary":
            raise ValueError(f"--optimizer bop trains 1-bit weights: it needs --conv binary, got --conv {self.conv}")
        if self.conv == "float" and self.stage not in ("auto", "one"):
            raise ValueError(f"--stage {self.stage}: a float network trains in one stage (--stage one)")
        if self.sync_bn and (self.device == "cpu" or (self.device == "auto" and not torch.cuda.is_available())):
            raise ValueError("--sync-bn needs GPUs: torch's SyncBatchNorm runs only on CUDA (on CPU each process "
                             "keeps its own BatchNorm statistics; the trainer evaluates and saves rank 0's)")
        if self.amp_dtype == "fp16" and self.device == "cpu":
            raise ValueError("--amp-dtype fp16 needs a GPU (on CPU, autocast runs in bf16)")
        if self.teacher is not None and self.teacher != "train":
            if not Path(self.teacher).is_file():
                raise ValueError(f"--teacher {self.teacher!r}: no such file (give a checkpoint, or 'train' to "
                                 "train a float teacher first)")
        if self.init is not None and not Path(self.init).is_file():
            raise ValueError(f"--init {self.init!r}: no such file (give a checkpoint written by this command, "
                             "e.g. OUT/stage1/last.pt)")
        if self.init is not None and self.stages[0] == "1" and len(self.stages) > 1:
            raise ValueError("--init starts a single stage from a checkpoint: use it with --stage 2 or --stage one")
        if self.teacher_model is not None:
            _teacher_factory(self.teacher_model)  # raises for an unknown architecture
        if not isinstance(self.frequency_eval, (list, tuple)) or any(
                isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 512 for n in self.frequency_eval):
            raise ValueError(f"--frequency-eval takes codebook sizes in [1, 512], got {self.frequency_eval!r}")
        if self.frequency_eval and self.conv != "binary":
            raise ValueError("--frequency-eval evaluates a 1-bit network's most frequent kernels: it needs --conv binary")
        return self

    @property
    def stages(self) -> list[str]:
        """The stages this config trains, in order: 'one' (binary or float from scratch),
        '1' (binary activations, real weights), '2' (binary weights)."""
        if self.conv == "float" or self.stage == "one":
            return ["one"]
        if self.stage in ("auto", "two"):
            return ["1", "2"]
        return [self.stage]


# ---------------------------------------------------------------------------------------------
# models

def build_model(model: str, conv: str, num_classes: int, in_channels: int, image_size: int,
                n_codewords: Optional[int] = None, width: int = 32) -> nn.Module:
    """One of :data:`MODELS` with its 3x3 block convs of type ``conv`` (:data:`CONVS`)."""
    from .models import SmallCNN, resnet18

    base = "binary" if conv == "signed" else conv
    n = n_codewords if conv == "sparks" else None
    if model == "smallcnn":
        if image_size not in (8, 28):
            raise ValueError(f"--model smallcnn takes 8x8 or 28x28 images, got {image_size}x{image_size}")
        net = SmallCNN(in_channels, num_classes, width, base, n, image_size)
    elif model in ("resnet18", "resnet18-cifar"):
        net = resnet18(num_classes, base, n, "imagenet" if model == "resnet18" else "cifar", in_channels)
    else:
        raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
    if conv == "signed":
        _to_signed(net, n_codewords)
    return net


def _to_signed(module: nn.Module, n_codewords: Optional[int]) -> None:
    from .nn import BinaryConv2d, SignedBinaryConv2d

    for name, child in module.named_children():
        if isinstance(child, BinaryConv2d):
            setattr(module, name, SignedBinaryConv2d(**child.geometry_config(), bias=child.bias is not None,
                                                     n_codewords=n_codewords))
        else:
            _to_signed(child, n_codewords)


def _latent_layers(model: nn.Module):
    from .nn.binary import _LatentBinaryConv
    return [m for m in model.modules() if isinstance(m, _LatentBinaryConv)]


def _real_weight_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Stage 1 of ReActNet: the layer's binarized input convolved with its real latent weights."""
    from .quantizers import sign_ste
    weight = self.weight.to(x.dtype)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return F.conv2d(sign_ste(x), weight, bias, self.stride, self.padding, self.dilation, self.groups)


def binary_activations_only(model: nn.Module) -> nn.Module:
    """Makes every binary conv of ``model`` use its real latent weights on binarized inputs
    (stage 1), in place; the parameter names stay those of stage 2's model."""
    for layer in _latent_layers(model):
        layer.forward = types.MethodType(_real_weight_forward, layer)
        if hasattr(layer, "logits"):  # no selection in stage 1 (and DDP wants no unused parameters)
            layer.logits.requires_grad_(False)
    return model


def _teacher_factory(spec: str):
    """``spec``: one of :data:`MODELS` (built with float convs) or ``module:function``."""
    if spec in MODELS:
        return None
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--teacher-model must be one of {', '.join(MODELS)} or 'module:function', got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--teacher-model {spec!r}: {e}") from None
    if not callable(factory):
        raise ValueError(f"--teacher-model {spec!r} is not callable")
    return factory


def load_teacher(cfg: TrainConfig, path: str, num_classes: int, channels: int, image_size: int,
                 device) -> nn.Module:
    """A frozen teacher in eval mode from ``path``: a checkpoint written by this command (its
    config names the architecture) or any torch state dict (optionally under "state_dict" or
    "model") for the architecture ``--teacher-model``."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(blob, dict) and blob.get("format") == CHECKPOINT_FORMAT:
        tc = blob["config"]
        teacher = build_model(tc["model"], tc["conv"], num_classes, channels, image_size,
                              tc.get("n_codewords"), tc.get("width", 32))
        if blob.get("stage") == "1":
            binary_activations_only(teacher)
        state = blob["model"]
    else:
        state = blob
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if cfg.teacher_model is None:
            raise ValueError(f"--teacher {path!r} is a plain state dict: name its architecture with --teacher-model")
        factory = _teacher_factory(cfg.teacher_model)
        if factory is None:
            teacher = build_model(cfg.teacher_model, "float", num_classes, channels, image_size, width=cfg.width)
        else:
            teacher = factory(num_classes=num_classes)
        state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        teacher.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"--teacher {path!r} does not fit its architecture: {str(e).splitlines()[0]}") from None
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


# ---------------------------------------------------------------------------------------------
# loss, optimizer, schedules

def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """ReActNet's distribution loss: ``-sum_c p_t(c) log p_s(c)`` averaged over the batch, with
    p = softmax(logits / T), times T^2 (so the gradient scale does not depend on T). It equals
    KL(p_t || p_s) plus the teacher's entropy, which has no gradient."""
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    p_teacher = F.softmax(teacher_logits.float() / t, dim=1)
    return -(p_teacher * log_p_student).sum(dim=1).mean() * (t * t)


def _parameter_groups(model: nn.Module, weight_decay: float, exclude=()):
    """Weight decay on conv and linear weights only (not on BatchNorm, biases, RSign/RPReLU
    thresholds or selection logits)."""
    excluded = {id(p) for p in exclude}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in excluded:
            continue
        (decay if p.dim() > 1 and not name.endswith("logits") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _make_optimizer(cfg: TrainConfig, model: nn.Module, stage: str):
    from .nn import BinaryConv2d
    from .optim import Bop

    wd = cfg.weight_decay if cfg.weight_decay is not None else (0.0 if stage == "2" else 1e-5)
    if cfg.optimizer == "bop" and stage != "1":
        binary = [m.weight for m in model.modules() if isinstance(m, BinaryConv2d)]
        with torch.no_grad():
            for w in binary:
                w.copy_(torch.where(w >= 0, 1.0, -1.0))
        adam = torch.optim.Adam(_parameter_groups(model, wd, exclude=binary), lr=cfg.lr)
        return Bop(binary, adam, gamma=cfg.bop_gamma, tau=cfg.bop_tau), adam
    adam = torch.optim.Adam(_parameter_groups(model, wd), lr=cfg.lr)
    return adam, adam


def _lr_factor(schedule: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - t)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
        return 1.0
    return factor


# ---------------------------------------------------------------------------------------------
# distributed set-up and data

@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(cfg: TrainConfig) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    device = torch.device(f"cuda:{local_rank}" if want_cuda else "cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    elif world > 1 and not want_cuda:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return _Dist(rank, world, local_rank, device)


class _BatchSampler(torch.utils.data.Sampler):
    """This rank's part of each global batch: the epoch's permutation (a function of (seed,
    epoch)) cut into global batches of ``batch_size``, each split evenly over the ranks, so the
    ranks together take exactly the batches one process would. A last batch too small to give
    every rank 2 samples (BatchNorm needs 2) is dropped."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int, shuffle: bool):
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _global_batches(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        batches = [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if self.shuffle and batches and len(batches[-1]) < 2 * self.world:
            batches.pop()
        return batches

    def __len__(self):
        return len(self._global_batches())

    def __iter__(self):
        for batch in self._global_batches():
            per = -(-len(batch) // self.world)
            yield batch[self.rank * per:(self.rank + 1) * per]


def _loader(dataset, sampler, workers: int):
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                       persistent_workers=False)


# ---------------------------------------------------------------------------------------------
# checkpoints and metrics

def _rng_state():
    import numpy as np
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    import numpy as np
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_metrics(folder: Path, rows: list) -> None:
    with open(folder / "metrics.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _config_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def _check_resumable(saved: dict, cfg: TrainConfig, path: Path) -> None:
    current = _config_dict(cfg)
    diff = [k for k in current if k not in _RESUMABLE and saved.get(k) != current[k]]
    if diff:
        details = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} -> {current[k]!r}" for k in diff)
        raise ValueError(f"--resume: {path} was written with different settings ({details}); "
                         "resume with the original flags or use a new --out")


# ---------------------------------------------------------------------------------------------
# one stage

def _unwrap(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _autocast(cfg: TrainConfig, device: torch.device):
    if not cfg.amp:
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16
    if device.type == "cuda" and cfg.amp_dtype in ("auto", "fp16"):
        dtype = torch.float16
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int, ctx: _Dist, cfg: TrainConfig):
    """(accuracy %, mean cross-entropy) of ``model`` in eval mode on ``dataset``; under torchrun
    each rank takes every world-th image and the counts are summed."""
    model = _unwrap(model)  # no DDP forward: the ranks may hold different numbers of batches
    was_training = model.training
    model.eval()
    shard = torch.utils.data.Subset(dataset, list(range(ctx.rank, len(dataset), ctx.world)))
    totals = torch.zeros(3, dtype=torch.float64)
    for x, y in torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=cfg.workers):
        x, y = x.to(ctx.device), y.to(ctx.device)
        with _autocast(cfg, ctx.device):
            logits = model(x)
        totals[0] += (logits.argmax(1) == y).sum().item()
        totals[1] += F.cross_entropy(logits.float(), y, reduction="sum").item()
        totals[2] += len(y)
    if ctx.world > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    count = max(totals[2].item(), 1.0)
    return 100.0 * totals[0].item() / count, totals[1].item() / count


def _stage_name(stage: str) -> str:
    return {"one": "final", "1": "stage1", "2": "stage2", "teacher": "teacher"}[stage]


def _run_stage(cfg: TrainConfig, stage: str, data, ctx: _Dist, teacher: Optional[nn.Module],
               init_state: Optional[dict], epochs: int, log, budget: dict) -> tuple[nn.Module, dict]:
    """Trains one stage into ``--out/<stage folder>``; returns the model (unwrapped, the final or
    the best weights as --export says) and the stage's result."""
    from .selection import TemperatureSchedule, set_temperature
    from tqdm import tqdm

    folder = Path(cfg.out) / _stage_name(stage)
    last_path, best_path = folder / "last.pt", folder / "best.pt"
    conv = "float" if stage == "teacher" else cfg.conv
    torch.manual_seed(cfg.seed + {"teacher": 7919, "one": 0, "1": 0, "2": 104729}[stage])
    model = build_model(cfg.model, conv, len(data.classes), data.channels, data.image_size,
                        cfg.n_codewords, cfg.width)
    if stage == "1":
        binary_activations_only(model)
    if init_state is not None:
        model.load_state_dict(init_state)
    model.to(ctx.device)

    sampler = _BatchSampler(len(data.train), cfg.batch_size, ctx.rank, ctx.world, cfg.seed, shuffle=True)
    steps_per_epoch = len(sampler)
    total = epochs * steps_per_epoch
    optimizer, adam = _make_optimizer(cfg, model, stage)
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(adam, _lr_factor(cfg.lr_schedule, warmup, total))
    tau = TemperatureSchedule(cfg.tau_start, cfg.tau_end, total)
    start_epoch, step, best, history = 0, 0, -1.0, []
    stage_cfg = dataclasses.replace(cfg, conv=conv)

    if last_path.exists():
        if not cfg.resume:
            raise ValueError(f"--out {cfg.out!r} already holds a run ({last_path}); pass --resume to "
                             "continue it or choose a new --out")
        blob = torch.load(last_path, map_location="cpu", weights_only=True)
        _check_resumable(blob["config"], stage_cfg, last_path)
        _unwrap(model).load_state_dict(blob["model"])
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        scheduler.lr_lambdas[0] = _lr_factor(cfg.lr_schedule, warmup, total)  # --epochs may have grown
        start_epoch, step, best, history = blob["epoch"], blob["step"], blob["best_acc"], blob["metrics"]
        _set_rng_state(blob["rng"])
        log(f"{folder.name}: resumed from {last_path} at epoch {start_epoch}")
    elif ctx.main:
        folder.mkdir(parents=True, exist_ok=True)

    if cfg.sync_bn and ctx.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = model
    if ctx.world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(enabled=cfg.amp and ctx.device.type == "cuda" and
                                  cfg.amp_dtype in ("auto", "fp16"))
    learns_selection = any(hasattr(m, "logits") for m in model.modules())
    for epoch in range(start_epoch, epochs):
        if budget["epochs"] is not None and budget["epochs"] <= 0:
            log(f"{folder.name}: stopping before epoch {epoch + 1} as --stop-after asks")
            return None, {"stopped": True}
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        data.train.set_epoch(epoch)
        net.train()
        sums = torch.zeros(3, dtype=torch.float64)
        bar = tqdm(_loader(data.train, sampler, cfg.workers), total=steps_per_epoch,
                   desc=f"{folder.name} {epoch + 1}/{epochs}", unit="step", leave=False,
                   disable=cfg.quiet or not ctx.main, dynamic_ncols=True)
        for x, y in bar:
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            if learns_selection:
                set_temperature(model, tau(step))
            with _autocast(cfg, ctx.device):
                logits = net(x)
                ce = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                if teacher is not None and cfg.distill_weight > 0:
                    with torch.no_grad():
                        teacher_logits = teacher(x)
                    kd = distillation_loss(logits, teacher_logits, cfg.distill_temperature)
                    loss = cfg.distill_weight * kd + (1 - cfg.distill_weight) * ce
                else:
                    loss = ce
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            sums += torch.tensor([loss.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y)],
                                 dtype=torch.float64)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        if ctx.world > 1:
            dist.all_reduce(sums)
            _check_same_selection(model)
            # Each rank's BatchNorm statistics moved with its own last batch: evaluate and save
            # rank 0's model everywhere.
            for buffer in _unwrap(net).buffers():
                dist.broadcast(buffer, 0)
        val_acc, val_loss = evaluate(net, data.val, 2 * cfg.batch_size, ctx, cfg)
        row = {"stage": folder.name, "epoch": epoch + 1, "step": step,
               "train_loss": round(sums[0].item() / sums[2].item(), 6),
               "train_acc": round(100 * sums[1].item() / sums[2].item(), 4),
               "val_loss": round(val_loss, 6), "val_acc": round(val_acc, 4),
               "lr": scheduler.get_last_lr()[0], "tau": tau(step) if learns_selection else None,
               "seconds": round(time.perf_counter() - t0, 3)}
        history.append(row)
        if budget["epochs"] is not None:
            budget["epochs"] -= 1
        if ctx.main:
            state = _unwrap(net).state_dict()
            if val_acc > best:
                best = val_acc
                _atomic_save({"format": CHECKPOINT_FORMAT, "config": _config_dict(stage_cfg), "stage": stage,
                              "epoch": epoch + 1, "val_acc": val_acc, "model": state}, best_path)
            _atomic_save({"format": CHECKPOINT_FORMAT, "config": _config_dict(stage_cfg), "stage": stage,
                          "epoch": epoch + 1, "step": step, "best_acc": best, "model": state,
                          "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "rng": _rng_state(), "metrics": history}, last_path)
            _write_metrics(folder, history)
            log(f"{folder.name} epoch {epoch + 1}/{epochs}: loss {row['train_loss']:.4f}, "
                f"train {row['train_acc']:.2f}%, val {val_acc:.2f}% ({row['seconds']:.1f} s)")
        if ctx.world > 1:
            dist.barrier()

    model = _unwrap(net)
    if cfg.sync_bn and ctx.world > 1:
        model = _revert_sync_bn(model)
    if ctx.world > 1:
        dist.barrier()
    if cfg.export == "best" and best_path.exists():
        model.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True)["model"])
    final_acc = history[-1]["val_acc"] if history else None
    result = {"stage": folder.name, "epochs": epochs, "steps": step, "final_val_acc": final_acc,
              "best_val_acc": best, "seconds": round(sum(r["seconds"] for r in history), 3)}
    if ctx.main:
        (folder / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return model.eval(), result


def _check_same_selection(model: nn.Module) -> None:
    """Raises unless every rank holds the same hard selection in every layer (DDP broadcasts
    the buffers that seed the noise, so they must agree; this checks it once per epoch)."""
    selected = [m.selected for m in model.modules() if isinstance(getattr(m, "selected", None), torch.Tensor)]
    if not selected:
        return
    flat = torch.cat([s.flatten().long() for s in selected])
    low, high = flat.clone(), flat.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError("the ranks selected different codewords: their selection state diverged")


def _init_state(path: str) -> dict:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(blob, dict) and blob.get("format") == CHECKPOINT_FORMAT):
        raise ValueError(f"--init {path!r} is not a checkpoint written by python -m sparks_ext train")
    return blob["model"]


def _revert_sync_bn(module: nn.Module) -> nn.Module:
    """SyncBatchNorm -> BatchNorm2d with the same state (for conversion and single-process use)."""
    out = module
    if isinstance(module, nn.SyncBatchNorm):
        out = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats).to(module.weight.device)
        out.load_state_dict(module.state_dict())
    for name, child in module.named_children():
        setattr(out, name, _revert_sync_bn(child))
    return out


# ---------------------------------------------------------------------------------------------
# the whole run

def train(config: Optional[TrainConfig] = None, **overrides) -> dict:
    """Runs the recipe of ``config`` (a :class:`TrainConfig`, or its fields as keywords) and
    returns the result (also written to ``--out/result.json``). Under torchrun, call it on
    every rank."""
    cfg = dataclasses.replace(config or TrainConfig(), **overrides).validate()
    threads = torch.get_num_threads()
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads)  # --threads is for this run only


def _train(cfg: TrainConfig) -> dict:
    from .data import load_datasets

    ctx = _setup_distributed(cfg)
    if cfg.batch_size % ctx.world:
        raise ValueError(f"--batch-size {cfg.batch_size} is the global batch: it must be divisible by the "
                         f"{ctx.world} processes")
    log = (lambda msg: print(msg, flush=True)) if ctx.main and not cfg.quiet else (lambda msg: None)
    out = Path(cfg.out)
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
    default_size = {"smallcnn": 28, "resnet18": 224, "resnet18-cifar": 32}[cfg.model]
    data = load_datasets(cfg.data, cfg.image_size, cfg.augment, cfg.seed, default_size)
    log(f"data {cfg.data}: {len(data.train)} train / {len(data.val)} val images, {len(data.classes)} classes, "
        f"{data.channels}x{data.image_size}x{data.image_size}, augmentation {data.augment}; "
        f"{ctx.world} process(es) on {ctx.device}, {torch.get_num_threads()} thread(s) each")
    start = time.perf_counter()
    results = {}
    teacher = None
    budget = {"epochs": cfg.stop_after}  # --stop-after counts the epochs of all stages of this call
    if cfg.teacher == "train":
        teacher, results["teacher"] = _run_stage(cfg, "teacher", data, ctx, None, None,
                                                 cfg.teacher_epochs or cfg.epochs, log, budget)
        if teacher is None:
            return _stopped(ctx)
        for p in teacher.parameters():
            p.requires_grad_(False)
    elif cfg.teacher is not None:
        teacher = load_teacher(cfg, cfg.teacher, len(data.classes), data.channels, data.image_size, ctx.device)
    if teacher is not None:
        acc, _ = evaluate(teacher, data.val, 2 * cfg.batch_size, ctx, cfg)
        results["teacher_val_acc"] = acc
        log(f"teacher: val {acc:.2f}%")

    state = _init_state(cfg.init) if cfg.init is not None else None
    model = None
    for stage in cfg.stages:
        epochs = cfg.stage1_epochs or cfg.epochs if stage == "1" else cfg.epochs
        model, results[_stage_name(stage)] = _run_stage(cfg, stage, data, ctx, teacher, state, epochs, log, budget)
        if model is None:
            return _stopped(ctx)
        # Stage 2 starts from stage 1's weights; its own model has the layers' binary forward.
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    result = {"config": _config_dict(cfg), "world_size": ctx.world, **results,
              "seconds": round(time.perf_counter() - start, 3)}
    if ctx.main and cfg.stages[-1] == "1":
        # Stage 1 keeps real weights: there is no binary network to convert yet.
        preds, labels = _predictions(model.cpu().eval(), data.val, cfg.workers)
        result["accuracy"] = 100 * (preds == labels).float().mean().item()
        (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        log(f"stage 1 done in {result['seconds']:.0f} s: val accuracy {result['accuracy']:.2f}%; continue with "
            f"--stage 2 --init {out / 'stage1' / 'last.pt'}")
    elif ctx.main:
        result.update(_finish(cfg, model.cpu(), data))
        (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        log(f"done in {result['seconds']:.0f} s: val accuracy {result['accuracy']:.2f}% "
            f"(converted {result['converted_accuracy']:.2f}%), {result['bits_per_weight']:.3f} bits/weight, "
            f"{out / 'model.spk'} {result['file_bytes']:,} bytes")
    if ctx.world > 1:
        dist.barrier()
    return result


def _stopped(ctx: _Dist) -> dict:
    if ctx.world > 1:
        dist.barrier()
    return {"stopped": True}


@torch.no_grad()
def _predictions(model, dataset, workers: int = 0, batch_size: int = 256):
    preds, labels = [], []
    for x, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers):
        preds.append(model(x).argmax(1))
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def _finish(cfg: TrainConfig, model: nn.Module, data) -> dict:
    """Converts the final network, checks it, saves it in the compact format, summarises it."""
    from .convert import convert
    from .serialization import save
    from .summary import summary

    out = Path(cfg.out)
    model.eval()
    preds, labels = _predictions(model, data.val, cfg.workers)
    converted = convert(model)
    converted_preds, _ = _predictions(converted, data.val, cfg.workers)
    size = save(converted, out / "model.spk")
    info = summary(converted, (data.channels, data.image_size, data.image_size),
                   name=f"{cfg.model} ({cfg.conv}{'' if cfg.conv in ('float', 'binary') else f', n={cfg.n_codewords}'})")
    (out / "summary.txt").write_text(str(info) + "\n")
    result = {"accuracy": 100 * (preds == labels).float().mean().item(),
              "converted_accuracy": 100 * (converted_preds == labels).float().mean().item(),
              "converted_agreement": 100 * (converted_preds == preds).float().mean().item(),
              "bits_per_weight": info.binary_bits_per_weight, "memory_bytes": info.memory_bytes,
              "file_bytes": size}
    if cfg.frequency_eval:
        from .nn import BinaryConv2d
        import copy
        result["frequency_accuracy"] = {}
        for n in cfg.frequency_eval:
            freq = copy.deepcopy(model)
            _replace(freq, lambda m: isinstance(m, BinaryConv2d), lambda m: m.to_inference(n_codewords=n))
            p, _ = _predictions(freq.eval(), data.val, cfg.workers)
            result["frequency_accuracy"][str(n)] = 100 * (p == labels).float().mean().item()
    return result


def _replace(module: nn.Module, match, make) -> None:
    for name, child in module.named_children():
        if match(child):
            setattr(module, name, make(child))
        else:
            _replace(child, match, make)


# ---------------------------------------------------------------------------------------------
# command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``python -m sparks_ext train`` (defaults from :class:`TrainConfig`)."""
    d = TrainConfig()
    g = p.add_argument_group("data and model")
    g.add_argument("--data", default=d.data,
                   help="'digits' (scikit-learn's 8x8 digits, built in) or an image folder DIR with "
                        "DIR/train/<class>/*.png|jpg and DIR/val/<class>/... (default: %(default)s)")
    g.add_argument("--model", choices=MODELS, default=d.model,
                   help="smallcnn (8x8 or 28x28 input), resnet18 (ImageNet stem, 224x224) or resnet18-cifar "
                        "(3x3 stem, 32x32) (default: %(default)s)")
    g.add_argument("--conv", choices=CONVS, default=d.conv,
                   help="type of the 3x3 block convs: float, binary (1-bit), sparks (learned sub-codebook) or "
                        "signed (signed-binary) (default: %(default)s)")
    g.add_argument("--n-codewords", type=int, default=d.n_codewords,
                   help="codebook size n of --conv sparks (log2(n)/9 bits per weight), or the mask "
                        "sub-codebook of --conv signed (default: %(default)s)")
    g.add_argument("--width", type=int, default=d.width, help="channels of smallcnn's first stage (default: %(default)s)")
    g.add_argument("--image-size", type=int, default=None,
                   help="model input size; images are resized to it (default: 8 for digits, else 28 for "
                        "smallcnn, 224 for resnet18, 32 for resnet18-cifar)")
    g.add_argument("--augment", choices=("auto", "none", "small", "imagenet"), default=d.augment,
                   help="training augmentation: small = padded random crop + flip, imagenet = RandomResizedCrop "
                        "+ flip + lighting; auto = none for digits, small up to 64 px, imagenet above "
                        "(default: %(default)s)")
    g.add_argument("--workers", type=int, default=d.workers, help="DataLoader worker processes (default: %(default)s)")
    g = p.add_argument_group("recipe")
    g.add_argument("--stage", choices=STAGES, default=d.stage,
                   help="two = ReActNet's stages (1: binary activations with real weights; 2: binary weights "
                        "from stage 1's weights), one = a single binary stage from scratch, 1 or 2 = that "
                        "stage alone; auto = two, or one for --conv float (default: %(default)s)")
    g.add_argument("--init", default=None,
                   help="start from the weights of a checkpoint of this command, e.g. --stage 2 --init "
                        "OUT/stage1/last.pt (default: none)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="epochs per stage (default: %(default)s)")
    g.add_argument("--stage1-epochs", type=int, default=None, help="epochs of stage 1 (default: --epochs)")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="global batch size, split over torchrun's processes (default: %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (default: %(default)s)")
    g.add_argument("--lr-schedule", choices=SCHEDULES, default=d.lr_schedule,
                   help="decay of the learning rate to 0 over each stage (default: %(default)s)")
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs,
                   help="linear warm-up of the learning rate (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="Adam weight decay of conv and linear weights (default: 1e-5, and 0 in stage 2)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                   help="adam, or bop: Bop flips the 1-bit weights (--conv binary), Adam trains the rest "
                        "(default: %(default)s)")
    g.add_argument("--bop-gamma", type=float, default=d.bop_gamma, help="Bop's adaptivity rate (default: %(default)s)")
    g.add_argument("--bop-tau", type=float, default=d.bop_tau, help="Bop's flip threshold (default: %(default)s)")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing,
                   help="label smoothing of the cross-entropy (default: %(default)s)")
    g.add_argument("--tau-start", type=float, default=d.tau_start,
                   help="Sinkhorn temperature of the learned selection at the start of a stage (default: %(default)s)")
    g.add_argument("--tau-end", type=float, default=d.tau_end,
                   help="... and at its end, decayed exponentially over the stage's steps (default: %(default)s)")
    g = p.add_argument_group("distillation")
    g.add_argument("--teacher", default=None,
                   help="'train' (train a float network of --model first, in OUT/teacher) or a checkpoint: one "
                        "written by this command, or any torch state dict with --teacher-model (default: none)")
    g.add_argument("--teacher-model", default=None,
                   help="architecture of a plain state-dict --teacher: one of the --model names (float convs) "
                        "or 'module:function' called with num_classes=")
    g.add_argument("--teacher-epochs", type=int, default=None, help="epochs of --teacher train (default: --epochs)")
    g.add_argument("--distill-weight", type=float, default=d.distill_weight,
                   help="loss = w * distribution loss + (1 - w) * cross-entropy; ReActNet: 1 (default: %(default)s)")
    g.add_argument("--distill-temperature", type=float, default=d.distill_temperature,
                   help="softmax temperature of the distribution loss (default: %(default)s)")
    g = p.add_argument_group("scale and operations")
    g.add_argument("--amp", action="store_true", help="mixed precision: bf16 autocast on CPU, fp16 (or "
                                                      "--amp-dtype bf16) on GPU")
    g.add_argument("--amp-dtype", choices=("auto", "bf16", "fp16"), default=d.amp_dtype,
                   help="autocast dtype on GPU (default: %(default)s = fp16 with a gradient scaler)")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across torchrun's processes")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device,
                   help="auto = the local GPU when there is one (default: %(default)s)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: torch's; under torchrun on CPU, cores / processes)")
    g.add_argument("--seed", type=int, default=d.seed, help="initialisation, data order, augmentation, noise (default: %(default)s)")
    g.add_argument("--out", default=d.out, help="output folder: checkpoints, metrics, model.spk (default: %(default)s)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint up to --epochs")
    g.add_argument("--export", choices=EXPORTS, default=d.export,
                   help="which weights of the final stage to convert and save: the last epoch's or the "
                        "best validation epoch's (default: %(default)s)")
    g.add_argument("--frequency-eval", type=int, nargs="*", default=[], metavar="N",
                   help="with --conv binary, also report the accuracy with each layer's N most frequent kernels")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop (as if interrupted) after this many epochs of this invocation; --resume continues")
    g.add_argument("--quiet", action="store_true", help="no progress bar or log lines")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def main(args: argparse.Namespace) -> int:
    try:
        result = train(config_from_args(args))
    except ValueError as e:
        print(f"python -m sparks_ext train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0 if result.get("stopped") or result.get("converted_agreement", 100.0) == 100.0 else 1

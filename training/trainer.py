"""The ABM trainer: mutual learning of L2R and R2L on a shared encoder (spec 4), built for speed.

Speed levers used here: every image decoded once and kept on the GPU as fixed padded batches
(bucketed by size, few distinct shapes for cuDNN's tuner), bf16 autocast, ``U_a F`` once per
batch and the folded coverage convolution (``DecoderBranch.teacher_forward``), embedding-side and
output matmuls batched over all steps, no host synchronisation inside an epoch (losses are summed on
the device), and validation decoded with the batched beam search.
"""
from __future__ import annotations

import json
import math
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from abm_rt.data.crohme import read_split
from abm_rt.data.vocab import Vocab
from abm_rt.decode import beam_search
from abm_rt.engine_dir import save_engine
from abm_rt.metrics import score_predictions
from abm_rt.model import ABM, ModelConfig, initialize

from .augment import random_affine
from .bn_recalibrate import batchnorm_buffers, recalibrate_batchnorm
from .ema import WeightAverage
from .checkpoint import has_state, load_state, save_state
from .losses import distillation_kl, sequence_ce, soft_target_kl
from .graphed import LOSS_PARTS, GraphedTrainStep, optimizer_step
from .packed import PackedBatch, pack_fixed_shapes, pack_split
from .paired import paired_teacher_forward


def _opt(default: Any, help: str) -> Any:
    """A TrainConfig field with its ``--help`` text (training/__main__.py builds the options from these)."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved with the run). The defaults are the runs' recipe:
    Adadelta at lr 1.0 with clip 100 (spec 4.4-4.5), as in abm-warm and every later run under training/runs/,
    and batches of <= 96 images / 1.5 M px, as in most of them."""

    data: str = _opt("../shared/data/crohme", "CROHME directory with train/ and 2014/ (the validation set)")
    out: str = _opt("runs/abm", "run directory: log.jsonl, state/ (resumed from when present), best_engine/")
    epochs: int = _opt(120, "the schedule's length in epochs; with --time-budget, only a cap")
    time_budget: float | None = _opt(None, "training seconds over all resumes (validation not counted): the "
                                     "cosine runs on elapsed training time and ends when they are spent")
    stop_after: float | None = _opt(None, "seconds for this invocation: save and exit before the next epoch "
                                    "would overrun them (device calls are capped at 10 minutes)")
    optimizer: str = _opt("adadelta", "adadelta (spec 4.4: rho 0.9, eps 1e-6) or adamw")
    lr: float = _opt(1.0, "peak learning rate (Adadelta works at 0.1-1; AdamW above 0.05 is refused)")
    weight_decay: float = _opt(1e-4, "weight decay: with Adadelta, L2 added to the gradient of every "
                                "parameter (spec 4.4); AdamW decouples it")
    warmup_epochs: float = _opt(1.0, "linear learning-rate warm-up, in epochs")
    min_lr_ratio: float = _opt(0.02, "the cosine ends at this fraction of --lr")
    clip: float = _opt(100.0, "gradient-norm clip (spec 4.5)")
    max_batch: int = _opt(96, "images per training batch at most")
    batch_pixels: int = _opt(1_500_000, "padded pixels per training batch at most")
    pad_to: tuple = _opt((32, 64), "batch canvases rounded up to multiples of H,W: few distinct shapes, "
                         "since each new one costs cuDNN set-up (and a graph capture)")
    pairing: str = _opt("aligned", "KL pairing: aligned (same target token of the same sample) or paper "
                        "(the paper code's order, spec 7.1)")
    kl_weight: float = _opt(8.0, "KL weight, beta * T^2 = 0.5 * 16 (spec 4.3)")
    label_smoothing: float = _opt(0.0, "label smoothing eps of both branches' training CE (validation CE "
                                  "stays plain); not in the paper")
    kl_warmup_epochs: float = _opt(0.0, "ramp the KL weight linearly from 0 over these epochs (e.g. while a "
                                   "freshly initialised R2L branch meets a warm-started L2R)")
    init_from: str | None = _opt(None, "warm start from an engine directory (the word default names the "
                                 "bundled one): encoder, L2R and its R2L when it carries one; or from a trainer "
                                 "state or weights export: every branch. Optimizer and schedule start afresh")
    bidirectional: bool = _opt(True, "train the R2L branch and the KL term; false: the L2R-only baseline")
    precision: str = _opt("bf16", "bf16 (autocast) or fp32")
    val_every: int = _opt(2, "epochs between validation decodes (beam search on 2014)")
    val_from: int = _opt(0, "no validation decode before this epoch")
    val_beam: int = _opt(10, "validation beam size")
    val_batch_pixels: int = _opt(4_000_000, "padded pixels per validation batch")
    seed: int = _opt(1, "seed of the initialisation, the batch order and the augmentation")
    train_limit: int | None = _opt(None, "use only the first N training images (smoke runs)")
    val_limit: int | None = _opt(None, "validate on the first N images of 2014 only")
    device: str = _opt("auto", "auto (CUDA when present), cuda or cpu")
    attention_fp32: bool = _opt(False, "attention (U_a F, coverage conv, energies, softmax, context) and the "
                                "coverage sum in fp32 with autocast off; GRUs and output stay under autocast")
    compile_step: bool = _opt(False, "torch.compile one decoder time step (the loop over t stays in Python)")
    cuda_graphs: bool = _opt(False, "replay each whole training step from one CUDA graph per batch shape "
                             "(training/graphed.py), batches packed on a shape grid; on a CPU the same "
                             "fixed-shape batches train eagerly. The fast path on a GPU")
    branch_streams: bool = _opt(False, "run the R2L branch (forward and, through autograd, backward) on a "
                                "second CUDA stream beside the L2R one, captured as parallel work in the CUDA "
                                "graphs; CUDA only. No speed-up measured: on an H200 at batches of 24, 23.55-23.79 s "
                                "per epoch against 23.12-23.34 without (tests/logs/2026-12-03_branch_streams_h200); "
                                "on an H100 at batches of 16, 0.98x a step "
                                "(benchmarks/results/train_branch_modes_h100_2026-12-06.json)")
    paired_branches: bool = _opt(False, "teacher-force the L2R and R2L branches in lock-step as one stacked "
                                 "computation (training/paired.py): each decoder kernel serves both branches; "
                                 "its first version ran 0.22x a step on an H100 (benchmarks/results/"
                                 "train_branch_modes_h100_2026-12-06.json), likely because its grouped coverage conv "
                                 "ran on PyTorch's slow depthwise kernels; with that conv dense it runs 1.205x "
                                 "(train_branch_modes_h100_2026-12-06b.json) and abm-paper's epochs 1.24x faster; "
                                 "not with --branch-streams or --compile-step")
    save_every: int = _opt(1, "epochs between saved states (a pause or the end always saves)")
    log_attention_sharpness: bool = _opt(True, "after each validation, log the mean peak attention weight of "
                                         "the first val batch (val_att_max) and the uniform baseline")
    scale_min: float = _opt(1.0, "augmentation, a map per image and step: log-uniform scale in "
                            "[scale_min, scale_max] (training/augment.py; 1 = off)")
    scale_max: float = _opt(1.0, "upper end of the scale augmentation")
    aspect_max: float = _opt(1.0, "augmentation: log-uniform width/height ratio in [1/aspect_max, aspect_max]")
    shear_max: float = _opt(0.0, "augmentation: slant x += k y, k uniform in +-shear_max")
    rotate_deg: float = _opt(0.0, "augmentation: rotation uniform in +-rotate_deg degrees")
    curriculum_epochs: float = _opt(0.0, "> 0: a length curriculum: epoch e < N trains only the fraction "
                                    "start + (1 - start) e / N of the batches, those with the shortest labels")
    curriculum_start: float = _opt(0.2, "the curriculum's first fraction of the batches")
    ema_decay: float = _opt(0.0, "> 0: also validate an EMA of the weights (training/ema.py) and keep whichever "
                            "decodes better as best_engine. Not in the state: a resume restarts the average")
    average_from: int = _opt(0, "> 0: from this epoch on, also keep the plain mean of the weights at the end of each "
                             "epoch (stochastic weight averaging), validated as 'tail' and saved like the EMA, with "
                             "BatchNorm statistics recomputed for it (training/bn_recalibrate.py). Not in the state: "
                             "a resume restarts the mean")
    average_bn_batches: int = _opt(200, "training batches (evenly spread, no augmentation) that recompute the "
                                   "BatchNorm statistics of the --average-from mean")
    teachers: str | None = _opt(None, "distil from these models (comma separated: engine directories, trainer "
                                "states or weights exports, or default), each with its R2L branch: their mean "
                                "soft predictions on the training set are computed once (training/distill.py)")
    teacher_weight: float = _opt(1.0, "with --teachers: weight of the KL towards their soft targets (times T^2), "
                                 "added for each branch")
    teacher_temperature: float = _opt(2.0, "with --teachers: the temperature T of their and the student's softmax")
    model: dict = _opt({}, "ModelConfig overrides as JSON (tests use small models)")


def _lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int, progress: float) -> float:
    """Linear warm-up over ``warmup_epochs``, then cosine decay to ``min_lr_ratio * lr`` as
    ``progress`` (fraction of the run done, by steps or by training time) goes from 0 to 1."""
    warm = max(1, int(cfg.warmup_epochs * steps_per_epoch))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    p = min(1.0, max(0.0, progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


# AdamW's working rates are ~1e-3; Adadelta's (spec 4.4) are ~0.1-1. A rate of the other's scale is a
# forgotten --optimizer: AdamW at lr 0.5 took a trained model to a CE of 1e5 within one epoch (run
# abm-affine's first attempt, training/runs/abm-affine/failed_adamw_attempt.log.jsonl).
ADAMW_MAX_LR = 0.05


def _check_learning_rate(cfg: TrainConfig) -> None:
    if cfg.optimizer == "adamw" and cfg.lr > ADAMW_MAX_LR:
        raise ValueError(f"lr {cfg.lr} with optimizer adamw: AdamW diverges at rates of Adadelta's scale "
                         f"(adamw's default is 1.5e-3; the limit here is {ADAMW_MAX_LR}). For the spec's "
                         f"Adadelta pass --optimizer adadelta (and --clip 100).")


def should_pause(elapsed: float, epoch_seconds: list[float], stop_after: float, margin: float = 1.15) -> bool:
    """Whether another epoch would overrun ``stop_after`` seconds of this invocation.

    ``epoch_seconds`` are this invocation's epochs in wall seconds (validation and checkpoint included). The
    next epoch is estimated as the costliest one after the first (a validation epoch costs more), or as the
    first while it is the only one. Why not the mean of all: the first epoch after a start carries the
    one-time CUDA graph capture (91-111 s, against 47-53 s an epoch), and that mean paused abm-paper's
    session 4 one epoch early (at 166 s of 260)."""
    if not epoch_seconds:
        return False
    estimate = max(epoch_seconds[1:]) if len(epoch_seconds) > 1 else epoch_seconds[0]
    return elapsed + estimate * margin > stop_after


def augments(cfg: TrainConfig) -> bool:
    """Whether ``cfg`` asks for any geometric augmentation of the training images."""
    return (cfg.scale_min, cfg.scale_max, cfg.aspect_max, cfg.shear_max, cfg.rotate_deg) != (1.0, 1.0, 1.0, 0.0, 0.0)


def batch_loss(model: ABM, b: PackedBatch, cfg: TrainConfig, device_type: str, autocast_cache: bool = True,
               kl_weight: float | torch.Tensor | None = None, side_stream: torch.cuda.Stream | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss of one batch (spec 4.3) and its detached parts [ce_l2r, ce_r2l, kl, kd].

    ``kd``: when the batch carries teacher soft targets (``training.distill``), the KL towards them summed
    over the branches; ``cfg.teacher_weight * T^2`` times it joins the loss.

    ``autocast_cache=False`` for CUDA-graph capture (autocast's cast-weight cache cannot be captured).
    ``kl_weight`` overrides ``cfg.kl_weight``; a tensor lets a captured graph follow a schedule.
    ``side_stream`` (CUDA): the R2L branch runs there, beside the L2R one (``r2l_on_side_stream``).
    ``cfg.paired_branches``: both branches in one stacked pass (``training.paired``)."""
    if model.training and augments(cfg):
        x, pmask = random_affine(b.images.float().div_(255.0), b.heights, b.widths, (cfg.scale_min, cfg.scale_max),
                                 cfg.aspect_max, cfg.rotate_deg, cfg.shear_max)
    else:
        x, pmask = b.inputs()
    amp = torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16",
                         cache_enabled=autocast_cache)
    opts = {"attention_fp32": cfg.attention_fp32, "compile_step": cfg.compile_step}
    with amp:
        feats, fmask = model.encode(x, pmask)
        paired = cfg.paired_branches and model.r2l is not None
        if paired:
            zl, zr = paired_teacher_forward(model.l2r, model.r2l, feats, fmask, b.l2r_in, b.r2l_in,
                                            cfg.attention_fp32)
        else:
            zl, _ = model.l2r.teacher_forward(feats, fmask, b.l2r_in, **opts)
        ce_l = sequence_ce(zl, b.l2r_tgt, b.lengths, cfg.label_smoothing)
        kd = _teacher_kl(zl, b.l2r_soft, b, cfg)
        if model.r2l is None:
            zero = ce_l.new_zeros(())
            return ce_l + _teacher_scale(cfg) * kd, torch.stack([ce_l.detach(), zero, zero, kd.detach()])
        if not paired:      # after the L2R loss, so that it overlaps a side stream's R2L work
            zr = (model.r2l.teacher_forward(feats, fmask, b.r2l_in, **opts)[0] if side_stream is None
                  else r2l_on_side_stream(model, feats, fmask, b, opts, side_stream))
    ce_r = sequence_ce(zr, b.r2l_tgt, b.lengths, cfg.label_smoothing)
    kl = distillation_kl(zl, zr, b.lengths, cfg.pairing)
    kd = kd + _teacher_kl(zr, b.r2l_soft, b, cfg)
    loss = ce_l + ce_r + (cfg.kl_weight if kl_weight is None else kl_weight) * kl + _teacher_scale(cfg) * kd
    return loss, torch.stack([ce_l.detach(), ce_r.detach(), kl.detach(), kd.detach()])


def _teacher_kl(logits: torch.Tensor, soft: torch.Tensor | None, b: PackedBatch, cfg: TrainConfig) -> torch.Tensor:
    """The KL towards one branch's teacher targets, or 0 when the batch has none."""
    if soft is None:
        return logits.new_zeros((), dtype=torch.float32)
    return soft_target_kl(logits, soft, b.lengths, cfg.teacher_temperature)


def _teacher_scale(cfg: TrainConfig) -> float:
    """Hinton's T^2: keeps the soft targets' gradients on the hard targets' scale whatever the temperature."""
    return cfg.teacher_weight * cfg.teacher_temperature ** 2


def r2l_on_side_stream(model: ABM, feats: torch.Tensor, fmask: torch.Tensor, b: PackedBatch, opts: dict,
                       side: torch.cuda.Stream) -> torch.Tensor:
    """The R2L teacher-forced logits, computed on ``side`` while the L2R branch's kernels run on the current
    stream: the two decoders share only the encoder's features, and each is a chain of small kernels that
    leaves most of the GPU idle. Autograd runs each backward op on its forward op's stream, so the two
    backward passes overlap as well; a CUDA graph captures the fork and the join as parallel branches."""
    main = torch.cuda.current_stream()
    eager = not torch.cuda.is_current_stream_capturing()
    side.wait_stream(main)                     # the features are ready
    if eager:                                  # main's blocks, read on ``side``: not reused before side is done
        for t in (feats, fmask):
            t.record_stream(side)
    with torch.cuda.stream(side):
        zr, _ = model.r2l.teacher_forward(feats, fmask, b.r2l_in, **opts)
    main.wait_stream(side)                     # the logits are ready for the loss
    if eager:
        zr.record_stream(main)                 # side's block, read on main
    return zr


def attention_sharpness(alpha: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> tuple[float, float]:
    """(mean max attention weight, mean uniform weight 1 / valid cells) over the valid steps t <= n_b.

    alpha [B, T, H', W'] (teacher-forced attention), mask [B, H', W'] valid feature cells, lengths [B] = n_b.
    A ratio near 1 means diffuse attention; an aligned model puts most of the weight on a few cells.
    """
    B, T = alpha.shape[:2]
    steps = torch.arange(T, device=alpha.device)[None, :] < (lengths + 1)[:, None]          # [B, T]
    peak = alpha.flatten(2).amax(-1).float()                                                # [B, T]
    uniform = (1.0 / mask.flatten(1).sum(1).clamp(min=1).float())[:, None].expand(B, T)
    n = steps.sum().clamp(min=1)
    return float((peak * steps).sum() / n), float((uniform * steps).sum() / n)


class Trainer:
    """Owns the model, optimizer, packed data and run directory of one training run."""

    def __init__(self, cfg: TrainConfig):
        _check_learning_rate(cfg)
        self.cfg = cfg
        self.device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if cfg.device == "auto" else cfg.device))
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        if self.device.type == "cuda":
            # No autotuning: it costs seconds for every new batch shape, in every process.
            torch.backends.cudnn.benchmark = False
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.vocab = Vocab.default()
        self.model = ABM(ModelConfig(**cfg.model), bidirectional=cfg.bidirectional)
        initialize(self.model)
        self.model.to(self.device)
        self.kl_scale = torch.tensor(cfg.kl_weight, device=self.device)   # filled per step (KL warm-up)
        self.graphed_wanted = cfg.cuda_graphs and self.device.type == "cuda"
        if cfg.paired_branches and (cfg.branch_streams or cfg.compile_step):
            raise ValueError("--paired-branches computes both branches in one stacked pass: it cannot also put "
                             "R2L on a second stream (--branch-streams) or compile one branch's step "
                             "(--compile-step); choose one")
        if cfg.branch_streams and self.device.type != "cuda":
            raise ValueError(f"--branch-streams runs the R2L branch on a second CUDA stream: it needs a CUDA "
                             f"device, not {self.device}")
        self.side_stream = torch.cuda.Stream(self.device) if cfg.branch_streams else None   # unused without R2L
        self.opt = self._optimizer()
        t0 = time.time()
        data = Path(cfg.data)
        train = read_split(data / "train", limit=cfg.train_limit)
        val = read_split(data / "2014", limit=cfg.val_limit)
        pad = tuple(cfg.pad_to)
        if cfg.cuda_graphs:
            self.train_batches = pack_fixed_shapes(train, self.vocab, self.device, cfg.max_batch, cfg.batch_pixels)
        else:
            self.train_batches = pack_split(train, self.vocab, self.device, cfg.max_batch, cfg.batch_pixels, pad)
        self.val_batches = pack_split(val, self.vocab, self.device, 128, cfg.val_batch_pixels, pad)
        self.teacher_seconds = self._attach_teacher_targets() if cfg.teachers else None
        self.n_train, self.n_val = len(train), len(val)
        # batches ordered by their longest label, for the curriculum (host-side labels: no device reads)
        self.longest_label = [max(map(len, b.tokens)) for b in self.train_batches]
        self.by_length = sorted(range(len(self.train_batches)), key=lambda i: (self.longest_label[i], i))
        self.load_seconds = time.time() - t0
        self.meta: dict[str, Any] = {"epoch": 0, "step": 0, "best_exprate": -1.0,
                                     "best_epoch": None, "train_seconds": 0.0, "config": asdict(cfg)}
        if has_state(self.out / "state"):
            self.meta.update(load_state(self.out / "state", self.model, self.opt))
        elif cfg.init_from:
            self._warm_start(cfg.init_from)
        self.ema = WeightAverage(list(self.model.parameters()), cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.tail = WeightAverage(list(self.model.parameters()), None) if cfg.average_from > 0 else None
        self.graphed: GraphedTrainStep | None = None
        if self.graphed_wanted:
            self.graphed = GraphedTrainStep(self.model, self.opt, self._loss, cfg.clip)

    def _warm_start(self, source: str) -> None:
        """Weights (and BN statistics) from an engine directory (encoder, L2R and R2L when it has one) or
        from a trainer state directory, e.g. a ``--export-weights`` or fp16 weights export (every branch,
        R2L included; the optimizer, schedule and epoch start afresh)."""
        from abm_rt.engine_dir import default_engine_path, load_engine

        if source != "default" and has_state(source):
            from export.convert import load_trainer_state

            src, _ = load_trainer_state(source, bidirectional=self.cfg.bidirectional)
            where = source
        else:
            engine = load_engine(default_engine_path() if source == "default" else source)
            src, where = engine.model, engine.path
        if not src.cfg.same_weights_layout(self.model.cfg):
            raise ValueError(f"--init-from {source}: its model dimensions {src.cfg} differ from this run's")
        with torch.no_grad():   # every branch both have (an engine without R2L leaves R2L at its init)
            for name in ("encoder", "l2r", "r2l"):
                if getattr(src, name, None) is not None and getattr(self.model, name, None) is not None:
                    getattr(self.model, name).load_state_dict(getattr(src, name).state_dict())
        self.meta["init_from"] = str(where)

    def _attach_teacher_targets(self) -> float:
        """Load ``--teachers``, attach their soft targets to every training batch, free them; the seconds."""
        from .distill import attach_soft_targets, load_teachers

        t0 = time.time()
        teachers = load_teachers(self.cfg.teachers, self.device)
        for name, model in teachers:
            if not model.cfg.same_weights_layout(self.model.cfg):
                raise ValueError(f"--teachers {name}: its model dimensions {model.cfg} differ from this run's "
                                 f"(the soft targets need the same vocabulary and step layout, not the same size, "
                                 f"but a mismatch here is almost always a wrong path)")
        attach_soft_targets(self.train_batches, [m for _, m in teachers], self.cfg.teacher_temperature,
                            bf16=self.cfg.precision == "bf16", attention_fp32=self.cfg.attention_fp32)
        del teachers
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        return time.time() - t0

    def _kl_weight_at(self, step: int, steps_per_epoch: int) -> float:
        """The KL weight: ``kl_weight``, ramped from 0 over ``kl_warmup_epochs`` when set."""
        ramp = self.cfg.kl_warmup_epochs * steps_per_epoch
        return self.cfg.kl_weight * (min(1.0, (step + 1) / ramp) if ramp > 0 else 1.0)

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW (fused) or Adadelta (spec 4.4). For CUDA graphs: capturable, with one lr tensor that the
        schedule fills in place (a float would be baked into the captured kernels)."""
        cfg, params = self.cfg, list(self.model.parameters())
        graphs = self.graphed_wanted
        lr = torch.tensor(cfg.lr, device=self.device) if graphs else cfg.lr
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay,
                                     fused=self.device.type == "cuda", capturable=graphs)
        if cfg.optimizer == "adadelta":
            return torch.optim.Adadelta(params, lr=lr, rho=0.9, eps=1e-6, weight_decay=cfg.weight_decay,
                                        foreach=True if graphs else None, capturable=graphs)
        raise ValueError(f"optimizer must be 'adamw' or 'adadelta', got {cfg.optimizer!r}")

    # ---- one epoch --------------------------------------------------------------------------------
    def _loss(self, b: PackedBatch, autocast_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_loss(self.model, b, self.cfg, self.device.type, autocast_cache, self.kl_scale, self.side_stream)

    def _eager_step(self, b: PackedBatch, sums: torch.Tensor) -> None:
        optimizer_step(list(self.model.parameters()), self.opt, self._loss, b, self.cfg.clip, sums)

    def _graphed_step(self, b: PackedBatch, sums: torch.Tensor) -> None:
        """A step from a CUDA graph; if capturing fails, say why and train eagerly from here on."""
        assert self.graphed is not None
        try:
            self.graphed.step(b)
        except RuntimeError as err:
            self._log({"event": "cuda_graphs_off", "reason": str(err)[:2000], "epoch": self.meta["epoch"]})
            sums += self.graphed.sums
            self.graphed = None
            torch.cuda.synchronize()
            try:        # a capture that failed midway can leave PyTorch's CUDA generator in capture mode
                torch.rand(1, device=self.device)
            except RuntimeError as rng_err:
                raise RuntimeError(
                    f"CUDA graph capture failed ({str(err)[:300]}) and left PyTorch's CUDA random generator in "
                    "capture mode, so this process cannot go on eagerly. Rerun with --cuda-graphs false, or make "
                    "the training step capturable (no host synchronisation)") from rng_err

    def epoch_batches(self, epoch: int) -> list[int]:
        """Indices of the batches epoch ``epoch`` (0-based) trains on: all of them, or during the length
        curriculum the shortest-label fraction ``curriculum_start + (1 - curriculum_start) e / N``."""
        n, cfg = len(self.train_batches), self.cfg
        if cfg.curriculum_epochs <= 0 or epoch >= cfg.curriculum_epochs:
            return list(range(n))
        fraction = cfg.curriculum_start + (1 - cfg.curriculum_start) * epoch / cfg.curriculum_epochs
        return sorted(self.by_length[:max(1, math.ceil(fraction * n))])

    def train_epoch(self) -> dict[str, float]:
        """One pass over the epoch's fixed batches in a shuffled order; returns mean losses and timing."""
        self.model.train()
        order = self.epoch_batches(self.meta["epoch"])
        random.Random(self.cfg.seed * 100003 + self.meta["epoch"]).shuffle(order)
        sums = torch.zeros(LOSS_PARTS, device=self.device)
        spe = len(self.train_batches)       # warm-up and KL ramp count full epochs, curriculum or not
        t0 = time.time()
        if self.graphed is not None:
            self.graphed.reset_sums()
        capture0 = self.graphed.capture_seconds if self.graphed is not None else 0.0
        for i, bi in enumerate(order):
            lr = _lr_at(self.cfg, self.meta["step"], spe, self._progress(i / len(order), time.time() - t0))
            for g in self.opt.param_groups:
                if torch.is_tensor(g["lr"]):
                    g["lr"].fill_(lr)
                else:
                    g["lr"] = lr
            if self.cfg.kl_warmup_epochs > 0:
                self.kl_scale.fill_(self._kl_weight_at(self.meta["step"], spe))
            if self.graphed is not None:
                self._graphed_step(self.train_batches[bi], sums)
            else:
                self._eager_step(self.train_batches[bi], sums)
            if self.ema is not None:
                self.ema.update()
            self.meta["step"] += 1
        if self.graphed is not None:
            sums += self.graphed.sums
        means = (sums / len(order)).tolist()    # the epoch's one host synchronisation
        secs = time.time() - t0
        # distinct images: each canvas's last batch is filled up with images that are trained twice
        images = len({name for bi in order for name in self.train_batches[bi].names})
        out = {"ce_l2r": means[0], "ce_r2l": means[1], "kl": means[2], "lr": lr,
               **({"kd": means[3]} if self.cfg.teachers else {}),
               "epoch_seconds": secs, "images_per_s": images / secs}
        if len(order) < len(self.train_batches):
            out["curriculum_batches"] = len(order)
            out["curriculum_max_len"] = self.longest_label[self.by_length[len(order) - 1]]
        if self.graphed is not None:
            out["graphs"] = len(self.graphed.graphs)
            out["capture_seconds"] = round(self.graphed.capture_seconds - capture0, 2)
        return out

    def _progress(self, epoch_fraction: float, epoch_seconds: float) -> float:
        """Fraction of the run done: by training time when there is a time budget, else by epochs."""
        if self.cfg.time_budget:
            return (self.meta["train_seconds"] + epoch_seconds) / self.cfg.time_budget
        return (self.meta["epoch"] + epoch_fraction) / self.cfg.epochs

    def finished(self) -> bool:
        """True when the run's epochs (or its time budget) are spent."""
        if self.meta["epoch"] >= self.cfg.epochs:
            return True
        return bool(self.cfg.time_budget) and self.meta["train_seconds"] >= self.cfg.time_budget

    # ---- validation ----------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, decode: bool) -> dict[str, Any]:
        """Teacher-forced L2R CE on 2014 (spec 4.6) and, if ``decode``, beam-search ExpRate.

        With ``log_attention_sharpness`` the first batch's teacher-forced pass also returns its
        attention maps (no extra forward), summarised as ``val_att_max`` / ``val_att_uniform``."""
        self.model.eval()
        t0 = time.time()
        ce_sum = torch.zeros((), device=self.device)
        preds, refs = [], []
        sharp = None
        for i, b in enumerate(self.val_batches):
            x, pmask = b.inputs()
            feats, fmask = self.model.encode(x, pmask)
            want_alpha = i == 0 and self.cfg.log_attention_sharpness
            zl, alpha = self.model.l2r.teacher_forward(feats, fmask, b.l2r_in, return_alpha=want_alpha)
            if want_alpha:
                sharp = attention_sharpness(alpha, fmask, b.lengths)
            ce_sum += sequence_ce(zl, b.l2r_tgt, b.lengths)
            if decode:
                for seq in beam_search(self.model.l2r, feats, fmask, self.cfg.val_beam, check_every=4):
                    preds.append(None if seq.truncated else self.vocab.decode(seq.tokens))
                refs.extend(b.tokens)
        out: dict[str, Any] = {"val_ce": float(ce_sum) / len(self.val_batches)}
        if sharp is not None:
            out["val_att_max"], out["val_att_uniform"] = sharp
        if decode:
            out.update({f"val_{k}": v for k, v in score_predictions(preds, refs).to_dict().items()})
        out["val_seconds"] = time.time() - t0
        return out

    @contextmanager
    def tail_weights(self) -> Iterator[None]:
        """Inside the block the model holds the ``--average-from`` mean of epoch-end weights, with BatchNorm
        statistics recomputed for it; on exit the raw weights and statistics come back (copied in place, so
        captured CUDA graphs stay valid). Why recompute: averaged weights never ran with any statistics."""
        with self.tail.applied():
            saved = [t.clone() for t in batchnorm_buffers(self.model)]
            n = max(1, self.cfg.average_bn_batches)
            try:
                recalibrate_batchnorm(self.model, self.train_batches[::max(1, len(self.train_batches) // n)][:n])
                yield
            finally:
                with torch.no_grad():
                    torch._foreach_copy_(batchnorm_buffers(self.model), saved)

    def _save_tail_engine(self, epoch: int) -> None:
        """Write the ``--average-from`` mean as ``tail_engine/`` when the run pauses or ends: it is lost with
        the process (not in the state), and offline evaluation may prefer it even where validation did not."""
        with self.tail_weights():
            save_engine(self.out / "tail_engine", self.model, self.vocab,
                        provenance={"trained_by": "abm_rt training", "epoch": epoch, "weights": "tail",
                                    "tail_epochs": [epoch - self.tail.updates + 1, epoch],
                                    "train_config": asdict(self.cfg)},
                        with_r2l=self.model.r2l is not None)

    def weights_of(self, kind: str):
        """A context holding the weights that validation named ``kind``: raw, ema or tail."""
        return {"raw": nullcontext, "ema": lambda: self.ema.applied(), "tail": self.tail_weights}[kind]()

    # ---- the run -------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        with open(self.out / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

    def run(self) -> dict[str, Any]:
        """Train until the epoch count (or the time budget) is reached; returns the final meta."""
        cfg = self.cfg
        start = time.time()
        self._log({"event": "start", "device": torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu",
                   "train_images": self.n_train, "train_batches": len(self.train_batches),
                   "val_images": self.n_val, "load_seconds": round(self.load_seconds, 2),
                   **({"teacher_seconds": round(self.teacher_seconds, 2)} if self.teacher_seconds is not None else {}),
                   "resumed_epoch": self.meta["epoch"], "config": asdict(cfg)})
        epoch_seconds: list[float] = []          # this invocation's epochs, for --stop-after
        while not self.finished():
            epoch_start = time.time()
            stats = self.train_epoch()
            self.meta["epoch"] += 1
            self.meta["train_seconds"] += stats["epoch_seconds"]
            e = self.meta["epoch"]
            if self.tail is not None and e >= cfg.average_from:
                self.tail.update()
            last = self.finished()
            decode = last or (e >= cfg.val_from and e % cfg.val_every == 0)
            val = self.validate(decode)
            record = {"epoch": e, "step": self.meta["step"], **stats, **val,
                      "elapsed": round(time.time() - start, 1)}
            candidates = [("raw", val)]
            for kind, average in (("ema", self.ema), ("tail", self.tail)):
                if decode and average is not None and average.updates > 0:
                    with self.weights_of(kind):
                        other = self.validate(decode)
                    candidates.append((kind, other))
                    record.update({f"{kind}_{k}": v for k, v in other.items()})
                    record["elapsed"] = round(time.time() - start, 1)
            if decode and self.tail is not None:
                record["tail_epochs"] = self.tail.updates
            weights, best = max(candidates, key=lambda c: c[1].get("val_exprate", -1.0))   # ties: raw
            if decode and best["val_exprate"] > self.meta["best_exprate"]:
                self.meta["best_exprate"], self.meta["best_epoch"] = best["val_exprate"], e
                self.meta["best_weights"] = weights
                with self.weights_of(weights):
                    save_engine(self.out / "best_engine", self.model, self.vocab,
                                provenance={"trained_by": "abm_rt training", "epoch": e, "weights": weights,
                                            "val_2014": {k[4:]: v for k, v in best.items() if k.startswith("val_")},
                                            "train_config": asdict(cfg)},
                                with_r2l=self.model.r2l is not None)
                record["saved_best"] = weights
            self._log(record)
            pause = False
            if cfg.stop_after is not None:
                epoch_seconds.append(time.time() - epoch_start)
                pause = should_pause(time.time() - start, epoch_seconds, cfg.stop_after)
            if pause or self.finished() or e % max(1, cfg.save_every) == 0:
                save_state(self.out / "state", self.model, self.opt, self.meta)
            if (pause or self.finished()) and self.tail is not None and self.tail.updates > 0:
                self._save_tail_engine(e)
            if pause:
                self._log({"event": "pause", "epoch": e, "elapsed": round(time.time() - start, 1)})
                break
        return self.meta

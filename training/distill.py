"""Distillation from teacher models: their soft predictions on the training set, computed once.

Why: every run so far memorises the training set (train CE ~0.04, 2014 val CE ~0.40), and two models of
different lineages disagree on many images that one of them gets right (tools/eval_ensemble.py measures
what pooling them gives). Training one model towards the averaged, temperature-softened predictions of
several (Hinton et al.'s distillation) hands it what the others learnt, in one model's inference cost.

The teachers run once, before training, teacher-forced on every packed training batch (no augmentation,
eval mode), and their averaged probabilities ``softmax(z / T)`` stay on the device beside the batch as
``PackedBatch.l2r_soft`` / ``r2l_soft`` [B, T, K] in bf16, so the training step (and its CUDA graphs)
only reads them. ``losses.soft_target_kl`` turns them into the loss term.
"""
from __future__ import annotations

import torch

from abm_rt.model import ABM

from .packed import PackedBatch


def load_teachers(sources: str, device: torch.device) -> list[tuple[str, ABM]]:
    """The models named in ``sources`` (comma separated: engine directories, trainer states or weights
    exports, or ``default`` for the bundled engine), in eval mode on ``device``. Each must carry its R2L
    branch: the R2L targets come from it."""
    from abm_rt.engine_dir import default_engine_path
    from export.convert import load_source

    out = []
    for name in [s.strip() for s in sources.split(",") if s.strip()]:
        model, _, _ = load_source(default_engine_path() if name == "default" else name)
        if model.r2l is None:
            raise ValueError(f"--teachers {name}: it has no R2L branch, so it cannot give R2L targets")
        out.append((name, model.to(device).eval()))
    if not out:
        raise ValueError("--teachers names no model")
    return out


@torch.no_grad()
def attach_soft_targets(batches: list[PackedBatch], teachers: list[ABM], temperature: float,
                        bf16: bool, attention_fp32: bool) -> None:
    """Set ``l2r_soft`` and ``r2l_soft`` of every batch: the teachers' mean ``softmax(z / temperature)``,
    teacher-forced on the batch's own inputs (the steps past a label get values too; every loss masks them)."""
    for b in batches:
        x, pmask = b.inputs()
        sums = [None, None]
        for model in teachers:
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                feats, fmask = model.encode(x, pmask)
                for k, (branch, inputs) in enumerate(((model.l2r, b.l2r_in), (model.r2l, b.r2l_in))):
                    z, _ = branch.teacher_forward(feats, fmask, inputs, attention_fp32=attention_fp32)
                    p = torch.softmax(z.float() / temperature, -1)
                    sums[k] = p if sums[k] is None else sums[k] + p
        b.l2r_soft, b.r2l_soft = (s.div_(len(teachers)).to(torch.bfloat16) for s in sums)

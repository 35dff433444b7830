"""Is the train/val gap of a trained model a BatchNorm train/eval mismatch? (CPU, a few minutes.)

Teacher-forced L2R CE of a trainer state on the first N training and N CROHME 2014 images, with BatchNorm in
eval mode (running statistics) and with BN on each batch's own statistics (momentum 0: nothing updated), dropout
off in both. If batch statistics gave a much lower val CE, the running statistics would be off (e.g. skewed
by padding); they do not for abm-soup, bundled then (training/runs/abm-b16/README.md).

    python3 tools/check_bn_statistics.py training/runs/abm-s3b/weights_fp16 --limit 160   # git checkout e8c3821 -- that path
"""
from __future__ import annotations

import argparse
import json

import torch

from training.losses import sequence_ce
from training.trainer import Trainer, TrainConfig


def mean_ce(trainer: Trainer, batches: list, batch_statistics: bool) -> float:
    """Mean over ``batches`` of the teacher-forced L2R CE, BN on running or on batch statistics.

    Not ``Trainer.validate``: that puts every module in eval mode first and reads only the validation batches."""
    trainer.model.eval()
    if batch_statistics:
        for m in trainer.model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.train()
                m.momentum = 0.0
    total = 0.0
    with torch.no_grad():
        for b in batches:
            x, pixel_mask = b.inputs()
            feats, mask = trainer.model.encode(x, pixel_mask)
            logits, _ = trainer.model.l2r.teacher_forward(feats, mask, b.l2r_in)
            total += float(sequence_ce(logits, b.l2r_tgt, b.lengths))
    return total / len(batches)


def main() -> None:
    """Print the four CEs as one JSON line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("state", help="a trainer state or weights export (e.g. training/runs/abm-s3b/weights_fp16)")
    ap.add_argument("--data", default="../shared/data/crohme")
    ap.add_argument("--limit", type=int, default=160, help="images of each split")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = TrainConfig(data=args.data, out="/tmp/check_bn_statistics", device="cpu", precision="fp32",
                      init_from=args.state, train_limit=args.limit, val_limit=args.limit,
                      optimizer="adadelta", lr=1.0, clip=100)
    t = Trainer(cfg)
    print(json.dumps({"val_eval": mean_ce(t, t.val_batches, False), "val_batchstat": mean_ce(t, t.val_batches, True),
                      "train_eval": mean_ce(t, t.train_batches, False),
                      "train_batchstat": mean_ce(t, t.train_batches, True)}))


if __name__ == "__main__":
    main()

"""How many training batches per epoch: the paper's batching (spec 1.5) next to our trainer's shape grid.

The CUDA-graph trainer packs images on canvases of a fixed grid (training/packed.py ``fixed_shape_groups``), up
to 1.5x larger per side than the images, so the same pixel cap holds fewer images than the paper's batching
(``abm_rt.data.buckets.paper_batches``, capped by each batch's largest real image). This prints both, as JSON,
for a few ``--batch-pixels`` values, to pick the setting that matches the paper's batches per epoch.

    python3 tools/count_train_batches.py ../shared/data/crohme/train --max-batch 16
"""
from __future__ import annotations

import argparse
import json

from abm_rt.data.buckets import paper_batches
from abm_rt.data.crohme import read_split
from training.packed import fixed_shape_groups


def main() -> None:
    """Print the counts as one JSON object."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("split", help="a CROHME split folder, e.g. ../shared/data/crohme/train")
    ap.add_argument("--max-batch", type=int, default=16, help="images per batch at most (the paper: 16)")
    ap.add_argument("--batch-pixels", default="320000,480000,560000,640000,800000",
                    help="comma separated pixel caps for our grid")
    args = ap.parse_args()
    samples = read_split(args.split)
    paper, dropped = paper_batches([s.image.shape for s in samples], args.max_batch, 320_000, 320_000)
    kept = len(samples) - len(dropped)
    grid = {}
    for px in (int(v) for v in args.batch_pixels.split(",")):
        n = len(fixed_shape_groups(samples, args.max_batch, px))
        grid[px] = {"batches": n, "images_per_batch": round(len(samples) / n, 2)}
    print(json.dumps({"images": len(samples), "max_batch": args.max_batch,
                      "paper": {"batches": len(paper), "dropped": len(dropped),
                                "images_per_batch": round(kept / len(paper), 2)},
                      "our_grid": grid}, indent=1))


if __name__ == "__main__":
    main()

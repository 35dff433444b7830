"""Options shared by the subcommands that run the model."""
from __future__ import annotations

import argparse

from ..data.images import ImageOptions


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--engine, --device, --beam, --batch-size, --max-len and the image options."""
    p.add_argument("--engine", metavar="DIR", help="engine directory (default: the model bundled with abm_rt)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N (default auto)")
    p.add_argument("--beam", type=int, default=10, help="beam width (default 10, as the paper)")
    p.add_argument("--batch-size", type=int, default=32, help="images decoded together (default 32)")
    p.add_argument("--pad-multiple", type=int, default=16, metavar="PX",
                   help="round each batch's canvas up to this many pixels (default 16; 1 = no rounding). The "
                        "CNN sees the padding, so batching moves results slightly (README.md: 'Batching changes the result')")
    p.add_argument("--canvas-grid", action="store_true",
                   help="pad each batch to the trainer's canvas grid instead (sizes x1.5 apart)")
    p.add_argument("--max-len", type=int, default=None,
                   help="decode steps before giving up on an expression; its best partial result is then "
                        "returned marked truncated (default 256)")
    p.add_argument("--rescore", choices=("auto", "r2l", "both", "none"), default="auto",
                   help="both: an R2L beam search beside the L2R one, each image keeping the best of both "
                        "beams' hypotheses scored by both branches (bidirectional search, see README.md); r2l: "
                        "the R2L branch only re-scores the L2R beam's hypotheses (cheaper, a little less "
                        "accurate); none: the L2R beam alone, as the paper (fastest); auto (default): both "
                        "when the engine has the R2L branch, else none")
    p.add_argument("--rescore-weight", type=float, default=1.0, metavar="W",
                   help="weight of the R2L score against the L2R one (default 1.0)")
    p.add_argument("--decoder", choices=("auto", "native", "pytorch"), default="auto",
                   help="beam search implementation: native (abm_rt._C kernels), pytorch, or auto (default)")
    p.add_argument("--encoder-backend", choices=("auto", "tensorrt", "pytorch", "onnxruntime"), default="auto",
                   help="encoder backend; auto (default) picks TensorRT > PyTorch CUDA > ONNX Runtime CPU > "
                        "PyTorch CPU by what is installed and what the engine holds (`abm-rt info` says why)")
    g = p.add_argument_group("image input (the model expects white ink on black, about 94 px high)")
    g.add_argument("--invert", choices=("auto", "always", "never"), default="auto",
                   help="auto: invert images with a bright background, e.g. dark ink on paper (default)")
    g.add_argument("--binarize", action="store_true", help="threshold to black/white (Otsu): for scans and photos")
    g.add_argument("--height", type=int, default=None, metavar="PX",
                   help="rescale each image to this height first (e.g. 94 for photos far from the training scale)")
    g.add_argument("--max-pixels", type=int, default=ImageOptions.max_pixels,
                   help=f"larger images are downscaled to this many pixels (default {ImageOptions.max_pixels})")


def make_recognizer(args: argparse.Namespace):
    """A Recognizer built from the parsed model options."""
    from ..recognizer import Recognizer

    opts = ImageOptions(invert=args.invert, binarize=args.binarize, target_height=args.height,
                        max_pixels=args.max_pixels)
    return Recognizer(args.engine, device=args.device, beam_size=args.beam, max_batch_size=args.batch_size,
                      max_len=args.max_len, image_options=opts, decoder=args.decoder,
                      encoder_backend=args.encoder_backend, pad_multiple=args.pad_multiple,
                      canvas_grid=args.canvas_grid, rescore=args.rescore, rescore_weight=args.rescore_weight)

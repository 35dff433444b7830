"""The native beam search on real encoder features, in a process that runs no cuDNN: for compute-sanitizer.

Why: on the H200, racecheck breaks inside PyTorch / cuDNN's part of a recognizer process. It fails the same way
with the PyTorch decoder, when none of our kernels runs (tests/logs/2026-12-02_real_sanitizer_h200/). So real
images are split into two processes:

    python3 tools/sanitize_native_search.py features DIR --limit 16 --out feats.pt     # no sanitizer
    compute-sanitizer --tool racecheck --kernel-name kns=abm \
        python3 tools/sanitize_native_search.py search feats.pt                          # only our search

``features`` encodes the images (sorted ``*.png`` of DIR) in the recognizer's size batches, and saves the
features, masks and the tokens the native search gives without a sanitizer. ``search`` runs the native search
alone on those features and checks it gives the same tokens; it exits 1 if any image differs. ``--branch r2l``
runs the R2L branch's search instead (eos to sos), the second search of the default bidirectional decoding.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from abm_rt import Recognizer
from abm_rt.recognizer import load_default_engine
from abm_rt.data.buckets import pad_batch, size_batches
from abm_rt.data.images import load_image
from abm_rt.data.vocab import EOS_ID, SOS_ID
from abm_rt.decode.native import NativeDecoder, tiled_kernels
from abm_rt.decode.native_search import native_beam_search


def _decoder(device: str, precision: str, branch: str) -> NativeDecoder:
    """The bundled engine's native decoder of ``branch`` ("l2r" or "r2l") on ``device``, its tables computed from
    the CPU model: the same tables to the bit in both processes, and no cuDNN on the GPU for them."""
    return NativeDecoder(getattr(load_default_engine().model, branch), device, weight_dtype=precision,
                         feat_dtype="fp32" if precision == "fp32" else "fp16")


def _search(dec: NativeDecoder, beam: int, max_len: int, feats: torch.Tensor, mask: torch.Tensor,
            branch: str) -> list[list[int]]:
    """Token ids of the native search, as the recognizer runs it (compaction on, host check every 4 steps, finished
    hypotheses kept for rescoring; the R2L branch from eos to sos)."""
    sos, eos = (SOS_ID, EOS_ID) if branch == "l2r" else (EOS_ID, SOS_ID)
    seqs = native_beam_search(dec, feats.to(dec.device), mask.to(dec.device), beam, max_len=max_len,
                              check_every=4 if dec.device.type == "cuda" else 1, compact=True, sos=sos, eos=eos,
                              keep_candidates=True)
    return [list(s.tokens) for s in seqs]


def features(args: argparse.Namespace) -> int:
    """Encode the images and save features, masks and the reference tokens."""
    rec = Recognizer(device=args.device, decoder="native", beam_size=args.beam, decoder_precision=args.precision,
                     max_batch_size=args.batch_size)
    paths = sorted(Path(args.dir).glob("*.png"))[: args.limit]
    if not paths:
        raise SystemExit(f"no *.png images in {args.dir}")
    pixels = [load_image(str(p), rec.image_options).pixels for p in paths]
    groups = size_batches([p.shape for p in pixels], rec.max_batch_size, rec.max_batch_pixels)
    batches, dec = [], _decoder(args.device, args.precision, args.branch)
    max_len = args.max_len or rec.max_len
    with torch.inference_mode():
        for group in groups:
            x, pixel_mask = pad_batch([pixels[i] for i in group], multiple=rec.pad_multiple, grid=rec.canvas_grid)
            feats, mask = rec.encoder.encode(x, pixel_mask)
            batches.append({"names": [paths[i].name for i in group], "features": feats.cpu(), "mask": mask.cpu(),
                            "tokens": _search(dec, rec.beam_size, max_len, feats, mask, args.branch)})
    torch.save({"device": args.device, "beam": args.beam, "max_len": max_len, "precision": args.precision,
                "branch": args.branch, "batches": batches}, args.out)
    print(f"{len(paths)} images in {len(batches)} batches -> {args.out}")
    return 0


def search(args: argparse.Namespace) -> int:
    """Run only the native search on saved features; compare with the saved tokens."""
    saved = torch.load(args.file, weights_only=True)
    # Only U_a F, the initial state and our kernels run on the GPU in this process.
    same = total = 0
    branch = saved.get("branch", "l2r")        # files written before --branch hold the L2R search
    dec = _decoder(args.device, saved["precision"], branch)
    with tiled_kernels() if args.tiled_kernels else contextlib.nullcontext(), torch.inference_mode():
        for b in saved["batches"]:
            got = _search(dec, saved["beam"], saved["max_len"], b["features"], b["mask"], branch)
            for name, want, have in zip(b["names"], b["tokens"], got):
                total += 1
                same += want == have
                if want != have:
                    print(f"{name}: tokens differ from the run without a sanitizer")
    print(f"native {branch} search on {dec.device} ({saved['precision']}): same tokens for {same} of {total} images")
    return 0 if same == total else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("features", help="encode images; save features, masks and reference tokens")
    f.add_argument("dir", help="a folder of *.png images (e.g. CROHME 2014)")
    f.add_argument("--limit", type=int, default=16, help="the first N images, sorted by name (default 16)")
    f.add_argument("--out", required=True, help="where to save them (torch.save file)")
    f.add_argument("--device", default="cuda", help="cuda or cpu (default cuda)")
    f.add_argument("--beam", type=int, default=10, help="beam width (default 10)")
    f.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"], help="native decoder weights")
    f.add_argument("--batch-size", type=int, default=16, help="images per batch at most (default 16)")
    f.add_argument("--branch", default="l2r", choices=["l2r", "r2l"],
                   help="whose search: the L2R branch's (default) or the R2L branch's (eos to sos)")
    f.add_argument("--max-len", type=int, default=None,
                   help="decode steps at most (default: the recognizer's). Fewer steps run the same kernels on "
                        "the same real batch, so that racecheck, slow on the tiled energy, can finish")
    s = sub.add_parser("search", help="run only the native search on saved features and compare the tokens")
    s.add_argument("file", help="the output of `features`")
    s.add_argument("--device", default="cuda", help="cuda or cpu (default cuda)")
    s.add_argument("--tiled-kernels", action="store_true",
                   help="turn the CUDA small-batch kernels (few-rows linear, split energy; on by default) off")
    args = p.parse_args(argv)
    return features(args) if args.cmd == "features" else search(args)


if __name__ == "__main__":
    sys.exit(main())

"""Decoders side by side on real images (issue 6's figures): the PyTorch batched beam search and the
native one (abm_rt._C) in FP32 / FP16 / INT8, at batch 1 and a large batch, beam 10, on one device.

For each configuration: images/s and ms per image of Recognizer.predict (encoder included, same
encoder for all), ExpRate / <=1 / <=2 on the labelled set, and the share of images whose tokens equal
the PyTorch FP32 decoder's (and the first configuration's, at the same batch size). Writes benchmarks/results/decoders_<device>_<date>.json.

    python3 benchmarks/bench_decoders.py --data /tmp/data/crohme/2014 --device cuda
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from abm_rt import Recognizer  # noqa: E402
from abm_rt.data.crohme import read_captions  # noqa: E402
from abm_rt.decode.native import few_rows_linear, split_energy, tiled_kernels  # noqa: E402
from abm_rt.metrics import score_predictions  # noqa: E402
from benchmarks.result_file import write_result  # noqa: E402

CONFIGS = [("pytorch", "fp32"), ("native", "fp32"), ("native", "fp16"), ("native", "int8")]


def run_config(decoder: str, precision: str, paths: list[str], batch: int, device: str, beam: int,
               encoder_precision: str = "fp32", flags: tuple[str, ...] = ()):
    """(seconds, results) of one predict over ``paths`` after a warm-up on the first few.

    ``encoder_precision="fp16"`` swaps in the PyTorch CUDA encoder in FP16 (issue 5's parity row).
    ``flags``: "graph" (native search from CUDA graphs), "nocompact" (finished images stay in the batch),
    "tiled" (the CUDA small-batch kernels off, ``native.tiled_kernels``: the tiled kernels at every N),
    "fewrows" (CUDA linears of <= 32 rows on the one-warp-per-output kernel, ``native.few_rows_linear``),
    "splitenergy" (the CUDA energy in channel slices at small N, ``native.split_energy``). The last two are the
    defaults since 2026-12-02; after "tiled" they turn one of them back on. The decoding of an engine with
    the R2L branch (``decode.rescore``; without a flag the Recognizer's default, "both" since 2026-12-06):
    "norescore" the L2R beam alone (``rescore="none"``), "r2lrescore" the L2R beam re-scored by the R2L
    branch (``rescore="r2l"``), "bothrescore" an R2L beam search as well (``rescore="both"``)."""
    modes = {"norescore": "none", "r2lrescore": "r2l", "bothrescore": "both"}
    unknown = set(flags) - {"graph", "nocompact", "tiled", "fewrows", "splitenergy", *modes}
    if len(set(flags) & set(modes)) > 1:
        raise ValueError(f"the flags {', '.join(modes)} exclude each other")
    if unknown:
        raise ValueError(f"unknown flags {sorted(unknown)}")
    # in this order, each nested in the one before: "tiled" first, so that the others override it
    switches = {"tiled": tiled_kernels, "fewrows": lambda: few_rows_linear(32), "splitenergy": lambda: split_energy(16)}
    for flag, switch in switches.items():
        if flag in flags:
            with switch():
                return run_config(decoder, precision, paths, batch, device, beam, encoder_precision,
                                  tuple(f for f in flags if f != flag))
    rec = Recognizer(device=device, beam_size=beam, max_batch_size=batch, decoder=decoder,
                     decoder_precision=precision, max_batch_pixels=64_000_000,
                     compact="nocompact" not in flags, decoder_graphs="graph" in flags,
                     rescore=next((modes[f] for f in flags if f in modes), "auto"))
    if encoder_precision != "fp32":
        from abm_rt.backends.torch_backend import TorchEncoder
        rec.encoder = TorchEncoder(rec.model, rec.device, precision=encoder_precision, cuda_graphs=False,
                                   bucket_pad=False)
    rec.predict(paths[: min(len(paths), max(2, batch))])            # warm-up: allocator, cuDNN plans
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    results = rec.predict(paths)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, results, rec.info()


def main() -> int:
    """Command line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a labelled folder (caption.txt + NAME.png), e.g. CROHME 2014")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--beam", type=int, default=10)
    ap.add_argument("--batches", default="1,256", help="comma separated max batch sizes")
    ap.add_argument("--limit-batch1", type=int, default=200, help="images timed at batch 1 (it is slow)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images at every batch size")
    ap.add_argument("--configs", default=",".join(f"{d}:{p}" for d, p in CONFIGS),
                    help="comma separated DECODER:PRECISION[:ENCODER_PRECISION[:FLAG+FLAG]] (encoder fp32 unless "
                         "given; flags: graph, nocompact, tiled, fewrows, splitenergy, norescore, r2lrescore, "
                         "bothrescore)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    data = Path(args.data)
    captions = read_captions(data / "caption.txt")[: args.limit]
    rows, base_tokens, first_tokens = [], {}, {}
    # Process-wide first-use costs (CUDA context, cuBLAS/cuDNN handles, the extension's first kernels) once,
    # untimed, so that they do not land on the first configuration's batch-1 row: each configuration still
    # warms up its own Recognizer (run_config).
    warm_paths = [str(data / f"{n}.png") for n, _ in captions[:2]]
    decoder, precision, *_ = args.configs.split(",")[0].split(":")
    run_config(decoder, precision, warm_paths, 1, args.device, args.beam)
    for batch in [int(b) for b in args.batches.split(",")]:
        caps = captions[: args.limit_batch1] if batch == 1 else captions
        paths = [str(data / f"{n}.png") for n, _ in caps]
        refs = [t for _, t in caps]
        for spec in args.configs.split(","):
            decoder, precision, *rest = spec.split(":")
            enc_precision = rest[0] if rest else "fp32"
            flags = tuple(rest[1].split("+")) if len(rest) > 1 else ()
            try:
                secs, results, info = run_config(decoder, precision, paths, batch, args.device, args.beam,
                                                 enc_precision, flags)
            except Exception as e:  # noqa: BLE001 - record and go on to the next configuration
                rows.append({"decoder": decoder, "precision": precision, "encoder_precision": enc_precision,
                             "flags": list(flags), "batch": batch, "error": f"{type(e).__name__}: {e}"})
                print(rows[-1], flush=True)
                continue
            toks = [r.tokens for r in results]
            key = (batch, len(paths))
            if decoder == "pytorch" and precision == "fp32" and enc_precision == "fp32":
                base_tokens[key] = toks
            same = base_tokens.get(key)
            first = first_tokens.setdefault(key, toks)
            scores = score_predictions([r.tokens if r.ok and not r.truncated else None for r in results], refs)
            rows.append({"decoder": decoder, "precision": precision, "encoder_precision": enc_precision,
                         "flags": list(flags), "batch": batch, "images": len(paths),
                         "seconds": round(secs, 3), "images_per_s": round(len(paths) / secs, 2),
                         "ms_per_image": round(1000 * secs / len(paths), 3),
                         "exprate": round(scores.exprate, 2), "le1": round(scores.le1, 2), "le2": round(scores.le2, 2),
                         "same_tokens_as_pytorch_fp32": (round(100 * sum(a == b for a, b in zip(toks, same)) / len(toks), 2)
                                                         if same else None),
                         "same_tokens_as_first_config": round(100 * sum(a == b for a, b in zip(toks, first)) / len(toks), 2),
                         "failed": scores.failed, "decoder_info": info["decoder"], "rescore": info["rescore"],
                         "decoder_graphs": info["decoder_graphs"]})
            print(json.dumps(rows[-1]), flush=True)
    best = {f"{r['decoder']} {r['precision']} enc-{r['encoder_precision']}{''.join(' ' + f for f in r['flags'])} "
            f"b{r['batch']} ms/img": r["ms_per_image"]
            for r in rows if "ms_per_image" in r}
    out = write_result("decoders", args.device,
                       {"beam": args.beam, "dataset": data.name, "rows": rows, "headline": best}, args.out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

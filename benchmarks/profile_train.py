"""Where a training step's time goes on the GPU: encoder vs decoders, first call vs steady state,
cuDNN autotuning on and off, and one validation beam-search batch. Prints one JSON line per figure."""
from __future__ import annotations

import argparse
import json
import time

import torch

from abm_rt.data.crohme import read_split
from abm_rt.data.vocab import Vocab
from abm_rt.decode import beam_search
from abm_rt.model import ABM, initialize
from training.losses import distillation_kl, sequence_ce
from training.packed import pack_split


def timed(fn, reps=1):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="../shared/data/crohme")
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--benchmark", type=int, default=0, help="cudnn.benchmark")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = bool(args.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev = torch.device("cuda")
    vocab = Vocab.default()
    samples = read_split(f"{args.data}/train", limit=args.limit)
    batches = pack_split(samples, vocab, dev, 64, 2_000_000)
    model = ABM(bidirectional=True)
    initialize(model)
    model.to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    picks = [len(batches) // 4, len(batches) // 2, 3 * len(batches) // 4]
    for bi in picks:
        b = batches[bi]
        x, pm = b.inputs()
        for rep in range(2):
            def enc():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return model.encode(x, pm)
            t_enc, (f, fm) = timed(enc)

            def dec():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    zl, _ = model.l2r.teacher_forward(f, fm, b.l2r_in)
                    zr, _ = model.r2l.teacher_forward(f, fm, b.r2l_in)
                return sequence_ce(zl, b.l2r_tgt, b.lengths) + sequence_ce(zr, b.r2l_tgt, b.lengths) + \
                    8 * distillation_kl(zl, zr, b.lengths)
            t_dec, loss = timed(dec)

            def bwd():
                opt.zero_grad()
                loss.backward()
                opt.step()
            t_bwd, _ = timed(bwd)
            print(json.dumps({"batch": bi, "rep": rep, "shape": list(x.shape), "T": int(b.l2r_in.shape[1]),
                              "enc_fwd_s": round(t_enc, 4), "dec_fwd_s": round(t_dec, 4),
                              "bwd_step_s": round(t_bwd, 4), "benchmark": args.benchmark}), flush=True)
    model.eval()
    val = pack_split(read_split(f"{args.data}/2014", limit=256), vocab, dev, 128, 4_000_000)
    with torch.no_grad():
        for rep in range(2):
            b = val[0]
            x, pm = b.inputs()
            t_enc, (f, fm) = timed(lambda: model.encode(x, pm))
            t_bs, seqs = timed(lambda: beam_search(model.l2r, f, fm, 10, check_every=4, max_len=64))
            print(json.dumps({"val_batch": list(x.shape), "rep": rep, "enc_s": round(t_enc, 4),
                              "beam_s_maxlen64": round(t_bs, 4),
                              "steps": max(len(s.tokens) for s in seqs)}), flush=True)


if __name__ == "__main__":
    main()

import time, torch, numpy as np
from pathlib import Path
from abm_rt import Recognizer
from abm_rt.data.crohme import read_captions
import abm_rt.decode.native_search as ns
D = Path("../shared/data/crohme/2014")
caps = read_captions(D / "caption.txt")[:64]
paths = [str(D / f"{n}.png") for n, _ in caps]
rec = Recognizer(device="cpu", max_batch_size=16)
rec.predict(paths[:4])
t_enc = [0.0]; t_dec = [0.0]; steps = [0]; rows = [0]
enc = rec.encoder.encode
def enc_t(*a, **k):
    t = time.perf_counter(); r = enc(*a, **k); t_enc[0] += time.perf_counter() - t; return r
rec.encoder.encode = enc_t
orig = ns._search_step
def st(decoder, feats, row_image, s, bst):
    t = time.perf_counter(); r = orig(decoder, feats, row_image, s, bst); t_dec[0] += time.perf_counter() - t
    steps[0] += 1; rows[0] += s.prev.numel(); return r
ns._search_step = st
t = time.perf_counter(); rec.predict(paths); tot = time.perf_counter() - t
print(f"total {tot:.2f}s enc {t_enc[0]:.2f}s step {t_dec[0]:.2f}s steps {steps[0]} rows/step {rows[0]/steps[0]:.1f} ms/row-step {1000*t_dec[0]/rows[0]:.3f}")

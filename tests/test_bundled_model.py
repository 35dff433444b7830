"""The bundled default engine is a trained model: scored on a slice of CROHME 2014 (skips without the data).

The bounds are what separates a trained model from an untrained one (random weights recognize nothing:
ExpRate 0, WER above 100 %); the full-set figures of the bundled model are in benchmarks/results/.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from abm_rt import Recognizer
from abm_rt.data.crohme import read_captions
from abm_rt.engine_dir import contains_engine, default_engine_path
from abm_rt.metrics import score_predictions

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "crohme" / "2014"
SLICE = 40

pytestmark = [
    pytest.mark.skipif(not (DATA / "caption.txt").is_file(), reason=f"CROHME 2014 is not at {DATA}"),
    pytest.mark.skipif(not contains_engine(default_engine_path()), reason="no engine is bundled"),
]


def test_bundled_engine_recognizes_crohme_2014_slice():
    """ExpRate and WER of the bundled engine on the first 40 items of 2014 (file order), batch decoding on CPU."""
    captions = read_captions(DATA / "caption.txt")[:SLICE]
    rec = Recognizer(device="cpu", max_batch_size=16)
    results = rec.predict([str(DATA / f"{name}.png") for name, _ in captions])
    scores = score_predictions([r.tokens if r.ok and not r.truncated else None for r in results],
                               [tokens for _, tokens in captions])
    print(f"bundled engine on 2014[:{SLICE}]: {scores}")
    assert scores.failed == 0
    # The abm-paper-soup3 model reads 25 of these 40 exactly with the default bidirectional search (62.5 %,
    # WER 10.1 on this machine's CPU) and 26 with R2L rescoring alone (WER 10.0); with R2L rescoring,
    # abm-paper-soup before it read 25 (WER 9.1), abm-soup 23 (WER 12.8), abm-aug 21 (WER 13.5) and abm-warm
    # 15 (WER 22.5).
    # The bounds leave room for other CPUs' rounding and still fail for anything short of a model at least
    # as good as abm-warm.
    assert scores.exprate >= 37.5, scores        # at least 15 of 40 exactly right
    assert scores.wer < 25.0, scores

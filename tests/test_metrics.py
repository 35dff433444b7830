"""Expression metrics of spec 5.4 (token edit distance, ExpRate, <=1, <=2, WER), with failed items
counted as wrong over the whole set."""
from __future__ import annotations

import pytest

from abm_rt.metrics import edit_distance, score_predictions


@pytest.mark.parametrize("a,b,d", [
    ([], [], 0),
    (["x"], [], 1),
    ([], ["x", "y", "z"], 3),
    (["x", "+", "1"], ["x", "+", "1"], 0),
    (["x", "+", "1"], ["x", "-", "1"], 1),                       # substitution
    (["x", "+", "1"], ["x", "1"], 1),                            # deletion
    (["x", "1"], ["x", "+", "1"], 1),                            # insertion
    (list("kitten"), list("sitting"), 3),
    (list("abcdef"), list("azced"), 3),
    (list("flaw"), list("lawn"), 2),
    (["a", "b"], ["b", "a"], 2),                                 # no transposition operation
])
def test_edit_distance_cases(a, b, d):
    """Levenshtein distance with unit substitution/insertion/deletion, symmetric in its arguments."""
    assert edit_distance(a, b) == d
    assert edit_distance(b, a) == d


def test_edit_distance_multi_char_tokens():
    """Distance counts tokens, not characters: \\frac vs \\sqrt is one substitution."""
    assert edit_distance([r"\frac", "{", "a", "}"], [r"\sqrt", "{", "a", "}"]) == 1


def test_score_predictions_hand_made():
    """ExpRate / <=1 / <=2 / WER on a hand-made set: distances 0, 1, 2, 3 and one failed item (None)
    counted as wrong at distance len(ref); the denominator is all 5 items."""
    refs = [
        ["x", "+", "1"],                 # pred exact                    -> d 0
        ["a", "=", "b"],                 # pred a = c                    -> d 1
        ["y", "^", "{", "2", "}"],       # pred y ^ 2 (2 deletions)      -> d 2
        ["1", "2", "3", "4"],            # pred 9 8 7 4 (3 substitutions) -> d 3
        ["z", "-", "w"],                 # failed (None)                 -> d 3 = len(ref)
    ]
    preds = [["x", "+", "1"], ["a", "=", "c"], ["y", "^", "2"], ["9", "8", "7", "4"], None]
    s = score_predictions(preds, refs)
    assert s.total == 5 and s.correct == 1 and s.failed == 1
    assert s.exprate == pytest.approx(100 * 1 / 5)
    assert s.le1 == pytest.approx(100 * 2 / 5)
    assert s.le2 == pytest.approx(100 * 3 / 5)
    assert s.wer == pytest.approx(100 * (0 + 1 + 2 + 3 + 3) / (3 + 3 + 5 + 4 + 3))
    d = s.to_dict()
    assert d["exprate"] == s.exprate and d["total"] == 5


def test_failed_item_counts_like_empty_prediction_for_wer():
    """A None item adds len(ref) to the WER numerator, the same as an empty prediction, but an empty
    prediction is not counted as failed; a failed item is never 'correct', even for an empty reference."""
    refs = [["a", "b"], ["c"]]
    failed = score_predictions([None, ["c"]], refs)
    empty = score_predictions([[], ["c"]], refs)
    assert failed.wer == pytest.approx(empty.wer) == pytest.approx(100 * 2 / 3)
    assert failed.failed == 1 and empty.failed == 0
    assert failed.exprate == empty.exprate == pytest.approx(50.0)
    s = score_predictions([None], [[]])
    assert s.correct == 0 and s.exprate == 0.0 and s.le2 == 0.0


def test_score_predictions_errors_and_empty():
    """Mismatched lengths raise ValueError; an empty set scores 0 everywhere."""
    with pytest.raises(ValueError):
        score_predictions([["x"]], [])
    s = score_predictions([], [])
    assert (s.exprate, s.le1, s.le2, s.wer, s.total) == (0.0, 0.0, 0.0, 0.0, 0)

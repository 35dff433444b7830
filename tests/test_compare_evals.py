"""tools/compare_evals.py: paired counts of two eval reports and the exact McNemar p-value."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from compare_evals import compare, main, mcnemar_exact, right_items  # noqa: E402


def _report(distances, truncated=(), errors=()):
    return {"items": [{"name": f"i{k}", "distance": d, "truncated": k in truncated,
                       "error": "boom" if k in errors else None} for k, d in enumerate(distances)]}


def test_right_items_count_as_the_eval_does():
    """Exact within the limit, and an error or a truncation is wrong whatever its distance."""
    r = right_items(_report([0, 1, 0, None, 0], truncated={2}, errors={4}))
    assert r == {"i0": True, "i1": False, "i2": False, "i3": False, "i4": False}
    assert right_items(_report([0, 1, 2]), limit=1) == {"i0": True, "i1": True, "i2": False}


def test_mcnemar_exact_against_the_binomial_sum():
    """Two-sided exact test: 2 * P(X <= min) for X ~ Bin(n, 1/2), capped at 1; no discordant pairs gives 1."""
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    n, k = 56, 23
    assert mcnemar_exact(k, n - k) == pytest.approx(2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    assert mcnemar_exact(33, 23) == mcnemar_exact(23, 33)


def test_compare_counts_and_refuses_different_sets(tmp_path, capsys):
    a = _report([0, 0, 1, 3, 0])
    b = _report([0, 2, 0, 3, 0])
    out = compare(a, b)
    assert (out["both"], out["only_a"], out["only_b"], out["neither"]) == (2, 1, 1, 1)
    assert out["rate_a"] == 60.0 and out["rate_b"] == 60.0 and out["mcnemar_p"] == 1.0
    with pytest.raises(ValueError, match="different items"):
        compare(a, _report([0, 0]))
    pa, pb, pj = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "out.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    assert main([str(pa), str(pb), "--json", str(pj)]) == 0
    assert json.loads(pj.read_text())["only_a"] == 1 and "McNemar" in capsys.readouterr().out

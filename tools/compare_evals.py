"""Paired comparison of two `abm-rt eval --json` reports of the same set: which images each gets right.

    python3 tools/compare_evals.py A.json B.json [--limit-distance 0] [--json OUT]

Counts the images right in both, only in A, only in B and in neither, and gives the exact two-sided McNemar
p-value of the discordant pairs (a binomial test at 1/2): the figure to quote before calling an ExpRate gap a
difference, since two models of one lineage disagree on only a few dozen of 2014's 986 images. An item counts as
right as `abm-rt eval` counts it: no error, not truncated, edit distance <= the limit (0: exact, the ExpRate).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any


def right_items(report: dict[str, Any], limit: int = 0) -> dict[str, bool]:
    """Item name -> whether the report's prediction is within ``limit`` edits (errors and truncations: wrong)."""
    out = {}
    for item in report["items"]:
        d = item.get("distance")
        out[item["name"]] = (item.get("error") is None and not item.get("truncated")
                             and d is not None and d <= limit)
    return out


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value: P(a split at least as uneven as this one | each pair 50/50)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def compare(a: dict[str, Any], b: dict[str, Any], limit: int = 0) -> dict[str, Any]:
    """The paired counts and p-value of reports ``a`` and ``b``; they must hold the same item names."""
    ra, rb = right_items(a, limit), right_items(b, limit)
    if set(ra) != set(rb):
        missing = sorted(set(ra) ^ set(rb))
        raise ValueError(f"the reports cover different items ({len(missing)} in one only, e.g. {missing[:3]}): "
                         "compare reports of the same set")
    both = sum(ra[n] and rb[n] for n in ra)
    only_a = sum(ra[n] and not rb[n] for n in ra)
    only_b = sum(rb[n] and not ra[n] for n in ra)
    total = len(ra)
    return {"items": total, "limit_distance": limit, "right_a": both + only_a, "right_b": both + only_b,
            "rate_a": round(100 * (both + only_a) / total, 2) if total else 0.0,
            "rate_b": round(100 * (both + only_b) / total, 2) if total else 0.0,
            "both": both, "only_a": only_a, "only_b": only_b, "neither": total - both - only_a - only_b,
            "mcnemar_p": round(mcnemar_exact(only_a, only_b), 4)}


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path, help="first eval report (abm-rt eval --json)")
    ap.add_argument("b", type=Path, help="second eval report, of the same set")
    ap.add_argument("--limit-distance", type=int, default=0,
                    help="edits allowed for 'right' (0: ExpRate, 1: <=1, 2: <=2)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args(argv)
    reports = [json.loads(p.read_text(encoding="utf-8")) for p in (args.a, args.b)]
    out = {"a": str(args.a), "b": str(args.b), **compare(*reports, limit=args.limit_distance)}
    print(f"{out['items']} items, distance <= {out['limit_distance']}: A {out['rate_a']} %, B {out['rate_b']} %; "
          f"both {out['both']}, only A {out['only_a']}, only B {out['only_b']}, neither {out['neither']}; "
          f"exact McNemar p = {out['mcnemar_p']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

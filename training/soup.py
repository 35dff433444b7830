"""Average the weights of engine directories of one model ("model soup") into a new engine directory.

    python -m training.soup ENGINE_A ENGINE_B [...] --out DIR [--weights 0.5,0.5]

Why: a run fine-tuned from another run's weights stays in the same basin of the loss, and the average of
the two often decodes better than either (here: the bundled abm-aug engine and its abm-ema fine-tune, see
README.md). Every floating tensor is averaged with the given weights, BatchNorm running statistics
included (an approximation of the averaged model's own statistics); integer buffers come from the first
engine. The engines must share model dimensions and vocabulary.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch

from abm_rt.engine_dir import load_engine, save_engine
from abm_rt.model import ABM


def average_engines(sources: Sequence[str | Path], out: str | Path,
                    weights: Sequence[float] | None = None, names: Sequence[str] | None = None,
                    run_name: str | None = None) -> Path:
    """Write the weighted average of the engines at ``sources`` to the engine directory ``out``.

    Args:
        sources: two or more engine directories with the same model dimensions and vocabulary.
        out: the engine directory to write.
        weights: one non-negative weight per source (normalised to sum 1); default: equal weights.
        names: what each source is (e.g. its run and epoch), recorded in the provenance next to its path.
        run_name: the soup's own name, recorded as the provenance's ``run`` (as training.bundle does).
    Raises:
        ValueError: fewer than two sources, a weight count that differs, negative or all-zero weights,
            or engines whose dimensions or vocabularies differ.
    """
    if len(sources) < 2:
        raise ValueError(f"a soup needs at least two engines, got {len(sources)}")
    weights = [1.0] * len(sources) if weights is None else [float(x) for x in weights]
    if len(weights) != len(sources):
        raise ValueError(f"{len(weights)} weights for {len(sources)} engines")
    if names is not None and len(names) != len(sources):
        raise ValueError(f"{len(names)} names for {len(sources)} engines")
    if min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative and not all zero, got {weights}")
    total = sum(weights)
    weights = [x / total for x in weights]
    engines = [load_engine(s) for s in sources]
    first = engines[0]
    for e in engines[1:]:
        if not e.model.cfg.same_weights_layout(first.model.cfg):
            raise ValueError(f"{e.path}: model dimensions {e.model.cfg} differ from {first.path}'s {first.model.cfg}")
        if e.vocab.tokens != first.vocab.tokens:
            raise ValueError(f"{e.path}: its vocabulary differs from {first.path}'s")
    # The R2L branch is averaged too when every engine has one; otherwise the soup has none.
    with_r2l = all(e.has_r2l for e in engines)
    states = [e.model.state_dict() if with_r2l else e.model.inference_state_dict() for e in engines]
    averaged = {}
    for name, ref in states[0].items():
        if ref.is_floating_point():
            acc = torch.zeros_like(ref, dtype=torch.float64)
            for w, st in zip(weights, states):
                acc += w * st[name].double()
            averaged[name] = acc.to(ref.dtype)
        else:
            averaged[name] = ref.clone()
    model = first.model if with_r2l else ABM(first.model.cfg)     # without R2L: the inference model
    model.load_state_dict(averaged)
    provenance = {"made_by": "training.soup (weighted average of engine weights)", "run": run_name,
                  "weights": [round(w, 6) for w in weights],
                  "sources": [{"name": names[i] if names else None, "path": str(e.path),
                               "provenance": e.config.get("provenance", {})} for i, e in enumerate(engines)]}
    return save_engine(out, model, first.vocab, provenance=provenance, with_r2l=with_r2l)


def main(argv: list[str] | None = None) -> None:
    """Command line."""
    p = argparse.ArgumentParser(prog="python -m training.soup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engines", nargs="+", help="engine directories to average (two or more)")
    p.add_argument("--out", required=True, help="the engine directory to write")
    p.add_argument("--weights", type=lambda s: [float(x) for x in s.split(",")],
                   help="comma separated, one per engine (default: equal)")
    p.add_argument("--names", type=lambda s: s.split(","), help="comma separated, what each engine is "
                   "(recorded in the provenance)")
    p.add_argument("--run-name", help="the soup's name, recorded in its provenance")
    a = p.parse_args(argv)
    print(average_engines(a.engines, a.out, a.weights, a.names, a.run_name))


if __name__ == "__main__":
    main()

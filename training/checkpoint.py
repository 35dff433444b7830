"""Resumable training state as safetensors shards of at most 16 MiB (device-call transfer limits).

Two forms:
- ``full``: fp32 weights and fp32 optimizer state: exact resume on the same machine;
- ``compact``: fp32 weights, optimizer moments in bf16 (and optionally without the first moment):
  small enough to carry between device machines (about 50 MB for ABM with AdamW).
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import torch

SHARD_BYTES = 16 * 1024 * 1024 - 64 * 1024   # leave room for the safetensors header
META_FILE = "state.json"


def _write_shards(tensors: dict[str, torch.Tensor], out: Path, prefix: str) -> list[str]:
    from safetensors.torch import save_file

    files, cur, size = [], {}, 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        nbytes = t.numel() * t.element_size()
        if nbytes > SHARD_BYTES:
            raise ValueError(f"tensor {name} ({nbytes} bytes) is larger than one shard")
        if cur and size + nbytes > SHARD_BYTES:
            files.append(f"{prefix}-{len(files):03d}.safetensors")
            save_file(cur, str(out / files[-1]))
            cur, size = {}, 0
        cur[name] = t
        size += nbytes
    if cur:
        files.append(f"{prefix}-{len(files):03d}.safetensors")
        save_file(cur, str(out / files[-1]))
    return files


def save_state(out_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               meta: dict[str, Any], compact: bool = False, keep_first_moment: bool = True,
               keep_moments: bool = True) -> Path:
    """Write weights, optimizer state, RNG states and ``meta`` (epoch, step, schedule...) to ``out_dir``.

    ``keep_moments=False`` writes no optimizer tensors (weights only, e.g. to bundle an engine from a
    device run whose files must come back in 16 MiB pieces); loading it starts the moments at zero."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors"):
        old.unlink()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    names = {i: n for i, (n, _) in enumerate(model.named_parameters())}
    scalars: dict[str, Any] = {}
    for pid, st in opt["state"].items():
        for key, val in st.items():
            if not torch.is_tensor(val) or val.dim() == 0:
                scalars[f"{names[pid]}.{key}"] = float(val)
                continue
            if not keep_moments or (compact and key == "exp_avg" and not keep_first_moment):
                continue
            tensors[f"opt.{names[pid]}.{key}"] = val.to(torch.bfloat16) if compact else val
    files = _write_shards(tensors, out, "state")
    rng = io.BytesIO()
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, rng)
    groups = [{k: (float(v) if torch.is_tensor(v) else v) for k, v in g.items()} for g in opt["param_groups"]]
    doc = {"meta": meta, "files": files, "compact": compact, "param_groups": groups,
           "scalars": scalars, "rng": base64.b64encode(rng.getvalue()).decode()}
    (out / META_FILE).write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return out


def has_state(path: str | Path) -> bool:
    """True when ``path`` holds a saved training state."""
    return (Path(path) / META_FILE).is_file()


def load_model_weights(in_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Only the model weights (``model.`` tensors, prefix removed) and ``meta`` of a saved state."""
    from safetensors.torch import load_file

    src = Path(in_dir)
    doc = json.loads((src / META_FILE).read_text(encoding="utf-8"))
    weights: dict[str, torch.Tensor] = {}
    for f in doc["files"]:
        weights.update({k[6:]: v for k, v in load_file(str(src / f)).items() if k.startswith("model.")})
    return weights, doc["meta"]


def load_state(in_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore what ``save_state`` wrote; returns its ``meta``. Missing moments start at zero."""
    from safetensors.torch import load_file

    src = Path(in_dir)
    doc = json.loads((src / META_FILE).read_text(encoding="utf-8"))
    tensors: dict[str, torch.Tensor] = {}
    for f in doc["files"]:
        tensors.update(load_file(str(src / f)))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    params = dict(model.named_parameters())
    order = list(params)
    state: dict[int, dict[str, Any]] = {}
    for i, name in enumerate(order):
        st: dict[str, Any] = {}
        for key in ("exp_avg", "exp_avg_sq", "square_avg", "acc_delta", "momentum_buffer"):
            t = tensors.get(f"opt.{name}.{key}")
            if t is not None:
                st[key] = t.to(params[name].device, torch.float32)
        if "exp_avg_sq" in st and "exp_avg" not in st:
            st["exp_avg"] = torch.zeros_like(st["exp_avg_sq"])
        for key in ("step",):
            v = doc["scalars"].get(f"{name}.{key}")
            if v is not None:
                st[key] = torch.tensor(v)
        if st:
            state[i] = st
    # The optimizer's own groups, not the saved ones: its flags (capturable, fused, foreach) and its lr
    # object (a tensor when CUDA graphs read it) belong to this run; the schedule sets the lr each step.
    lrs = [g["lr"] for g in optimizer.param_groups]
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    rng = torch.load(io.BytesIO(base64.b64decode(doc["rng"])), weights_only=False)
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return doc["meta"]


def export_weights(state_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Copy only the model weights of a saved state (any form) to ``out_dir`` as a weights-only state:
    what a device call hands back while its trainer is still running (the last saved epoch).

    ``dtype=torch.float16`` halves it (17 MB for ABM) to carry a run to a fresh machine within the
    device call's 64 MiB; resuming casts back to fp32 (relative rounding <= 2^-11)."""
    src, out = Path(state_dir), Path(out_dir)
    doc = json.loads((src / META_FILE).read_text(encoding="utf-8"))
    weights, _ = load_model_weights(src)
    out.mkdir(parents=True, exist_ok=True)
    cast = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in weights.items()}
    files = _write_shards({f"model.{k}": v for k, v in cast.items()}, out, "state")
    doc.update({"files": files, "scalars": {}, "compact": True})
    (out / META_FILE).write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return out


def state_from_engine(engine_dir: str | Path, log_path: str | Path, out_dir: str | Path,
                      dtype: torch.dtype | None = None) -> Path:
    """Rebuild a weights-only resumable state from a run's best engine and the run's ``log.jsonl``.

    For a run whose state was lost (its device machine went back before the call that returns the state)
    while its best engine came back. The trainer resumes after the engine's epoch with the schedule where
    it was (epoch, step and training seconds, from the log); the optimizer moments start at zero, and the
    weights are those the engine holds (the average, when its provenance says ``ema``)."""
    from abm_rt.engine_dir import load_engine

    from .plot import read_log

    engine = load_engine(engine_dir)
    prov = engine.config.get("provenance") or {}
    epoch, train_config = prov.get("epoch"), prov.get("train_config")
    if not isinstance(epoch, int) or not isinstance(train_config, dict):
        raise ValueError(f"{engine.path}: its provenance names no training epoch and config: not a trainer's best engine")
    if not engine.has_r2l:
        raise ValueError(f"{engine.path} has no R2L branch: a resumed run needs every branch")
    # training epochs only (not the final "done" line); the last line of an epoch wins
    by_epoch = {r["epoch"]: r for r in read_log(log_path) if "epoch_seconds" in r}
    missing = [e for e in range(1, epoch + 1) if e not in by_epoch]
    if missing:
        raise ValueError(f"{log_path} lacks epochs {missing}: cannot tell the schedule's position at epoch {epoch}")
    meta = {"epoch": epoch, "step": by_epoch[epoch]["step"], "best_epoch": epoch,
            "best_exprate": float((prov.get("val_2014") or {}).get("exprate", -1.0)),
            "best_weights": prov.get("weights"), "config": train_config, "rebuilt_from": str(engine.path),
            "train_seconds": float(sum(by_epoch[e]["epoch_seconds"] for e in range(1, epoch + 1)))}
    model = engine.model if dtype is None else engine.model.to(dtype)
    return save_state(out_dir, model, torch.optim.Adadelta(model.parameters()), meta, compact=True,
                      keep_moments=False)


USAGE = """usage: python -m training.checkpoint STATE_DIR OUT_DIR [--fp16]
         a weights-only copy of a state (<= 16 MiB shards)
       python -m training.checkpoint --from-engine ENGINE_DIR LOG_JSONL OUT_DIR [--fp16]
         a weights-only state rebuilt from a run's best engine and its log, to resume a run whose state was lost"""

if __name__ == "__main__":
    import sys

    args = [a for a in sys.argv[1:] if a not in ("--fp16", "--from-engine")]
    half = torch.float16 if "--fp16" in sys.argv else None
    if "--from-engine" in sys.argv and len(args) == 3:
        print(state_from_engine(args[0], args[1], args[2], half))
    elif "--from-engine" not in sys.argv and len(args) == 2:
        print(export_weights(args[0], args[1], half))
    else:
        sys.exit(USAGE)

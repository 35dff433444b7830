"""The one reader and writer of engine directories (CTranslate2-style converted models).

An engine directory holds:
    config.json         format_version, abm_rt version, model dims, vocab sha256, precision, provenance
    vocab.txt           one token per line; id = line number
    model.safetensors   FP32 inference weights (encoder + L2R branch): the source all else is rebuilt from
    r2l.safetensors     optional: the FP32 R2L branch (``r2l.`` keys), for bidirectional rescoring
                        (``decode.rescore``); listed as files["r2l"]. Readers that do not know it ignore it.
Later formats add exported/compiled files next to these; ``config.json`` lists them under "files".
"""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .data.vocab import Vocab
from .model import ABM, ModelConfig
from .version import __version__

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.txt"
WEIGHTS_FILE = "model.safetensors"
R2L_FILE = "r2l.safetensors"


class EngineError(RuntimeError):
    """An engine directory that is missing, incomplete, inconsistent or from a newer format."""


@dataclass
class Engine:
    """A loaded engine directory: the model (encoder + L2R, and R2L when the engine carries it; eval mode,
    CPU, FP32), its vocabulary and config."""

    path: Path
    model: ABM
    vocab: Vocab
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def model_config(self) -> ModelConfig:
        """Dimensions of the model."""
        return self.model.cfg

    @property
    def has_r2l(self) -> bool:
        """True when the engine carries the R2L branch (``model.r2l``), which rescoring needs."""
        return self.model.r2l is not None


def default_engine_path() -> Path:
    """The engine directory bundled inside the package (``abm_rt/assets/default``)."""
    return Path(str(resources.files("abm_rt").joinpath("assets", "default")))


def contains_engine(path: str | Path) -> bool:
    """True when ``path`` looks like an engine directory (it has a config.json and weights)."""
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def _cpu_fp32(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
            for k, v in tensors.items()}


def save_engine(path: str | Path, model: ABM, vocab: Vocab, precision: str = "fp32",
                provenance: dict[str, Any] | None = None, with_r2l: bool = False) -> Path:
    """Write ``model``'s inference weights (encoder + L2R) as an engine directory at ``path``.

    ``with_r2l``: also write the R2L branch (``r2l.safetensors``), so that the engine can rescore; the
    model must then be bidirectional."""
    from safetensors.torch import save_file

    if len(vocab) != model.cfg.vocab_size:
        raise ValueError(f"vocabulary has {len(vocab)} tokens but the model outputs {model.cfg.vocab_size}")
    if with_r2l and model.r2l is None:
        raise ValueError("with_r2l=True needs a bidirectional model (ABM(cfg, bidirectional=True))")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": "abm_rt", "format_version": str(FORMAT_VERSION)}
    save_file(_cpu_fp32(model.inference_state_dict()), str(path / WEIGHTS_FILE), metadata=meta)
    files = {"weights": WEIGHTS_FILE, "vocab": VOCAB_FILE}
    if with_r2l:
        r2l = {k: v for k, v in model.state_dict().items() if k.startswith("r2l.")}
        save_file(_cpu_fp32(r2l), str(path / R2L_FILE), metadata=meta)
        files["r2l"] = R2L_FILE
    elif (path / R2L_FILE).exists():
        (path / R2L_FILE).unlink()              # a stale branch of an earlier model must not be picked up
    (path / VOCAB_FILE).write_text(vocab.to_text(), encoding="utf-8")
    config = {
        "format_version": FORMAT_VERSION,
        "abm_rt_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "precision": precision,
        "model": model.cfg.to_dict(),
        "vocab_size": len(vocab),
        "vocab_sha256": vocab.sha256(),
        "files": files,
        "provenance": provenance or {},
    }
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def read_config(path: str | Path) -> dict[str, Any]:
    """Read and check ``config.json`` without loading weights (what ``abm-rt info`` shows)."""
    path = Path(path)
    if not path.exists():
        raise EngineError(f"engine directory {path} does not exist")
    if not (path / CONFIG_FILE).is_file():
        raise EngineError(f"{path} is not an engine directory: no {CONFIG_FILE} (make one with `abm-rt convert`)")
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EngineError(f"{path / CONFIG_FILE}: unreadable ({e})") from e
    if not isinstance(config, dict):
        raise EngineError(f"{path / CONFIG_FILE}: expected a JSON object, got {type(config).__name__}")
    version = config.get("format_version")
    if not isinstance(version, int):
        raise EngineError(f"{path / CONFIG_FILE}: no integer format_version")
    if version > FORMAT_VERSION:
        raise EngineError(f"{path} has engine format version {version}, but this abm_rt "
                          f"({__version__}) reads format version {FORMAT_VERSION} and older: upgrade abm_rt")
    return config


def update_config(path: str | Path, **entries: Any) -> dict[str, Any]:
    """Set top-level ``config.json`` entries of an existing engine directory (e.g. ``files``, ``export``
    after ``abm-rt convert`` adds exported graphs); returns the new config. A dict value replaces the
    old one whole. ``format_version`` and the model/vocabulary identity cannot be changed here."""
    fixed = {"format_version", "model", "vocab_size", "vocab_sha256"}
    bad = sorted(fixed & set(entries))
    if bad:
        raise ValueError(f"update_config cannot change {bad}: write a new engine with save_engine")
    path = Path(path)
    config = read_config(path)
    config.update(entries)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return config


def load_engine(path: str | Path) -> Engine:
    """Load an engine directory; every inconsistency is an ``EngineError`` naming the file."""
    from safetensors.torch import load_file

    path = Path(path)
    config = read_config(path)
    for name in (VOCAB_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise EngineError(f"engine directory {path} is incomplete: {name} is missing")
    try:
        vocab = Vocab.load(path / VOCAB_FILE)
    except (OSError, ValueError) as e:
        raise EngineError(f"{path / VOCAB_FILE}: not a valid vocabulary ({e})") from e
    if vocab.sha256() != config.get("vocab_sha256"):
        raise EngineError(f"{path / VOCAB_FILE} does not match the vocabulary the engine was built with "
                          f"(sha256 {vocab.sha256()[:12]} != {str(config.get('vocab_sha256'))[:12]})")
    try:
        cfg = ModelConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise EngineError(f"{path / CONFIG_FILE}: bad model dimensions ({e})") from e
    r2l_name = (config.get("files") or {}).get("r2l")
    model = ABM(cfg, bidirectional=r2l_name is not None)
    sources = [WEIGHTS_FILE] + ([r2l_name] if r2l_name else [])
    state: dict[str, torch.Tensor] = {}
    for name in sources:
        if not (path / name).is_file():
            raise EngineError(f"engine directory {path} is incomplete: {name} is missing (listed in {CONFIG_FILE})")
        try:
            part = load_file(str(path / name))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for corrupt files
            raise EngineError(f"{path / name}: unreadable weights ({type(e).__name__}: {e})") from e
        if name == r2l_name and any(not k.startswith("r2l.") for k in part):
            raise EngineError(f"{path / name}: holds keys outside the R2L branch ({next(iter(part))!r})")
        state.update(part)
    load_checked(model, state, " + ".join(str(path / n) for n in sources))
    return Engine(path, model.eval(), vocab, config)


def load_checked(model: ABM, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``; an ``EngineError`` naming ``source`` if keys or shapes do not fit."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise EngineError(f"{source} does not fit the model: missing {missing[:5]}"
                          f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    bad = [k for k in expected if expected[k].shape != state[k].shape]
    if bad:
        raise EngineError(f"{source}: wrong shapes for {bad[:5]}")
    model.load_state_dict(state)

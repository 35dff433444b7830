"""``abm-rt info``: what an engine directory holds."""
from __future__ import annotations

import argparse
import json

from ..engine_dir import EngineError, default_engine_path, read_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("info", help="show what an engine directory holds",
                       description="Print an engine directory's config.json (format version, precision, model "
                                   "dimensions, vocabulary hash, provenance) and its files with their sizes.")
    p.add_argument("engine", nargs="?", metavar="ENGINE_DIR",
                   help="engine directory (default: the model bundled with abm_rt)")


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit status."""
    path = args.engine or default_engine_path()
    if args.engine is None and not (default_engine_path() / "config.json").is_file():
        print("abm-rt info: no trained model is bundled with this abm_rt yet; pass an engine directory")
        return 1
    try:
        config = read_config(path)
    except EngineError as e:
        print(f"abm-rt info: {e}")
        return 1
    from pathlib import Path
    files = {f.name: f.stat().st_size for f in sorted(Path(path).iterdir()) if f.is_file()}
    print(json.dumps({"path": str(path), **config, "file_sizes": files}, indent=1))
    return 0

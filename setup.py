"""Packaging for abm_rt. ``pip install .`` installs the runtime, its ``abm-rt`` command and the trainer.

torch is required but not pinned here: install the build you want first (CI and the README use the
CPU build, ``pip install torch==2.13.0``), so that pip does not pull a multi-gigabyte CUDA build.
"""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
version = {}
exec((ROOT / "abm_rt" / "version.py").read_text(), version)

setup(
    name="abm_rt",
    version=version["__version__"],
    description="Inference runtime for ABM, the handwritten mathematical expression recognizer (AAAI 2022)",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["abm_rt", "abm_rt.*", "training", "training.*"]),
    package_data={"abm_rt": ["data/vocab.txt", "assets/default/*"]},
    install_requires=["torch>=2.1", "numpy>=1.23", "pillow>=9.1", "safetensors>=0.4", "tqdm>=4.60"],
    extras_require={"test": ["pytest>=7", "Hershey-Fonts>=2.1"]},
    entry_points={"console_scripts": ["abm-rt = abm_rt.cli:main"]},
)

"""Packaging for abm_rt. ``pip install .`` installs the runtime, its ``abm-rt`` command and the trainer.

torch is required but not pinned here: install the build you want first (CI and the README use the
CPU build, ``pip install torch==2.13.0``), so that pip does not pull a multi-gigabyte CUDA build.

It also builds the native extension ``abm_rt._C`` (pybind11, no torch at build time) from the
sources listed in ``csrc/sources.txt`` (CMakeLists.txt reads the same list):

- the C++ part always (``-O3 -std=c++17 -fopenmp``);
- the CUDA part (``csrc/**/*_cuda.cu``, nvcc, explicit ``-gencode``, cudart linked statically) when
  nvcc is found (``$CUDA_HOME``/``$CUDA_PATH``, then ``nvcc`` on PATH, then /usr/local/cuda), at
  least one such file exists and ``ABM_RT_SKIP_CUDA_BUILD`` is not ``1``. Only then is
  ``ABM_WITH_CUDA`` defined; otherwise stubs make the CUDA entry points raise "built without CUDA".

Environment: ``ABM_RT_SKIP_CUDA_BUILD=1`` builds CPU-only even with nvcc present;
``ABM_RT_NO_EXTENSION=1`` installs pure Python (``abm_rt.decode.native`` then reports itself
unavailable); ``ABM_RT_NVCC_THREADS`` caps parallel nvcc jobs (default: CPU count).
"""
import os
import platform
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
version = {}
exec((ROOT / "abm_rt" / "version.py").read_text(), version)

CXX_FLAGS = ["-O3", "-std=c++17", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"]
NVCC_FLAGS = [
    "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
    # No --use_fast_math: the CUDA twin is compared with the PyTorch reference at 1e-5 in FP32.
    "-gencode", "arch=compute_90,code=sm_90",
    "-gencode", "arch=compute_80,code=sm_80",
    "-gencode", "arch=compute_90,code=compute_90",   # PTX for newer GPUs
]


def read_sources() -> dict:
    """csrc/sources.txt -> {"core": [...], "nocuda": [...], "cuda": [...], "binding": [...]} (repo-relative)."""
    kinds = {"core": [], "nocuda": [], "cuda": [], "binding": []}
    for number, raw in enumerate((ROOT / "csrc" / "sources.txt").read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, path = line.split()
        if kind not in kinds:
            raise ValueError(f"csrc/sources.txt:{number}: unknown kind {kind!r}")
        if kind == "cuda":   # a glob: whatever CUDA sources exist now
            kinds[kind] += sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob(path))
        else:
            kinds[kind].append(path)
    return kinds


def find_cuda():
    """(nvcc path, CUDA toolkit root) or None. Handles nvcc wrapper scripts by asking nvcc itself."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc"), Path(home)
    nvcc = shutil.which("nvcc")
    if nvcc is None and Path("/usr/local/cuda/bin/nvcc").is_file():
        nvcc = "/usr/local/cuda/bin/nvcc"
    if nvcc is None:
        return None
    home = Path(os.path.realpath(nvcc)).parent.parent
    if not (home / "include" / "cuda_runtime.h").is_file():
        # e.g. /usr/local/bin/nvcc is a script that execs the real one: nvcc's dry run prints its TOP.
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", "probe.cu"], capture_output=True, text=True, timeout=60)
            tops = [ln.split("TOP=", 1)[1].strip() for ln in (out.stdout + out.stderr).splitlines() if "TOP=" in ln]
        except (OSError, subprocess.SubprocessError):
            tops = []
        if not tops:
            return None
        home = Path(os.path.realpath(tops[-1]))
    return nvcc, home


def cuda_dirs(home: Path):
    """(include dirs, the lib dir holding libcudart_static.a) of a CUDA toolkit, or None if incomplete."""
    target = f"targets/{platform.machine()}-linux" if platform.machine() != "aarch64" else "targets/sbsa-linux"
    includes = [d for d in (home / "include", home / target / "include") if (d / "cuda_runtime.h").is_file()]
    libs = [d for d in (home / "lib64", home / target / "lib", home / "lib") if (d / "libcudart_static.a").is_file()]
    if not includes or not libs:
        return None
    return [str(d) for d in includes], str(libs[0])


class BuildExt(build_ext):
    """Builds abm_rt._C: C++ always; .cu files with nvcc first when CUDA is available, then one link."""

    def build_extensions(self):
        for ext in self.extensions:
            if ext.name == "abm_rt._C":
                self._configure_abm(ext)
        super().build_extensions()

    def _configure_abm(self, ext: Extension) -> None:
        import pybind11  # build requirement (pyproject.toml); imported here so setup.py itself needs none

        srcs = read_sources()
        ext.include_dirs += [pybind11.get_include(), "csrc"]
        ext.extra_compile_args = list(CXX_FLAGS)
        ext.extra_link_args = []
        if self._has_flag("-fopenmp"):
            ext.extra_compile_args.append("-fopenmp")
            ext.extra_link_args.append("-fopenmp")
        else:
            self.announce("abm_rt._C: the compiler has no -fopenmp; building single-threaded", level=3)

        # Rebuild when a header, a CUDA source or the source list changes (setuptools only checks sources).
        ext.depends = sorted({p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*")
                              if p.suffix in (".h", ".cuh", ".hpp", ".inl", ".cu", ".txt")})
        cuda = self._cuda_plan(srcs["cuda"])
        self._stamp(ext, "cpu" if cuda is None else f"cuda {cuda} {srcs['cuda']} {NVCC_FLAGS}")
        if cuda is None:
            ext.sources = srcs["core"] + srcs["nocuda"] + srcs["binding"]
            print("abm_rt._C: CPU-only build", flush=True)
            return
        nvcc, includes, libdir = cuda
        ext.sources = srcs["core"] + srcs["binding"]
        ext.define_macros.append(("ABM_WITH_CUDA", None))
        ext.include_dirs += includes
        ext.extra_objects = self._nvcc_compile(nvcc, srcs["cuda"], includes)
        ext.depends += ext.extra_objects   # a recompiled CUDA object relinks the module
        ext.library_dirs.append(libdir)
        ext.libraries += ["cudart_static", "rt", "dl", "pthread"]
        # Keep the static runtime's symbols private, so they never interpose on torch's libcudart.
        ext.extra_link_args.append("-Wl,--exclude-libs,libcudart_static.a")
        print(f"abm_rt._C: CUDA build ({len(srcs['cuda'])} CUDA sources, cudart_static from {libdir})", flush=True)

    def _stamp(self, ext: Extension, config: str) -> None:
        """A file that changes when the build configuration does (CPU-only <-> CUDA), so the module relinks."""
        stamp = Path(self.build_temp) / "abm_rt_C.config"
        stamp.parent.mkdir(parents=True, exist_ok=True)
        if not stamp.exists() or stamp.read_text() != config:
            stamp.write_text(config)
        ext.depends.append(str(stamp))

    def _cuda_plan(self, cu_sources):
        if os.environ.get("ABM_RT_SKIP_CUDA_BUILD") == "1":
            print("abm_rt._C: ABM_RT_SKIP_CUDA_BUILD=1, not building CUDA", flush=True)
            return None
        if not cu_sources:
            print("abm_rt._C: no csrc/**/*_cuda.cu sources, not building CUDA", flush=True)
            return None
        found = find_cuda()
        if found is None:
            print("abm_rt._C: nvcc not found (set CUDA_HOME to build CUDA)", flush=True)
            return None
        nvcc, home = found
        dirs = cuda_dirs(home)
        if dirs is None:
            print(f"abm_rt._C: CUDA toolkit at {home} lacks cuda_runtime.h or libcudart_static.a; CPU-only", flush=True)
            return None
        return nvcc, dirs[0], dirs[1]

    def _nvcc_compile(self, nvcc, cu_sources, cuda_includes):
        """Compile each .cu to an object under build_temp (skipped when up to date); returns the objects."""
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        headers = [p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cuh", ".hpp", ".inl")]
        newest_header = max((p.stat().st_mtime for p in headers), default=0.0)
        incs = [f"-I{d}" for d in ["csrc", *cuda_includes]]

        def compile_one(src):
            obj = out_dir / (src.replace("/", "_") + ".o")
            if not self.force and obj.exists() and obj.stat().st_mtime >= max(Path(src).stat().st_mtime, newest_header):
                return str(obj)
            cmd = [nvcc, "-c", src, "-o", str(obj), *NVCC_FLAGS, "-DABM_WITH_CUDA", *incs]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            return str(obj)

        jobs = int(os.environ.get("ABM_RT_NVCC_THREADS", os.cpu_count() or 1))
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            return list(pool.map(compile_one, cu_sources))

    def _has_flag(self, flag: str) -> bool:
        """Whether the C++ compiler accepts `flag` (compiles a tiny file)."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "flag.cc"
            src.write_text("int main() { return 0; }\n")
            try:
                self.compiler.compile([str(src)], output_dir=tmp, extra_postargs=[flag])
            except Exception:  # distutils CompileError, or an unrelated compiler failure
                return False
        return True


ext_modules = []
if os.environ.get("ABM_RT_NO_EXTENSION") != "1":
    # Sources are filled in by BuildExt (which .cc files depends on whether CUDA is built).
    ext_modules.append(Extension("abm_rt._C", sources=read_sources()["core"], language="c++"))

setup(
    name="abm_rt",
    version=version["__version__"],
    description="Inference runtime for ABM, the handwritten mathematical expression recognizer (AAAI 2022)",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["abm_rt", "abm_rt.*", "training", "training.*", "export", "export.*"]),
    package_data={"abm_rt": ["data/vocab.txt", "assets/default/*"]},
    install_requires=["torch>=2.1", "numpy>=1.23", "pillow>=9.1", "safetensors>=0.4", "tqdm>=4.60"],
    extras_require={"onnx": ["onnx>=1.15", "onnxruntime>=1.17"],
                    "test": ["pytest>=7", "Hershey-Fonts>=2.1", "onnx>=1.15", "onnxruntime>=1.17"]},
    entry_points={"console_scripts": ["abm-rt = abm_rt.cli:main"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt},
)

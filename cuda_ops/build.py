"""Just-in-time build of the compiled kernels (``torch.utils.cpp_extension.load`` + ninja), cached.

The CPU extension (C++, OpenMP) and the CUDA extension are built separately, on first use, into
``$WEFT_CACHE_DIR/torch_extensions/<torch>-<cuda>`` (default cache dir: ``~/.cache/weft``).
ninja only recompiles what changed, so later loads are instant. A failed build writes the
compiler's log next to the build folder and returns ``None``; callers decide whether that is a
warning (``auto``) or an error (a forced backend).

Prebuild from the command line::

    python -m cuda_ops.build            # every kernel this machine can build
    python -m cuda_ops.build --cuda     # only the CUDA extension (needs nvcc, not a GPU)
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = {
    "cpu": [CSRC / "ms_deform_sample.cpp", CSRC / "cpu" / "ms_deform_sample_cpu.cpp"],
    "cuda": [CSRC / "ms_deform_sample.cpp", CSRC / "cuda" / "ms_deform_sample_cuda.cu"],
}
# Hopper (H100/H200) when no GPU is visible to choose from; override with TORCH_CUDA_ARCH_LIST.
DEFAULT_CUDA_ARCH = "9.0"


class KernelBuildError(RuntimeError):
    """A compiled kernel could not be built; ``log_path`` holds the compiler output."""

    def __init__(self, kind: str, log_path: Path):
        super().__init__(f"building the {kind} kernels of cuda_ops failed; compiler log: {log_path}")
        self.kind = kind
        self.log_path = log_path


def cache_dir() -> Path:
    """Root of weft's build cache, ``$WEFT_CACHE_DIR`` or ``~/.cache/weft``."""
    return Path(os.environ.get("WEFT_CACHE_DIR", Path.home() / ".cache" / "weft"))


def build_dir(kind: str) -> Path:
    """Build folder of one extension, keyed by torch and CUDA versions so upgrades never mix, and by the
    checkout its sources live in: ninja rebuilds when source paths change, so two checkouts sharing one
    folder would recompile each other's build on every alternation (~1-2 min each)."""
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda or 'none'}".replace("+", "_")
    checkout = hashlib.sha256(str(CSRC.resolve()).encode()).hexdigest()[:10]
    return cache_dir() / "torch_extensions" / tag / f"{kind}-{checkout}"


@functools.cache
def find_cuda_home() -> str | None:
    """The CUDA toolkit folder (holding ``bin/nvcc``, ``include/``, ``lib64/``).

    ``$CUDA_HOME`` wins. Otherwise ask the ``nvcc`` on PATH where its toolkit is: it may be a
    wrapper script outside the toolkit, in which case the folder above it is not the toolkit.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dryrun = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True, text=True, timeout=60
        ).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", dryrun, re.MULTILINE)
    if match:
        return str(Path(match.group(1).strip()).resolve())
    return str(Path(nvcc).resolve().parent.parent)


def _compile(kind: str, verbose: bool) -> ModuleType:
    cuda_home = find_cuda_home()
    if cuda_home is not None:
        # cpp_extension resolves CUDA_HOME once, at import: give it the toolkit's real folder.
        os.environ["CUDA_HOME"] = cuda_home
    # cpp_extension warns at import that no CUDA runtime is found; on a CPU build that is noise.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    kwargs: dict = {
        "extra_cflags": ["-O3", *openmp],
        "extra_ldflags": openmp,
    }
    if kind == "cuda":
        if cuda_home is None:
            raise RuntimeError("nvcc not found: set CUDA_HOME or put nvcc on PATH")
        cpp_extension.CUDA_HOME = cuda_home  # in case cpp_extension was imported earlier
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH)
        kwargs["extra_cuda_cflags"] = ["-O3", "--use_fast_math", "-lineinfo"]
    directory = build_dir(kind)
    directory.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=f"weft_ms_deform_{kind}",
        sources=[str(s) for s in SOURCES[kind]],
        build_directory=str(directory),
        verbose=verbose,
        **kwargs,
    )


@functools.cache
def load_kernels(kind: str, verbose: bool = False) -> ModuleType:
    """Build (if needed) and import the ``cpu`` or ``cuda`` extension.

    Returns the module with ``forward`` and ``backward``. Raises :class:`KernelBuildError` with the
    compiler log's path if the build fails; the failure is cached for the process.
    """
    if kind not in SOURCES:
        raise ValueError(f"unknown kernel kind {kind!r}; expected one of {sorted(SOURCES)}")
    log_path = build_dir(kind).with_suffix(".log")
    try:
        module = _compile(kind, verbose)
    except Exception as error:  # compiler, linker, or import failure: keep the whole story
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(f"{type(error).__name__}: {error}\n")
        raise KernelBuildError(kind, log_path) from error
    log_path.unlink(missing_ok=True)  # a stale log of an earlier failure would mislead
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cuda_ops.build", description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="build the CPU extension")
    parser.add_argument("--cuda", action="store_true", help="build the CUDA extension (needs nvcc)")
    parser.add_argument("--verbose", action="store_true", help="show compiler commands")
    args = parser.parse_args(argv)
    kinds = [k for k in ("cpu", "cuda") if getattr(args, k)]
    if not kinds:
        kinds = ["cpu"] + (["cuda"] if torch.cuda.is_available() or find_cuda_home() else [])
    failed = False
    for kind in kinds:
        start = time.perf_counter()
        try:
            module = load_kernels(kind, verbose=args.verbose)
        except KernelBuildError as error:
            print(f"{kind}: FAILED ({error})", file=sys.stderr)
            failed = True
            continue
        print(f"{kind}: ok in {time.perf_counter() - start:.1f}s -> {module.__file__}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

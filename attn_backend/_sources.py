"""Where the CUDA sources live and a hash of them.

Kept free of torch imports: setup.py loads this file directly to name the
sources it compiles and to stamp the build with the same hash the JIT path
uses, so a stale prebuilt extension is never loaded against newer sources.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_SOURCE_SUFFIXES = (".cu", ".cuh", ".cpp", ".h", ".hpp")

# Flags shared by the setup.py build and the JIT build. The -U flags undo
# torch's defaults that hide the half/bfloat16 operators the kernels use.
# The C++ standard is left to torch (C++17 or C++20, as its headers need).
NVCC_FLAGS = [
    "-O3",
    "--expt-relaxed-constexpr",
    "-lineinfo",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__",
]
CXX_FLAGS = ["-O3"]

# What setup.py compiles for when TORCH_CUDA_ARCH_LIST is not set.
DEFAULT_ARCH_LIST = "8.0;9.0a"


def kernels_dir() -> Path:
    """The `kernels/` tree: beside the package in a checkout, inside it in a wheel."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir.parent / "kernels", package_dir / "_kernels"):
        if (candidate / "csrc").is_dir() and (candidate / "include").is_dir():
            return candidate
    raise FileNotFoundError(
        f"attn_backend cannot find its CUDA sources (looked for kernels/ beside and "
        f"_kernels/ inside {package_dir})"
    )


def compiled_sources(root: Path | None = None) -> list[Path]:
    """The translation units of the extension: every .cpp and .cu in kernels/csrc."""
    csrc = (root or kernels_dir()) / "csrc"
    return sorted(p for p in csrc.iterdir() if p.suffix in (".cpp", ".cu"))


def sources_hash(root: Path | None = None) -> str:
    """sha256 over the relative path and bytes of every source and header."""
    root = root or kernels_dir()
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in _SOURCE_SUFFIXES):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()

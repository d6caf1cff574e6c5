"""Loading the compiled kernels: a matching prebuilt extension, else a JIT build.

`setup.py` builds `attn_backend/_C*.so` and stamps it (`_C.build.json`) with
the torch version, CUDA architectures and source hash it was built from. When
no stamped build matches the running torch, the sources and the GPU in hand,
the same sources are compiled with ninja on first use into a cache directory
keyed by torch version + architecture + source hash. Either way the library is
loaded with `torch.ops.load_library`, which registers `torch.ops.attn_backend`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import torch

from . import _sources

logger = logging.getLogger("attn_backend")

_PACKAGE_DIR = Path(__file__).resolve().parent
BUILD_STAMP = "_C.build.json"
_load_lock = threading.Lock()
_loaded_from: str | None = None



def arch_for_device(device_index: int | None = None) -> str:
    """TORCH_CUDA_ARCH_LIST entry for a GPU: Hopper gets 9.0a (wgmma, setmaxnreg)."""
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"{major}.{minor}a" if (major, minor) == (9, 0) else f"{major}.{minor}"


def _requested_arch_list() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or arch_for_device()


def _stamp_matches(stamp: dict, source_hash: str) -> tuple[bool, str]:
    if stamp.get("torch_version") != torch.__version__:
        return False, f"built for torch {stamp.get('torch_version')}, running {torch.__version__}"
    if stamp.get("source_hash") != source_hash:
        return False, "kernel sources changed since it was built"
    if torch.cuda.is_available():
        needed = arch_for_device()
        built = stamp.get("arch_list", "").replace(" ", ";").split(";")
        if needed not in built and needed.rstrip("a") not in built:
            return False, f"built for {built}, this GPU needs {needed}"
    return True, ""


def _prebuilt_library(source_hash: str) -> Path | None:
    stamp_path = _PACKAGE_DIR / BUILD_STAMP
    if not stamp_path.exists():
        return None
    stamp = json.loads(stamp_path.read_text())
    library = _PACKAGE_DIR / stamp.get("library", "")
    if not library.is_file():
        return None
    ok, why = _stamp_matches(stamp, source_hash)
    if not ok:
        logger.info("attn_backend: not using the prebuilt extension (%s)", why)
        return None
    return library


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "attn_backend"
    return Path(os.environ.get("ATTN_BACKEND_CACHE_DIR", default))


def jit_build(verbose: bool = False) -> Path:
    """Compile kernels/ with ninja into the cache (a no-op when already built)."""
    from torch.utils import cpp_extension

    root = _sources.kernels_dir()
    source_hash = _sources.sources_hash(root)
    arch_list = _requested_arch_list()
    arch_tag = arch_list.replace(";", "_").replace(" ", "_").replace(".", "").replace("+", "")
    torch_tag = torch.__version__.replace("+", "_")
    build_dir = cache_root() / f"torch{torch_tag}-sm{arch_tag}-{source_hash[:16]}"
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(p) for p in _sources.compiled_sources(root)]

    previous_arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    started = time.perf_counter()
    cached = (build_dir / "attn_backend_jit.so").exists()
    if not cached:
        logger.warning(
            "attn_backend: JIT-compiling %d CUDA sources for TORCH_CUDA_ARCH_LIST=%s into %s "
            "(first use only; MAX_JOBS=%s)",
            len(sources), arch_list, build_dir, os.environ.get("MAX_JOBS", "auto"),
        )
    try:
        library = cpp_extension.load(
            name="attn_backend_jit",
            sources=sources,
            extra_include_paths=[str(root / "include"), str(root / "csrc")],
            extra_cflags=_sources.CXX_FLAGS,
            extra_cuda_cflags=_sources.NVCC_FLAGS,
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=verbose,
        )
    finally:
        if previous_arch_list is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous_arch_list
    if not cached:
        logger.warning("attn_backend: kernels compiled in %.1f s (%s)",
                       time.perf_counter() - started, library)
    return Path(library)


def pdl_default(device: torch.device) -> bool:
    """Whether kernels on `device` launch with programmatic dependent launch by default: on
    GPUs that have it (compute capability 9.0 and newer), as FlashInfer does."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def load_ops():
    """Load the kernels once per process and return `torch.ops.attn_backend`.

    Called on every kernel launch, so after the first load it takes no lock.
    """
    global _loaded_from
    if _loaded_from is not None:
        return torch.ops.attn_backend
    with _load_lock:
        if _loaded_from is None:
            library = _prebuilt_library(_sources.sources_hash())
            if library is None:
                if not torch.cuda.is_available():
                    raise RuntimeError(
                        "attn_backend: no prebuilt extension matches this torch and no GPU is "
                        "present to JIT-build for; CPU tensors use the float reference instead"
                    )
                library = jit_build(verbose=os.environ.get("ATTN_BACKEND_VERBOSE_BUILD") == "1")
            torch.ops.load_library(str(library))
            _loaded_from = str(library)
    return torch.ops.attn_backend


def try_load_ops():
    """`torch.ops.attn_backend`, or None on a machine without a GPU and without a build that
    matches (there, CPU tensors need only the float reference)."""
    try:
        return load_ops()
    except RuntimeError:
        if torch.cuda.is_available():
            raise
        return None


def loaded_library() -> str | None:
    """Path of the loaded kernel library, or None before the first kernel call."""
    return _loaded_from

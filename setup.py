"""Builds attn_backend and its CUDA extension `attn_backend._C` from kernels/.

    pip install -e . --no-build-isolation          # needs torch and nvcc
    TORCH_CUDA_ARCH_LIST="9.0a" MAX_JOBS=16 pip install -e . --no-build-isolation

Targets sm_80 and sm_90a unless TORCH_CUDA_ARCH_LIST says otherwise.
ATTN_BACKEND_SKIP_CUDA_BUILD=1 installs the Python package alone; the kernels
are then JIT-built on first use on a GPU machine.
"""

import importlib.util
import json
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("attn_backend_sources",
                                               ROOT / "attn_backend" / "_sources.py")
sources = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sources)
KERNELS = ROOT / "kernels"


class BuildPyWithKernels(build_py):
    """Ships kernels/ inside the wheel (attn_backend/_kernels) for the JIT path."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "attn_backend" / "_kernels"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(KERNELS, target)


cmdclass = {"build_py": BuildPyWithKernels}
ext_modules = []

if os.environ.get("ATTN_BACKEND_SKIP_CUDA_BUILD", "0") != "1":
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", sources.DEFAULT_ARCH_LIST)

    class StampedBuildExtension(BuildExtension):
        """Records what the extension was built from, so the loader can tell a stale build."""

        def run(self):
            super().run()
            for ext in self.extensions:
                library = Path(self.get_ext_fullpath(ext.name))
                stamp = {
                    "library": library.name,
                    "torch_version": torch.__version__,
                    "cuda_version": torch.version.cuda,
                    "arch_list": os.environ["TORCH_CUDA_ARCH_LIST"],
                    "source_hash": sources.sources_hash(KERNELS),
                }
                (library.parent / "_C.build.json").write_text(json.dumps(stamp, indent=1) + "\n")

    ext_modules.append(
        CUDAExtension(
            name="attn_backend._C",
            sources=[str(p.relative_to(ROOT)) for p in sources.compiled_sources(KERNELS)],
            include_dirs=[str(KERNELS / "include"), str(KERNELS / "csrc")],
            extra_compile_args={"cxx": sources.CXX_FLAGS, "nvcc": sources.NVCC_FLAGS},
        )
    )
    cmdclass["build_ext"] = StampedBuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)

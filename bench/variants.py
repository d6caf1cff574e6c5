"""Side extensions of kernel variants for the shape sweeps (bench/sweep_decode.py,
bench/sweep_prefill.py): one translation unit per variant, built in parallel, and an ops
unit that dispatches an integer variant index to them."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from attn_backend import _sources


def build_variant_extension(name: str, params_type: str, variant_units: list[str],
                            ops_template: str) -> None:
    """Compile and load extension `name`. Variant unit i defines
    `void run_variant_i(const <params_type>&, int64_t kv_heads, int64_t items, cudaStream_t)` and
    `std::vector<int64_t> info_variant_i()`; `ops_template` gets {declarations}, {run_cases}
    (switch cases that call run_variant_i with `params`, `kv_heads`, `items`, `stream` in
    scope) and {info_cases}. The build directory is keyed by the sources and reused while the
    machine stays warm."""
    from torch.utils.cpp_extension import load

    kernels = _sources.kernels_dir()
    key = hashlib.sha256(("".join(variant_units) + ops_template +
                          _sources.sources_hash(kernels)).encode()).hexdigest()[:16]
    build_dir = Path(tempfile.gettempdir()) / f"{name}_{key}"
    build_dir.mkdir(exist_ok=True)
    sources = []
    for i, unit in enumerate(variant_units):
        path = build_dir / f"variant_{i}.cu"
        path.write_text(unit)
        sources.append(str(path))
    count = range(len(variant_units))
    declarations = "\n".join(
        f"void run_variant_{i}(const {params_type}&, int64_t, int64_t, cudaStream_t);\n"
        f"std::vector<int64_t> info_variant_{i}();" for i in count)
    run_cases = "\n".join(
        f"    case {i}: return run_variant_{i}(params, kv_heads, items, stream);" for i in count)
    info_cases = "\n".join(f"    case {i}: return info_variant_{i}();" for i in count)
    ops = build_dir / "ops.cu"
    ops.write_text(ops_template.format(declarations=declarations, run_cases=run_cases,
                                       info_cases=info_cases))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    load(name=name, sources=[str(ops)] + sources,
         extra_include_paths=[str(kernels / "include"), str(kernels / "csrc")],
         extra_cuda_cflags=_sources.NVCC_FLAGS, extra_cflags=_sources.CXX_FLAGS,
         build_directory=str(build_dir), is_python_module=False, verbose=False)

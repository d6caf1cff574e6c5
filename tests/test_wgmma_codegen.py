"""The warpgroup-MMA kernels' machine code (CPU, with nvcc): compiled for sm_90a, no kernel has
its wgmma serialized by ptxas (C7520: a wgmma on a path that depends on a runtime value, or an
accumulator the compiler cannot follow, makes every wgmma of the kernel wait for the previous
one; ptxas says so only as an "info" line) and none spills more than a few registers. Both
have happened while writing these kernels (bench/NOTES.md, session 22) without any test failing,
since the results stay correct."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from attn_backend._sources import kernels_dir

KERNELS = {
    "paged_mla_seesaw_kernel": "MlaSeesawTraits<MlaSeesawShape, B, B, B>",
    "paged_mla_wgmma_kernel": "MlaWgmmaTraits<MlaWgmmaShape<3>, B, B, B>",
    "paged_prefill_kernel": "PrefillTraits<PrefillShape<128, 128, 1, 128, 2, 12, true>, B, B, B>",
}
MAX_SPILL_BYTES = 128


def nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


@pytest.mark.skipif(nvcc() is None, reason="needs nvcc (the CUDA toolkit)")
def test_wgmma_kernels_are_not_serialized_and_barely_spill(tmp_path):
    unit = tmp_path / "wgmma_kernels.cu"
    lines = ['#include "attn_backend/mla_seesaw.cuh"', '#include "attn_backend/mla_wgmma.cuh"',
             '#include "attn_backend/prefill.cuh"', "namespace attn_backend {",
             "using B = __nv_bfloat16;"]
    lines += [f"template __global__ void {kernel}<{traits}, LogitsTransform<false>, false>"
              "(const __grid_constant__ AttentionParams);" for kernel, traits in KERNELS.items()]
    unit.write_text("\n".join(lines + ["}"]) + "\n")
    done = subprocess.run([nvcc(), "-std=c++17", "-O3", "--expt-relaxed-constexpr",
                           "-arch=sm_90a", "-cubin", "-Xptxas", "-v",
                           f"-I{kernels_dir() / 'include'}", str(unit),
                           "-o", str(tmp_path / "wgmma_kernels.cubin")],
                          capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "C7520" not in log and "serialized" not in log, \
        [line for line in log.splitlines() if "serialized" in line]
    # ptxas reports each entry ("Compiling entry function '<mangled>'") before its properties.
    spills = {}
    entry = None
    for line in log.splitlines():
        found = re.search(r"Compiling entry function '(\w+)'", line)
        if found:
            entry = found.group(1)
        found = re.search(r"(\d+) bytes spill stores", line)
        if found and entry is not None:
            spills[entry] = int(found.group(1))
    assert len(spills) == len(KERNELS), log[-3000:]
    for name in KERNELS:
        (mangled,) = [entry for entry in spills if name in entry]
        assert spills[mangled] <= MAX_SPILL_BYTES, (name, spills[mangled])

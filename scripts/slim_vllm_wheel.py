"""A vLLM wheel (and the FlashInfer wheel vLLM pins) small enough for one carry to the GPU
machine (issue 21).

    python scripts/slim_vllm_wheel.py FULL_WHEEL OUT_DIR [--arch 90] [--profile vllm|flashinfer]

The GPU machine has no network and takes at most 64 MiB along per call, and its torch (2.11)
is older than the one vLLM 0.33 pins (2.14). What runs there, and so what the slim wheel keeps:
- every Python file, and `_C_stable_libtorch.abi3.so`, vLLM's CUDA ops built on torch's stable
  ABI (so they load under the older torch), with the GPU code of other architectures zeroed in
  its `.nv_fatbin` section (the section keeps its size, so the ELF is untouched; the zeros
  compress away);
- not the extensions built against torch 2.14's C++ ABI, which cannot load there (the FA2/FA3
  `vllm_flash_attn` ones, MoE, FlashMLA, DeepGEMM, ...), nor the `vllm-rs` binary and the bundled
  CUTLASS headers;
- `vllm/vllm_flash_attn/__init__.py` becomes a stand-in that gives the names vLLM's model
  inspection imports and says FlashAttention is unavailable (the real one raises ImportError
  without its extensions, which stops model configs from building).
The `flashinfer` profile (flashinfer-python 0.7.2.post1, 59 MiB, which vLLM's engine imports
for its sampler and autotuner, and which its FLASHINFER backend JIT-compiles on first use) drops
only the CUDA sources of kernel families that vLLM's FLASHINFER attention on sm_90 never compiles
(MoE, Blackwell, the cake_* and experimental kernels, KDA/GDN); every Python file stays, so
`import flashinfer` and its JIT still work.
The wheel keeps its file name, with a RECORD for the files it holds.
"""

from __future__ import annotations

import argparse
import base64
import csv
import fnmatch
import hashlib
import io
import struct
import sys
import zipfile
from pathlib import Path

DROPPED = [
    "vllm/vllm_flash_attn/*.so", "vllm/_moe_C_stable_libtorch.abi3.so", "vllm/_flashmla*.so",
    "vllm/_qutlass_C.abi3.so", "vllm/_flashkda_C.abi3.so", "vllm/_deepselect_C.abi3.so",
    "vllm/third_party/deep_gemm/*.so", "vllm/vllm-rs", "vllm/third_party/*/include/*",
    "vllm/third_party/*/cutlass/include/*",
]
FLASHINFER_DROPPED = [
    "flashinfer/data/csrc/cake_*", "flashinfer/data/csrc/kda/*", "flashinfer/data/csrc/gdn/*",
    "flashinfer/data/csrc/fused_moe/*", "flashinfer/data/csrc/blackwell_*",
    "flashinfer/data/csrc/alphamoe*", "flashinfer/data/cutlass/examples/*",
] + [f"flashinfer/{folder}/*.{ext}" for folder in ("experimental", "moe_ep", "cake_*_backend")
     for ext in ("cu", "cuh", "cubin", "cpp", "h", "hpp")]
PROFILES = {"vllm": DROPPED, "flashinfer": FLASHINFER_DROPPED}
SLIMMED = "vllm/_C_stable_libtorch.abi3.so"
STAND_IN = "vllm/vllm_flash_attn/__init__.py"
STAND_IN_SOURCE = '''"""Stand-in written by attn_backend's scripts/slim_vllm_wheel.py: this wheel has no
FlashAttention extensions (they need vLLM's pinned torch); the names vLLM imports are here."""

FA2_AVAILABLE = False
FA3_AVAILABLE = False
_REASON = "vllm_flash_attn extensions removed from this slim wheel (attn_backend recipe)"


def fa_version_unsupported_reason(fa_version, device=None):
    return _REASON


def is_fa_version_supported(fa_version, device=None):
    return False


def _unavailable(*args, **kwargs):
    raise NotImplementedError(_REASON)


flash_attn_varlen_func = _unavailable
flash_attn_with_kvcache = _unavailable
get_scheduler_metadata = _unavailable
compile_flash_attn_varlen_func_from_specs = _unavailable
'''

FATBIN_MAGIC = 0xBA55ED50
ENTRY_ELF, ENTRY_PTX = 2, 1


def section(elf: bytes, name: str) -> tuple[int, int]:
    """(file offset, size) of the named section of a little-endian ELF64 file."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def header(i):  # sh_name, sh_offset, sh_size
        base = shoff + i * shentsize
        return (struct.unpack_from("<I", elf, base)[0], *struct.unpack_from("<QQ", elf, base + 24))

    _, names_offset, _ = header(shstrndx)
    for i in range(shnum):
        name_at, offset, size = header(i)
        end = elf.index(b"\0", names_offset + name_at)
        if elf[names_offset + name_at:end].decode() == name:
            return offset, size
    raise ValueError(f"no section {name}")


def keep_only_arch(elf: bytearray, arch: int) -> tuple[int, int]:
    """Zero every fatbin entry but the SASS (ELF) of `arch` in `.nv_fatbin`, in place; each
    container keeps its size, its kept entries packed at its start. Returns (kept, zeroed)
    bytes."""
    start, size = section(bytes(elf), ".nv_fatbin")
    pos, end, kept, zeroed = start, start + size, 0, 0
    while pos + 16 <= end:
        magic, _version, header_size, body_size = struct.unpack_from("<IHHQ", elf, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # containers are 8-byte aligned; padding between them
            continue
        body, body_end = pos + header_size, pos + header_size + body_size
        entry, keep = body, bytearray()
        while entry < body_end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", elf, entry)
            entry_arch, = struct.unpack_from("<I", elf, entry + 28)
            length = entry_header + payload
            if kind == ENTRY_ELF and entry_arch == arch:
                keep += elf[entry:entry + length]
            else:
                zeroed += length
            entry += length
        kept += len(keep)
        elf[body:body_end] = bytes(keep) + bytes(body_size - len(keep))
        struct.pack_into("<Q", elf, pos + 8, len(keep))
        pos = body_end
    if kept == 0:
        raise ValueError(f"no sm_{arch} code in .nv_fatbin: the slim library would not run")
    return kept, zeroed


def record_row(name: str, data: bytes) -> list:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [name, f"sha256={digest}", str(len(data))]


def slim(full: Path, out_dir: Path, arch: int, dropped_patterns: list[str] = DROPPED) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / full.name
    rows, dropped = [], 0
    with zipfile.ZipFile(full) as source, \
            zipfile.ZipFile(str(out) + ".part", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as sink:
        record = next(i.filename for i in source.infolist()
                      if i.filename.endswith(".dist-info/RECORD"))
        for info in source.infolist():
            name = info.filename
            if info.is_dir() or name == record:
                continue
            if any(fnmatch.fnmatch(name, pattern) for pattern in dropped_patterns):
                dropped += info.file_size
                continue
            data = source.read(info)
            if name == SLIMMED:
                library = bytearray(data)
                kept, zeroed = keep_only_arch(library, arch)
                print(f"{name}: kept {kept / 2**20:.1f} MiB of sm_{arch} code, zeroed "
                      f"{zeroed / 2**20:.1f} MiB")
                data = bytes(library)
            elif name == STAND_IN:
                data = STAND_IN_SOURCE.encode()
            sink.writestr(info, data)
            rows.append(record_row(name, data))
        listing = io.StringIO()
        writer = csv.writer(listing, lineterminator="\n")
        writer.writerows(rows)
        writer.writerow([record, "", ""])
        sink.writestr(record, listing.getvalue())
    Path(str(out) + ".part").replace(out)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB ({len(rows)} files; dropped "
          f"{dropped / 2**20:.0f} MiB of extensions and headers)")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--arch", type=int, default=90, help="SASS kept (90: H100/H200)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="vllm",
                        help="which wheel's files to drop")
    args = parser.parse_args(argv)
    slim(args.wheel, args.out_dir, args.arch, PROFILES[args.profile])
    return 0


if __name__ == "__main__":
    sys.exit(main())

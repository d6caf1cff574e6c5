"""The compiled kernel configurations, as the extension reports them.

Each configuration is one CTA shape of a kernel family (kernels/csrc/kernel_registry.h):
its tile facts (packed query rows and keys per tile, threads, shared memory) are the
kernel's own constants, read here from the extension rather than written down in Python,
and its id is what a plan records and a run launches.

    decode             the split-KV decode shape (every batch size)
    decode_full_batch  d128: for batches whose whole requests fill the GPU
    prefill_mma        long queries on mma.sync (sm80+)
    prefill_wgmma      long queries on warpgroup MMAs (sm_90a builds on sm_90 GPUs)
    prefill_short      requests of at most one 64-row tile (speculative verify, short extends)
    prefill_short_keysplit  d128: requests of at most 16 rows (4 drafts x group 4), in one tile
                       that every warp holds, each computing its own keys (decode's loop)
    prefill_mla        MLA's latent rows (576 / 512): tiles of 16 packed rows (decode of 16 heads)
    prefill_mla_wide   MLA, tiles of 32 packed rows (more heads, or several query tokens)
    prefill_mla_wgmma  MLA on warpgroup MMAs (sm_90a builds on sm_90 GPUs): tiles of 64 rows
    prefill_mla_seesaw MLA on warpgroup MMAs, 64-key tiles taken by the two warpgroups in turns
                       (16-bit caches; sm_90a builds on sm_90 GPUs): tiles of 64 rows
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import _extension, fp8

FAMILIES = ("decode", "prefill")


@dataclass(frozen=True)
class KernelConfig:
    id: int
    name: str
    family: str
    head_dim_qk: int
    head_dim_vo: int
    tile_rows: int  # packed query rows (token * group + head in group) per CTA
    kv_tile_tokens: int  # keys per K/V pipeline stage
    threads: int
    smem_bytes: int
    wgmma: bool
    partial_tokens: int = 0  # a split partial's price in keys (scheduler.h; MLA's only)

    def ctas_per_sm(self, kv_dtype: torch.dtype | None = None) -> int:
        """CTAs of this configuration that fit on one SM of the current CUDA device, for caches
        of `kv_dtype` (FP8 tiles take less shared memory; default a 16-bit cache)."""
        return int(_extension.load_ops().kernel_config_occupancy(self.id, fp8.is_fp8(kv_dtype)))

    def runs_here(self) -> bool:
        """Whether its code runs on the current CUDA device (wgmma: an sm_90a build on sm_90)."""
        return bool(_extension.load_ops().kernel_config_runs_here(self.id))


@functools.cache
def all_configs() -> tuple[KernelConfig, ...]:
    ops = _extension.load_ops()
    fields = list(ops.kernel_config_fields())
    configs = []
    for config_id, name in enumerate(ops.kernel_config_names()):
        facts = dict(zip(fields, ops.kernel_config_facts(config_id)))
        configs.append(KernelConfig(
            id=config_id, name=name, family=FAMILIES[facts["family"]],
            head_dim_qk=facts["head_dim_qk"], head_dim_vo=facts["head_dim_vo"],
            tile_rows=facts["tile_rows"], kv_tile_tokens=facts["kv_tile_tokens"],
            threads=facts["threads"], smem_bytes=facts["smem_bytes"], wgmma=bool(facts["wgmma"]),
            partial_tokens=facts["partial_tokens"]))
    return tuple(configs)


def find(name: str, head_dim_qk: int, head_dim_vo: int) -> KernelConfig | None:
    """The configuration `name` for these head dims, or None where none is compiled."""
    for config in all_configs():
        if (config.name, config.head_dim_qk, config.head_dim_vo) == (name, head_dim_qk,
                                                                     head_dim_vo):
            return config
    return None

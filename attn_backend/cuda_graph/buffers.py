"""A wrapper's plan workspace: one device allocation with a fixed address, whose upload region
plan() refreshes from a host staging buffer with one copy."""

from __future__ import annotations

import numpy as np
import torch


class PlanWorkspace:
    """`workspace_bytes` on `device`, allocated once (zeros: the split-KV merge counters must
    start at zero, and the kernels leave them so); `upload()` copies the first `upload_bytes`
    from the host staging buffer `host` in place.

    The refresh never reallocates, which is what a captured CUDA graph needs. On CUDA the
    bytes go through pinned memory from torch's caching host allocator, which keeps each
    staging block alive until its asynchronous copy has finished, so `upload()` does not
    wait for the stream and the next plan() may overwrite `host` at once. On the CPU the
    staging buffer is the workspace's own upload region, so there is nothing to copy.
    """

    def __init__(self, workspace_bytes: int, upload_bytes: int, device):
        if not 0 < upload_bytes <= workspace_bytes:
            raise ValueError(f"plan workspace: upload_bytes {upload_bytes} must be in "
                             f"(0, workspace_bytes={workspace_bytes}]")
        self.device = torch.device(device)
        self.upload_bytes = upload_bytes
        self.tensor = torch.zeros(workspace_bytes, dtype=torch.uint8, device=self.device)
        self._region = self.tensor[:upload_bytes]
        self.host = self._region if self.device.type == "cpu" else \
            torch.zeros(upload_bytes, dtype=torch.uint8)

    def upload(self) -> None:
        if self.device.type != "cpu":
            self._region.copy_(self.host.pin_memory(), non_blocking=True)

    def host_view(self, offset: int, count: int, dtype=np.int32) -> np.ndarray:
        """`count` values of `dtype` at byte `offset` of the host staging buffer (what the last
        plan() wrote there), without a copy."""
        return self.host.numpy()[offset: offset + count * np.dtype(dtype).itemsize].view(dtype)

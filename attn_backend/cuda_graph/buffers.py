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
    bytes go to the device from one of two pinned buffers allocated here (no allocation per
    plan: a `pin_memory()` per plan showed in the per-step host time of decode replays), in
    turns: a buffer is refilled only after the copy that last read it has finished, which is
    the copy of two plans ago, so `upload()` waits only when the GPU is two plans behind. The
    plan writes `host`, a plain host buffer the copies never read, so the next plan() may
    overwrite it at once. On the CPU the staging buffer is the workspace's own upload region,
    so there is nothing to copy.
    """

    _PINNED_BUFFERS = 2

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
        self._pinned: list[torch.Tensor] = []
        self._copied: list[torch.cuda.Event | None] = []
        self._turn = 0
        if self.device.type == "cuda":
            self._pinned = [torch.empty(upload_bytes, dtype=torch.uint8, pin_memory=True)
                            for _ in range(self._PINNED_BUFFERS)]
            self._copied = [None] * self._PINNED_BUFFERS

    def upload(self) -> None:
        if self.device.type == "cpu":
            return
        if torch.cuda.is_current_stream_capturing():
            # A plan made inside a capture: the captured copy reads its source again at every
            # replay, so it must not be one of the two buffers later plans refill. (The engines
            # plan before they capture; this keeps the earlier behaviour for other callers.)
            self._region.copy_(self.host.pin_memory(), non_blocking=True)
            return
        turn = self._turn
        self._turn = (turn + 1) % self._PINNED_BUFFERS
        staging, copied = self._pinned[turn], self._copied[turn]
        if copied is not None:
            copied.synchronize()  # the copy that last read this buffer has finished
        staging.copy_(self.host)
        self._region.copy_(staging, non_blocking=True)
        if copied is None:
            copied = self._copied[turn] = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(self.device))

    def host_view(self, offset: int, count: int, dtype=np.int32) -> np.ndarray:
        """`count` values of `dtype` at byte `offset` of the host staging buffer (what the last
        plan() wrote there), without a copy."""
        return self.host.numpy()[offset: offset + count * np.dtype(dtype).itemsize].view(dtype)

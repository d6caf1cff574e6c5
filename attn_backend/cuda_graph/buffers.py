"""A device buffer with a fixed address that host-side values are copied into."""

from __future__ import annotations

import torch


class FixedCapacityBuffer:
    """`capacity` elements on `device`, allocated once; `load()` refreshes a prefix in place.

    The refresh never reallocates, which is what a captured CUDA graph needs. On
    CUDA the values go through pinned memory from torch's caching host
    allocator, which keeps each staging block alive until its asynchronous copy
    has finished, so `load()` does not wait for the stream.
    """

    def __init__(self, name: str, capacity: int, dtype: torch.dtype, device):
        if capacity < 1:
            raise ValueError(f"{name}: capacity must be >= 1, got {capacity}")
        self.name = name
        self.capacity = capacity
        self.device = torch.device(device)
        self.tensor = torch.zeros(capacity, dtype=dtype, device=self.device)

    def load(self, values) -> torch.Tensor:
        """Copy host `values` (a CPU tensor or a sequence) into the buffer; returns the filled prefix."""
        values = torch.as_tensor(values, dtype=self.tensor.dtype)
        if values.dim() != 1:
            raise ValueError(f"{self.name}: expected a 1-D sequence, got shape {tuple(values.shape)}")
        n = values.numel()
        if n > self.capacity:
            raise ValueError(f"{self.name}: {n} values exceed its capacity of {self.capacity}; "
                             "allocate the plan buffers for a larger maximum")
        if self.device.type == "cuda":
            self.tensor[:n].copy_(values.pin_memory(), non_blocking=True)
        else:
            self.tensor[:n].copy_(values)
        return self.tensor[:n]

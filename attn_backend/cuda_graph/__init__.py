"""State that CUDA graphs capture by address: buffers allocated once, refreshed in place.

A captured graph replays the exact device addresses it saw at capture, so every
tensor a kernel reads (plans, page tables, lengths) lives in a buffer allocated
once at its maximum size; each replay copies the new values into the same
memory. Both engine integrations use these through the kernel wrappers.
"""

from .buffers import PlanWorkspace

__all__ = ["PlanWorkspace"]

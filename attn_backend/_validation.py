"""Argument checks that raise before any launch, naming the argument and what is accepted.

Cheap checks (dtype, shape, device, layout) always run. Checks that need the
values of device tensors (page ids and slots in range) synchronise with the
host, so they run only in debug mode: `attn_backend.set_debug_checks(True)`
or ATTN_BACKEND_DEBUG=1. Tests turn it on.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)

_debug_checks = os.environ.get("ATTN_BACKEND_DEBUG", "0") not in ("", "0")


def set_debug_checks(enabled: bool) -> None:
    """Turn on host-side value checks (they synchronise; for tests and debugging)."""
    global _debug_checks
    _debug_checks = bool(enabled)


def debug_checks_enabled() -> bool:
    return _debug_checks


def _names(values: Iterable) -> str:
    return ", ".join(str(v).replace("torch.", "") for v in values)


def check_tensor(name: str, t, *, dims: int | None = None, dtypes=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {_names([t.dtype])}; accepted: {_names(dtypes)}")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{name} is on {device} but {first_name} is on {first}; "
                             "all tensors must be on one device")
    return first


def check_size(name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{name} has size {t.shape[dim]} in dimension {dim}; expected {expected} "
                         f"({what})")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride {t.stride(-1)})")


def capturing_cuda_graph(device: torch.device) -> bool:
    """True while the current stream of a CUDA device is being captured into a graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_in_range(name: str, values: torch.Tensor, low: int, high: int, what: str) -> None:
    """Every value in [low, high); reads the tensor on the host.

    Skipped while a CUDA graph is being captured: reading device values there
    would invalidate the capture (the eager warm-up before capture checks them).
    """
    if values.numel() == 0 or capturing_cuda_graph(values.device):
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < low or hi >= high:
        raise ValueError(f"{name} holds values in [{lo}, {hi}]; accepted: [{low}, {high - 1}] "
                         f"({what})")

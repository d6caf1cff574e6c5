"""FP8 KV caches: the formats served, their scales, and how values are quantised and read.

The semantics every path follows (the float reference defines them; kernels will be tested
against it, issue 19):
- Formats: `torch.float8_e4m3fn` (largest finite 448) and `torch.float8_e5m2` (57344). The
  engines' strings: SGLang's `fp8_e4m3` / `fp8_e5m2`, vLLM's `fp8` (= e4m3), `fp8_e4m3`,
  `fp8_e5m2`. Both engines store the bytes as uint8; `view_as_fp8` re-views them by the string,
  so e4m3 bytes are never read as e5m2 or the other way round.
- Scales: K and V each have a per-tensor scale (a float, or a 0-d tensor) or one per kv head
  (`[num_kv_heads]`, vLLM's compressed-tensors `attn_head` checkpoints); None means 1.0.
- Write: fp8 = round-to-nearest-even(clamp(x / scale, -max, max)), x / scale computed in
  float32: the saturating convention of vLLM's `reshape_and_cache_flash` (`__NV_SATFINITE`).
  SGLang's pool store divides in place in the input's dtype first (`x.div_(scale)` on a bf16
  tensor rounds the quotient to bf16, then `.to(fp8)` rounds again), which gives other bytes
  for some values: `quantize(..., via_input_dtype=True)` is that rule, for SGLang's caches. The
  clamp makes overflow explicit in both (torch's cast saturates e4m3fn but turns e5m2
  overflow into inf). NaN stays NaN.
- Read: x = fp8 * scale, in float32.
"""

from __future__ import annotations

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

# The engines' KV-cache dtype strings served, and the float8 format each names.
ENGINE_FP8_STRINGS = {
    "fp8": torch.float8_e4m3fn,  # vLLM: "fp8 (=fp8_e4m3)"
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def fp8_dtype(kv_cache_dtype: str) -> torch.dtype:
    """The float8 format of an engine's KV-cache dtype string; other fp8 layouts are refused
    by name (e.g. vLLM's packed `fp8_ds_mla`, `fp8_inc`, per-token-head scales)."""
    if kv_cache_dtype not in ENGINE_FP8_STRINGS:
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not an FP8 format attn_backend "
                         f"serves; accepted: {', '.join(ENGINE_FP8_STRINGS)}")
    return ENGINE_FP8_STRINGS[kv_cache_dtype]


def view_as_fp8(storage: torch.Tensor, kv_cache_dtype: str) -> torch.Tensor:
    """An engine's uint8 cache bytes (or a float8 view of them) as the format the string names."""
    dtype = fp8_dtype(kv_cache_dtype)
    if storage.dtype not in (torch.uint8, *FP8_DTYPES):
        raise TypeError(f"an FP8 cache is uint8 storage or a float8 view; got {storage.dtype}")
    return storage.view(dtype)


def check_scale_shape(name: str, scale, num_kv_heads: int) -> None:
    """A scale is None, a float, a 0-d tensor or a tensor [num_kv_heads] (no value is read)."""
    if isinstance(scale, torch.Tensor) and (
            scale.dim() > 1 or (scale.dim() == 1 and scale.numel() != num_kv_heads)):
        raise ValueError(f"{name} has shape {tuple(scale.shape)}; accepted: [] (per tensor) "
                         f"or [{num_kv_heads}] (per kv head)")


def scale_per_head(name: str, scale, num_kv_heads: int, device) -> torch.Tensor:
    """`scale` (None = 1.0, a float, a 0-d tensor, or one per kv head) as float32
    [num_kv_heads] on `device`; refuses other shapes and values that are not finite and > 0.
    A device tensor is read here, which synchronises: this is for the reference and checks."""
    if scale is None:
        return torch.ones(num_kv_heads, dtype=torch.float32, device=device)
    check_scale_shape(name, scale, num_kv_heads)
    if isinstance(scale, torch.Tensor):
        values = scale.detach().to(device=device, dtype=torch.float32).reshape(-1)
    else:
        values = torch.tensor([float(scale)], dtype=torch.float32, device=device)
    if not bool(torch.isfinite(values).all()) or not bool((values > 0).all()):
        raise ValueError(f"{name} must be finite and > 0; got {values.tolist()}")
    return values.expand(num_kv_heads).contiguous()


def quantize(x: torch.Tensor, scale_heads: torch.Tensor, dtype: torch.dtype, *,
             via_input_dtype: bool = False) -> torch.Tensor:
    """x [..., num_kv_heads, D] to `dtype` (float8) with per-head scales [num_kv_heads]:
    round-to-nearest-even of x / scale, saturated at the format's largest finite value.
    `via_input_dtype`: the quotient is first rounded to x's dtype (SGLang's store)."""
    if not is_fp8(dtype):
        raise TypeError(f"quantize: {dtype} is not a float8 format")
    largest = torch.finfo(dtype).max
    scaled = x.float() / scale_heads.to(x.device)[:, None]
    if via_input_dtype:
        scaled = scaled.to(x.dtype).float()
    return scaled.clamp(-largest, largest).to(dtype)


def dequantize(x: torch.Tensor, scale_heads: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float8 x [..., num_kv_heads, D] times its per-head scales, in `dtype`."""
    return (x.float() * scale_heads.to(x.device)[:, None]).to(dtype)


_FIXED_SCALES: dict[tuple[float, torch.device], torch.Tensor] = {}


def device_scale(name: str, scale, num_kv_heads: int, device: torch.device) -> torch.Tensor:
    """`scale` as the kernels read it: a float32 device tensor of 1 or num_kv_heads values,
    read by each launch on the device, never synchronised on here.

    A float32 tensor already on `device` is passed as is (a view), so a captured CUDA graph
    reads whatever the engine's buffer holds at replay (vLLM replaces its scale buffers after
    loading, before capture). A float (or None = 1.0, or a CPU tensor) is fixed for the life of
    the process: one device tensor per value, made on first use (outside capture: the
    engines' warm-up runs first), so every later call and every replay reads the same one.
    Another dtype on the device is converted by a launch each call (captured with the graph).
    """
    check_scale_shape(name, scale, num_kv_heads)
    if isinstance(scale, torch.Tensor) and scale.device == device:
        flat = scale.detach().reshape(-1)
        return flat if flat.dtype == torch.float32 and flat.is_contiguous() else \
            flat.to(torch.float32).contiguous()
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            return scale.detach().to(device=device, dtype=torch.float32).reshape(-1)
        scale = float(scale)
    value = 1.0 if scale is None else float(scale)
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{name} must be finite and > 0; got {value}")
    key = (value, device)
    if key not in _FIXED_SCALES:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{name}={value} reaches the kernels for the first time inside CUDA "
                               "graph capture, where its device copy cannot be made; run the "
                               "layer once before capturing (the engines' warm-up does)")
        _FIXED_SCALES[key] = torch.tensor([value], dtype=torch.float32, device=device)
    return _FIXED_SCALES[key]

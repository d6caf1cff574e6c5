"""What the shape sweeps (bench/sweep_decode.py, bench/sweep_prefill.py, bench/sweep_chunks.py)
share: side extensions of kernel variants, launched over exactly the run op's parameters
(kernels/csrc/attention_params.h), and schedules of the planner's specification written into a
wrapper's workspace in place of its own plan.

A variant unit i defines `void run_variant_i(const AttentionParams&, dim3 grid, cudaStream_t)`
and `std::vector<int64_t> info_variant_i()` ([tile rows, kv tile tokens, CTAs per SM, threads]);
`OPS_TEMPLATE` dispatches an integer variant index to them. One translation unit per variant,
built in parallel; the build directory is keyed by the sources and reused while the machine
stays warm.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from attn_backend import _sources

# A decode CTA's row of the trace (decode.cuh kTraceFields): entry, first tile, loop end,
# exit, SM, merge start.
TRACE_FIELDS = 6

# The ops unit of a variant extension: {library} names it, {declarations}, {run_cases} and
# {info_cases} come from the variant units. Built with ATTN_BACKEND_DECODE_TRACE defined, a
# `trace` tensor records the decode CTA timeline (AttentionParams::trace), TRACE_FIELDS per CTA.
OPS_TEMPLATE = """
#include <ATen/ATen.h>

#include "attention_params.h"
namespace attn_backend {{
{declarations}
namespace {{
void run_variant(int64_t variant, const at::Tensor& q, const at::Tensor& k_cache,
                 const at::Tensor& v_cache, const at::Tensor& page_table, bool table_holds_slots,
                 at::Tensor& workspace, at::IntArrayRef plan_info, int64_t head_dim,
                 int64_t tile_rows, double sm_scale, at::Tensor& out,
                 const std::optional<at::Tensor>& trace) {{
  TORCH_CHECK(q.scalar_type() == at::kBFloat16, "variants: bf16 only");
  PlanInfo info;
  TORCH_CHECK(PlanInfo::from_values(plan_info.data(), plan_info.size(), info), "plan_info");
  // An FP8 cache is read with scales of 1 (the sweeps time kernels, not scales).
  const bool fp8 = k_cache.element_size() == 1;
  std::vector<at::Tensor> kv = {{k_cache, v_cache}};
  if (fp8) {{
    const at::Tensor one = at::ones({{1}}, q.options().dtype(at::kFloat));
    kv.push_back(one);
    kv.push_back(one);
  }}
  // V's head dim from its cache view: head_dim, or MLA's 512 columns of the 576-wide rows.
  AttentionParams params = make_attention_params(
      info, head_dim, v_cache.size(3), tile_rows, q, kv, page_table, std::nullopt,
      std::nullopt, table_holds_slots, workspace, std::nullopt, sm_scale, 0.0, out, std::nullopt);
#ifdef ATTN_BACKEND_DECODE_TRACE
  TORCH_CHECK(trace.has_value() && trace->scalar_type() == at::kLong && trace->is_contiguous() &&
                  trace->numel() >= info.num_kv_heads * info.num_work_items * @TRACE_FIELDS@,
              "trace must be int64 [kv_heads * items, @TRACE_FIELDS@] (decode.cuh kTraceFields)");
  params.trace = reinterpret_cast<unsigned long long*>(trace->data_ptr<int64_t>());
#else
  TORCH_CHECK(!trace.has_value(), "this build has no trace (build it with the trace define)");
#endif
  const c10::cuda::CUDAGuard device_guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid = work_grid(info.num_work_items, info.num_kv_heads);
  switch (variant) {{
{run_cases}
    default: TORCH_CHECK(false, "no variant ", variant);
  }}
}}
std::vector<int64_t> variant_info(int64_t variant) {{
  switch (variant) {{
{info_cases}
    default: TORCH_CHECK(false, "no variant ", variant);
  }}
}}
}}  // namespace
}}  // namespace attn_backend

TORCH_LIBRARY({library}, m) {{
  m.def("run(int variant, Tensor q, Tensor k_cache, Tensor v_cache, Tensor page_table, "
        "bool table_holds_slots, Tensor(a!) workspace, int[] plan_info, int head_dim, "
        "int tile_rows, float sm_scale, Tensor(b!) out, Tensor(c!)? trace=None) -> ()");
  m.def("info(int variant) -> int[]");
}}
TORCH_LIBRARY_IMPL({library}, CUDA, m) {{ m.impl("run", &attn_backend::run_variant); }}
TORCH_LIBRARY_IMPL({library}, CompositeExplicitAutograd, m) {{
  m.impl("info", &attn_backend::variant_info);
}}
""".replace("@TRACE_FIELDS@", str(TRACE_FIELDS))


def variant_unit(i: int, *, header: str, traits: str, kernel: str, tile_tokens: str) -> str:
    """Variant unit i: `traits` (a C++ traits type) launched as `kernel` (the kernel template's
    name and its arguments after the traits, e.g. "paged_prefill_kernel<{}, LogitsTransform<false>,
    false>" with {} for the traits), declared in attn_backend/`header`; `tile_tokens` names the
    traits' keys per tile for info_variant_i."""
    traits_name = f"VariantTraits{i}"
    return f"""
#include "attention_params.h"
#include "attn_backend/{header}"
namespace attn_backend {{
using {traits_name} = {traits};
constexpr auto* kVariantKernel{i} = &{kernel.format(traits_name)};
void run_variant_{i}(const AttentionParams& params, dim3 grid, cudaStream_t stream) {{
  launch_with_pdl(kVariantKernel{i}, params, grid, {traits_name}::kThreads,
                  {traits_name}::kSmemBytes, /*pdl=*/false, stream);
}}
std::vector<int64_t> info_variant_{i}() {{
  return {{{traits_name}::kRows, {traits_name}::{tile_tokens},
          ctas_per_sm(kVariantKernel{i}, {traits_name}::kThreads, {traits_name}::kSmemBytes),
          {traits_name}::kThreads}};
}}
}}  // namespace attn_backend
"""


def build_variant_extension(name: str, variant_units: list[str], prefix: str = "") -> None:
    """Compile and load extension `name` (its ops under torch.ops.<name>); `prefix` goes
    before every unit (e.g. a #define)."""
    from torch.utils.cpp_extension import load

    kernels = _sources.kernels_dir()
    units = [prefix + unit for unit in variant_units]
    count = range(len(units))
    declarations = "\n".join(
        f"void run_variant_{i}(const AttentionParams&, dim3, cudaStream_t);\n"
        f"std::vector<int64_t> info_variant_{i}();" for i in count)
    run_cases = "\n".join(f"    case {i}: return run_variant_{i}(params, grid, stream);"
                          for i in count)
    info_cases = "\n".join(f"    case {i}: return info_variant_{i}();" for i in count)
    ops_unit = prefix + OPS_TEMPLATE.format(library=name, declarations=declarations,
                                            run_cases=run_cases, info_cases=info_cases)
    key = hashlib.sha256(("".join(units) + ops_unit +
                          _sources.sources_hash(kernels)).encode()).hexdigest()[:16]
    build_dir = Path(tempfile.gettempdir()) / f"{name}_{key}"
    build_dir.mkdir(exist_ok=True)
    sources = []
    for i, unit in enumerate(units):
        path = build_dir / f"variant_{i}.cu"
        path.write_text(unit)
        sources.append(str(path))
    ops = build_dir / "ops.cu"
    ops.write_text(ops_unit)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    load(name=name, sources=[str(ops)] + sources,
         extra_include_paths=[str(kernels / "include"), str(kernels / "csrc")],
         extra_cuda_cflags=_sources.NVCC_FLAGS, extra_cflags=_sources.CXX_FLAGS,
         build_directory=str(build_dir), is_python_module=False, verbose=False)


def checked_run(call, out: torch.Tensor, want: torch.Tensor, profile: bool) -> float | None:
    """Runs a variant's launch `call` once and returns the largest difference of its `out` from
    the shipped kernel's `want`; with `profile` runs it three more times (for ncu) and returns
    None: the caller then times nothing."""
    call()
    diff = (out.float() - want.float()).abs().max().item()
    if profile:
        for _ in range(3):
            call()
        return None
    return diff


def install_schedule(wrapper, schedule, *, partial_rows: int) -> list[int]:
    """Writes `schedule` (attn_backend.schedule.WorkSchedule, e.g. of another plan or another
    tile shape) into `wrapper`'s workspace in place of its last plan's, and returns the plan-info
    record that launches it (a grid of exactly its items)."""
    plan = wrapper._planned.plan
    if schedule.num_items > plan["work_capacity"] \
            or schedule.num_merge_groups > plan["merge_group_capacity"] \
            or schedule.num_partials > plan["partial_capacity"] \
            or partial_rows > plan["partial_row_capacity"]:
        raise ValueError("the schedule does not fit the wrapper's plan buffers")
    rows, indptr = wrapper.work_list_views(schedule.num_merge_groups)
    rows[:, : schedule.num_items] = schedule.items
    indptr[:] = schedule.merge_indptr
    wrapper._workspace.upload()
    return plan.replace(num_items=schedule.num_items, num_work_items=schedule.num_items,
                        num_partials=schedule.num_partials,
                        num_merge_groups=schedule.num_merge_groups, partial_rows=partial_rows,
                        chunk_tokens=schedule.chunk_tokens, num_tiles=schedule.num_tiles).values


def run_with_plan(wrapper, plan_values: list[int], q, cache, table, out) -> None:
    """The wrapper's own kernel over `plan_values` (install_schedule) instead of its plan."""
    wrapper._ops.attention(q, [cache.k, cache.v], table.table, table.row_index, table.slot_map,
                           table.holds_token_slots, wrapper._workspace.tensor, plan_values, None,
                           q.shape[-1] ** -0.5, 0.0, out, None)

"""What the two kernel wrappers (PagedDecode, PagedPrefill) share: the plan-info record, the
one plan workspace, and the run op.

A wrapper is built for one shape (heads, head dims, element types) and its maxima. At
construction the extension lays out its plan buffers for the kernel configurations it may
run (`plan_setup`); each plan() runs the C++ planner into the host staging buffer, copies it
to the device in one piece and keeps the plan-info record the planner returned; run() passes
that record and the workspace to the one run op, which launches exactly the configuration
the record names. CPU tensors run the float reference instead; where no extension is built
(a CPU-only install), the reference needs no schedule and plan() records the lengths alone.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from . import _extension
from ._validation import check_kernel_shape
from .cuda_graph import PlanWorkspace
from .kernel_configs import KernelConfig, all_configs, find
from .schedule import WORK_LIST_ROWS, WorkSchedule


@functools.cache
def _plan_info_index() -> dict[str, int]:
    return {name: i for i, name in enumerate(_extension.load_ops().plan_info_fields())}


class PlanRecord:
    """A plan-info record (kernels/include/attn_backend/plan_info.h), fields by name."""

    __slots__ = ("values",)

    def __init__(self, values):
        self.values = list(values)

    @classmethod
    def with_fields(cls, **fields: int) -> "PlanRecord":
        index = _plan_info_index()
        values = [0] * len(index)
        for name, value in fields.items():
            values[index[name]] = int(value)
        return cls(values)

    def __getitem__(self, name: str) -> int:
        return self.values[_plan_info_index()[name]]

    def replace(self, **fields: int) -> "PlanRecord":
        """A copy with `fields` changed."""
        record = PlanRecord(self.values)
        index = _plan_info_index()
        for name, value in fields.items():
            record.values[index[name]] = int(value)
        return record


def normalize_device(device) -> torch.device:
    """One name per device: `cpu:0` is `cpu` (CPU tensors report `cpu`), `cuda` the current GPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class KernelWrapper:
    """The shape, element types and plan buffers of one decode or prefill wrapper."""

    family: str  # "decode" | "prefill"
    backends: tuple[str, ...]  # the backend= choices
    serves_mla = False  # whether MLA's head dims (the latent kernel) run on this wrapper

    def _init_shape(self, *, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                    head_dim_vo: int | None, dtype: torch.dtype, kv_dtype: torch.dtype | None,
                    device, max_batch_size: int, use_cuda_graph: bool,
                    enable_pdl: bool | None, backend: str) -> None:
        if backend not in self.backends:
            raise ValueError(f"backend={backend!r}; accepted: {', '.join(self.backends)}")
        self.backend = backend
        head_dim_vo = head_dim if head_dim_vo is None else head_dim_vo
        kv_dtype = dtype if kv_dtype is None else kv_dtype
        self.device = normalize_device(device)
        check_kernel_shape(num_qo_heads, num_kv_heads, head_dim, head_dim_vo, dtype, kv_dtype,
                           on_cuda=self.device.type == "cuda", serves_mla=self.serves_mla)
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.num_qo_heads = num_qo_heads
        self.num_kv_heads = num_kv_heads
        self.group_size = num_qo_heads // num_kv_heads
        self.head_dim = head_dim
        self.head_dim_vo = head_dim_vo
        self.dtype = dtype  # the query's and the output's
        self.kv_dtype = kv_dtype
        self.max_batch_size = max_batch_size
        self.use_cuda_graph = use_cuda_graph
        self.enable_pdl = _extension.pdl_default(self.device) if enable_pdl is None \
            else bool(enable_pdl)
        self._ops = _extension.load_ops() if self.device.type == "cuda" \
            else _extension.try_load_ops()

    def _find_config(self, name: str) -> KernelConfig | None:
        """This shape's configuration `name` (None without an extension, or where none is
        compiled for the head dims: the reference path plans no schedule)."""
        return find(name, self.head_dim, self.head_dim_vo) if self._ops is not None else None

    def _with_slots(self, config: KernelConfig | None,
                    given: int | None) -> tuple[KernelConfig, int] | None:
        """(config, CTAs of it the GPU runs at once): `given` as is, 1 on the CPU, else its
        occupancy on the device; None for no configuration."""
        if config is None:
            return None
        if given is not None:
            return config, given
        if self.device.type != "cuda":
            return config, 1
        num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        return config, max(1, config.ctas_per_sm(self.kv_dtype)) * num_sms

    def _init_plans(self, main: tuple[KernelConfig, int] | None,
                    alt: tuple[KernelConfig, int] | None, max_num_tokens: int = 0,
                    narrow: tuple[KernelConfig, int] | None = None) -> None:
        """Lays out the plan workspace for `main` (and `alt`, and prefill's `narrow`), each
        (configuration, CTA slots); main None: no schedule is made (the reference path)."""
        self._setup: PlanRecord | None = None
        self._workspace: PlanWorkspace | None = None
        if main is None:
            return
        family = 0 if self.family == "decode" else 1
        setup = PlanRecord.with_fields(
            family=family, num_kv_heads=self.num_kv_heads, group_size=self.group_size,
            head_dim_vo=self.head_dim_vo, max_batch=self.max_batch_size,
            max_num_tokens=max_num_tokens, use_cuda_graph=self.use_cuda_graph,
            enable_pdl=self.enable_pdl, config_id=main[0].id, cta_slots=main[1],
            alt_config_id=alt[0].id if alt else -1, alt_cta_slots=alt[1] if alt else 0,
            narrow_config_id=narrow[0].id if narrow else -1,
            narrow_cta_slots=narrow[1] if narrow else 0)
        self._setup = PlanRecord(self._ops.plan_setup(setup.values))
        self._workspace = PlanWorkspace(self._setup["workspace_bytes"],
                                        self._setup["upload_bytes"], self.device)

    @property
    def work_capacity(self) -> int:
        """Work items the plan buffers hold (0 without a schedule)."""
        return self._setup["work_capacity"] if self._setup else 0

    @staticmethod
    def _planned_config(plan: PlanRecord) -> KernelConfig:
        """The configuration a plan was made for (the one run() launches)."""
        return all_configs()[plan["planned_config_id"]]

    def work_list_views(self, num_merge_groups: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of the host staging buffer's work list, as rows [6, work_capacity] (a
        strided view of its [work_capacity, work_record_ints] records), and of its
        merge_indptr [num_merge_groups + 1] (what the next upload() copies to the device)."""
        setup = self._setup
        capacity, record = setup["work_capacity"], setup["work_record_ints"]
        records = self._workspace.host_view(setup["schedule_offset"], capacity * record)
        indptr = self._workspace.host_view(setup["merge_indptr_offset"], num_merge_groups + 1)
        return records.reshape(capacity, record)[:, :len(WORK_LIST_ROWS)].T, indptr

    def planned_schedule(self):
        """The last plan's schedule as written to the device (attn_backend.schedule's form), or
        None without one: for tests and benchmarks."""
        planned = self._planned
        if planned is None or planned.plan is None:
            return None
        info = planned.plan
        rows, indptr = self.work_list_views(info["num_merge_groups"])
        return WorkSchedule(rows[:, : info["num_items"]].copy(), indptr.copy(),
                            info["chunk_tokens"], info["num_tiles"])

    def _launch(self, q, cache, page_table, plan: PlanRecord, mask_bits, sm_scale: float,
                logits_soft_cap: float, out, lse) -> None:
        self._ops.attention(q, cache.kernel_tensors(), page_table.table, page_table.row_index,
                            page_table.slot_map, page_table.holds_token_slots,
                            self._workspace.tensor, plan.values, mask_bits, sm_scale,
                            logits_soft_cap, out, lse)


def host_int64(values) -> np.ndarray:
    """A 1-D int64 copy of host `values` (a copy: plans keep their lengths, and engines reuse
    their host length buffers); the callers check the values."""
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.int64).numpy()  # a device tensor syncs here
    return np.array(values, dtype=np.int64).reshape(-1)

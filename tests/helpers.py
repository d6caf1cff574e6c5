"""Builders of random paged-KV test problems shared by the CPU and GPU tests."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from attn_backend import reference
from attn_backend.integrations.sglang import BACKEND_NAME as SGLANG_BACKEND_NAME
from attn_backend.paged_kv import PagedKVCache, PageTable

TOLERANCE = reference.KERNEL_TOLERANCE


@dataclass
class PagedProblem:
    """A batch of requests whose KV sits on shuffled pages of one cache."""

    cache: PagedKVCache
    page_table: list[list[int]]  # page ids of each request, in order
    kv_lens: list[int]
    q_lens: list[int]

    @property
    def page_size(self) -> int:
        return self.cache.page_size

    def slots(self, r: int) -> torch.Tensor:
        t = torch.arange(self.kv_lens[r])
        pages = torch.tensor(self.page_table[r], dtype=torch.long)
        return pages[t // self.page_size] * self.page_size + t % self.page_size

    def kv_csr(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        indptr = torch.tensor([0] + self.kv_lens).cumsum(0)
        slots = torch.cat([self.slots(r) for r in range(len(self.kv_lens))]) if self.kv_lens \
            else torch.empty(0, dtype=torch.long)
        device = device or self.cache.device
        return indptr.to(device), slots.to(device)

    def qo_indptr(self, device=None) -> torch.Tensor:
        return torch.tensor([0] + self.q_lens).cumsum(0).to(device or self.cache.device)


def allocate_pages(kv_lens: list[int], page_size: int, generator: torch.Generator,
                   spare_pages: int = 3) -> tuple[list[list[int]], int]:
    """Shuffled, disjoint page lists for each request (partial last pages included)."""
    needed = [(n + page_size - 1) // page_size for n in kv_lens]
    num_pages = sum(needed) + spare_pages
    order = torch.randperm(num_pages, generator=generator).tolist()
    tables, start = [], 0
    for count in needed:
        tables.append(order[start:start + count])
        start += count
    return tables, num_pages


def make_cache(layout: str, num_pages: int, page_size: int, num_kv_heads: int, head_dim_k: int,
               head_dim_v: int, dtype: torch.dtype, device, generator=None) -> PagedKVCache:
    """A cache filled with random values in one of the engine layouts.

    layout: "sglang" (separate [slots, H, D] buffers), "vllm_nhd" (packed
    K||V, token-major strides) or "vllm_hnd" (packed K||V, head-major).
    """
    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)

    if layout == "sglang":
        k = rand(num_pages * page_size, num_kv_heads, head_dim_k)
        v = rand(num_pages * page_size, num_kv_heads, head_dim_v)
        return PagedKVCache.from_sglang(k, v, page_size)
    width = head_dim_k + head_dim_v
    if layout == "vllm_nhd":  # physical [blocks, block_size, H, C], logical [blocks, H, block_size, C]
        kv = rand(num_pages, page_size, num_kv_heads, width).transpose(1, 2)
    elif layout == "vllm_hnd":
        kv = rand(num_pages, num_kv_heads, page_size, width)
    else:
        raise ValueError(layout)
    return PagedKVCache.from_vllm(kv, head_dim_k)


LAYOUTS = ("sglang", "vllm_nhd", "vllm_hnd")


def build_paged_problem(q_lens, kv_lens, *, page_size, num_kv_heads, group, head_dim, dtype,
                        layout, gen, engine="vllm", device="cuda", kv_dtype=None):
    """A random paged problem, its page table (a vLLM block table, or SGLang's req_to_token
    with shuffled pool rows) and q [sum(q_lens), num_kv_heads * group, head_dim]. `kv_dtype`:
    the cache's (default `dtype`; an FP8 cache holds random values cast to it)."""
    tables, num_pages = allocate_pages(kv_lens, page_size, gen)
    cache = make_cache(layout, num_pages, page_size, num_kv_heads, head_dim, head_dim,
                       kv_dtype or dtype, device, gen)
    problem = PagedProblem(cache, tables, list(kv_lens), list(q_lens))
    page_table = engine_page_table(problem, engine, gen, device)
    q = torch.randn(sum(q_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype).to(device)
    return problem, page_table, q


def engine_page_table(problem: PagedProblem, engine: str, gen: torch.Generator,
                      device) -> PageTable:
    """The problem's pages as an engine hands them over: a vLLM block table (one spare
    column), or SGLang's req_to_token of token slots with shuffled pool rows."""
    batch, page_size = len(problem.kv_lens), problem.page_size
    max_pages = max(len(p) for p in problem.page_table) + 1
    if engine == "vllm":
        table = torch.zeros(batch, max_pages, dtype=torch.int32)
        for r, pages in enumerate(problem.page_table):
            table[r, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        return PageTable.from_block_table(table.to(device))
    rows = torch.randperm(batch + 2, generator=gen)[:batch] + 1
    req_to_token = torch.zeros(batch + 3, max_pages * page_size, dtype=torch.int32)
    for r in range(batch):
        req_to_token[rows[r], : problem.kv_lens[r]] = problem.slots(r).int()
    return PageTable.from_req_to_token(req_to_token.to(device), rows.to(device))


def check_against_reference(wrapper, problem: "PagedProblem", page_table, q, *, seed=None,
                            soft_cap: float = 0.0, **reference_kwargs) -> None:
    """Run a planned PagedDecode/PagedPrefill into a NaN-poisoned output and compare output and
    lse with the float reference (`reference_kwargs`: causal, window_left, masks)."""
    # Poisoned: every element must be written. V's head dim may differ from Q's (MLA).
    out = torch.full((*q.shape[:-1], wrapper.head_dim_vo), float("nan"), dtype=q.dtype,
                     device=q.device)
    got, lse = wrapper.run(q, problem.cache, page_table, out=out, return_lse=True,
                           logits_soft_cap=soft_cap)
    kv_indptr, kv_slots = problem.kv_csr()
    want = reference.attention(q, problem.qo_indptr(), problem.cache, kv_indptr, kv_slots,
                               sm_scale=q.shape[-1] ** -0.5, logits_soft_cap=soft_cap,
                               **reference_kwargs)
    tol = TOLERANCE[q.dtype]
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got.float(), want.out, atol=tol, rtol=tol,
                               msg=lambda m: f"seed={seed}: {m}")
    torch.testing.assert_close(lse, want.lse, atol=2e-3, rtol=1e-3,
                               msg=lambda m: f"seed={seed} (lse): {m}")


def behind_slot_map(page_table: PageTable, gen: torch.Generator) -> PageTable:
    """The same token slots reached through a slot map, as SGLang's hybrid pools address their
    window layers: the table holds shuffled stand-in slots s' and slot_map[s'] is the real slot."""
    table = page_table.table.long().cpu()
    size = int(table.max()) + 1
    stand_in = torch.randperm(4 * size, generator=gen)[:size]  # real slot -> its stand-in
    slot_map = torch.full((4 * size,), -1, dtype=torch.int64)
    slot_map[stand_in] = torch.arange(size)
    device = page_table.table.device
    return PageTable.from_req_to_token(stand_in[table].int().to(device), page_table.row_index,
                                       slot_map=slot_map.to(device))


def _extension_loads() -> bool:
    from attn_backend import _extension

    return _extension.try_load_ops() is not None


# The C++ planner and the kernel configurations live in the extension: a setup.py build that
# matches this torch and these sources (CI builds one), or a JIT build on a GPU machine.
needs_extension = pytest.mark.skipif(not _extension_loads(),
                                     reason="no extension build matches this torch and sources")


def check_reads_of_prior_kernel_writes(run, with_pdl, without_pdl, buffers: dict, want,
                                       seed=None) -> None:
    """With programmatic dependent launch (PDL) a kernel may start while the kernel before it
    still runs. For each of `buffers` (name -> device tensor the wrappers read) in turn, the
    kernel just before `run(wrapper)` writes it from a poisoned state (NaN, or 0 for integer
    buffers: page 0, mask bits off), after the others: the output of `with_pdl` must match the
    reference `want` and that of `without_pdl` bit for bit."""
    saved = {name: buffer.clone() for name, buffer in buffers.items()}
    for last in buffers:
        outputs = []
        for wrapper in (with_pdl, without_pdl):
            for buffer in buffers.values():
                buffer.fill_(float("nan") if buffer.is_floating_point() else 0)
            for name in [n for n in buffers if n != last] + [last]:
                torch.add(saved[name], 0, out=buffers[name])  # a kernel, not a copy
            outputs.append(run(wrapper))
        tol = TOLERANCE[outputs[0].dtype]
        torch.testing.assert_close(outputs[0].float(), want.out, atol=tol, rtol=tol,
                                   msg=lambda m: f"seed={seed}, {last} written last: {m}")
        assert torch.equal(outputs[0], outputs[1]), f"PDL changed the result ({last} written last)"


class KitTestCase:
    """SGLang's attention kit calls testcase.skipTest(reason) when a backend is unavailable;
    for attn_backend that must fail the test."""

    def skipTest(self, reason):  # noqa: N802
        pytest.fail(f"the kit skipped {SGLANG_BACKEND_NAME}: {reason}")


def run_in_processes(method: str, target, args_of_rank: list[tuple]) -> list[tuple]:
    """Start one process per rank with `multiprocessing`'s `method` ("spawn" or "fork"), as
    the engines start their TP workers; `target(*args, results)` puts one tuple, its rank
    first, on `results`. Returns the tuples sorted by rank."""
    import multiprocessing

    context = multiprocessing.get_context(method)
    results = context.Queue()
    workers = [context.Process(target=target, args=(*args, results)) for args in args_of_rank]
    for worker in workers:
        worker.start()
    got = sorted(results.get(timeout=240) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    return got

"""End-to-end SGLang throughput: attn_backend against SGLang's built-in backends, on one GPU.

Runs SGLang's own `sglang.benchmark.one_batch` (a real engine: scheduler, KV pool,
CUDA-graph decode) through attn_backend's launcher, one process per backend and
shape, on a Llama-3-8B-shaped model with 4 layers and random weights
(`--load-format dummy`; the model directory, a config and a word-level tokenizer,
is written locally, so no hub access is needed):

    python -m bench.e2e_sglang [--backends attn_backend flashinfer triton]
        [--shapes 1x8192 16x8192 64x4096 256x1024] [--output-len 32]
        [--page16 attn_backend flashinfer] [--engines 1] [--skip-agreement]
        [--kv-cache-dtype auto|fp8_e4m3|fp8_e5m2] [--model-kind llama|deepseek]
    python -m bench.e2e_sglang --plot-only bench/results/e2e_sglang-DATE-GPU.json

Each engine run leaves its result in --log-dir; with --resume a later call reuses them (so
the runs can be spread over several calls of a time-limited machine).

Writes `bench/results/e2e_sglang-<date>-<gpu>.json` (+ .png): unit tokens/s, each
shape twice, `<case>_prefill` (prefill tokens/s of the whole batch) and
`<case>_decode` (median decode tokens/s), `ours` = attn_backend, peers by SGLang
backend name. Then a sanity check of the outputs: greedy generations of random
prompts by attn_backend and flashinfer (and triton against flashinfer as the
baseline) on the same random weights, reported as the share of requests whose
first generated tokens agree.

With `--model-kind deepseek` the model is one TP-8 rank's share of DeepSeek-V3 (MLA attention,
every MLP dense) and the results are `e2e_sglang_mla-<date>-<gpu>.json`.

With `--kv-cache-dtype fp8_e4m3` (or `fp8_e5m2`) every engine runs an FP8 KV pool (no
checkpoint scales: 1.0), the case names carry `_fp8e4m3` before the phase, and the agreement
check also compares each backend's FP8 generations with its own bf16 ones.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import RESULTS_DIR

OURS = "attn_backend"
DEFAULT_SHAPES = ["1x8192", "16x8192", "64x4096", "256x1024"]
ONE_BATCH = "sglang.benchmark.one_batch"
# The KV pool and weights need < 20 GB here; one_batch prefills the whole batch at once, so
# the rest stays free for activations (262k-token prefills need ~30 GB).
MEM_FRACTION = 0.25


MODEL_KINDS = {
    "llama": "Llama-3-8B shapes (32 query / 8 kv heads, head dim 128, MLP 14336)",
    # One rank's share of DeepSeek-V3 at TP 8: 16 of its 128 MLA heads (latent 512 + rope 64,
    # nope 128, v 128, q_lora 1536) and of its dense MLP (18432 / 8); every layer dense
    # (first_k_dense_replace), so no MoE kernel runs.
    "deepseek": "DeepSeek-V3 shapes at TP 8 per rank (16 MLA heads: latent 512 + rope 64, nope "
                "128, v 128; q_lora 1536; hidden 7168; dense MLP 2304 in every layer)",
}


# Keys of DeepSeek-V3's released config.json that transformers' DeepseekV3Config does not
# define and SGLang 0.5.17's deepseek_v2.py reads as attributes (`moe_layer_freq` in every
# layer's constructor, `topk_method` and `scoring_func` in the router's).
DEEPSEEK_RELEASE_KEYS = {"moe_layer_freq": 1, "topk_method": "noaux_tc",
                         "scoring_func": "sigmoid"}


def write_model_dir(path: Path, *, layers: int = 4, vocab: int = 32000,
                    kind: str = "llama") -> Path:
    """A random-weight model of `kind` (MODEL_KINDS) with `layers` layers, and a word-level
    tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if (path / "config.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    words = {f"w{i}": i for i in range(vocab)}
    unk, bos, eos = vocab, vocab + 1, vocab + 2
    words.update({"<unk>": unk, "<s>": bos, "</s>": eos})
    tokenizer = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    model_config(kind, layers=layers, vocab_size=vocab + 3, bos_token_id=bos,
                 eos_token_id=eos).save_pretrained(path)
    return path


def model_config(kind: str, *, layers: int, **tokens):
    """The transformers config of a MODEL_KINDS model."""
    import transformers

    common = dict(num_hidden_layers=layers, max_position_embeddings=32768, rms_norm_eps=1e-5,
                  torch_dtype="bfloat16", **tokens)
    if kind == "llama":
        return transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336,
                                        num_attention_heads=32, num_key_value_heads=8,
                                        rope_theta=500000.0,
                                        architectures=["LlamaForCausalLM"], **common)
    if kind == "deepseek":
        return transformers.DeepseekV3Config(
            hidden_size=7168, intermediate_size=2304, num_attention_heads=16,
            num_key_value_heads=16, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
            qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=layers,
            n_routed_experts=8, moe_intermediate_size=256, n_shared_experts=1,
            num_experts_per_tok=2, n_group=1, topk_group=1, rope_theta=10000.0,
            rope_scaling=None, architectures=["DeepseekV3ForCausalLM"],
            **DEEPSEEK_RELEASE_KEYS, **common)
    raise ValueError(f"model kind {kind!r}; known: {', '.join(MODEL_KINDS)}")


def one_batch_command(model: Path, backend: str, *, page_size: int, extra: list[str],
                      kv_cache_dtype: str = "auto") -> list[str]:
    # The launcher registers attn_backend first: one_batch parses its arguments before
    # SGLang loads plugins. It changes nothing for the built-in backends.
    kv = [] if kv_cache_dtype == "auto" else ["--kv-cache-dtype", kv_cache_dtype]
    return [sys.executable, "-m", "attn_backend.launch", ONE_BATCH, "--model-path", str(model),
            "--load-format", "dummy", "--attention-backend", backend,
            "--page-size", str(page_size), "--mem-fraction-static", str(MEM_FRACTION), *kv,
            *extra]


def kv_tag(kv_cache_dtype: str) -> str:
    """The case-name tag of a KV-cache dtype string: '' for auto, `_fp8e4m3` for fp8_e4m3."""
    return "" if kv_cache_dtype == "auto" else "_" + kv_cache_dtype.replace("_", "")


REPO_ROOT = Path(__file__).resolve().parents[1]


def run_logged(command: list[str], log: Path, timeout: int) -> int:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with open(log, "w") as handle:
        handle.write(" ".join(command) + "\n")
        handle.flush()
        try:
            return subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT,
                                  timeout=timeout, env=env).returncode
        except subprocess.TimeoutExpired:
            handle.write(f"\n[timed out after {timeout} s]\n")
            return 124


def throughput_run(model: Path, backend: str, batch: int, input_len: int, output_len: int,
                   page_size: int, log_dir: Path, timeout: int, resume: bool,
                   repeats: int, engine: int = 0, kv_cache_dtype: str = "auto") -> dict | None:
    """Prefill and median decode tokens/s of one shape in engine number `engine`, or None
    (the log says why)."""
    name = (f"{backend}_b{batch}_in{input_len}_p{page_size}{kv_tag(kv_cache_dtype)}"
            + (f"_e{engine}" if engine else ""))
    result_file = log_dir / f"{name}.jsonl"
    if resume and result_file.exists():
        print(f"  {name}: measured by an earlier call", flush=True)
    else:
        result_file.unlink(missing_ok=True)
        _measure(model, backend, batch, input_len, output_len, page_size, log_dir, timeout,
                 name, result_file, repeats, kv_cache_dtype)
    if not result_file.exists():
        return None
    results = [json.loads(line) for line in result_file.read_text().strip().splitlines()]
    return {"prefill": statistics.median(r["prefill_throughput"] for r in results),
            "decode": statistics.median(r["median_decode_throughput"] for r in results),
            "measurements": len(results)}


def _measure(model, backend, batch, input_len, output_len, page_size, log_dir, timeout, name,
             result_file, repeats, kv_cache_dtype) -> None:
    # The same batch several times in one engine: one_batch measures each (one warm-up for
    # all), and the median damps the step-to-step noise of a single measurement.
    command = one_batch_command(model, backend, page_size=page_size, extra=[
        "--batch-size", *[str(batch)] * repeats, "--input-len", str(input_len), "--output-len",
        str(output_len), "--cuda-graph-bs", str(batch), "--result-filename", str(result_file),
        "--run-name", name], kv_cache_dtype=kv_cache_dtype)
    started = time.perf_counter()
    code = run_logged(command, log_dir / f"{name}.log", timeout)
    print(f"  {name}: exit {code} in {time.perf_counter() - started:.0f} s", flush=True)
    if code != 0:
        result_file.unlink(missing_ok=True)


def engine_turns(shapes: list[str], backends: list[str], page16: list[str],
                 engines: int) -> list[tuple[str, str, int, int]]:
    """(backend, shape, page size, engine) in the order to run them: a full turn of every row
    per engine, the backends in reverse order every other turn, so that a drift over the run
    does not favour whichever backend always goes first."""
    turns = []
    for engine in range(engines):
        for page, names in ((1, backends), (16, page16)):
            order = names if engine % 2 == 0 else names[::-1]
            turns += [(backend, shape, page, engine) for shape in shapes for backend in order]
    return turns


def over_engines(results: list[dict]) -> dict:
    """One row from its engines' results: the median over engines of each phase."""
    return {"prefill": statistics.median(r["prefill"] for r in results),
            "decode": statistics.median(r["decode"] for r in results),
            "measurements": sum(r["measurements"] for r in results), "engines": len(results)}


def generations(model: Path, backend: str, prompts_file: Path, num_prompts: int, tokens: int,
                log_dir: Path, timeout: int, resume: bool,
                kv_cache_dtype: str = "auto") -> list[list[str]] | None:
    """Greedy generations (words after each prompt) from one_batch's correctness test."""
    log = log_dir / f"agreement_{backend}{kv_tag(kv_cache_dtype)}.log"
    if resume and log.exists():
        earlier = parse_generations(log, prompts_file, num_prompts, tokens)
        if earlier is not None:
            return earlier
    # The first 4 prompt tokens are a prefill, the rest an extend over them (cut-len 4),
    # then decodes in a CUDA graph: the serving paths.
    command = one_batch_command(model, backend, page_size=1, extra=[
        "--correctness-test", "--prompt-filename", str(prompts_file), "--batch-size",
        str(num_prompts), "--output-len", str(tokens), "--cuda-graph-bs", str(num_prompts)],
        kv_cache_dtype=kv_cache_dtype)
    if run_logged(command, log, timeout) != 0:
        return None
    return parse_generations(log, prompts_file, num_prompts, tokens)


def parse_generations(log: Path, prompts_file: Path, num_prompts: int,
                      tokens: int) -> list[list[str]] | None:
    texts = re.split(r"=+ Prompt \d+ =+\n", log.read_text())[1:]
    prompts = prompts_file.read_text().splitlines()
    outputs = []
    for prompt, text in zip(prompts, texts):
        words = text.split()
        if words and words[0] == "<s>":
            words = words[1:]
        outputs.append(words[len(prompt.split()):][:tokens])
    return outputs if len(outputs) == num_prompts else None


def agreement(a: list[list[str]], b: list[list[str]], first: int) -> float:
    """Share of requests whose first `first` generated tokens are identical."""
    same = sum(x[:first] == y[:first] for x, y in zip(a, b))
    return same / max(1, len(a))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=[OURS, "flashinfer", "triton"])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="BATCHxINPUT")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3,
                        help="measurements per engine run; rows report their medians")
    parser.add_argument("--engines", type=int, default=1,
                        help="engines per row, started in turns (backend order reversed every "
                             "other turn); rows report the median over engines")
    parser.add_argument("--page16", nargs="*", default=[OURS, "flashinfer"],
                        help="backends also run with page size 16 (default: attn_backend "
                             "flashinfer; the flag with no names: none)")
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument("--agreement-prompts", type=int, default=32)
    parser.add_argument("--agreement-tokens", type=int, default=8)
    parser.add_argument("--model-kind", choices=list(MODEL_KINDS), default="llama",
                        help="llama (GQA) or deepseek (MLA; results as e2e_sglang_mla)")
    parser.add_argument("--model", type=Path,
                        help="the model directory (default: e2e_<kind> in the temp dir)")
    parser.add_argument("--log-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "attn_backend_e2e")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the results an earlier call left in --log-dir")
    parser.add_argument("--no-results", action="store_true",
                        help="measure only (a later --resume call writes the JSON)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per engine run")
    parser.add_argument("--kv-cache-dtype", default="auto",
                        choices=["auto", "fp8_e4m3", "fp8_e5m2"],
                        help="every engine's KV pool (SGLang's --kv-cache-dtype)")
    parser.add_argument("--plot-only", type=Path, help="redraw the PNG of a results JSON")
    args = parser.parse_args(argv)
    if args.plot_only:  # any end-to-end results JSON (e2e_sglang*, e2e_vllm)
        result = json.loads(args.plot_only.read_text())
        engine = "vLLM" if result["benchmark"].startswith("e2e_vllm") else "SGLang"
        plot(result["rows"], args.plot_only.with_suffix(".png"), engine=engine)
        return 0

    args.log_dir.mkdir(parents=True, exist_ok=True)
    model = write_model_dir(args.model or Path(tempfile.gettempdir()) / f"e2e_{args.model_kind}",
                            kind=args.model_kind)
    runs = engine_turns(args.shapes, args.backends, args.page16, args.engines)
    per_engine: dict[tuple[str, str, int], list[dict]] = {}
    notes = [f"{ONE_BATCH} via `python -m attn_backend.launch`, {MODEL_KINDS[args.model_kind]}, "
             f"4 layers and random weights (--load-format dummy), bf16, "
             f"--mem-fraction-static {MEM_FRACTION}, "
             f"--kv-cache-dtype {args.kv_cache_dtype}, "
             f"output {args.output_len} tokens, CUDA-graph decode; each engine its own process",
             "rows <case>_prefill: prefill tokens/s of the whole batch; <case>_decode: median "
             f"decode tokens/s (one_batch's result file), each the median of {args.repeats} "
             "measurements in that engine"
             + (f"; then the median over {args.engines} engines per row, started in turns"
                if args.engines > 1 else "")]
    for backend, shape, page, engine in runs:
        batch, input_len = (int(x) for x in shape.split("x"))
        result = throughput_run(model, backend, batch, input_len, args.output_len, page,
                                args.log_dir, args.timeout, args.resume, args.repeats, engine,
                                args.kv_cache_dtype)
        if result is None:
            notes.append(f"{backend} {shape} page {page} engine {engine}: the engine run failed "
                         f"(log in {args.log_dir})")
        else:
            per_engine.setdefault((backend, shape, page), []).append(result)
    measured = {key: over_engines(results) for key, results in per_engine.items()}
    if args.engines > 1:
        notes += [f"{backend} {shape} page {page} decode per engine: "
                  + " / ".join(f"{r['decode']:.0f}" for r in results)
                  for (backend, shape, page), results in per_engine.items()]

    rows = []
    for shape in args.shapes:
        batch, input_len = shape.split("x")
        for page in (1, 16):
            for phase in ("prefill", "decode"):
                values = {b: measured[(b, shape, page)][phase] for b in args.backends
                          if (b, shape, page) in measured}
                if OURS not in values:
                    continue
                case = (f"b{batch}_in{input_len}_out{args.output_len}_p{page}"
                        f"{kv_tag(args.kv_cache_dtype)}_{phase}")
                rows.append({"case": case, "ours": round(values.pop(OURS), 1),
                             "peers": {b: round(v, 1) for b, v in values.items()}})

    if args.no_results:
        return 0
    if not args.skip_agreement:
        notes += check_agreement(model, args)
    if not rows:
        print("no attn_backend run succeeded; logs in", args.log_dir, file=sys.stderr)
        return 1
    publish(rows, notes, BENCHMARKS[args.model_kind], args.out, engine="SGLang")
    return 0


def publish(rows: list[dict], notes: list[str], benchmark: str, out_dir: Path,
            engine: str) -> Path:
    """The end-to-end results JSON (+ PNG), and the table and notes on stdout."""
    path = write_results(rows, notes, out_dir, benchmark=benchmark)
    try:
        plot(rows, path.with_suffix(".png"), engine=engine)
    except ImportError as error:  # the JSON is the result; --plot-only redraws elsewhere
        print(f"no plot ({error}); redraw with --plot-only {path}", file=sys.stderr)
    print(f"-> {path}")
    print(format_rows(rows))
    for note in notes:
        print("note:", note)
    return path


def check_agreement(model: Path, args) -> list[str]:
    import random

    rng = random.Random(0)
    prompts_file = args.log_dir / "agreement_prompts.txt"
    # Seeded: every call writes the same prompts, so outputs of earlier calls compare.
    prompts = [" ".join(f"w{rng.randrange(32000)}" for _ in range(rng.randrange(16, 200)))
               for _ in range(args.agreement_prompts)]
    prompts_file.write_text("\n".join(prompts) + "\n")
    outputs = {}
    kv = args.kv_cache_dtype
    for backend in (OURS, "flashinfer", "triton"):
        outputs[backend] = generations(model, backend, prompts_file, args.agreement_prompts,
                                       args.agreement_tokens, args.log_dir, args.timeout,
                                       args.resume, kv)
    pairs = [(OURS, "flashinfer"), ("triton", "flashinfer"), (OURS, "triton")]
    if kv != "auto":  # each backend's FP8 generations against its own bf16 ones
        for backend in (OURS, "flashinfer"):
            outputs[f"{backend} bf16"] = generations(
                model, backend, prompts_file, args.agreement_prompts, args.agreement_tokens,
                args.log_dir, args.timeout, args.resume)
            pairs.append((backend, f"{backend} bf16"))
    notes = [] if kv == "auto" else [f"agreement runs with --kv-cache-dtype {kv} unless "
                                     "marked bf16"]
    for a, b in pairs:
        if outputs[a] is None or outputs[b] is None:
            notes.append(f"agreement {a} vs {b}: a run failed (logs agreement_*.log)")
            continue
        for first in (1, args.agreement_tokens):
            share = agreement(outputs[a], outputs[b], first)
            notes.append(f"agreement {a} vs {b}: first {first} greedy tokens identical in "
                         f"{share:.0%} of {args.agreement_prompts} random prompts")
    return notes


BENCHMARKS = {"llama": "e2e_sglang", "deepseek": "e2e_sglang_mla"}


def write_results(rows: list[dict], notes: list[str], out_dir: Path,
                  benchmark: str = "e2e_sglang") -> Path:
    from .common import write_results as write

    return write(benchmark, "tokens/s", {"name": "none (end to end)", "value": None},
                 rows, out_dir, notes)


def format_rows(rows: list[dict]) -> str:
    peers = sorted({p for row in rows for p in row["peers"]})
    lines = [" | ".join(["case", "ours"] + peers + [f"ours/{p}" for p in peers])]
    for row in rows:
        cells = [row["case"], f"{row['ours']:.0f}"]
        cells += [f"{row['peers'][p]:.0f}" if p in row["peers"] else "-" for p in peers]
        cells += [f"{row['ours'] / row['peers'][p]:.3f}" if p in row["peers"] else "-"
                  for p in peers]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, engine: str = "SGLang") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peers = sorted({p for row in rows for p in row["peers"]})
    names = [OURS] + peers
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    for ax, phase in zip(axes, ("prefill", "decode")):
        selected = [row for row in rows if row["case"].endswith(f"_{phase}")]
        width = 0.8 / len(names)
        shown = []
        for i, name in enumerate(names):
            values = [row["ours"] if name == OURS else row["peers"].get(name, 0)
                      for row in selected]
            shown += [v for v in values if v > 0]
            ax.bar([x + i * width for x in range(len(selected))], values, width, label=name)
        ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(selected))])
        ax.set_xticklabels([row["case"].removesuffix(f"_{phase}") for row in selected],
                           rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("tokens/s")
        # A log axis only where the rows span orders of magnitude (batch 1 against batch 256);
        # otherwise bars from zero, so that a 2% gap looks like one.
        if shown and max(shown) > 20 * min(shown):
            ax.set_yscale("log")
        ax.set_title(f"{engine} end to end, {phase}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end vLLM throughput: attn_backend (`CUSTOM`) against vLLM's built-in backends.

Each (backend, shape) runs in its own process (`--worker`), an offline `vllm.LLM` engine on a
random-weight model (the model directory is written locally, as for bench/e2e_sglang.py:
Llama-3-8B shapes with `--layers` layers, or with `--model-kind deepseek` one TP-8 rank's share
of DeepSeek-V3, MLA; weights as `--weights` says, below): the batch's random prompts generated greedily with
`ignore_eos`, CUDA graphs on (FULL decode graphs through UNIFORM_BATCH for ours), once with one
output token (the prefill) and once with all of them:

    python -m bench.e2e_vllm [--backends CUSTOM FLASH_ATTN TRITON_ATTN FLASHINFER]
        [--shapes 64x1024 64x4096 256x1024] [--output-len 128] [--model-kind llama|deepseek]
        [--compile vllm|none] [--enforce-eager] [--weights random|dummy] [--layers 4]
        [--engines 1] [--profile-steps 0]

`--compile vllm` is vLLM's default (its Inductor pipeline, FULL_AND_PIECEWISE graphs); `none`
runs the model eagerly between FULL decode graphs (vLLM turns FULL_AND_PIECEWISE into
FULL_DECODE_ONLY without piecewise compilation), for a torch older than vLLM's pin, where
Inductor may not build; `--enforce-eager` runs without graphs. Every backend of one run gets
the same settings, and the JSON's notes say which. `--weights random` (the default) writes
seeded normal(0, 0.02) weights into the model directory once (transformers' own
initialisation, bf16 safetensors) so that greedy outputs vary from step to step and the
agreement check compares real continuations; vLLM's `dummy` weights (uniform in +-1e-3) make
every prompt repeat one token. `--layers 32` is the whole Llama-3-8B depth, where attention is
a larger share of a decode step than at the default 4.

`<case>_prefill` is batch x input / prefill time; `<case>_decode` is batch x (output - 1) over
the rest of the run. Peers are vLLM's backend names; one that cannot start on the machine is
left out and its reason noted (its log in --log-dir). Then greedy agreement: the share of
prompts whose first generated tokens are the same with attn_backend and the first peer that
ran, on the same weights (the seeded safetensors, or vLLM's dummy weights, which it seeds
identically).

`--profile-steps N`: after its measurements each engine generates N + 1 tokens (the prefill
and N decode steps) once more under torch.profiler (the engine runs in the worker's process),
writing `<backend>_<shape>_trace.json.gz` and its summary (bench/trace_summary.py: GPU kernels,
CPU ops by time) `<backend>_<shape>_trace.txt` into --log-dir: where a decode step's time goes,
kernel by kernel and on the host, the same way for every backend.

Writes `bench/results/e2e_vllm-<date>-<gpu>.json` (+ .png; `e2e_vllm_<n>layers-...` at another
depth than 4). vLLM on the project's GPU
machine: scripts/fetch_vllm_wheels.sh (its engine also needs FlashInfer at vLLM's pin).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import RESULTS_DIR
from .e2e_sglang import MODEL_KINDS, engine_turns, publish, write_model_dir

OURS = "CUSTOM"
DEFAULT_BACKENDS = [OURS, "FLASH_ATTN", "TRITON_ATTN", "FLASHINFER"]
DEFAULT_SHAPES = ["64x1024", "64x4096", "256x1024"]
GPU_MEMORY = 0.6
DEFAULT_LAYERS = 4
# One engine process, in-process scheduling: the worker's timings are the engine's own.
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
              "PYTHONUNBUFFERED": "1"}


def prompts(batch: int, input_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Random token-id prompts, the same for every backend (seeded)."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 10) for _ in range(input_len)] for _ in range(batch)]


def default_model_dir(kind: str = "llama", layers: int = DEFAULT_LAYERS) -> Path:
    """Where the model directory of a kind and depth is written (scripts/gpu_vllm_engine.sh's
    throughput step uses the same one)."""
    return Path(tempfile.gettempdir()) / f"e2e_vllm_{kind}_{layers}l"


def write_random_weights(model: Path, seed: int = 0) -> None:
    """Seeded random bf16 weights for the model directory's config, written once."""
    if any(model.glob("*.safetensors")):
        return
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(model)
    torch.manual_seed(seed)
    network = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    network.save_pretrained(model)


def compilation_config(compile_mode: str) -> dict:
    """vLLM's compilation settings for --compile (also the throughput step's, in
    scripts/gpu_vllm_engine.sh): {} keeps vLLM's defaults."""
    return {"mode": 0} if compile_mode == "none" else {}  # CompilationMode.NONE


def settings_note(args) -> str:
    graphs = ("no CUDA graphs (enforce_eager)" if args.enforce_eager else
              "FULL decode graphs, eager model otherwise (compilation mode NONE)"
              if args.compile == "none" else "vLLM's default compilation and graphs")
    return f"engine settings: {graphs}"


def worker(args) -> int:
    """One engine: time a prefill-only generate and a full one; write one JSON line."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    batch, input_len = (int(x) for x in args.shape.split("x"))
    max_model_len = input_len + args.output_len + 8
    load_format = "dummy" if args.weights == "dummy" else "safetensors"
    llm = LLM(model=str(args.model), load_format=load_format, dtype="bfloat16", seed=0,
              max_model_len=max_model_len, max_num_seqs=batch,
              # at most batch x max_model_len: vLLM's V2 runner warms up with this many tokens
              # split over max_num_seqs dummy requests, which must fit max_model_len each
              max_num_batched_tokens=min(max(8192, input_len), batch * max_model_len),
              gpu_memory_utilization=GPU_MEMORY,
              attention_config={"backend": args.backend}, enable_prefix_caching=False,
              enforce_eager=args.enforce_eager, compilation_config=compilation_config(args.compile),
              skip_tokenizer_init=True)  # token-id prompts, token-id outputs
    requests = [TokensPrompt(prompt_token_ids=p)
                for p in prompts(batch, input_len, args.vocab, seed=args.seed)]

    def run(tokens: int):
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True,
                                detokenize=False)
        started = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        return time.perf_counter() - started, outputs

    run(2)  # warm-up: compiles, graph capture already done at start-up
    times = []
    for _ in range(args.repeats):
        prefill_s, _ = run(1)
        total_s, outputs = run(args.output_len)
        times.append((prefill_s, total_s))
    prefill_s = statistics.median(t[0] for t in times)
    total_s = statistics.median(t[1] for t in times)
    result = {"backend": args.backend, "shape": args.shape,
              "prefill": batch * input_len / prefill_s,
              "decode": batch * (args.output_len - 1) / max(total_s - prefill_s, 1e-9),
              "tokens": [list(o.outputs[0].token_ids) for o in outputs[: args.agreement_prompts]]}
    args.result.write_text(json.dumps(result) + "\n")
    if args.profile_steps > 0:
        profile_steps(run, args.profile_steps, args.result)
    return 0


def trace_paths(result: Path) -> tuple[Path, Path]:
    """A worker's profiler trace and its summary, beside its result file."""
    return (result.with_name(result.stem + "_trace.json.gz"),
            result.with_name(result.stem + "_trace.txt"))


def profile_steps(run, steps: int, result: Path) -> None:
    """One generate of the prefill and `steps` decode steps under torch.profiler: the chrome
    trace and its summary beside the worker's result."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from .trace_summary import load, summarize

    trace, summary = trace_paths(result)
    gpu = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as profiler:
        seconds, _ = run(steps + 1)
        if gpu:
            torch.cuda.synchronize()
    profiler.export_chrome_trace(str(trace))
    header = [f"one generate of 1 prefill + {steps} decode steps under the profiler: "
              f"{seconds * 1e3:.1f} ms wall"]
    summary.write_text("\n".join(header + summarize(load(str(trace)))) + "\n")


def run_worker(model: Path, backend: str, shape: str, args, log: Path, result: Path) -> int:
    command = [sys.executable, "-m", "bench.e2e_vllm", "--worker", "--model", str(model),
               "--backend", backend, "--shape", shape, "--output-len", str(args.output_len),
               "--repeats", str(args.repeats), "--vocab", str(args.vocab), "--result",
               str(result), "--agreement-prompts", str(args.agreement_prompts),
               "--compile", args.compile, "--weights", args.weights,
               "--profile-steps", str(args.profile_steps)] + \
        (["--enforce-eager"] if args.enforce_eager else [])
    env = dict(os.environ, **ENGINE_ENV)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    with open(log, "w") as handle:
        handle.write(" ".join(command) + "\n")
        handle.flush()
        try:
            return subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                  timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            handle.write(f"\n[timed out after {args.timeout} s]\n")
            return 124


def last_error(log: Path) -> str:
    """The last line of a failed run's log that names an error, for the notes."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["(empty log)"])[-1][:200]


def agreement(a: list[list[int]], b: list[list[int]], first: int) -> float:
    same = sum(x[:first] == y[:first] for x, y in zip(a, b))
    return same / max(1, min(len(a), len(b)))


def over_engines(results: list[dict]) -> dict:
    """One (backend, shape) from its engines: the median of each phase; the first engine's
    tokens for the agreement check."""
    return {"prefill": statistics.median(r["prefill"] for r in results),
            "decode": statistics.median(r["decode"] for r in results),
            "tokens": results[0]["tokens"]}


def build_rows(measured: dict, shapes: list[str], backends: list[str],
               output_len: int) -> list[dict]:
    rows = []
    for shape in shapes:
        batch, input_len = shape.split("x")
        for phase in ("prefill", "decode"):
            values = {b: measured[(b, shape)][phase] for b in backends if (b, shape) in measured}
            if OURS not in values:
                continue
            rows.append({"case": f"b{batch}_in{input_len}_out{output_len}_{phase}",
                         "ours": round(values.pop(OURS), 1),
                         "peers": {b: round(v, 1) for b, v in values.items()}})
    return rows


def agreement_notes(measured: dict, shapes: list[str], backends: list[str]) -> list[str]:
    """Greedy agreement of every pair of backends that ran a shape, ours against each peer
    first: the peers' agreement with each other is the baseline (on random weights two correct
    backends also part ways where two logits are within rounding of each other)."""
    notes = []
    for shape in shapes:
        ran = [b for b in [OURS] + [b for b in backends if b != OURS] if (b, shape) in measured]
        for i, first_backend in enumerate(ran):
            for second in ran[i + 1:]:
                a, b = measured[(first_backend, shape)]["tokens"], measured[(second, shape)]["tokens"]
                for first in (1, 8):
                    notes.append(f"agreement {first_backend} vs {second} at {shape}: first {first} "
                                 f"greedy tokens identical in {agreement(a, b, first):.0%} of "
                                 f"{min(len(a), len(b))} prompts")
    return notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=DEFAULT_BACKENDS)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="BATCHxINPUT")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model-kind", choices=list(MODEL_KINDS), default="llama")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--agreement-prompts", type=int, default=32)
    parser.add_argument("--log-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "attn_backend_e2e_vllm")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per engine run")
    parser.add_argument("--compile", choices=["vllm", "none"], default="vllm")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--weights", choices=["random", "dummy"], default="random")
    parser.add_argument("--layers", type=int, default=DEFAULT_LAYERS)
    parser.add_argument("--engines", type=int, default=1,
                        help="engines per row, started in turns (backend order reversed every "
                             "other turn); rows report the median over engines")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="decode steps each engine runs once more under torch.profiler "
                             "(trace and summary in --log-dir); 0: none")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    args.log_dir.mkdir(parents=True, exist_ok=True)
    model = write_model_dir(args.model or default_model_dir(args.model_kind, args.layers),
                            kind=args.model_kind, layers=args.layers, vocab=args.vocab - 3)
    if args.weights == "random":
        started = time.perf_counter()
        write_random_weights(model)
        print(f"  random weights in {model}: {time.perf_counter() - started:.0f} s", flush=True)
    weights = ("seeded random weights (normal, std 0.02)" if args.weights == "random" else
               "vLLM's dummy weights (--load-format dummy)")
    measured, notes = {}, [
        f"vllm.LLM offline, {MODEL_KINDS[args.model_kind]}, {args.layers} layers, {weights}, "
        f"bf16, {args.output_len} output tokens, greedy with ignore_eos, one engine per row "
        f"(VLLM_ENABLE_V1_MULTIPROCESSING=0); medians of {args.repeats} measurements",
        settings_note(args)]
    if os.environ.get("VLLM_USE_FLASHINFER_SAMPLER") == "0":
        notes.append("vLLM's PyTorch sampler for every backend (VLLM_USE_FLASHINFER_SAMPLER=0)")
    if args.engines > 1:
        notes.append(f"each row the median over {args.engines} engines, started in turns with "
                     f"the backend order reversed every other turn")
    per_engine: dict[tuple[str, str], list[dict]] = {}
    for backend, shape, _, engine in engine_turns(args.shapes, args.backends, [], args.engines):
        name = f"{backend}_{shape}" + (f"_e{engine}" if args.engines > 1 else "")
        result = args.log_dir / f"{name}.json"
        result.unlink(missing_ok=True)
        started = time.perf_counter()
        code = run_worker(model, backend, shape, args, args.log_dir / f"{name}.log", result)
        print(f"  {name}: exit {code} in {time.perf_counter() - started:.0f} s", flush=True)
        if code == 0 and result.exists():
            per_engine.setdefault((backend, shape), []).append(json.loads(result.read_text()))
            if args.profile_steps > 0:
                summary = trace_paths(result)[1]
                notes.append(f"{name} profile: " + (
                    " ".join(summary.read_text().splitlines()[:2]) if summary.exists()
                    else "no trace written (see its log)"))
        else:
            notes.append(f"{backend} {shape}" + (f" engine {engine}" if args.engines > 1 else "")
                         + f": did not run ({last_error(args.log_dir / f'{name}.log')})")
    measured = {key: over_engines(results) for key, results in per_engine.items()}
    if args.engines > 1:
        notes += [f"{backend} {shape} decode per engine: "
                  + " / ".join(f"{r['decode']:.0f}" for r in results)
                  for (backend, shape), results in per_engine.items()]
    rows = build_rows(measured, args.shapes, args.backends, args.output_len)
    notes += agreement_notes(measured, args.shapes, args.backends)
    if not rows:
        print("no attn_backend run succeeded; logs in", args.log_dir, file=sys.stderr)
        for note in notes:
            print("note:", note)
        return 1
    publish(rows, notes, benchmark_name(args.layers), args.out, engine="vLLM")
    return 0


def benchmark_name(layers: int) -> str:
    """The results' name: `e2e_vllm` at the default depth, `e2e_vllm_<n>layers` otherwise, so
    runs at two depths on one day keep apart (bench/results/<name>-<date>-<gpu>.json)."""
    return "e2e_vllm" if layers == DEFAULT_LAYERS else f"e2e_vllm_{layers}layers"

if __name__ == "__main__":
    sys.exit(main())

"""`rlm-train bench generate --base-url URL`: our harness against a real server vs vLLM's own
load generator against the same server.

1. Harness: `run_generate` (the CLI's code path: REPL sandbox, sub-calls, scoring, store) runs
   EPISODES episodes of the shared scenario tasks with the served model as root and sub policy,
   at most CONCURRENCY requests in flight. Its generation throughput is the completion tokens the
   server reported (usage, summed over every root turn and sub-call) over the run's wall time.
2. Baseline: `vllm bench serve` (vllm.benchmarks.serve, in the Python that has vLLM) sends the same
   number of requests with the same mean prompt and completion lengths (random dataset, EOS
   ignored so every request generates its length) at the same max concurrency.

Ratio = harness tokens/s / vLLM bench tokens/s; goal >= 0.9: the harness keeps the server busy,
the sandbox and orchestration never become the bottleneck. On a CPU-only vLLM the REPL workers
take cores from the server, so the ratio measured there errs low (the bench prints the CPU count).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from rlm_train.bench import verdict
from rlm_train.bench.scenario import write_scenario_tasks
from rlm_train.errors import UserError

GOAL = 0.9
_VLLM_BENCH = """
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
result = main(parser.parse_args(sys.argv[1:]))
print("RESULT " + json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, str))}))
"""


def _calls(turns: Any) -> Iterator[tuple[int, int]]:
    """(prompt_tokens, completion_tokens) of every model request in an episode's call tree."""
    for turn in turns:
        yield turn.get("prompt_tokens", 0), turn.get("completion_tokens", 0)
        for call in turn.get("sub_calls", []):
            if "child" in call:
                yield from _calls(call["child"].get("turns", []))
            elif call.get("error") is None:
                yield call.get("prompt_tokens", 0), call.get("completion_tokens", 0)


def served_model(base_url: str) -> str:
    """The first model the server lists (/v1/models)."""
    import urllib.request

    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/models", timeout=30) as reply:
            data = json.loads(reply.read())
    except OSError as exc:
        raise UserError(f"--base-url {base_url}: no answer from /models ({exc}); start the server first") from None
    models = [m.get("id") for m in data.get("data", []) if m.get("id")]
    if not models:
        raise UserError(f"--base-url {base_url}: /models lists no model")
    return models[0]


def run_harness(base_url: str, model: str, episodes: int, concurrency: int, max_tokens: int,
                max_iterations: int, out: Path) -> dict[str, Any]:
    from rlm_train.policies.spec import ClientOptions
    from rlm_train.rlm import RLMConfig
    from rlm_train.rollouts import store
    from rlm_train.rollouts.generate import GenerateConfig, run_generate

    tasks = out / "tasks.jsonl"
    write_scenario_tasks(tasks, episodes)
    config = GenerateConfig(
        tasks=str(tasks), out=str(out / "run"), policy=f"openai:{model}", base_urls=[base_url], progress=False,
        concurrency=concurrency, client=ClientOptions(max_concurrency=concurrency, max_retries=2, request_timeout_s=600),
        rlm=RLMConfig(max_iterations=max_iterations, root_max_tokens=max_tokens, sub_max_tokens=max_tokens,
                      temperature=0.7, max_depth=1))
    started = time.perf_counter()
    summary = run_generate(config)
    wall = time.perf_counter() - started
    calls = [c for record in store.read_records(out / "run") for c in _calls(record["turns"])]
    prompt = sum(p for p, _ in calls)
    completion = sum(c for _, c in calls)
    return {"episodes": summary["records"], "requests": len(calls), "wall_s": round(wall, 2),
            "prompt_tokens": prompt, "completion_tokens": completion,
            "mean_prompt_tokens": round(prompt / max(len(calls), 1)), "mean_completion_tokens": round(completion / max(len(calls), 1)),
            "output_tokens_per_s": round(completion / wall, 2), "outcomes": summary["outcomes"]}


def run_vllm_bench(python: str, base_url: str, model: str, tokenizer: str, requests: int, concurrency: int,
                   input_len: int, output_len: int, out: Path) -> dict[str, Any]:
    root = base_url.rstrip("/").removesuffix("/v1")
    cmd = [python, "-c", _VLLM_BENCH, "--backend", "openai-chat", "--base-url", root, "--endpoint", "/v1/chat/completions",
           "--model", model, "--tokenizer", tokenizer, "--dataset-name", "random",
           "--random-input-len", str(max(input_len, 1)), "--random-output-len", str(max(output_len, 1)),
           "--num-prompts", str(requests), "--max-concurrency", str(concurrency), "--ignore-eos",
           "--request-rate", "inf", "--seed", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=out)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise UserError(f"vllm bench serve failed (exit {proc.returncode}): {tail}")
    result = json.loads(lines[-1][len("RESULT "):])
    return {"requests": result.get("completed"), "duration_s": round(result.get("duration", 0.0), 2),
            "output_tokens_per_s": round(result.get("output_throughput", 0.0), 2),
            "total_output_tokens": result.get("total_output_tokens"),
            "mean_ttft_ms": round(result.get("mean_ttft_ms", 0.0), 1)}


def default_vllm_python() -> str:
    beside = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
    return str(beside) if beside.is_file() else sys.executable


def bench_generate_server(base_url: str, model: str | None = None, tokenizer: str | None = None,
                          episodes: int = 32, concurrency: int = 8, max_tokens: int = 128, max_iterations: int = 3,
                          vllm_python: str | None = None) -> dict[str, Any]:
    model = model or served_model(base_url)
    if tokenizer is None:
        from rlm_train.models.loading import resolve_model

        tokenizer = str(resolve_model(model))
    python = vllm_python or default_vllm_python()
    with tempfile.TemporaryDirectory(prefix="rlm-bench-generate-server-") as tmp_name:
        tmp = Path(tmp_name)
        harness = run_harness(base_url, model, episodes, concurrency, max_tokens, max_iterations, tmp)
        vllm = run_vllm_bench(python, base_url, model, tokenizer, harness["requests"], concurrency,
                              harness["mean_prompt_tokens"], harness["mean_completion_tokens"], tmp)
    ratio = harness["output_tokens_per_s"] / vllm["output_tokens_per_s"] if vllm["output_tokens_per_s"] else 0.0
    results = {"base_url": base_url, "model": model, "concurrency": concurrency, "cpus": os.cpu_count(),
               "harness": harness, "vllm_bench_serve": vllm, "ratio": round(ratio, 3), "goal": GOAL}
    print(f"generate vs vllm bench serve on {base_url} ({model}), max {concurrency} requests in flight, {os.cpu_count()} CPUs")
    print(f"    harness: {harness['episodes']} episodes, {harness['requests']} requests "
          f"(mean {harness['mean_prompt_tokens']} prompt / {harness['mean_completion_tokens']} completion tokens) "
          f"in {harness['wall_s']:.1f} s: {harness['output_tokens_per_s']:.1f} generated tokens/s")
    print(f"    vllm bench serve: {vllm['requests']} requests, same lengths, EOS ignored, in {vllm['duration_s']:.1f} s: "
          f"{vllm['output_tokens_per_s']:.1f} tokens/s")
    print(f"    harness / vllm bench = {ratio:.3f}   goal >= {GOAL}  {verdict(ratio >= GOAL)}")
    return results

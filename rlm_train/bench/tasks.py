"""`rlm-train bench tasks`: how long generating tasks takes (goal: 100 tasks at 128k
tokens in under 30 s on 2 cores), split evenly over the five families."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from rlm_train.tasks import FAMILIES, corpora
from rlm_train.tasks.generate import make_tasks, write_tasks


def bench_tasks(n: int = 100, context_tokens: int = 128_000, seed: int = 0) -> dict:
    """Time corpus loading, generation per family and writing; return every number."""
    started = time.perf_counter()
    # Corpus loading is a one-time cost per process; report it separately.
    corpora.essay_passages(), corpora.labelled_questions(), corpora.hotpot_paragraphs(), corpora.stdlib_files()
    load_s = time.perf_counter() - started
    families = list(FAMILIES)
    per_family = {f: n // len(families) + (1 if i < n % len(families) else 0) for i, f in enumerate(families)}
    gen_s: dict[str, float] = {}
    tasks = []
    for family, count in per_family.items():
        if not count:
            continue
        t0 = time.perf_counter()
        tasks += make_tasks(family, count, context_tokens, seed)
        gen_s[family] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_tasks(Path(tmp) / "bench.jsonl", tasks)
        written = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
    write_s = time.perf_counter() - t0
    total_s = time.perf_counter() - started
    per_task_ms = {f: round(1000 * s / per_family[f], 1) for f, s in gen_s.items()}
    result = {
        "n": len(tasks),
        "context_tokens": context_tokens,
        "corpus_load_s": round(load_s, 3),
        "generate_s": {f: round(s, 3) for f, s in gen_s.items()},
        "per_task_ms": per_task_ms,
        "write_s": round(write_s, 3),
        "bytes_written": written,
        "total_s": round(total_s, 3),
        "goal_s": 30.0,
        "within_goal": total_s < 30.0,
    }
    print(f"tasks: {result['n']} tasks at {context_tokens:,} tokens ({len(gen_s)} families), "
          f"{written / 1e6:.0f} MB written")
    print(f"    total {total_s:.1f} s (corpus load {load_s:.1f} s, write {write_s:.1f} s)   goal < 30 s  "
          f"{'ok' if total_s < 30 else 'MISSED'}")
    print("    per task: " + ", ".join(f"{f} {ms:.0f} ms" for f, ms in per_task_ms.items()))
    return result

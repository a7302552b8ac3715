"""What an episode causes is charged to it, and what a cell's reply can change (issue 24).

- A context a cell hands to rlm_query is built in the child RLM's own session (its cgroup
  pays for it), never decoded on the host nor held by a zygote.
- A trajectory record is bounded by `rlm.trajectory_chars`; past it only counts are kept,
  and the record says so.
- A cell can answer for later cells of its own session (through fd 3, or by patching the
  REPL in its own interpreter: no channel check can tell these replies apart). What that
  can and cannot change is shown here and written where trajectories are consumed.

The models are stand-ins (mock policies whose answers are code); the sandbox is real.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

import psutil
import pytest

from rlm_train.models.base import CallablePolicy
from rlm_train.repl import REPLSession, SandboxConfig, cgroups
from rlm_train.repl.client import get_server
from rlm_train.rlm import RLMConfig, run_episode

from sandbox_attack import CFG, ROOT, _rss_mb

REPO = Path(__file__).resolve().parents[1]


def block(code: str) -> str:
    return f"```repl\n{code}\n```"


def _turn(messages) -> int:
    return sum(1 for m in messages if m["role"] == "assistant")


def _episode(policy, context="ctx", **config):
    return asyncio.run(run_episode("q", context, CallablePolicy(policy, name="mock"), config=RLMConfig(**config)))


# =========================================================================== child contexts
def _zygotes_mb(server_pid: int) -> dict[int, float]:
    """Zygotes of our fork-server and the memory each holds (RSS); a child that exits while it is
    being looked at (a pooled worker handed out) is not one."""
    found = {}
    for p in psutil.Process(server_pid).children():
        try:
            if p.name() == "rlm-zygote":
                found[p.pid] = p.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            pass
    return found


def test_a_child_rlm_context_is_built_in_the_child_session_not_the_host():
    """A cell hands rlm_query 1.5 M empty lists (4.5 MB of JSON, ~100 MB as objects). While the
    child runs, the host holds the JSON text only, no zygote holds the context, and the child
    session's memory group is charged for the objects."""
    n = 1_500_000
    seen: dict = {}
    server = get_server()

    def policy(messages, call):
        turn = _turn(messages)
        if call.depth == 0:
            if turn == 0:
                seen["host_mb"], seen["zygotes"] = _rss_mb(), _zygotes_mb(server.pid)
                return block(f"r = rlm_query('count them', context=[[] for _ in range({n})])\nFINAL(r)")
            return block("FINAL('no')")
        if turn == 0:  # the child: its session is up once this cell ran
            return block("import os\nprint('uid', os.getuid(), len(context))")
        seen["host_during_mb"], seen["zygotes_during"] = _rss_mb(), _zygotes_mb(server.pid)
        uid = re.search(r"uid (\d+) (\d+)", messages[-1]["content"])
        seen["child_uid"], seen["child_len"] = int(uid.group(1)), int(uid.group(2))
        group = os.path.join(cgroups.ROOT, "memory", cgroups.PARENT, f"{server.pid}.{seen['child_uid']}")
        if ROOT and os.path.isdir(group):
            seen["child_group_mb"] = int(open(os.path.join(group, "memory.usage_in_bytes")).read()) / 2**20
        return block("FINAL(len(context))")

    traj = _episode(policy, max_depth=1, sandbox=SandboxConfig(timeout_s=30, memory_mb=1024))
    assert traj["final"] == str(n), traj["error"] or traj["turns"][0]["executions"]
    assert seen["child_len"] == n
    host_growth = seen["host_during_mb"] - seen["host_mb"]
    new_zygotes = {pid: mb for pid, mb in seen["zygotes_during"].items() if pid not in seen["zygotes"]}
    print(f"\nhost RSS +{host_growth:.1f} MB while the child ran; new zygotes {new_zygotes}; "
          f"child session's memory group {seen.get('child_group_mb', float('nan')):.1f} MB")
    assert host_growth < 40, f"the host grew {host_growth:.0f} MB: it holds the decoded context"
    assert not new_zygotes, f"a zygote holds the child's context: {new_zygotes}"
    if ROOT:
        assert seen["child_group_mb"] > 60, seen  # the objects are the child session's


@pytest.mark.parametrize("context,expect", [
    ("'{not json'", "could not be loaded: unexpected"),
    # 4.5 MB of JSON that decodes to ~100 MB of objects: past the child's memory_mb, not the host's.
    ("'[' + '[],' * 1_499_999 + '[]]'", "memory"),
])
def test_a_child_context_the_child_cannot_load_fails_the_child_not_the_host(context, expect):
    """A forged request (written to fd 3) with a context the child's worker cannot build: it
    fails while loading, in the child's session, and the cell gets that as rlm_query's answer."""
    code = ("import os, json, struct, socket, pickle\n"
            f"p = json.dumps({{'op': 'rlm', 'items': [['q', [{context}, 'a list', 'x']]]}}).encode()\n"
            "os.write(3, struct.pack('<Q', len(p)) + p)\n"
            "sock = socket.socket(fileno=os.dup(3))\nn = struct.unpack('<Q', sock.recv(8, socket.MSG_WAITALL))[0]\n"
            "print(pickle.loads(sock.recv(n, socket.MSG_WAITALL)))")
    seen = {}

    def policy(messages, call):
        seen.setdefault("host_mb", _rss_mb())
        return block(code) if _turn(messages) == 0 and call.depth == 0 else block("FINAL('done')")

    traj = _episode(policy, max_depth=1, sandbox=SandboxConfig(timeout_s=10, memory_mb=48))
    assert _rss_mb() - seen["host_mb"] < 40
    out = traj["turns"][0]["executions"][0]["stdout"]
    assert "could not be loaded" in out and expect in out and "the child RLM gave no answer" in out, out
    child = traj["turns"][0]["sub_calls"][0]["child"]
    assert child["outcome"] == "error" and child["error_kind"] == "sandbox"


# =========================================================================== trajectory budget
def test_a_trajectory_is_bounded_by_its_budget_and_says_what_it_left_out(tmp_path):
    """The root and three of its four child RLMs print 12 x 20,000 characters a turn: ~4 M
    characters of output. The record keeps `trajectory_chars` (the default, 2 M) and counts
    the rest; the model still read every output whole; the root's conversation is whole."""
    flood = "\n".join([block("print('x' * 20000)")] * 12)

    def policy(messages, call):
        turn = _turn(messages)
        if call.depth > 0:
            if call.query == "a":  # a small child, done before the budget is spent
                return block("print('small')") if turn == 0 else block("FINAL('a done')")
            return flood if turn < 3 else block("FINAL('child done')")
        if turn == 0:
            return block("rs = rlm_query_batched(['a', 'b', 'c', 'd'], ['1', '2', '3', '4'])")
        return flood if turn < 7 else block("FINAL('root done')")

    traj = _episode(policy, max_depth=1)
    size = len(json.dumps(traj))
    budget = 2_000_000  # the default
    print(f"\nrecord {size:,} chars; {traj['stats'].get('recording')}")
    assert traj["final"] == "root done"
    # Bounded: the budget, the root's own conversation and a count per thing left out.
    conversation = sum(len(m["content"]) for m in traj["messages"])
    assert size < budget + conversation + 200_000, f"the record is {size:,} characters"
    rec = traj["stats"]["recording"]
    assert rec["budget_chars"] == budget and rec["truncated"] and rec["charged_chars"] <= budget
    assert rec["dropped_texts"] > 0 and rec["charged_chars"] + rec["dropped_chars"] > 3_500_000
    # Past the budget a cell's output is its length; the model still read it whole.
    last = traj["turns"][-2]
    assert re.fullmatch(r"\[20,\d{3} chars not recorded: past rlm.trajectory_chars\]", last["executions"][0]["stdout"])
    assert "xxxxxxxxxx" in last["feedback"]
    # The child that ended before it is whole; those that ended after are counts only: every
    # token is still there for usage reports, every text is its length.
    from rlm_train.serve.gateway_metrics import tree_usage

    children = [c["child"] for c in traj["turns"][0]["sub_calls"]]
    assert children[0]["turns"][0]["executions"][0]["stdout"] == "small\n"
    counted = [c for c in children if not c["messages"]]
    assert rec["episodes_without_text"] == len(counted) >= 1
    assert all(c["outcome"] == "final" and c["stats"]["turns"] == len(c["turns"]) == 4 for c in children[1:])
    assert all(c["final"].endswith("not recorded: past rlm.trajectory_chars]") and c["turns"][0]["executions"] == []
               and c["turns"][0]["completion_tokens"] > 0 for c in counted)
    assert tree_usage(traj)["total_tokens"] == traj["stats"]["tokens_total"]
    # The readers of trajectories take it as it is: the store, the filter's rules, the viewer.
    from rlm_train.rollouts import store
    from rlm_train.rollouts.filter import FilterConfig, trajectory_drop_reason
    from rlm_train.viewer.load import load
    from rlm_train.viewer.page import render_page

    (tmp_path / "t.jsonl").write_text(json.dumps({**traj, "task_id": "t", "score": 1.0}) + "\n")
    [back] = store.read_records(tmp_path / "t.jsonl")
    assert back["stats"]["recording"] == rec and trajectory_drop_reason(back, FilterConfig()) is None
    page = render_page(load([tmp_path / "t.jsonl"]))
    assert page.episodes == 1 and page.problems == []


def test_a_small_episode_is_recorded_whole():
    traj = _episode(lambda m, h: block("print('hi')") if _turn(m) == 0 else block("FINAL('ok')"))
    rec = traj["stats"]["recording"]
    assert not rec["truncated"] and rec["dropped_texts"] == rec["episodes_without_text"] == 0
    assert traj["turns"][0]["executions"][0]["stdout"] == "hi\n" and 0 < rec["charged_chars"] < 100


# =========================================================================== per-cell integrity
# fd 3 moved to a thread the cell leaves behind: the REPL's own loop talks to a socket nobody
# reads, and the thread answers this cell (honestly) and every later one (forged).
FD3_FORGER = """
import os, json, socket, struct, threading
channel = socket.socket(fileno=os.dup(3))
dead_end, _keep = socket.socketpair()
os.dup2(dead_end.fileno(), 3)
def reply(**fields):
    p = json.dumps({'op': 'done', 'stdout': '', 'stderr': '', 'error': None, 'final': None,
                    'truncated_chars': 0, **fields}).encode()
    channel.sendall(struct.pack('<Q', len(p)) + p)
def forge():
    reply()
    while True:
        n = struct.unpack('<Q', channel.recv(8, socket.MSG_WAITALL))[0]
        channel.recv(n, socket.MSG_WAITALL)
        reply(stdout='42\\n', final='forged', score=1.0, outcome='final')
threading.Thread(target=forge, daemon=True).start()
"""
# No channel at all: the cell patches the REPL in its own interpreter.
PATCH_FORGER = """
import gc
repl = next(o for o in gc.get_objects() if type(o).__name__ == 'Worker')
repl.run_cell = lambda code: {'op': 'done', 'stdout': '42\\n', 'stderr': '', 'error': None, 'final': 'forged',
                              'truncated_chars': 0}
"""


def _forged(code: str) -> None:
    with REPLSession("ctx", config=CFG) as s, REPLSession("ctx", config=CFG) as other:
        assert s.execute(code).error is None
        r = s.execute("print(1/0)")
        assert (r.stdout, r.error, r.final) == ("42\n", None, "forged"), r  # the session's later cells: forged
        assert s.execute("FINAL_VAR('anything')").final == "forged"
        r = other.execute("print(1/0)")  # another session, at the same time: untouched
        assert "ZeroDivisionError" in r.error and r.stdout == "" and r.final is None
        assert not hasattr(r, "score")
    with REPLSession("ctx", config=CFG) as fresh:  # a new worker: nothing of it is left
        assert "ZeroDivisionError" in fresh.execute("print(1/0)").error


def test_a_cell_can_answer_for_later_cells_of_its_own_session_only():
    """Through fd 3 or by patching its interpreter, a cell decides what its session's later
    cells return. That is all it decides: other sessions, fresh workers, and the host's
    result (typed fields only) are untouched."""
    _forged(FD3_FORGER)
    _forged(PATCH_FORGER)


def test_a_forged_answer_is_scored_like_any_answer_and_the_limit_is_written_down(tmp_path):
    """In an episode the forger's answer is the episode's answer: the host's scorer judges it
    against a reference the sandbox never sees. The records, the viewer's page, the filter's
    report (test_formats_compat) and the docs say what a cell's recorded result is."""
    import html

    from rlm_train.records import CELL_RESULTS_NOTE
    from rlm_train.tasks import make_tasks, score
    from rlm_train.viewer.load import load
    from rlm_train.viewer.page import build_html

    task = make_tasks("niah", 1, 2000)[0]

    def policy(messages, call):
        if _turn(messages) == 0:
            return block(FD3_FORGER)
        return block("import re\nFINAL(re.findall(r'\\d{7}', context)[0])")  # the honest cell

    traj = asyncio.run(run_episode(task["query"], task["context"], CallablePolicy(policy, name="mock"), task_id=task["id"]))
    assert traj["final"] == "forged" and traj["score"] is None  # nothing from the worker scores it
    assert score(task, traj["final"]) == 0.0 and score(task, task["answer"]) == 1.0
    assert "forged" not in json.dumps(traj["stats"])
    assert "earlier cell" in CELL_RESULTS_NOTE and "score" in CELL_RESULTS_NOTE
    (tmp_path / "t.jsonl").write_text(json.dumps(traj) + "\n")
    assert html.escape(CELL_RESULTS_NOTE, quote=True) in build_html(load([tmp_path / "t.jsonl"]))
    docs = " ".join((REPO / "docs" / "architecture.md").read_text().split())
    assert "earlier cell of the same episode" in docs and "what a forged reply can and cannot change" in docs

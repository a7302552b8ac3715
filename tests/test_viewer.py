"""`rlm-train view`: the page it writes, checked in real headless Chromium (driven over
the DevTools protocol, tests/chromium_cdp.py), plus its input handling without a browser.

The browser tests skip when no Chromium is installed (`apt-get install -y chromium`).
The screenshot is kept under the test's tmp dir and copied to runs/test-artifacts/viewer.png.

Every field of a trajectory is hostile (records come from models and from other people's
runs): the hostile-record tests put a payload that runs script in any HTML context (markup,
or a break out of a quoted attribute) into the fields, hover and click the page as a reader
does, and check that nothing ran, no Content-Security-Policy violation was needed to stop it,
and the payload reads as text.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from pathlib import Path

import pytest

from chromium_cdp import Chromium
import viewer_browser
from viewer_browser import _open, _violations, block, needs_chromium
from rlm_train import cli
from rlm_train.models.base import CallablePolicy
from rlm_train.rlm import RLMConfig, run_episode
from rlm_train.viewer import fragment
from rlm_train.viewer.load import load
from rlm_train.viewer.page import build_html

REPO = Path(__file__).resolve().parents[1]
browser = viewer_browser.browser  # the fixture
FIXTURE_RUN = REPO / "tests" / "fixtures" / "a736554" / "run"
ARTIFACTS = REPO / "runs" / "test-artifacts"
BIG = 10_000


# --------------------------------------------------------------------------- episodes with sub-calls

def _mock_episodes() -> list[dict]:
    """Three real episodes from the loop and the sandbox: a fan-out with a child RLM (which
    makes its own sub-call), a cell that raises, and one that never answers."""

    def root(messages, call):
        turn = sum(1 for m in messages if m["role"] == "assistant")
        if call.depth > 0:  # the child RLM
            return "Counting in the child.\n" + block("n = len(context.split())\nok = llm_query(f'is {n} right?')\nFINAL(str(n))")
        return [
            "First a look.\n" + block("print(len(context))\nprint(context[:40])"),
            "Fan out, then recurse.\n" + block(
                "parts = llm_query_batched([f'summarize part {i}: ' + context[i*10:(i+1)*10] for i in range(3)])\n"
                "sub = rlm_query('count the words', context=context[:60])\nprint(parts)\nprint('child said', sub)"),
            "Done.\n" + block("FINAL('words=' + sub)"),
        ][min(turn, 2)]

    sub = CallablePolicy(lambda m, h: "reply to: " + m[-1]["content"][:40], name="mock-sub")
    config = RLMConfig(max_iterations=3, max_depth=1)
    raises = CallablePolicy(lambda m, h: block("1/0") if len(m) < 3 else block("FINAL('zero')"), name="mock-root")
    silent = CallablePolicy(lambda m, h: "I am not sure yet.", name="mock-root")
    context = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho"

    async def all_three():
        return [await run_episode("How many words?", context, CallablePolicy(root, name="mock-root"), sub, config),
                await run_episode("Divide by zero?", context, raises, sub, config),
                await run_episode("Say nothing?", context, silent, sub, config)]

    episodes = asyncio.run(all_three())
    for k, (ep, score) in enumerate(zip(episodes, [1.0, 0.0, None])):
        ep.update(family="mock", task_id=f"mock-{k}", sample=0, score=score)
    return episodes


@pytest.fixture(scope="module")
def mock_episodes():
    return _mock_episodes()


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory, mock_episodes):
    """An eval directory as `rlm-train eval` lays it out (runs/METHOD/ per method, a joined
    task file, report.json): the a736554 scripted run and the mock episodes, the mock
    shard with two bad lines."""
    root = tmp_path_factory.mktemp("eval")
    shutil.copytree(FIXTURE_RUN, root / "runs" / "scripted")
    (root / "runs" / "mock").mkdir()
    lines = [json.dumps(mock_episodes[0]), "{not json", json.dumps(mock_episodes[1]),
             json.dumps({"schema": "rlm-train/task/v1", "id": "t"}), json.dumps(mock_episodes[2])]
    (root / "runs" / "mock" / "shard-20261130T000000-all-1.jsonl").write_text("\n".join(lines) + "\n")
    shutil.copy(FIXTURE_RUN.parent / "tasks.jsonl", root / "tasks.jsonl")  # not trajectories: not read
    (root / "report.json").write_text(json.dumps({"methods": ["scripted", "mock"]}))
    return root


def _index(html: str) -> dict:
    match = re.search(r'<script type="application/json" id="rlm-index">(.*?)</script>', html, re.S)
    assert match
    return json.loads(match.group(1))


# --------------------------------------------------------------------------- without a browser
def test_eval_directory_gives_one_method_per_run_and_lists_bad_lines(eval_dir, tmp_path, capsys):
    out = tmp_path / "view.html"
    assert cli.main(["view", str(eval_dir), "-o", str(out)]) == 0
    assert "7 episode(s) from 2 sources, 2 bad line(s) or record(s) skipped" in capsys.readouterr().err
    html = out.read_text()
    index = _index(html)
    assert index["methods"] == ["mock", "scripted"] and len(index["rows"]) == 7
    assert [re.sub(r"^.*?:(\d+): .*$", r"\1", p) for p in index["problems"]] == ["2", "4"]
    assert json.loads(index["report"]) == {"methods": ["scripted", "mock"]}
    # Details are one JSON line per episode; the child RLM's episode is nested whole.
    details = re.search(r'id="rlm-details">(.*?)</script>', html, re.S).group(1).split("\n")
    fanout = json.loads(details[0])
    assert "messages" not in fanout  # the system prompt is interned once, in the string table
    assert index["strings"][fanout["system"]].startswith("You answer a query")
    child = fanout["turns"][1]["sub_calls"][3]["child"]
    assert child["depth"] == 1 and child["turns"][0]["sub_calls"][0]["depth"] == 2
    assert "<" not in re.search(r'id="rlm-details">(.*?)</script>', html, re.S).group(1)
    # report.json itself may be passed.
    assert cli.main(["view", str(eval_dir / "report.json"), "-o", str(tmp_path / "again.html")]) == 0


@pytest.mark.parametrize("case", ["missing", "empty_dir", "only_bad_lines", "only_broken_records", "out_is_dir"])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
    path, out = tmp_path / "nothing-here", tmp_path / "v.html"
    if case == "empty_dir":
        path.mkdir()
    if case == "only_bad_lines":
        path = tmp_path / "bad.jsonl"
        path.write_text("{oops\n[1]\n")
    if case == "only_broken_records":
        path = tmp_path / "broken.jsonl"
        path.write_text(json.dumps({"schema": "rlm-train/trajectory/v1", "turns": [{"executions": ["x"]}]}) + "\n")
    if case == "out_is_dir":
        path, out = FIXTURE_RUN, tmp_path
    assert cli.main(["view", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rlm-train view: error: ") and not (tmp_path / "v.html").exists()
    expected = {"missing": "no such file or directory", "empty_dir": "no trajectories",
                "only_bad_lines": "2 bad line(s), the first: ", "out_is_dir": "-o ",
                "only_broken_records": "no trajectory could be shown (1 problem(s), the first: "}[case]
    assert expected in err[-1]


def test_fragment_is_what_the_page_reads():
    assert fragment(method="lora r=8", family="niah") == "#method=lora%20r%3D8&family=niah"
    with pytest.raises(ValueError):
        fragment(model="x")


def _shown(browser: Chromium) -> int:
    return browser.evaluate("window.__rlmViewer.shown().length")


def _choose(browser: Chromium, field: str, value: str) -> None:
    browser.evaluate(f"(() => {{ const s = document.getElementById('f-{field}'); s.value = {json.dumps(value)};"
                     " s.dispatchEvent(new Event('change')); })()")


@needs_chromium
def test_page_in_chromium_shows_turns_code_outputs_and_the_subcall_tree(browser, eval_dir, mock_episodes, tmp_path):
    out = tmp_path / "view.html"
    assert cli.main(["view", str(eval_dir), "-o", str(out)]) == 0
    fanout = mock_episodes[0]["id"]
    _open(browser, out, f"#ep={fanout}")
    assert browser.evaluate("document.querySelectorAll('#list .row.ep').length") == 7
    assert browser.evaluate("document.getElementById('detail').dataset.open") == fanout
    # The timeline: three turns; highlighted code; what the cells printed.
    assert browser.evaluate("document.querySelectorAll('#detail > .episode > .turn').length") == 3
    assert "llm_query_batched" in browser.evaluate(
        "Array.from(document.querySelectorAll('#detail pre.code span.r')).map(s => s.textContent).join(' ')")
    outputs = browser.evaluate("Array.from(document.querySelectorAll('#detail pre.out')).map(p => p.textContent).join('\\n')")
    assert "alpha beta gamma" in outputs and "child said" in outputs
    assert "depth 1: 3 llm, 1 rlm" in browser.evaluate("document.querySelector('#detail .calltree').textContent")
    # The sub-call tree: the turn's four calls; the rlm_query one holds the child episode, whose own call is depth 2.
    calls = browser.evaluate("Array.from(document.querySelectorAll('#detail .turn[data-turn=\"1\"] > .subcalls > details.sc'))"
                             ".map(d => d.className + ' ' + d.dataset.depth)")
    assert calls == ["sc llm 1"] * 3 + ["sc rlm 1"]
    browser.evaluate("document.querySelector('#detail details.sc.rlm').open = true")
    browser.wait_for("!!document.querySelector('#detail details.sc.rlm .child .turn')")
    child = browser.evaluate("(() => { const c = document.querySelector('#detail details.sc.rlm'); return {"
                             "prompt: c.querySelector('pre[data-label=prompt]').textContent,"
                             "reply: c.querySelector('pre[data-label=response]').textContent,"
                             "inner: Array.from(c.querySelectorAll('.child details.sc')).map(d => d.dataset.depth)}; })()")
    assert child["prompt"].startswith("count the words")
    assert child["reply"] == mock_episodes[0]["turns"][1]["sub_calls"][3]["response"] == "11"  # the child's FINAL
    assert child["inner"] == ["2"]
    browser.evaluate("document.querySelector('#detail .child details.sc').open = true")
    assert "reply to: " in browser.wait_for("document.querySelector('#detail .child details.sc pre[data-label=response]')"
                                            " && document.querySelector('#detail .child details.sc pre[data-label=response]').textContent")
    assert browser.console_errors() == []
    assert _violations(browser) == []  # the page's own script and style are what its CSP allows
    assert browser.evaluate("getComputedStyle(document.querySelector('#detail pre.code')).borderLeftStyle") == "solid"
    browser.evaluate("document.querySelector('#detail .turn[data-turn=\"1\"]').scrollIntoView({block: 'start'})")
    shot = browser.screenshot(tmp_path / "viewer.png")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "viewer.png")
    assert shot.stat().st_size > 10_000


@needs_chromium
def test_filters_sorting_fragment_links_and_bad_lines_in_chromium(browser, eval_dir, mock_episodes, tmp_path):
    out = tmp_path / "view.html"
    assert cli.main(["view", str(eval_dir), "-o", str(out)]) == 0
    _open(browser, out)
    assert _shown(browser) == 7
    assert browser.evaluate("document.querySelectorAll('#problems li').length") == 2
    assert re.search(r":2: not valid JSON", browser.evaluate("document.getElementById('problems').textContent"))
    _choose(browser, "family", "mock")
    assert _shown(browser) == 3 and "family=mock" in browser.evaluate("location.hash")
    _choose(browser, "error", "exception")
    assert browser.evaluate("window.__rlmViewer.shown()") == [mock_episodes[1]["id"]]
    _choose(browser, "error", "")
    _choose(browser, "score", "none")
    assert browser.evaluate("window.__rlmViewer.shown()") == [mock_episodes[2]["id"]]
    _choose(browser, "score", "")
    _choose(browser, "outcome", "max_iterations")
    assert _shown(browser) == 1
    browser.evaluate("document.getElementById('f-clear').click()")
    assert _shown(browser) == 7
    # Sorting: by score, blanks last; again for descending.
    browser.evaluate("document.querySelector('#list-head [data-sort=score]').click()")
    assert browser.evaluate("window.__rlmViewer.shown()")[0] == mock_episodes[1]["id"]
    browser.evaluate("document.querySelector('#list-head [data-sort=score]').click()")
    ids = browser.evaluate("window.__rlmViewer.shown()")
    assert ids[-1] == mock_episodes[2]["id"] and "desc=1" in browser.evaluate("location.hash")
    # The fragment an eval report links with, and the page's own score table's links.
    browser.evaluate(f"location.hash = {json.dumps(fragment(method='scripted', family='niah'))}")
    browser.wait_for("window.__rlmViewer.shown().length === 4")
    assert browser.evaluate("[document.getElementById('f-method').value, document.getElementById('f-family').value]") == \
        ["scripted", "niah"]
    browser.evaluate("document.querySelector('#report-table a[data-method=mock][data-family=mock]').click()")
    browser.wait_for("window.__rlmViewer.shown().length === 3")
    browser.evaluate("document.querySelector('#f-q').value = 'divide'; document.querySelector('#f-q').dispatchEvent(new Event('input'))")
    browser.wait_for("window.__rlmViewer.shown().length === 1")
    assert browser.console_errors() == []


@needs_chromium
def test_ten_thousand_episodes_render_in_seconds(browser, mock_episodes, tmp_path):
    base = [json.loads(line) for line in next(FIXTURE_RUN.glob("shard-*.jsonl")).read_text().splitlines()] + mock_episodes
    src = tmp_path / "big.jsonl"
    with src.open("w") as fh:
        for k in range(BIG):
            ep = dict(base[k % len(base)], id=f"ep{k:05d}", sample=k, score=(k % 5) / 4)
            fh.write(json.dumps(ep) + "\n")
    started = time.monotonic()
    html = build_html(load([src]))
    build_s = time.monotonic() - started
    out = tmp_path / "big.html"
    out.write_text(html)
    started = time.monotonic()
    _open(browser, out)
    render_s = time.monotonic() - started
    assert browser.evaluate("window.__rlmViewer.episodes") == BIG
    assert browser.evaluate("document.querySelectorAll('#list .row.ep').length") < 100  # only the rows in view exist
    browser.evaluate("document.getElementById('list').scrollTop = 26 * 6000")
    browser.wait_for("!!document.querySelector('#list .row.ep[data-id=ep06000]')")
    started = time.monotonic()
    _choose(browser, "score", "1")
    browser.evaluate("document.querySelector('#list-head [data-sort=tokens]').click()")
    browser.evaluate("document.querySelector('#list .row.ep').click()")
    browser.wait_for("!!document.querySelector('#detail .turn')")
    interact_s = time.monotonic() - started
    assert _shown(browser) == BIG // 5
    report = (f"{BIG} episodes: page {out.stat().st_size / 1e6:.1f} MB, built in {build_s:.1f} s, rendered in "
              f"{render_s:.2f} s (page script {browser.evaluate('window.__rlmViewer.scriptMs'):.0f} ms), "
              f"filter + sort + open in {interact_s:.2f} s")
    print(report)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "viewer-10k.txt").write_text(report + "\n")
    assert render_s < 5.0, report
    assert interact_s < 2.0, report
    assert browser.console_errors() == []
    assert _violations(browser) == []


@needs_chromium
def test_hostile_and_odd_records_show_as_text_in_chromium(browser, tmp_path):
    """Markup in a record is text, never markup; a lone surrogate, a NaN score and a turn
    with only its text still render; a record of the wrong shape is listed, not fatal."""
    evil = "</script><script>window.__pwned = 1</script><img src=x onerror='window.__pwned = 2'>"
    odd = {"schema": "rlm-train/trajectory/v1", "id": "odd", "query": evil + " \ud800",
           "turns": [{"assistant": "just text " + evil}], "score": float("nan"), "outcome": "final",
           "stats": {"turns": 1}}
    broken = {"schema": "rlm-train/trajectory/v1", "id": "broken", "turns": [{"executions": ["not an object"]}]}
    src = tmp_path / "odd.jsonl"
    src.write_text(json.dumps(odd) + "\n" + json.dumps(broken) + "\n")
    out = tmp_path / "odd.html"
    assert cli.main(["view", str(src), "-o", str(out)]) == 0
    _open(browser, out, "#ep=odd")
    assert browser.evaluate("window.__pwned === undefined && document.querySelectorAll('#detail img').length === 0")
    assert browser.evaluate("document.querySelector('#detail h2').textContent") == evil + " \ud800"
    assert browser.evaluate("document.querySelector('#detail .prose').textContent") == "just text " + evil
    assert "'broken': not shown" in browser.evaluate("document.getElementById('problems').textContent")
    assert browser.console_errors() == []

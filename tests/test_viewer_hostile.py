"""`rlm-train view` with hostile records, in real headless Chromium: every field of a trajectory
is hostile (records come from models and from other people's runs). A payload that runs script
in any HTML context (markup, or a break out of a quoted attribute) goes into the fields; the test
hovers and clicks the page as a reader does and checks that nothing ran, no Content-Security-Policy
violation was needed to stop it, and the payload reads as text. Then the policy itself."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from pathlib import Path

import pytest

from chromium_cdp import Chromium
from rlm_train import cli
import viewer_browser
from viewer_browser import _open, _violations, block, needs_chromium

browser = viewer_browser.browser  # the fixture


# --------------------------------------------------------------------------- hostile records, in Chromium
def payload(tag: str) -> str:
    """Runs script wherever it lands as HTML: as markup (the <img>'s onerror) or inside a
    double-quoted attribute (the quote ends it; the onmouseover fires on hover). `tag` is
    what the script leaves in window.__pwned: the field that let it in."""
    return f"""x" onmouseover="window.__pwned='{tag}'" y="<img src=x onerror=window.__pwned='{tag}'>"""


def _record(**fields) -> dict:
    """A well-formed trajectory with a cell and a sub-call; `fields` replace its own."""
    turn = {"index": 0, "assistant": "Look.\n" + block("print(1)"), "forced": False, "prompt_tokens": 10,
            "completion_tokens": 5, "latency_s": 0.5, "code_blocks": ["print(1)"],
            "executions": [{"code": "print(1)", "stdout": "1\n", "stderr": "", "error": None, "timed_out": False,
                            "final": None, "truncated_chars": 0, "wall_s": 0.01}],
            "sub_calls": [{"kind": "llm", "depth": 1, "prompt": "p", "prompt_chars": 1, "response": "r",
                           "prompt_tokens": 1, "completion_tokens": 1, "latency_s": 0.1, "error": None}],
            "final": None, "parse_error": None, "feedback": "go on"}
    record = {"schema": "rlm-train/trajectory/v1", "id": "ep-1", "task_id": "t-1", "sample": 0, "family": "niah",
              "policy": "mock-root", "sub_policy": "mock-sub", "query": "What?", "depth": 0,
              "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "What?"}],
              "turns": [turn], "final": "42", "outcome": "final", "error": None, "error_kind": None, "score": 1.0,
              "stats": {"turns": 1, "sub_calls": 1, "root_sub_calls": 1, "prompt_tokens": 10, "completion_tokens": 5,
                        "episode_wall_s": 0.6, "subcalls_total": 1, "tokens_total": 17, "wall_s": 0.6},
              "config": {"max_iterations": 3}}
    record.update(fields)
    return record


def _write_view(tmp_path: Path, records: list[dict]) -> Path:
    src = tmp_path / "hostile.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "hostile.html"
    assert cli.main(["view", str(src), "-o", str(out)]) == 0
    return out


OPEN_ALL_DETAILS = """(async () => {
  for (let round = 0; round < 20; round++) {  // opening one may add more (a child's sub-calls)
    const closed = Array.from(document.querySelectorAll('details:not([open])'));
    if (!closed.length) return round;
    closed.forEach(d => { d.open = true; });
    await new Promise(r => setTimeout(r, 20));
  }
  return -1;
})()"""


LEAVES = """(() => {  // the elements with no element inside: hovering one hovers every element around it
  const out = [];
  document.querySelectorAll(%s).forEach(e => { if (!e.firstElementChild) out.push(e); });
  return out; })()"""

PROVOKE = """(() => {  // every mouse, pointer and focus event a reader could cause, on every element
  const kinds = ['mouseover', 'mouseenter', 'mousemove', 'mousedown', 'mouseup', 'pointerover', 'pointerenter',
                 'pointerdown', 'pointerup', 'focus', 'focusin', 'dblclick', 'contextmenu', 'wheel'];
  const all = document.querySelectorAll('*');
  all.forEach(e => kinds.forEach(k => e.dispatchEvent(new MouseEvent(k, {bubbles: true}))));
  return all.length; })()"""


def _hover_everything(browser: Chromium, selector: str) -> int:
    """Move the real mouse (DevTools input) over every element matching `selector`: over
    each leaf among them, scrolled into view, where the pointer lands on it; how many leaves
    were hovered."""
    leaves = LEAVES % json.dumps(selector)
    count = browser.evaluate(f"{leaves}.length")
    hovered = 0
    for k in range(count):
        box = browser.evaluate(f"""(() => {{
          const e = {leaves}[{k}];
          e.scrollIntoView({{block: 'center', inline: 'nearest'}});
          const r = e.getBoundingClientRect(), x = r.x + r.width / 2, y = r.y + r.height / 2;
          return r.width && r.height && document.elementFromPoint(x, y) === e ? [x, y] : null; }})()""")
        if box:
            browser.hover(*box)
            hovered += 1
    return hovered


def _center(browser: Chromium, element: str, x: float | None = None) -> list[float]:
    """The viewport point in the middle of the element the JavaScript `element` names
    (`x` pixels from its left edge instead, if given)."""
    return browser.evaluate(f"(() => {{ const r = ({element}).getBoundingClientRect();"
                            f" return [r.x + {'r.width / 2' if x is None else x}, r.y + r.height / 2]; }})()")


def _read_like_a_user(browser: Chromium) -> None:
    """Click every episode in the list and open everything in it, hover (real mouse) every
    element of the list and the episode, then send every element of the page the mouse,
    pointer and focus events a reader could cause."""
    rows = browser.evaluate("document.querySelectorAll('#list .row.ep').length")
    assert rows > 0
    for k in range(rows):
        browser.click(*_center(browser, f"document.querySelectorAll('#list .row.ep')[{k}]"))
        browser.wait_for(f"(document.querySelector('#list .row.ep.sel') || {{}}).dataset?.pos === '{k}'", timeout=5)
        assert browser.evaluate(OPEN_ALL_DETAILS) >= 0
        assert _hover_everything(browser, "#detail *") > 5
    assert _hover_everything(browser, "#list .row.ep *") >= rows * 5
    assert browser.evaluate(PROVOKE) > 50
    time.sleep(0.2)  # an image's error event is a task of its own


def _assert_nothing_ran(browser: Chromium) -> None:
    found = browser.evaluate("""({
      pwned: window.__pwned === undefined ? null : String(window.__pwned),
      violations: window.__violations,
      handlers: Array.from(document.querySelectorAll('*')).flatMap(e => Array.from(e.attributes)
        .filter(a => /^on/i.test(a.name)).map(a => e.tagName + '[' + a.name + ']')),
      foreign: Array.from(document.querySelectorAll('img, svg, iframe, object, embed, a[href^="javascript"]'))
        .map(e => e.tagName),
      scripts: document.scripts.length })""")
    # Escaping alone holds: nothing was left for the CSP to stop (a violation would mean it tried).
    assert found == {"pwned": None, "violations": [], "handlers": [], "foreign": [], "scripts": 3}, found
    assert browser.console_errors() == []


def _visible_text(browser: Chromium) -> str:
    return browser.evaluate("document.body.innerText")


# The fields the page put into HTML strings unescaped (sample) or into quoted attributes
# with quotes unescaped (the others) on e13e08c, and where each must read as text.
INJECTION_POINTS = {
    "query": (lambda p: _record(query=p), "[row.title, row.querySelector('.c-query').innerText,"
              " document.querySelector('#detail h2').innerText]"),
    "sample": (lambda p: _record(sample=p), "[row.querySelector('.c-task .o').innerText.slice(1), kv('sample')]"),
    "outcome": (lambda p: _record(outcome=p), "[row.querySelector('.c-outcome').innerText,"
                " document.querySelector('#detail .costs .cost').innerText.replace(/^outcome /, '')]"),
    "id": (lambda p: _record(id=p), "[row.dataset.id, document.getElementById('detail').dataset.open, kv('id')]"),
}


@needs_chromium
@pytest.mark.parametrize("field", sorted(INJECTION_POINTS))
def test_a_hostile_field_runs_nothing_and_reads_as_text_in_chromium(browser, tmp_path, field):
    build, where = INJECTION_POINTS[field]
    text = payload(field)
    out = _write_view(tmp_path, [build(text)])
    _open(browser, out)
    _read_like_a_user(browser)
    _assert_nothing_ran(browser)
    browser.click(*_center(browser, "document.querySelector('#list .row.ep')", x=20))
    shown = browser.evaluate(f"""(() => {{
      const row = document.querySelector('#list .row.ep');
      const kv = label => Array.from(document.querySelectorAll('#detail .kv dt'))
        .find(dt => dt.innerText === label).nextElementSibling.innerText;
      return {where}; }})()""")
    assert shown == [text] * len(shown), shown


def _every_field_hostile(p) -> dict:
    """A trajectory whose every field the page shows holds payload(its path), a child RLM's
    included; numbers and flags are strings too."""
    def execution(prefix):
        return {"code": p(prefix + "code"), "stdout": p(prefix + "stdout"), "stderr": p(prefix + "stderr"),
                "error": p(prefix + "error"), "error_kind": p(prefix + "error_kind"), "timed_out": p(prefix + "timed_out"),
                "final": p(prefix + "final"), "truncated_chars": p(prefix + "truncated_chars"), "wall_s": p(prefix + "wall_s")}

    def stats(prefix):
        return {"turns": p(prefix + "turns"), "sub_calls": p(prefix + "sub_calls"), "root_sub_calls": p(prefix + "root"),
                "prompt_tokens": p(prefix + "prompt_tokens"), "completion_tokens": p(prefix + "completion_tokens"),
                "episode_wall_s": p(prefix + "episode_wall_s"), "subcalls_total": p(prefix + "subcalls_total"),
                "tokens_total": p(prefix + "tokens_total"), "wall_s": p(prefix + "wall_s")}

    def turn(prefix, sub_calls, code=True):
        body = {"index": p(prefix + "index"), "forced": p(prefix + "forced"), "prompt_tokens": p(prefix + "prompt_tokens"),
                "completion_tokens": p(prefix + "completion_tokens"), "latency_s": p(prefix + "latency_s"),
                "final": p(prefix + "final"), "parse_error": p(prefix + "parse_error"), "feedback": p(prefix + "feedback"),
                "sub_calls": sub_calls, "assistant": p(prefix + "assistant"), "executions": [], "code_blocks": []}
        if code:  # prose, a fenced cell the loop ran, and a block it did not run
            cell = execution(prefix + "ex.")
            body.update(assistant=p(prefix + "assistant") + "\n" + block(cell["code"]), executions=[cell],
                        code_blocks=[cell["code"], p(prefix + "code_blocks")])
        return body

    def sub_call(prefix, kind, child=None):
        call = {"kind": kind, "depth": p(prefix + "depth"), "prompt": p(prefix + "prompt"),
                "prompt_chars": p(prefix + "prompt_chars"), "response": p(prefix + "response"),
                "prompt_tokens": p(prefix + "prompt_tokens"), "completion_tokens": p(prefix + "completion_tokens"),
                "latency_s": p(prefix + "latency_s"), "error": p(prefix + "error")}
        if child is not None:
            call["child"] = child
        return call

    def messages(prefix):
        return [{"role": "system", "content": p(prefix + "system")}, {"role": "user", "content": p(prefix + "user")}]

    child = {"query": p("child.query"), "depth": 1, "messages": messages("child."), "final": p("child.final"),
             "outcome": p("child.outcome"), "error": p("child.error"), "error_kind": p("child.error_kind"),
             "score": None, "stats": stats("child.stats."),
             "turns": [turn("child.turn.", [sub_call("child.sc.", p("child.sc.kind"))], code=False)]}
    return {"schema": "rlm-train/trajectory/v1", "id": p("id"), "task_id": p("task_id"), "sample": p("sample"),
            "family": p("family"), "policy": p("policy"), "sub_policy": p("sub_policy"), "query": p("query"), "depth": 0,
            "messages": messages(""), "final": p("final"), "outcome": p("outcome"), "error": p("error"),
            "error_kind": p("error_kind"), "score": p("score"), "score_error": p("score_error"),
            "stats": dict(stats("stats."), sandbox_wait_s=p("stats.sandbox_wait_s"), recording={
                "budget_chars": p("recording.budget_chars"), "charged_chars": p("recording.charged_chars"),
                "truncated": True, "dropped_texts": p("recording.dropped_texts"),
                "dropped_chars": p("recording.dropped_chars"), "episodes_without_text": p("recording.episodes_without_text")}),
            "config": {"note": p("config")},
            "turns": [turn("turn.", [sub_call("sc.", "rlm", child)])]}


# What the page does not show, by design: counts the page takes from elsewhere (turns, root
# sub-calls), one shadowed by another (sub_calls by subcalls_total, episode_wall_s by wall_s),
# the budget's own bookkeeping (charged_chars), flags shown as words (forced, timed_out), the
# config (shown as JSON: checked on its own).
NOT_SHOWN = {"stats.turns", "stats.sub_calls", "stats.root", "stats.episode_wall_s", "recording.charged_chars",
             "child.stats.turns", "child.stats.root", "child.stats.episode_wall_s", "child.stats.sub_calls",
             "turn.forced", "child.turn.forced", "turn.ex.timed_out", "config"}


@needs_chromium
def test_every_field_of_hostile_runs_is_text_in_chromium(browser, tmp_path):
    """Every field of a trajectory (a child RLM's too), the run directories' names (the
    methods), an eval's report.json, a bad line's path and the title: all hostile at once."""
    tags: list[str] = []

    def p(tag: str) -> str:
        tags.append(tag)
        return payload(tag)

    record = _every_field_hostile(p)
    root = tmp_path / "eval"
    for name, rec in ((p("method"), record), ("plain", _record())):
        (root / "runs" / name).mkdir(parents=True)
        (root / "runs" / name / "shard-20261130T000000-all-1.jsonl").write_text(json.dumps(rec) + "\n" + p("bad line") + "\n")
    (root / "report.json").write_text(json.dumps({"note": p("report")}, indent=1).replace("\\\"", "\""))
    out = tmp_path / "every.html"
    assert cli.main(["view", str(root), "-o", str(out), "--title", p("title")]) == 0
    _open(browser, out)
    _read_like_a_user(browser)
    browser.click(*_center(browser, "document.querySelector('#list .row.ep[data-id^=x]')", x=20))
    assert browser.evaluate(OPEN_ALL_DETAILS) >= 0
    _assert_nothing_ran(browser)
    assert browser.evaluate("[document.title, document.getElementById('title').innerText]") == [payload("title")] * 2
    text = _visible_text(browser)
    missing = [t for t in tags if t not in NOT_SHOWN | {"title", "bad line"} and payload(t) not in text]
    assert missing == [], missing
    assert [t for t in sorted(NOT_SHOWN) if payload(t) in text] == []  # the list above is exact
    assert json.dumps(payload("config"))[1:-1] in text  # the RLM config, as JSON
    assert payload("method") in browser.evaluate("Array.from(document.querySelectorAll('#f-method option'))"
                                                 ".map(o => o.value)")
    assert browser.evaluate("document.querySelectorAll('#problems li').length") == 2  # the bad lines: listed, as text


def _policy(html: str) -> dict[str, list[str]]:
    """The page's Content-Security-Policy: directive -> its sources."""
    meta = re.findall(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', html)
    assert len(meta) == 1, meta
    return {d.split()[0]: d.split()[1:] for d in meta[0].split(";") if d.strip()}


def _sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_the_csp_names_only_the_pages_own_script_and_style_and_no_html_sinks(tmp_path):
    html = _write_view(tmp_path, [_record()]).read_text()
    policy = _policy(html)
    scripts, styles = re.findall(r"<script>(.*?)</script>", html, re.S), re.findall(r"<style>(.*?)</style>", html, re.S)
    assert len(scripts) == 1 and len(styles) == 1  # the data sits in <script type="application/json">: never run
    assert policy == {"default-src": ["'none'"], "script-src": [_sha256_source(scripts[0])],
                      "style-src": [_sha256_source(styles[0])], "base-uri": ["'none'"], "form-action": ["'none'"],
                      "require-trusted-types-for": ["'script'"], "trusted-types": ["'none'"]}
    # The script builds the page from nodes: no HTML strings, no code from strings, no handler attributes.
    sinks = re.findall(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|"
                       r"setAttribute\(\s*['\"]on|\.on[a-z]+\s*=", scripts[0])
    assert sinks == []


@needs_chromium
def test_the_csp_runs_only_the_pages_own_script_and_refuses_inline_handlers_in_chromium(browser, tmp_path):
    out = _write_view(tmp_path, [_record()])
    _open(browser, out)  # the page's script ran, so its hash is the one the policy names
    assert _violations(browser) == []
    # Script that adds an inline handler, markup or a script is refused, and the CSP reports it.
    for attempt in ["document.getElementById('detail').setAttribute('onmouseover', 'window.__pwned = 1')",
                    "document.getElementById('detail').insertAdjacentHTML('beforeend', '<img src=x onerror=\"window.__pwned = 2\">')",
                    "document.getElementById('detail').innerHTML = '<b onmouseover=\"window.__pwned = 3\">b</b>'",
                    "document.body.appendChild(document.createElement('script')).textContent = 'window.__pwned = 4'"]:
        with pytest.raises(RuntimeError, match=r"requires 'Trusted(HTML|Script)' assignment"):
            browser.evaluate(attempt)
    with pytest.raises(RuntimeError, match="EvalError"):
        browser.evaluate("eval('window.__pwned = 5')", as_page=True)
    # A handler, a javascript: link and an <img> that reach the DOM anyway (put there by
    # DevTools, as a bug in the page might) do not run on hover or click: script-src refuses them.
    browser.set_outer_html("#detail", '<section id="detail"><span id="inj" onmouseover="window.__pwned = 6">hover me</span>'
                                      ' <a id="js" href="javascript:window.__pwned = 7">click me</a>'
                                      '<img src="x" onerror="window.__pwned = 8"></section>')
    browser.hover(*_center(browser, "document.getElementById('inj')"))
    browser.click(*_center(browser, "document.getElementById('js')"))
    time.sleep(0.2)
    assert browser.evaluate("window.__pwned === undefined")
    reported = browser.wait_for("window.__violations.length >= 9 && window.__violations")
    assert reported.count("require-trusted-types-for trusted-types-sink") >= 4, reported  # (eval is one too)
    assert reported.count("script-src-attr inline") == 2, reported  # the hovered handler, the <img>'s onerror
    assert "script-src-elem inline" in reported, reported  # the javascript: link
    assert browser.console_errors() == []

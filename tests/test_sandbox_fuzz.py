"""Seeded fuzzing of the host side of the sandbox channel (worker -> host frames).

Two levels, fixed iteration counts and a fixed seed, so every run feeds the same inputs:

1. Decoder: `protocol.recv_data` on a socketpair, fed random and adversarial frames
   (random bytes, huge and off-by-one lengths, truncated frames, stalled senders,
   100,000-level nesting, huge numbers, invalid UTF-8, lone surrogates, non-object and
   mutated JSON). It returns plain data or raises ProtocolError, never anything else,
   never past its deadline, and memory stays flat.
2. Session: cells of one REPLSession write such frames to fd 3 (the worker's channel),
   forge `done` frames and sub-call requests, or ask for a 20 MB answer and never read
   it. The host ends the cell within timeout_s + 2 s, keeps every string it returns
   bounded, never hands the sub-model a non-str prompt, and the next cell runs.
"""

from __future__ import annotations

import asyncio
import ast
import json
import random
import reprlib
import socket
import struct
import threading
import time

import psutil
import pytest

from rlm_train.repl import REPLSession, SandboxConfig, protocol

SEED = 0x5EED_F022
MB = 1 << 20


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _frame(payload: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(payload) if length is None else length) + payload


# =========================================================================== 1. decoder
MAX_BYTES = 1 << 20
DEADLINE_S = 0.5
MARGIN_S = 0.3
DECODER_ITERATIONS = 3000
STALL_EVERY = 500  # a sender that stops mid-frame costs the whole deadline: a few of those
PLAIN = (str, int, float, bool, type(None))


def _text(rng: random.Random, n: int) -> str:
    """Any code points but surrogates (JSON of those cannot round-trip)."""
    ranges = ((0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF))
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def _value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.randint(-(2**62), 2**62)
    if kind == 3:
        return rng.choice([0.0, -0.0, 1e-300, 1.7976931348623157e308, rng.uniform(-1e6, 1e6)])
    if kind in (4, 5):
        return _text(rng, rng.randrange(12))
    if kind == 6:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {_text(rng, rng.randrange(6)): _value(rng, depth + 1) for _ in range(rng.randrange(5))}


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op, i = rng.randrange(4), rng.randrange(len(b) + 1)
        if op == 0 and i < len(b):
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i:i] = bytes([rng.randrange(256)])
        elif op == 2:
            del b[i:i + rng.randint(1, 4)]
        else:
            b[i:i] = rng.choice([b"\\ud800", b"\xff", b"[", b"}", b'"', b"\\", b"1e999", b"\x00"])
    return bytes(b)


def _nested(rng: random.Random) -> tuple[bytes, int]:
    """A nesting `depth` levels deep (orjson takes at most 1,024)."""
    n = rng.choice([1023, 1024, 1025, 5000, 100_000])
    shape = rng.randrange(4)
    if shape == 0:
        return b"[" * n + b"]" * n, n
    if shape == 1:
        return b'{"a":' * n + b"1" + b"}" * n, n
    if shape == 2:
        return b'[{"a":' * (n // 2) + b"null" + b"}]" * (n // 2), 2 * (n // 2)
    return b"[" * n, n  # never closed


def _decoder_case(rng: random.Random, i: int):
    """One input: (kind, bytes to write, close after writing, drip-feed, expectation).
    Expectations: "any" (plain data or ProtocolError), "error" (ProtocolError),
    "closed" (PeerClosed), "timeout" (FrameTimeout), or ("value", v)."""
    if i % STALL_EVERY == STALL_EVERY - 1:  # header and part of the payload, then silence
        payload = json.dumps(_value(rng)).encode() + b" " * 64
        return "stall", _frame(payload)[: rng.randrange(1, 8 + len(payload))], False, False, "timeout"
    if i % 600 == 300:  # a slow sender that does finish within the deadline
        v = _value(rng)
        return "drip", _frame(json.dumps(v).encode()), True, True, ("value", v)
    if i % 250 == 125:  # exactly max_bytes: accepted (a writer thread feeds it)
        s = "x" * (MAX_BYTES - 2)
        return "at-limit", _frame(json.dumps(s).encode()), True, False, ("value", s)
    kind = rng.randrange(14)
    if kind == 0:
        data = rng.randbytes(rng.randrange(0, 64) if rng.random() < 0.7 else rng.randrange(64, 4096))
        return "random-bytes", data, True, False, "any"
    if kind == 1:
        return "random-payload", _frame(rng.randbytes(rng.randrange(0, 2048))), True, False, "any"
    if kind == 2:  # oversize headers: refused at once, without waiting for (or allocating) the payload
        length = rng.choice([2**63, 2**64 - 1, MAX_BYTES + 1, MAX_BYTES + rng.randint(2, 2**40),
                             rng.randint(MAX_BYTES + 1, 2**64 - 1)])
        return "oversize", _frame(rng.randbytes(rng.randrange(0, 32)), length), False, False, "error"
    if kind == 3:  # a frame cut anywhere (header included), then the peer closes
        full = _frame(json.dumps(_value(rng)).encode())
        return "truncated", full[: rng.randrange(0, len(full))], True, False, "closed"
    if kind == 4:
        data, n = _nested(rng)
        return "nested", _frame(data), True, False, ("error" if n > 1024 else "any")
    if kind == 5:
        num = rng.choice([b"9" * rng.randrange(20, 400_000), b"1" + b"0" * 400, b"1e999", b"-1e999",
                          b"1e-999", b"-" + b"9" * 5000, b"0." + b"0" * 100_000 + b"1",
                          b"18446744073709551616", b"-9223372036854775809", b"NaN", b"Infinity",
                          b"[" + b",".join([b"1e308"] * 1000) + b"]"])
        return "huge-number", _frame(rng.choice([num, b'{"op":"done","truncated_chars":' + num + b"}"])), \
            True, False, "any"
    if kind == 6:
        bad = rng.choice([bytes(rng.randrange(0x80, 0x100) for _ in range(rng.randint(1, 8))),
                          b"\xc0\xaf", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80",
                          b"\xe2\x82", b"\xff\xfe"])
        return "invalid-utf8", _frame(b'{"op":"done","stdout":"' + bad + b'"}'), True, False, "error"
    if kind == 7:
        lone = rng.choice([b'"\\ud800"', b'"\\udfff"', b'"\\ud800\\u0041"', b'["\\ud83d"]', b'"\\udc00\\ud800"',
                           b'{"op":"done","stdout":"\\udc00"}', b'{"\\ud800":1}'])
        return "lone-surrogate", _frame(lone), True, False, "error"
    if kind == 8:  # non-object JSON
        v = rng.choice([_value(rng), [_value(rng)], _text(rng, 5), rng.randint(-(2**62), 2**62), None, True])
        return "non-object", _frame(json.dumps(v).encode()), True, False, ("value", v)
    if kind == 9:
        v = {"op": "done", "stdout": _text(rng, rng.randrange(50)), "extra": _value(rng)}
        return "valid", _frame(json.dumps(v, ensure_ascii=rng.random() < 0.5).encode()), True, False, ("value", v)
    if kind == 10:
        payload = json.dumps({"op": "llm", "items": [_value(rng) for _ in range(3)]}).encode()
        return "mutated", _frame(_mutate(rng, payload)), True, False, "any"
    if kind == 11:  # the length field itself is off: too short (trailing junk) or too long (peer closes)
        payload = json.dumps(_value(rng)).encode()
        length = max(0, len(payload) + rng.randint(-8, 8))
        return "wrong-length", _frame(payload, length), True, False, "any"
    if kind == 12:
        data = rng.choice([b"", _frame(b""), _frame(b" " * 16)])
        return "empty", data, True, False, ("closed" if data == b"" else "error")
    payload = json.dumps(_value(rng)).encode()  # valid frame followed by garbage: only the first is read
    v = json.loads(payload)
    return "trailing-junk", _frame(payload) + rng.randbytes(rng.randrange(1, 64)), True, False, ("value", v)


def _write(sock: socket.socket, data: bytes, close: bool, drip: bool) -> None:
    try:
        if drip:
            for k in range(0, len(data), max(1, len(data) // 8)):
                sock.sendall(data[k:k + max(1, len(data) // 8)])
                time.sleep(0.01)
        else:
            sock.sendall(data)
    except OSError:  # the reader gave up and closed its end
        pass
    if close:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _check_plain(obj) -> None:
    stack = [obj]
    while stack:
        x = stack.pop()
        if type(x) is dict:
            assert all(type(k) is str for k in x), x
            stack.extend(x)
            stack.extend(x.values())
        elif type(x) is list:
            stack.extend(x)
        else:
            assert type(x) in PLAIN, type(x)
            if type(x) is str:
                x.encode("utf-8")  # no lone surrogates reach the host


def test_decoder_fuzz():
    rng = random.Random(SEED)
    base = peak = 0
    counts: dict[str, int] = {}
    for i in range(DECODER_ITERATIONS):
        if i == 50:  # after the first allocations of each size warmed the allocator
            base = peak = _rss()
        kind, data, close, drip, expect = _decoder_case(rng, i)
        counts[kind] = counts.get(kind, 0) + 1
        a, b = socket.socketpair()
        writer = None
        try:
            if len(data) > 32 << 10 or drip:  # more than the socket buffer surely holds
                writer = threading.Thread(target=_write, args=(a, data, close, drip), daemon=True)
                writer.start()
            else:
                _write(a, data, close, False)
            t0 = time.monotonic()
            try:
                got = protocol.recv_data(b, max_bytes=MAX_BYTES, deadline=t0 + DEADLINE_S)
                outcome = ("value", got)
            except protocol.ProtocolError as exc:
                outcome = ("raised", exc)
            except BaseException as exc:  # noqa: BLE001 - anything else is the finding
                pytest.fail(f"case {i} ({kind}): {type(exc).__name__}: {exc}; input {data[:80]!r}")
            took = time.monotonic() - t0
        finally:
            b.close()  # wakes a writer blocked on a full buffer
            if writer is not None:
                writer.join(5)
                assert not writer.is_alive()
            a.close()
        where = f"case {i} ({kind}), input {data[:80]!r}"
        assert took < DEADLINE_S + MARGIN_S, f"{where}: took {took:.2f}s"
        if outcome[0] == "value":
            _check_plain(outcome[1])
        exc = outcome[1]
        if expect == "error":
            assert outcome[0] == "raised" and not isinstance(exc, (protocol.PeerClosed, protocol.FrameTimeout)), \
                f"{where}: {reprlib.repr(outcome)}"
        elif expect == "closed":
            assert isinstance(exc, protocol.PeerClosed), f"{where}: {reprlib.repr(outcome)}"
        elif expect == "timeout":
            assert isinstance(exc, protocol.FrameTimeout) and took >= DEADLINE_S - 0.05, f"{where}: {reprlib.repr(outcome)}"
        elif isinstance(expect, tuple):
            assert outcome == expect, f"{where}: {reprlib.repr(outcome)}"
        if kind == "oversize":  # refused from the header alone: the sender never closed
            assert took < DEADLINE_S / 2 and "exceeds" in str(exc), f"{where}: {exc}"
        if i >= 50 and i % 25 == 0:
            peak = max(peak, _rss())
    peak = max(peak, _rss())
    assert peak - base < 64 * MB, f"RSS grew by {(peak - base) / MB:.0f} MB over {DECODER_ITERATIONS} frames"
    assert len(counts) == 17, counts  # every kind of input was fed


# =========================================================================== 2. session
CFG = {"timeout_s": 2, "memory_mb": 256, "max_output_chars": 1000, "max_message_mb": 4}
NOTE = 200  # the host's own "[... N characters cut ...]" notes
BIG_ANSWER = 20 * MB
SLACK_S = 2.0

# Cell-side helpers: write all of a buffer to the host channel, read n bytes from it.
PRELUDE = """\
import os, struct, time, json, pickle
def _put(b):
    v = memoryview(b)
    while v:
        v = v[os.write(3, v):]
def _frame(p, n=None):
    return struct.pack('<Q', len(p) if n is None else n) + p
def _get(n):
    b = b''
    while len(b) < n:
        c = os.read(3, n - len(b))
        if not c:
            raise EOFError('host closed')
        b += c
    return b
"""

WRONG = ["None", "0", "-1", "1.5", "True", "[]", "['x']", "{'a': 'b'}", "[[['deep']]]", "'short'", "'\\x00\\u2028'"]
CUTS = ["5", "2**62 - 1", "-1", "2**62", "2**63", "2**64 - 1", "'5'", "1.5", "1e300", "None", "[1]"]
BAD_ITEMS = [  # (op, items as a cell-side Python expression): the host must answer with an error
    ("llm", "None"), ("llm", "7"), ("llm", "'abc'"), ("llm", "[]"), ("llm", "[1]"), ("llm", "[None]"),
    ("llm", "[['a']]"), ("llm", "[{'p': 'a'}]"), ("llm", "['a', 2]"), ("llm", "[True]"),
    ("llm", "['a'] * 10_001"), ("llm", "{'0': 'a'}"), ("rlm", "[['p']]"), ("rlm", "[[1, None]]"),
    ("rlm", "['p']"), ("rlm", "[['p', None, 1]]"), ("rlm", "[[None, 'c']]"), ("rlm", "[['p', D]]"),
    ("rlm", "[['p', {'k': 1}]]"), ("rlm", "[['p', ['[1]', 'a list', 7]]]"),  # a context is [json, type, description]
    ("llm+", "['a']"),  # an op the host does not serve: the session is ended instead
]
GOOD_ITEMS = [("llm", "['alpha', 'beta']"), ("rlm", "[['gamma', ['{\"k\": [1, 2]}', 'a dict with 1 keys', 'k']]]"),
              ("llm", "['delta']")]


def _session_cases(rng: random.Random) -> list[tuple[str, str, str]]:
    """(name, cell code, expectation): "dead" (sandbox restart), "timeout", "forged"
    (the forged `done` is the answer; the cell then exits), or "print:<stdout>"."""
    cases = []
    for _ in range(5):
        cases.append(("random-bytes", f"_put({rng.randbytes(rng.randrange(8, 300))!r})", "dead"))
    for _ in range(3):
        cases.append(("random-payload", f"_put(_frame({rng.randbytes(rng.randrange(2, 300))!r}))", "dead"))
    for n in ((4 << 20) + 1, 2**63, 2**64 - 1, rng.randint((4 << 20) + 2, 2**64 - 1)):
        cases.append(("oversize-header", f"_put(_frame(b'{{\"op\":\"done\"}}', {n}))", "dead"))
    cases.append(("over-the-cap", "_put(_frame(b'\"' + b'x' * ((4 << 20) - 1) + b'\"'))", "dead"))
    for _ in range(3):
        n = rng.randrange(100, 4 << 20)
        head = f"b'{{\"op\":\"done\",\"stdout\":\"' + b'x' * {rng.randrange(0, 100)}"
        cases.append(("truncated-exit", f"_put(_frame({head}, {n}))\nos._exit(0)", "dead"))
    cases.append(("half-header-exit", f"_put({rng.randbytes(5)!r})\nos._exit(0)", "dead"))
    for _ in range(2):
        n = rng.randrange(100, 4 << 20)
        cases.append(("truncated-sleep", f"_put(_frame(b'{{\"op\":\"do', {n}))\ntime.sleep(60)", "timeout"))
    for p in (b"[1]", b'"done"', b"null", b'{"op":5}', b'{"op":["done"]}', b"{}", b'{"op":"DONE"}',
              b'{"op":"exec","code":"print(1)"}', b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 5000 + b"1" + b"}" * 5000,
              b'{"op":"done","stdout":"\\ud800"}', b'{"op":"done","stdout":"\xed\xa0\x80"}',
              b'{"op":"done","truncated_chars":1' + b"0" * 400 + b"}", b'{"op":"done","stdout":NaN}'):
        cases.append(("bad-frame", f"_put(_frame({p!r}))", "dead"))
    for _ in range(6):  # forged done: wrong types, oversized strings; the real done never follows
        fields = {f: rng.choice(WRONG) for f in ("stdout", "stderr", "error", "final") if rng.random() < 0.6}
        big = [f for f in ("stdout", "stderr", "error", "final") if rng.random() < 0.4]
        for f in big:
            fields[f] = f"'{f[0]}' * {rng.randrange(1001, 3_800_000 // len(big))}"
        if rng.random() < 0.7:
            fields["truncated_chars"] = rng.choice(CUTS)
        d = "{'op': 'done', " + ", ".join(f"{k!r}: {v}" for k, v in fields.items()) + "}"
        cases.append(("forged-done", f"_put(_frame(json.dumps({d}).encode()))\nos._exit(0)", "forged"))
    exact = "p = b'{\"op\":\"done\",\"final\":\"' + b'f' * ((4 << 20) - 24) + b'\"}'\nassert len(p) == 4 << 20\n"
    cases.append(("forged-done-at-cap", exact + "_put(_frame(p))\nos._exit(0)", "forged"))
    ask = ("D = None\nfor _ in range(150):\n    D = [D]\n"
           "_put(_frame(json.dumps({{'op': {op!r}, 'items': {items}}}).encode()))\n"
           "r = pickle.loads(_get(struct.unpack('<Q', _get(8))[0]))\n"
           "print(r['error'] is not None, r['results'])")
    for op, items in BAD_ITEMS:
        cases.append(("bad-subcall", ask.format(op=op, items=items), "dead" if op == "llm+" else "print:True None\n"))
    for op, items in GOOD_ITEMS:
        want = [f"ans:{p}" for p in ast.literal_eval(items)] if op == "llm" else [f"ans:{ast.literal_eval(items)[0][0]}"]
        cases.append(("good-subcall", ask.format(op=op, items=items), f"print:False {want}\n"))
    big = "_put(_frame(json.dumps({'op': 'llm', 'items': ['BIG']}).encode()))\n"
    cases.append(("big-answer-never-read", big + "time.sleep(60)", "timeout"))
    cases.append(("big-answer-then-exit", big + "os._exit(0)", "dead"))
    rng.shuffle(cases)
    return cases


def _assert_bounded(r, cfg: SandboxConfig) -> None:
    limit = cfg.max_output_chars
    assert type(r.stdout) is str and len(r.stdout) <= limit + NOTE, len(r.stdout)
    assert type(r.stderr) is str and len(r.stderr) <= limit + NOTE, len(r.stderr)
    # Tracebacks get more room than output: the host clips `error` to max(max_output_chars, 20,000).
    assert r.error is None or (type(r.error) is str and len(r.error) <= max(limit, 20_000) + NOTE), len(r.error)
    assert r.final is None or (type(r.final) is str and len(r.final) <= cfg.max_final_chars + NOTE), len(r.final)
    assert isinstance(r.truncated_chars, int) and 0 <= r.truncated_chars < 2**62, r.truncated_chars
    assert type(r.timed_out) is bool and type(r.restarted) is bool
    assert r.error_kind in (None, "sandbox", "timeout", "limit"), r.error_kind
    for text in (r.stdout, r.stderr, r.error or "", r.final or ""):
        text.encode("utf-8")


_cells_run = [0]


def _timed(s: REPLSession, code: str):
    """Every other cell runs on an event loop (execute_async, the RLM loop's path)."""
    _cells_run[0] += 1
    t0 = time.monotonic()
    r = asyncio.run(s.execute_async(code)) if _cells_run[0] % 2 else s.execute(code)
    took = time.monotonic() - t0
    assert took < s.config.timeout_s + SLACK_S, f"execute took {took:.1f}s"
    return r


def test_session_fuzz():
    cfg = SandboxConfig(**CFG)
    rng = random.Random(SEED)
    cases = _session_cases(rng)
    big = "y" * BIG_ANSWER
    prompts: list = []

    def llm(prompt):
        prompts.append(prompt)
        return big if prompt == "BIG" else f"ans:{prompt}"

    uids, worker_pids = set(), set()

    def note_worker(s: REPLSession) -> None:
        if s.pid is not None:
            worker_pids.add(s.pid)
            uids.add(psutil.Process(s.pid).uids().real)

    with REPLSession("", config=cfg, llm=llm) as s:
        server = s.zygote_pid  # small contexts: workers come from the fork-server's pool
        note_worker(s)
        assert _timed(s, "print(1)").stdout == "1\n"
        base = _rss()
        for i, (name, code, expect) in enumerate(cases):
            where = f"case {i} ({name})"
            r = _timed(s, PRELUDE + code)
            _assert_bounded(r, cfg)
            if expect == "dead":
                assert r.restarted and r.error_kind == "sandbox" and not r.timed_out, f"{where}: {r}"
            elif expect == "timeout":
                assert r.restarted and r.timed_out and r.error_kind == "timeout", f"{where}: {r}"
            elif expect == "forged":
                assert not r.restarted and r.error_kind is None, f"{where}: {r}"
            else:
                assert (r.stdout, r.error, r.restarted) == (expect[len("print:"):], None, False), f"{where}: {r}"
            nxt = _timed(s, "print(1)")
            if expect == "forged":  # the forging cell exited after its frame: the host learns it now
                assert nxt.restarted and nxt.error_kind == "sandbox", f"{where}: {nxt}"
                nxt = _timed(s, "print(1)")
            assert (nxt.stdout, nxt.error) == ("1\n", None), f"{where}: follow-up {nxt}"
            assert s.zygote_pid == server and psutil.pid_exists(server), f"{where}: the fork-server was lost"
            note_worker(s)
        grown = _rss() - base
        assert all(type(p) is str for p in prompts), [type(p) for p in prompts if type(p) is not str]
        assert sorted(set(prompts)) == ["BIG", "alpha", "beta", "delta", "gamma"], sorted(set(prompts))[:10]
    assert grown < 64 * MB, f"host RSS grew by {grown / MB:.0f} MB"
    # Nothing of the session is left. Its uids go back to the fork-server, whose idle pooled
    # workers may hold one again: only those (never one of ours or a child of one) may remain.
    pool = {p.pid for p in psutil.Process(server).children(recursive=True)}
    left = []
    for p in psutil.process_iter(["uids"]):
        if p.info["uids"] and p.info["uids"].real in uids:
            try:
                ours = p.pid in worker_pids or any(a.pid in worker_pids for a in p.parents())
            except psutil.NoSuchProcess:
                continue
            if ours or p.pid not in pool:
                left.append(p.pid)
    assert left == [], f"processes of the session's uids {sorted(uids)} left after close: {left}"


@pytest.mark.parametrize("close", ["os.close(3)", "import socket\nsocket.socket(fileno=3).shutdown(socket.SHUT_WR)"])
def test_closed_channel_with_a_live_worker_ends_within_the_cell_clock(close):
    """Found by this fuzzer: a worker that closes its channel but keeps running held
    execute() for 5 s, waiting for an exit status that never came."""
    with REPLSession("", config=SandboxConfig(**CFG)) as s:
        r = _timed(s, f"import os, time\n{close}\ntime.sleep(60)")
        assert r.restarted and r.error_kind == "sandbox" and "still running" in r.error, r
        assert _timed(s, "print(1)").stdout == "1\n"

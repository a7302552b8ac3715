"""The rule `rlm-train bench http` decides the transport by (its timings are the bench's, not a test's)."""

from rlm_train.bench.http import decide


def row(cpu: float, streamed: float, burst: float) -> dict[str, float]:
    return {"cpu_us_per_request": cpu, "streamed_cpu_us_per_request": streamed, "burst_wall_ms": burst}


def test_the_simplest_candidate_within_10_percent_on_every_measure_is_kept():
    rows = {"streams": {"asyncio": row(40, 700, 130), "uvloop": row(33, 540, 120)},
            "aiohttp": {"asyncio": row(250, 1100, 200), "uvloop": row(210, 900, 200)},
            "protocol": {"asyncio": row(45, 600, 125), "uvloop": row(32, 500, 118)}}
    decision = decide(rows)
    assert decision["transport"] == "streams" and decision["as_fast"]["streams"] == ["uvloop"]
    assert decision["loop"] == "uvloop" and decision["uvloop_helps"]  # asyncio's loop: 40 > 1.1 x 33


def test_one_measure_more_than_10_percent_behind_rules_a_candidate_out():
    rows = {"streams": {"asyncio": row(32, 620, 118)},  # streamed: 620 > 1.1 x 500
            "protocol": {"asyncio": row(33, 500, 120)}}
    assert decide(rows)["transport"] == "protocol"


def test_uvloop_only_where_it_helps_by_more_than_10_percent():
    rows = {"streams": {"asyncio": row(33, 520, 121), "uvloop": row(31, 500, 118)}}
    decision = decide(rows)
    assert (decision["transport"], decision["loop"], decision["uvloop_helps"]) == ("streams", "asyncio", False)

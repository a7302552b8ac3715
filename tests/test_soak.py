"""The soak: 1,000 episodes against a local mock server failing 5% of its chat requests in
every way (500s, hangs, resets, garbage bodies). `rlm-train bench soak` is the same run."""

import pytest

from rlm_train.bench.soak import bench_soak


@pytest.mark.slow
def test_1000_episodes_with_5_percent_failures_every_record_once_memory_fds_processes_bounded():
    result = bench_soak(episodes=1000, quiet=True)
    assert result["records"] == 1000 and result["checks"]["exactly_once"]
    injected = result["injected"]
    assert all(injected.get(kind, 0) > 0 for kind in ("error_500", "hang", "drop", "garbage")), injected
    # ~11 requests an episode, 5% failing: hundreds of failures, each retried, none losing an episode.
    # (A reset on a reused keep-alive connection looks stale and is re-sent at once, uncounted.)
    failures = sum(injected[k] for k in ("error_500", "hang", "drop", "garbage"))
    assert failures > 300 and result["retries"] >= injected["error_500"] + injected["hang"] + injected["garbage"]
    assert result["outcomes"] == {"final": 1000}
    assert len(result["samples"]) >= 5  # memory sampled through the run
    assert result["checks"]["self_rss_bounded"] and result["checks"]["tree_rss_bounded"], result["rss_mb"]
    assert result["checks"]["fds_back"], result["fds"]
    assert result["checks"]["processes_back"], result["processes"]

"""Side-by-side latency: alternation, warm-up, iteration counts and statistics.

Most checks use fake sessions on a fake clock (patched into the latency module only),
so the measured times are exact; one check uses real, tiny sleeps and compares them."""

from __future__ import annotations

import time
import types

import numpy as np
import pytest

from lowbit.runtime import latency, memory
from lowbit.runtime.latency import LatencyStats, measure_side_by_side


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class FakeSession:
    """Records every call; each call advances the fake clock by the next cost."""

    def __init__(self, name: str, log: list[str], clock: FakeClock | None = None,
                 costs: list[float] | float = 0.0, sleep_s: float = 0.0) -> None:
        self.name, self.log, self.clock = name, log, clock
        self.costs, self.sleep_s = costs, sleep_s
        self.feeds: list[dict] = []

    def run(self, output_names, feed):
        assert output_names is None
        self.feeds.append(feed)
        if self.clock is not None:
            k = len(self.log)
            cost = self.costs if isinstance(self.costs, float) else self.costs[k]
            self.clock.now += cost
        if self.sleep_s:
            time.sleep(self.sleep_s)
        self.log.append(self.name)
        return [np.zeros((1,), np.float32)]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(latency, "time", types.SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


def test_alternates_order_each_iteration(clock: FakeClock) -> None:
    log: list[str] = []
    a, b = FakeSession("A", log, clock, 0.001), FakeSession("B", log, clock, 0.001)
    stats = measure_side_by_side([a, b], [{"x": 1}, {"x": 2}], batch=1, threads=1,
                                 iterations=4, warmup=2)
    assert log == ["A", "B"] * 2 + ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert [s.iterations for s in stats] == [4, 4]
    # each session gets its own feed, every time
    assert all(f == {"x": 1} for f in a.feeds) and all(f == {"x": 2} for f in b.feeds)


def test_three_sessions_rotate(clock: FakeClock) -> None:
    """Each session in every position, none twice in a row (reversing ran the ends twice
    in a row at the turns and measured them faster than identical models between)."""
    log: list[str] = []
    sessions = [FakeSession(n, log, clock, 0.001) for n in "ABC"]
    measure_side_by_side(sessions, [{}, {}, {}], batch=1, threads=1, iterations=4, warmup=0)
    order = "".join(log)
    assert order == "ABC" "BCA" "CAB" "ABC"
    assert all(a != b for a, b in zip(order, order[1:]))


def test_warmup_calls_are_not_timed(clock: FakeClock) -> None:
    log: list[str] = []
    # the 3 warm-up rounds (6 calls) cost 1 s each; timed calls cost 2 ms (A) and 5 ms (B).
    # A call's cost is looked up by its position in the shared log: after warm-up the
    # order is A B, B A, A B, ...
    timed = []
    for i in range(10):
        timed += ["A", "B"] if i % 2 == 0 else ["B", "A"]
    costs = [1.0] * 6 + [0.002 if n == "A" else 0.005 for n in timed]
    a, b = FakeSession("A", log, clock, costs), FakeSession("B", log, clock, costs)
    sa, sb = measure_side_by_side([a, b], [{}, {}], batch=4, threads=2, iterations=10, warmup=3)
    assert len(log) == 6 + 20
    assert sa.iterations == sb.iterations == 10
    assert sa.p50_ms == pytest.approx(2.0) and sa.mean_ms == pytest.approx(2.0)
    assert sa.p90_ms == pytest.approx(2.0)
    assert sb.p50_ms == pytest.approx(5.0) and sb.mean_ms == pytest.approx(5.0)
    assert (sa.batch, sa.threads) == (4, 2)


def test_statistics_are_median_p90_mean(clock: FakeClock) -> None:
    log: list[str] = []
    per_call = [0.001 * k for k in (1, 2, 3, 4, 10)]
    a = FakeSession("A", log, clock, per_call)
    (st,) = measure_side_by_side([a], [{}], batch=1, threads=1, iterations=5, warmup=0)
    arr = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    assert st.p50_ms == pytest.approx(3.0)
    assert st.p90_ms == pytest.approx(float(np.percentile(arr, 90)))
    assert st.mean_ms == pytest.approx(4.0)


def test_keeps_going_until_min_time(clock: FakeClock) -> None:
    log: list[str] = []
    a, b = FakeSession("A", log, clock, 0.05), FakeSession("B", log, clock, 0.05)
    sa, sb = measure_side_by_side([a, b], [{}, {}], batch=1, threads=1, iterations=3, warmup=0,
                                  min_time_s=1.0)
    # each iteration costs 0.1 s of the fake clock: 10 iterations reach 1 s
    assert sa.iterations == sb.iterations == 10
    assert sa.iterations >= 3


def test_min_time_is_capped_at_20x_iterations(clock: FakeClock) -> None:
    log: list[str] = []
    a = FakeSession("A", log, clock, 0.0)  # the fake clock never moves
    (st,) = measure_side_by_side([a], [{}], batch=1, threads=1, iterations=4, warmup=1,
                                 min_time_s=10.0)
    assert st.iterations == 80
    assert len(log) == 1 + 80


def test_iterations_at_least_requested_without_min_time(clock: FakeClock) -> None:
    log: list[str] = []
    a = FakeSession("A", log, clock, 1.0)
    (st,) = measure_side_by_side([a], [{}], batch=1, threads=1, iterations=7, warmup=0,
                                 min_time_s=0.0)
    assert st.iterations == 7


def test_slower_session_has_larger_p50_real_clock() -> None:
    log: list[str] = []
    fast = FakeSession("fast", log)
    slow = FakeSession("slow", log, sleep_s=0.002)
    sf, ss = measure_side_by_side([fast, slow], [{}, {}], batch=8, threads=1, iterations=15,
                                  warmup=1)
    assert sf.iterations >= 15 and ss.iterations >= 15
    assert ss.p50_ms > sf.p50_ms
    assert ss.p50_ms > 2 * sf.p50_ms
    assert ss.throughput < sf.throughput
    assert log[:2] == ["fast", "slow"]


def test_stats_to_dict_and_throughput() -> None:
    st = LatencyStats(p50_ms=4.0, p90_ms=5.123456, mean_ms=4.56789, batch=8, threads=2,
                      iterations=50)
    assert st.throughput == pytest.approx(8 / 0.004)
    d = st.to_dict()
    assert set(d) == {"p50_ms", "p90_ms", "mean_ms", "batch", "threads", "iterations",
                      "throughput_per_s"}
    assert d["throughput_per_s"] == pytest.approx(2000.0)
    assert d["p90_ms"] == pytest.approx(5.1235) and d["mean_ms"] == pytest.approx(4.5679)
    assert (d["batch"], d["threads"], d["iterations"]) == (8, 2, 50)
    assert LatencyStats(0.0, 0.0, 0.0, 1, 1, 1).throughput == float("inf")


def test_release_memory_runs() -> None:
    libc = memory._libc()
    assert libc is None or hasattr(libc, "malloc_trim")
    memory.release_memory()  # a no-op or malloc_trim; must not raise
    memory.release_memory()

"""The timing race the audit and the benchmarks share."""
import pytest

from functional_cnn.audit import timing


class FakeClock:
    """``time.perf_counter`` that runners advance: the race's arithmetic, without a machine's
    stalls (a real sleep can last tens of ms longer on a loaded CI box)."""

    def __init__(self):
        self.now, self.order = 0.0, []

    def perf_counter(self):
        return self.now

    def runner(self, name, seconds):
        def run(n):
            self.order.append((name, n))
            self.now += n * seconds
        return run


def test_race_times_every_runner_per_call_in_alternating_rounds(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock.perf_counter)
    fast, slow = 2.0 ** -10, 2.0 ** -8  # seconds a call, exact in binary: no rounding below
    result = timing.race({"fast": clock.runner("fast", fast), "slow": clock.runner("slow", slow)},
                         rounds=3, target_s=10 * fast)
    for name, ms in (("fast", 1e3 * fast), ("slow", 1e3 * slow)):
        assert result[name] == pytest.approx({"median_ms": ms, "min_ms": ms, "max_ms": ms})
    # warm-up (2 calls) and calibration (3) each, then target_s worth a round: 10 and 2 calls,
    # the order reversed every round
    assert clock.order == [("fast", 2), ("fast", 3), ("slow", 2), ("slow", 3),
                           ("fast", 10), ("slow", 2), ("slow", 2), ("fast", 10),
                           ("fast", 10), ("slow", 2)]

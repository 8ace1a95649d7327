"""The timing race the audit and the benchmarks share."""
import time

from functional_cnn.audit import timing


def test_race_times_every_runner_per_call():
    def sleeper(seconds):
        def run(n):
            for _ in range(n):
                time.sleep(seconds)
        return run

    result = timing.race({"fast": sleeper(0.001), "slow": sleeper(0.004)}, rounds=3,
                         target_s=0.01)
    assert set(result) == {"fast", "slow"}
    assert 0.9 <= result["fast"]["min_ms"] <= result["fast"]["median_ms"] <= 3
    assert result["slow"]["median_ms"] > 2 * result["fast"]["median_ms"]

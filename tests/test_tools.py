"""The benchmark tools' shared pieces: the section writer, the timing race, and a tiny bench."""
import time

from experiments import _report, _timing, bench


def test_write_section_replaces_only_its_own_markers(tmp_path):
    doc = tmp_path / "B.md"
    doc.write_text("# Title\n\nhand-written\n")
    _report.write_section(str(doc), "a", "first")
    _report.write_section(str(doc), "b", "other")
    _report.write_section(str(doc), "a", "second")
    text = doc.read_text()
    assert text.startswith("# Title\n\nhand-written\n")
    assert "<!-- a:begin -->\nsecond\n<!-- a:end -->" in text and "first" not in text
    assert text.index("<!-- a:begin -->") < text.index("<!-- b:begin -->")
    assert "<!-- b:begin -->\nother\n<!-- b:end -->" in text


def test_race_times_every_runner_per_call():
    def sleeper(seconds):
        def run(n):
            for _ in range(n):
                time.sleep(seconds)
        return run

    result = _timing.race({"fast": sleeper(0.001), "slow": sleeper(0.004)}, rounds=3,
                          target_s=0.01)
    assert set(result) == {"fast", "slow"}
    assert 0.9 <= result["fast"]["min_ms"] <= result["fast"]["median_ms"] <= 3
    assert result["slow"]["median_ms"] > 2 * result["fast"]["median_ms"]


def test_bench_writes_its_section(tmp_path):
    report = tmp_path / "BENCHMARKS.md"
    assert bench.main(["--models", "mlp", "--batch", "8", "--rounds", "1", "--no-epoch",
                       "--no-torch", "--op-batch", "2", "--report", str(report)]) == 0
    text = report.read_text()
    assert "<!-- bench:begin -->" in text and "<!-- bench:end -->" in text
    assert "| mlp | 8 |" in text
    assert (tmp_path / "figures" / "bench_steps.png").stat().st_size > 1000

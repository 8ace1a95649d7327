"""Time to 99.0% MNIST test accuracy: this library against the same recipe in plain PyTorch.

    python -m benchmarks.bench_time_to_accuracy [--rounds 5] [--report docs/BENCHMARKS.md]

Runs ``python -m experiments.time_to_accuracy`` and ``python benchmarks/time_to_accuracy_torch.py``
as fresh processes, alternating, ``--rounds`` times each, and reads each one's JSON (wall time
from its process start to the target, whether it got there). A third column repeats the JAX run
with a primed persistent compilation cache (``--compile-cache``): what a second start costs.
The medians and spreads go into the ``tta`` section of ``--report``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from benchmarks._report import BENCHMARKS, ROOT, command, write_section

RUNS = {  # name -> command (the JSON path is appended)
    "functional_cnn, cold start": [sys.executable, "-m", "experiments.time_to_accuracy"],
    "functional_cnn, compile cache": [sys.executable, "-m", "experiments.time_to_accuracy",
                                      "--compile-cache", "{cache}"],
    "torch": [sys.executable, os.path.join("benchmarks", "time_to_accuracy_torch.py")],
}


def run_once(template, workdir) -> dict:
    out = os.path.join(workdir, "run.json")
    argv = [a.replace("{cache}", os.path.join(workdir, "cache")) for a in template]
    done = subprocess.run(argv + ["--json", out], cwd=ROOT, capture_output=True, text=True)
    if done.returncode not in (0, 1) or not os.path.exists(out):  # 1: ran, missed the target
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    with open(out) as f:
        result = json.load(f)
    os.remove(out)
    return result


def race(rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        run_once(RUNS["functional_cnn, compile cache"], workdir)  # primes the cache
        results = {name: [] for name in RUNS}
        for _ in range(rounds):
            for name, run in RUNS.items():
                results[name].append(run_once(run, workdir))
                r = results[name][-1]
                print(f"{name:30s} {'reached' if r['reached'] else 'MISSED '} "
                      f"{r['history'][-1]['test_accuracy']:.4f} in {r['seconds']:.1f} s",
                      flush=True)
    return results


def section(results: dict, rounds: int, command: str, machine: str) -> str:
    """The ``tta`` section; ``machine`` is :func:`benchmarks._peak.machine_text`'s line."""
    lines = ["## Time to 99.0% test accuracy (issue #5)", "", f"Measured on: {machine}.", "",
             f"Wall time from process start (imports, data loading, compilation, training, "
             f"evaluation) until the test accuracy reaches the target; {rounds} fresh processes "
             f"each, alternating. The recipe (both sides): the LeNet-shaped BatchNorm net of "
             "`experiments/time_to_accuracy.py` (8 and 16 channels), batch 128, AdamW (weight "
             "decay 5e-4) with a one-cycle learning rate peaking at 3e-2 over 2 epochs, the test "
             "set evaluated after epoch 2.", "",
             "| run | reached 99.0% | median s | min-max s | test accuracy |",
             "| --- | --- | --- | --- | --- |"]
    for name, runs in results.items():
        seconds = [r["seconds"] for r in runs]
        accuracy = sorted({f"{r['history'][-1]['test_accuracy']:.2%}" for r in runs})
        lines.append(f"| {name} | {sum(r['reached'] for r in runs)}/{len(runs)} | "
                     f"{statistics.median(seconds):.1f} | {min(seconds):.1f}-{max(seconds):.1f} "
                     f"| {', '.join(accuracy)} |")
    lines += ["", f"Reproduce: `FUNCTIONAL_CNN_DATA=../shared/datasets {command}`."]
    return "\n".join(lines)


def _machine_after_the_race() -> str:
    """The CPU model and matmul peak, measured here once the timed processes are done (this
    process imports jax and torch only now, so the race's processes had the cores alone)."""
    from benchmarks._peak import machine_text, matmul_peak
    try:
        import torch
    except ImportError:
        torch = None
    return machine_text(matmul_peak(torch))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--report", default=BENCHMARKS, help="'none' to skip")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    results = race(args.rounds)
    machine = _machine_after_the_race()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.report != "none":
        write_section(args.report, "tta", section(
            results, args.rounds, command("benchmarks.bench_time_to_accuracy", argv), machine))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Time to 99.0% MNIST test accuracy: this library against torch's best recipe in plain PyTorch.

    python -m benchmarks.bench_time_to_accuracy [--rounds 5] [--report docs/BENCHMARKS.md]

Runs ``python -m experiments.time_to_accuracy`` and ``python benchmarks/time_to_accuracy_torch.py``
as fresh processes, alternating, ``--rounds`` times each, and reads each one's JSON (wall time
from its process start to the target, whether it got there). A third column repeats the JAX run
with a primed persistent compilation cache (``--compile-cache``): what a second start costs.
The medians and spreads go into the ``tta`` section of ``--report``.

Before the race, the repository's Python sources are compiled to bytecode once
(:func:`write_bytecode`), as ``pip install`` does for an installed package (torch, jax): where
``PYTHONDONTWRITEBYTECODE`` is set, as on this project's machines, every run would otherwise
compile this library's source again (imports 0.69 against 0.58 s, AMD EPYC).
"""
from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile

from benchmarks import _report
from benchmarks._report import BENCHMARKS, ROOT, command, write_section
OURS, THEIRS = "functional_cnn, cold start", "torch"  # the race's two sides, from cold
ACTIVATION_NAMES = {"relu": "ReLU", "silu": "SiLU"}  # a recipe's, as the table writes them
OPTIMIZER_NAMES = {"adamw": "AdamW", "nadamw": "AdamW with Nesterov momentum"}  # likewise
RUNS = {  # name -> command (the JSON path is appended)
    OURS: [sys.executable, "-m", "experiments.time_to_accuracy"],
    "functional_cnn, compile cache": [sys.executable, "-m", "experiments.time_to_accuracy",
                                      "--compile-cache", "{cache}"],
    THEIRS: [sys.executable, os.path.join("benchmarks", "time_to_accuracy_torch.py")],
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


def write_bytecode(root=ROOT, packages=("functional_cnn", "experiments", "benchmarks")) -> None:
    """The packages' ``__pycache__``, written even under ``PYTHONDONTWRITEBYTECODE`` (which
    stops only the interpreter's own writing; a cached file is still read)."""
    for package in packages:
        if not compileall.compile_dir(os.path.join(root, package), quiet=1):
            raise SystemExit(f"bench_time_to_accuracy: {package} does not compile")


def race(rounds: int) -> dict:
    write_bytecode()
    with tempfile.TemporaryDirectory() as workdir:
        run_once(RUNS["functional_cnn, compile cache"], workdir)  # primes the cache
        results = {name: [] for name in RUNS}
        for r in range(rounds):  # the order alternates: a slow stretch hits every side alike
            for name in (list(RUNS) if r % 2 == 0 else list(RUNS)[::-1]):
                results[name].append(run_once(RUNS[name], workdir))
                r = results[name][-1]
                print(f"{name:30s} {'reached' if r['reached'] else 'MISSED '} "
                      f"{r['history'][-1]['test_accuracy']:.4f} in {r['seconds']:.1f} s",
                      flush=True)
    return results


def _recipe(run: dict) -> str:
    r = run["recipe"]
    widths = "/".join(str(w) for w in r["widths"])
    activation = ACTIVATION_NAMES[r.get("activation", "relu")]  # ReLU before the option
    return (f"{widths}-channel {r['kernel']}x{r['kernel']} convolutions (padding "
            f"{r['padding']}) with BatchNorm and {activation}"
            + (", the first frozen at the principal components of the training images' "
               "patches (its BatchNorm without affine parameters)"
               if r.get("first_conv") == "pca" else "")
            + f", a {r['hidden']}-wide hidden layer, batch {r['batch_size']}, {r['steps']} steps "
            f"({r['steps'] * r['batch_size'] / 60000:.2f} epochs), one-cycle "
            f"{OPTIMIZER_NAMES[r.get('optimizer', 'adamw')]} peaking at {r['peak_lr']:g}, "
            f"label smoothing {r['label_smoothing']:g}"
            + (f", weight decay {r['weight_decay']:g}" if "weight_decay" in r else "")
            + (f", b2 {r['b2']:g}" if "b2" in r else "")
            + (f", conv2d's formulations in training {_pins(run['formulations'])}"
               if any(run.get("formulations") or ()) else "")
            + (f", in evaluation {_pins(run['eval_formulations'])}"
               if any(run.get("eval_formulations") or ()) else "")
            + (", keys from functional_cnn.prng's FMIX32" if run.get("prng") == "fmix32"
               else "")
            + (f", on {run['devices']} host devices (each its share of every batch, with its "
               "own BatchNorm statistics)" if run.get("devices", 1) > 1 else "")
            + (", compiled with XLA:CPU's loop emitters" if run.get("fusion_emitters") is False
               else ""))


def _pins(formulations) -> str:
    """``['taps', None]`` as ``taps, as chosen``."""
    return ", ".join(f or "as chosen" for f in formulations)


def section(results: dict, rounds: int, command: str, machine: str) -> str:
    """The ``tta`` section; ``machine`` is :func:`benchmarks._peak.machine_text`'s line."""
    lines = ["## Time to 99.0% test accuracy (issue #11)", "", f"Measured on: {machine}.", "",
             f"Wall time from process start (imports, data loading, compilation, training, "
             f"evaluation) until the test accuracy reaches the target; {rounds} fresh processes "
             "each, alternating. Each side runs its own recipe (the fastest we found for it: "
             "the module docstrings say what makes each fast), the test set evaluated once, "
             "after the schedule:", ""]
    for name, runs in results.items():
        lines.append(f"* {name}: {_recipe(runs[0])}")
    rows = []
    for name, runs in results.items():
        seconds = [r["seconds"] for r in runs]
        accuracy = sorted({f"{r['history'][-1]['test_accuracy']:.2%}" for r in runs})
        rows.append([name, f"{sum(r['reached'] for r in runs)}/{len(runs)}",
                     f"{statistics.median(seconds):.1f}",
                     f"{min(seconds):.1f}-{max(seconds):.1f}", ", ".join(accuracy)])
    header = ["run", "reached 99.0%", "median s", "min-max s", "test accuracy"]
    lines += [""] + _report.table(header, rows) + [""]
    if OURS in results and THEIRS in results:
        lines += [paired_text(results), ""]
    lines.append(f"Reproduce: `FUNCTIONAL_CNN_DATA=../shared/datasets {command}`.")
    return "\n".join(lines)



def paired_text(results: dict, ours: str = OURS, theirs: str = THEIRS) -> str:
    """Round by round, ``ours``' time over ``theirs``': the two ran within a minute of each
    other, so the ratio carries less of this machine's drift than the medians do."""
    ratios = [a["seconds"] / b["seconds"] for a, b in zip(results[ours], results[theirs])]
    return (f"Round by round, {ours} over {theirs}: {statistics.median(ratios):.2f} median "
            f"({min(ratios):.2f}-{max(ratios):.2f}); faster in {sum(r < 1 for r in ratios)} "
            f"of {len(ratios)} rounds.")


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
    print(paired_text(results))
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

"""Which conv2d formulation trains each convolution of the race network fastest, timed inside
the whole training step on the running machine (issue #11: a choice that holds on any CPU is
measured where it runs, not carried over from another machine's gates).

    python -m benchmarks.bench_formulations [--rounds 5] [--devices N] [--report PATH|none]

:mod:`functional_cnn.tuning`, measured afresh, on ``experiments/time_to_accuracy``'s network
and recipe, on the devices it trains on (``--devices``, as the race's): one convolution at a
time, each formulation that can run it against conv2d's own choice (``none``), the earlier
convolutions as already chosen, in alternating rounds of compiled epochs of 50 training steps.
The choice is cached, so the race's later runs use it. The table goes into ``--report``
between ``<!-- formulations:begin -->`` and ``<!-- formulations:end -->``.
"""
from __future__ import annotations

import argparse

from benchmarks import _report
from benchmarks._peak import machine_text, matmul_peak
from experiments import time_to_accuracy as tta
from functional_cnn import tuning


def section(tuned: tuning.Tuning, batch: int, devices: int, command: str, machine: str) -> str:
    rows = []
    for name, ms in tuned.ms.items():
        stage = name.split()[0]
        rows.append([name, f"{ms:.3f}", f"{ms / tuned.ms[f'{stage} {tuning.AS_CHOSEN}']:.2f}"])
    lines = ["## conv2d's formulations in the race network's training step", "",
             f"Measured on: {machine}.", "",
             f"One AdamW step at batch {batch}{_on(devices)}, ms (the best of alternating rounds "
             "of 50-step epochs, `functional_cnn.tuning`), one convolution at a time: each row "
             "pins that convolution to one formulation, the earlier ones as chosen before them; "
             f"`{tuning.AS_CHOSEN}` is conv2d's own choice, and a pin that compiles to the same "
             "program (conv2d's own choice pinned) shares its time. Ratios compare within a "
             "convolution's rows only: the rounds of different convolutions ran at different "
             "times, and this machine drifts by 10-30% between them.",
             "", *_report.table(["variant", "ms / step", f"/ {tuning.AS_CHOSEN}"], rows), "",
             f"Chosen (and cached for the race): `--formulations "
             f"{tuning.pins_text(tuned.pins)}`.", "", f"Reproduce: `{command}`."]
    return "\n".join(lines)


def _on(devices: int) -> str:
    return "" if devices == 1 else f" on {devices} host devices (each its share of the batch)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--devices", type=tta.positive_int, default=None,
                        help="as experiments.time_to_accuracy's (default: its own)")
    parser.add_argument("--report", default=_report.BENCHMARKS, help="'none' to skip")
    args = parser.parse_args(argv)
    mesh = tta.host_mesh(args.devices)  # before anything touches a device
    recipe = tta.parser().parse_args([])
    tuned = tuning.tune_formulations(tta.trainer_for(recipe, mesh), len(recipe.widths),
                                     tta.INPUT_SHAPE, tta.EXAMPLE, rounds=args.rounds,
                                     remeasure=True)
    for name, ms in tuned.ms.items():
        print(f"{name:16s} {ms:7.3f} ms a step")
    print(f"chosen: --formulations {tuning.pins_text(tuned.pins)}")
    if args.report != "none":
        text = section(tuned, recipe.batch_size, 1 if mesh is None else mesh.size,
                       _report.command("benchmarks.bench_formulations", argv),
                       machine_text(matmul_peak()))
        _report.write_section(args.report, "formulations", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

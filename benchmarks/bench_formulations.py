"""Which conv2d formulation trains each convolution fastest, timed inside the whole training
step on the running machine (issue #11: a choice that holds on any CPU is measured where it
runs, not carried over from another machine's gates).

    python -m benchmarks.bench_formulations [--batch 32] [--rounds 9] [--report PATH|none]

The network is ``experiments/time_to_accuracy``'s, whose recipe pins ``"taps"`` for its first
convolution in training (measured so on one AMD EPYC). Each variant pins one convolution to one
formulation (``Conv2d(train_formulation=...)``) and leaves the others to conv2d's choice;
"as chosen" pins nothing. One AdamW step of every variant is compiled and timed in alternating
rounds of one process (``functional_cnn.audit.timing.race``); a formulation that cannot run a
convolution's shape is left out. The table goes into ``--report`` between
``<!-- formulations:begin -->`` and ``<!-- formulations:end -->``.
"""
from __future__ import annotations

import argparse

import jax
import numpy as np

import functional_cnn.functional as F
from benchmarks import _report
from benchmarks._peak import machine_text, matmul_peak
from benchmarks.bench import JaxRunner
from experiments import time_to_accuracy as tta
from functional_cnn.audit.timing import race

AS_CHOSEN = "as chosen"


def variants(stages: int) -> dict[str, tuple]:
    """Name -> per-convolution pins: nothing pinned, then each convolution by each formulation."""
    pins = {AS_CHOSEN: (None,) * stages}
    for stage in range(stages):
        for name in F.CONV_FORMULATIONS:
            pins[f"conv{stage + 1} {name}"] = tuple(name if s == stage else None
                                                    for s in range(stages))
    return pins


def _runs(net, input_shape) -> bool:
    """Whether every pin of ``net`` can run its convolution: the layers' init refuses one that
    cannot (a ValueError), checked abstractly, before anything is computed or compiled."""
    try:
        jax.eval_shape(lambda key: net.init(key, input_shape)[1:], jax.random.key(0))
    except ValueError:
        return False
    return True


def runners(batch: int) -> dict[str, JaxRunner]:
    """A compiled step per variant whose pins can run (any other error is raised)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    built = {}
    for name, pins in variants(len(tta.RECIPE["widths"])).items():
        net = tta.net(formulations=pins)
        if _runs(net, x.shape):
            built[name] = JaxRunner(None, batch, "custom", x, y, net=net)
    return built


def section(timing: dict, batch: int, command: str, machine: str) -> str:
    base = timing[AS_CHOSEN]["median_ms"]
    rows = [[name, f"{t['median_ms']:.3f} ({t['min_ms']:.3f}-{t['max_ms']:.3f})",
             f"{t['median_ms'] / base:.2f}"] for name, t in timing.items()]
    lines = ["## conv2d's formulations in the race network's training step", "",
             f"Measured on: {machine}.", "",
             f"One AdamW step at batch {batch}, ms (median, min-max over alternating rounds); "
             "each row pins one convolution to one formulation, the other to conv2d's choice. "
             "The row that pins a convolution to the gates' own choice runs the same program as "
             "\"as chosen\": their difference is this machine's noise.",
             "", *_report.table(["variant", "ms / step", "/ as chosen"], rows), "",
             f"Reproduce: `{command}`."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=tta.RECIPE["batch_size"])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--report", default=_report.BENCHMARKS, help="'none' to skip")
    args = parser.parse_args(argv)
    timing = race(runners(args.batch), args.rounds)
    for name, t in timing.items():
        print(f"{name:16s} {t['median_ms']:7.3f} ms ({t['min_ms']:.3f}-{t['max_ms']:.3f})")
    if args.report != "none":
        text = section(timing, args.batch, _report.command("benchmarks.bench_formulations", argv),
                       machine_text(matmul_peak()))
        _report.write_section(args.report, "formulations", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What the two time-to-accuracy scripts (``experiments/time_to_accuracy.py`` and its PyTorch
twin ``benchmarks/time_to_accuracy_torch.py``) share: the recipe's command line, so both run
the same hyperparameters, and the record they print and write. Plain Python: importing it adds
nothing to either side's start-up time."""
from __future__ import annotations

import argparse
import json
import time

from experiments._machine import machine


def recipe_parser(description: str) -> argparse.ArgumentParser:
    """The flags both scripts take, with the recipe's defaults."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--target", type=float, default=0.99)
    parser.add_argument("--epochs", type=int, default=2, help="the schedule's length")
    parser.add_argument("--max-epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--peak-lr", type=float, default=3e-2)
    parser.add_argument("--eval-from", type=int, default=None,
                        help="first epoch to evaluate after (default: --epochs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir")
    parser.add_argument("--json")
    return parser


def first_evaluated_epoch(args) -> int:
    return args.epochs if args.eval_from is None else args.eval_from


class Record:
    """The evaluated epochs of one run, timed from ``start`` (the process's first statement)."""

    def __init__(self, start: float, target: float):
        self.start, self.target, self.history = start, target, []

    def epoch(self, epoch: int, accuracy: float) -> bool:
        """Record and print one evaluation; True once the target is reached."""
        self.history.append({"epoch": epoch, "test_accuracy": accuracy,
                             "seconds": time.perf_counter() - self.start})
        print(f"epoch {epoch}: test accuracy {accuracy:.4f} at "
              f"{self.history[-1]['seconds']:.1f} s", flush=True)
        return accuracy >= self.target

    def finish(self, json_path: str | None, **fields) -> int:
        """Print the summary, write the JSON (with ``fields``); the exit code (0: reached)."""
        reached = bool(self.history) and self.history[-1]["test_accuracy"] >= self.target
        seconds = self.history[-1]["seconds"] if self.history else None
        result = {**fields, **machine(), "target": self.target, "reached": reached,
                  "seconds": seconds, "history": self.history}
        print(f"{'reached' if reached else 'did NOT reach'} {self.target:.1%}"
              + (f" in {seconds:.1f} s from process start" if seconds is not None else ""))
        if json_path:
            with open(json_path, "w") as f:
                json.dump(result, f, indent=1)
        return 0 if reached else 1

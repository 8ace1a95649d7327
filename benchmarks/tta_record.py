"""What both time-to-accuracy scripts (``experiments/time_to_accuracy.py`` and its PyTorch twin
``benchmarks/time_to_accuracy_torch.py``) record, print and write. Plain Python: importing it
adds nothing to either side's start-up time."""
from __future__ import annotations

import json
import time


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
        result = {**fields, "target": self.target, "reached": reached, "seconds": seconds,
                  "history": self.history}
        print(f"{'reached' if reached else 'did NOT reach'} {self.target:.1%}"
              + (f" in {seconds:.1f} s from process start" if seconds is not None else ""))
        if json_path:
            with open(json_path, "w") as f:
                json.dump(result, f, indent=1)
        return 0 if reached else 1

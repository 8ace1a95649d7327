"""Audit every hand-written VJP against JAX autodiff, finite differences and PyTorch.

    python -m functional_cnn.audit [--json PATH] [--ops conv2d,max_pool2d,...]
                                   [--dtype float32|float64] [--repeats N] [--grid N]
                                   [--report PATH] [--chart PATH]

For every op and loss in ``fcn.functional.REGISTRY`` (and every network in
``functional_cnn.models``), over the op's default config, its edge cases and ``--grid`` more
configurations from its space, prints one row per case: the max abs and max relative error of
the custom VJP against autodiff, the error against float64 central finite differences and
against torch (when installed), and the jitted forward+backward time of both paths (median of
``--repeats`` alternating rounds, after compilation) with their ratio. Exits 1 when any error
exceeds its tolerance (``functional_cnn.verify.TOLERANCES``).

It writes nothing unless asked: ``--report docs/VJP_REPORT.md`` renders the markdown report,
``--chart docs/figures/vjp_speed.png`` the speed chart.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from . import audit_registry, load_torch, report
from .core import networks, op_names


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m functional_cnn.audit", description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    parser.add_argument("--ops", metavar="NAMES",
                        help="comma-separated op, loss or network names (default: all)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--repeats", type=int, default=9,
                        help="timing rounds per path (median); 0 skips timing")
    parser.add_argument("--grid", type=int, default=2,
                        help="grid configs per op beyond its default and edge cases")
    parser.add_argument("--seed", type=int, default=0, help="input seed of every case")
    parser.add_argument("--no-fd", action="store_true", help="skip finite differences")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch comparison")
    parser.add_argument("--report", metavar="PATH", help="write the markdown report there")
    parser.add_argument("--chart", metavar="PATH", help="write the speed chart (PNG) there")
    args = parser.parse_args(argv)
    ops, nets = op_names(), list(networks())
    if args.ops:
        wanted = [n.strip() for n in args.ops.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in ops and n not in nets]
        if unknown:
            parser.error(f"--ops: unknown {unknown}; choose from {ops + nets}")
        ops = [n for n in ops if n in wanted]
        nets = [n for n in nets if n in wanted]
    args.command = " ".join(["python -m functional_cnn.audit"] + list(
        sys.argv[1:] if argv is None else argv))
    return args, ops, nets


def progress_bar(total, stream):
    """A tqdm bar when tqdm is installed (it is not a dependency), else nothing."""
    try:
        from tqdm import tqdm
    except ImportError:
        return lambda _: None
    bar = tqdm(total=total, file=stream, unit="case", dynamic_ncols=True)

    def step(description):
        if not description.startswith("configs"):
            bar.update()
        bar.set_description(description[:70])
    return step


def write_json(records, path):
    with open(path, "w") as f:
        json.dump([r.to_json() for r in records], f, indent=1, default=str)
    print(f"wrote {path}")


def main(argv=None) -> int:
    args, ops, nets = parse_args(argv)
    start = time.perf_counter()
    records = audit_registry(ops, nets, args.dtype, args.repeats, args.grid, args.seed,
                             fd=not args.no_fd, torch=load_torch(not args.no_torch),
                             progress=progress_bar(None, sys.stderr))
    seconds = time.perf_counter() - start
    print(report.text_table(records))
    print()
    print(report.summary_text(records, seconds))
    if args.json:
        write_json(records, args.json)
    chart_path = report.chart(records, args.chart) if args.chart else None
    if args.report:
        report.write_report(records, args, seconds, args.report, chart_path)
        print(f"wrote {args.report}" + (f" and {chart_path}" if chart_path else ""))
    elif chart_path:
        print(f"wrote {chart_path}")
    return 0 if all(r.passed for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The audit's tables and its markdown report: a text table per case, the per-op summary, and
``--report PATH``, which renders each op's rule from the op's own docstring (the one place its
math is written) beside its cases; ``--chart PATH`` draws the speed ratios.
"""
from __future__ import annotations

import datetime
import inspect
import os
import platform
import re

import jax
import numpy as np

from .. import verify
from ..functional import REGISTRY


def _e(value, note=None):
    if value is None:
        return note or "-"
    return "inf" if not np.isfinite(value) else f"{value:.1e}"


def _ms(value):
    return "-" if value is None else f"{value:.3f}"


def _ratio(value):
    return "-" if value is None else f"{value:.2f}"


COLUMNS = ("op", "config", "abs err", "rel err", "fd err", "torch err", "custom ms",
           "autodiff ms", "auto/custom", "ok")


def row_cells(r) -> list[str]:
    fd_note = "skip" if r.fd_note and r.kind != "network" else None
    return [r.op, r.short, _e(r.max_abs_err), _e(r.max_rel_err),
            _e(r.fd_err, fd_note), _e(r.torch_err), _ms(r.custom_ms),
            _ms(r.autodiff_ms), _ratio(r.ratio),
            "ok" if r.passed else "FAIL: " + "; ".join(r.failures)]


def text_table(results) -> str:
    rows = [list(COLUMNS)] + [row_cells(r) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    lines = []
    for k, row in enumerate(rows):
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells + [row[-1]]))
        if k == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def md_table(results) -> str:
    head = "| " + " | ".join(COLUMNS[1:]) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) - 1)]
    for r in results:
        cells = row_cells(r)[1:]
        if r.fd_note and r.kind != "network":
            cells[3] = f"n/a ({r.fd_note.split(':')[0]})"
        lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- summary

def per_op_summary(results) -> list[dict]:
    out = []
    for op in dict.fromkeys(r.op for r in results):
        rs = [r for r in results if r.op == op]

        def worst(key):
            vals = [getattr(r, key) for r in rs if getattr(r, key) is not None]
            return max(vals) if vals else None

        ratios = [r.ratio for r in rs if r.ratio is not None]
        out.append(dict(op=op, kind=rs[0].kind, cases=len(rs),
                        failed=sum(not r.passed for r in rs),
                        rel=worst("max_rel_err"), fd=worst("fd_err"), torch=worst("torch_err"),
                        ratio=float(np.median(ratios)) if ratios else None,
                        ratio_min=min(ratios) if ratios else None,
                        ratio_max=max(ratios) if ratios else None,
                        custom_ms=float(np.median([r.custom_ms for r in rs
                                                   if r.custom_ms is not None] or [np.nan]))))
    return out


def summary_text(results, seconds) -> str:
    failed = [r for r in results if not r.passed]
    ops = [s for s in per_op_summary(results)]
    lines = [f"{len(results)} cases ({sum(r.kind != 'network' for r in results)} op/loss "
             f"cases, {sum(r.kind == 'network' for r in results)} networks) in "
             f"{seconds:.0f} s: " + ("all within tolerance" if not failed else
                                     f"{len(failed)} FAILED")]
    for key, label in (("max_rel_err", "custom vs autodiff"), ("fd_err", "vs finite differences"),
                       ("torch_err", "vs torch")):
        vals = [(getattr(r, key), r) for r in results if getattr(r, key) is not None]
        if vals:
            v, r = max(vals, key=lambda t: t[0])
            lines.append(f"  worst rel err {label}: {_e(v)} ({r.op}, {r.short})")
    lines.append("  autodiff/custom time, median per op: " + ", ".join(
        f"{s['op']} {_ratio(s['ratio'])}" for s in ops))
    for r in failed:
        lines.append(f"  FAIL {r.op} [{r.short}]: {'; '.join(r.failures)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- report

def rule_text(op: str) -> str:
    """The op's docstring as markdown: its semantics, its backward rule and its kinks."""
    doc = inspect.cleandoc(REGISTRY[op].doc) if op in REGISTRY else ""
    doc = re.sub(r"::\n\n((?:    .*\n?|\n)+)", lambda m: ":\n\n~~~\n"
                 + inspect.cleandoc(m.group(1)) + "\n~~~\n\n", doc)  # literal blocks
    return doc.replace("``", "`") or "(no docstring)"


def observations(results) -> list[str]:
    """Data-driven bullet points for the report's summary."""
    lines = []
    ops = [r for r in results if r.kind != "network"]
    summary = per_op_summary(results)
    exact = [s["op"] for s in summary if s["kind"] != "network" and s["rel"] == 0.0]
    if exact:
        lines.append(f"- Bitwise identical to autodiff on every case (max abs error 0): "
                     f"{', '.join(exact)}.")
    for key, label in (("max_rel_err", "against autodiff"), ("fd_err", "against float64 "
                       "finite differences"), ("torch_err", "against torch")):
        vals = [r for r in ops if getattr(r, key) is not None]
        if vals:
            r = max(vals, key=lambda r: getattr(r, key))
            lines.append(f"- Worst relative error {label}: {_e(getattr(r, key))} ({r.op}, "
                         f"{r.short}).")
    skipped = sum(r.fd_note is not None for r in ops)
    if skipped:
        lines.append(f"- {skipped} of {len(ops)} op cases have no finite-difference check "
                     "(kinks, ties, logits of 1e4; see below).")
    timed = [s for s in summary if s["ratio"] is not None]
    fast = [f"{s['op']} ({_ratio(s['ratio'])}x)" for s in timed if s["ratio"] >= 1.25]
    slow = [f"{s['op']} ({_ratio(s['ratio'])}x)" for s in timed if s["ratio"] <= 0.8]
    if timed:
        lines.append("- Median autodiff/custom time: the hand-written rule is clearly faster for "
                     + (", ".join(fast) or "no op") + "; clearly slower for "
                     + (", ".join(slow) or "no op")
                     + "; everything else is within the timing noise (0.8-1.25).")
    return lines


def chart(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = [s for s in per_op_summary(results) if s["ratio"] is not None]
    if not summary:
        return None
    summary = summary[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(summary) + 1.4), dpi=90)
    ys = np.arange(len(summary))
    colors = {"op": "tab:blue", "loss": "tab:orange", "network": "tab:green"}
    ax.barh(ys, [s["ratio"] for s in summary], color=[colors[s["kind"]] for s in summary],
            alpha=0.8)
    for y, s in zip(ys, summary):
        per_case = [r.ratio for r in results if r.op == s["op"] and r.ratio]
        ax.plot(per_case, [y] * len(per_case), "k|", markersize=8)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(ys, [s["op"] for s in summary], fontsize=8)
    ax.set_xlabel("autodiff time / custom time, jitted forward+backward (>1: custom faster)",
                  fontsize=8)
    ax.set_title("Median per op (bars), each case (ticks); blue op, orange loss, green network",
                 fontsize=8)
    lo = min(min(r.ratio for r in results if r.ratio), 0.5)
    hi = max(max(r.ratio for r in results if r.ratio), 2.0)
    ax.set_xlim(lo / 1.2, hi * 1.2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _report_summary(results, args, seconds, summary, rel_chart) -> list[str]:
    """The title, how the report was made, and the per-op summary table."""
    dtype = args.dtype
    failed = [r for r in results if not r.passed]
    cmd = args.command
    out = [
        "# Hand-written VJPs against JAX autodiff",
        "",
        f"Generated by `{cmd}` (dtype {dtype}, {args.repeats} timing rounds, the default config "
        f"and edge cases of every op plus {args.grid} more from its grid) on "
        f"{datetime.date.today().isoformat()}, {platform.machine()} CPU with "
        f"{os.cpu_count()} cores, jax {jax.__version__}; the run took {seconds:.0f} s. "
        "Re-run the command to regenerate this file.",
        "",
        "## Summary",
        "",
        f"{len(results)} cases: "
        + ("**all within tolerance**." if not failed else f"**{len(failed)} FAILED**."),
        "",
        *observations(results),
        "",
        "| op | kind | cases | worst rel err vs autodiff | worst fd err (float64) | "
        "worst torch err | autodiff/custom time, median (min-max) | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        rng = ("-" if s["ratio"] is None else
               f"{_ratio(s['ratio'])} ({_ratio(s['ratio_min'])}-{_ratio(s['ratio_max'])})")
        out.append(f"| [{s['op']}](#{s['op']}) | {s['kind']} | {s['cases']} | "
                   f"{_e(s['rel'])} | {_e(s['fd'], 'n/a')} | {_e(s['torch'], 'n/a')} | {rng} | "
                   f"{s['failed']} |")
    if rel_chart:
        out += ["", f"![autodiff/custom time per op]({rel_chart})"]
    return out


READING_GUIDE = [
    "## How to read the tables",
    "",
    "- **abs err**: the largest `|custom - autodiff|` over every element of every input "
    "gradient of the case. Both sides differentiate `sum(primary(output) * ct)` for the same "
    "fixed random cotangent `ct` (`audit.cases.cotangent`), inside one jitted "
    "forward+backward per path.",
    "- **rel err**: per gradient leaf, `max|custom - ref| / (max|ref| + floor)` with "
    "`floor = atol / rtol`, maximized over the leaves. Dividing by the leaf's largest "
    "magnitude (not elementwise) keeps it meaningful where single entries are ~0, and the "
    "floor keeps it meaningful where a whole leaf is zero up to rounding (a conv bias before "
    "BatchNorm, BatchNorm over two values per channel, dropout with p = 1). A leaf passes "
    "when `rel err <= rtol`, which is exactly `max|diff| <= atol + rtol * max|ref|`, the "
    "criterion of the test suite: both are `functional_cnn.verify`'s.",
    "- **fd err**: the custom rule in float64 against central differences "
    f"`(f(x + e) - f(x - e)) / 2e`, `e = {verify.FD_EPS:g}`, at up to {verify.FD_ENTRIES} "
    "sampled entries per input (the same positions as `audit.cases.finite_difference_grads`, "
    "evaluated in one vmapped call), elementwise: `max |exact - fd| / (|fd| + atol/rtol)`. "
    "It is computed in float64 even in a float32 run (the case is rebuilt in float64 with "
    "the same config and seed). **n/a** where differences say nothing: configs with exact "
    "zeros (relu/leaky_relu at their kink), tied maxima (max_pool2d's first-max convention is "
    "a choice, not a derivative), and logits scaled by 1e4 (a step of 1e-6 is far below the "
    "resolution of a number of size 1e4, and the loss is piecewise linear there anyway).",
    "- **torch err**: the same rel err against `torch.nn.functional` with the same inputs and "
    "cotangent (`audit.cases.torch_value_and_grads`); `-` without torch.",
    "- **custom ms / autodiff ms**: per call of the jitted forward+backward, median over the "
    "timing rounds, after compilation. Rounds alternate the order of the two paths, and each "
    "round repeats a call enough times to last 1 ms (whole networks get three times the "
    "rounds). **These timings are noisy**: they come "
    "from a shared 2-core machine with other jobs running, and for the tiny elementwise ops "
    "(a few µs) they measure dispatch overhead, not arithmetic: a ratio within ~0.8-1.25 "
    "is a tie. **auto/custom** is `autodiff ms / custom ms`: above 1 the hand-written rule "
    "is faster.",
]


def _report_tolerances(dtype) -> list[str]:
    """The tolerance table of ``dtype`` (``verify.TOLERANCES``, the tests' own)."""
    fd = verify.tolerance("fd")
    out = ["### Tolerances", "", "| comparison | rtol | atol | why |", "|---|---|---|---|"]
    for name, label in (("autodiff", "custom vs autodiff, ops"), ("torch", "custom vs torch"),
                        ("network", "custom vs autodiff, whole networks")):
        t = verify.tolerance(name, dtype)
        out.append(f"| {label} ({dtype}) | {t.rtol:g} | {t.atol:g} | {_md_escape(t.why)} |")
    out.append(f"| custom vs finite differences (float64, elementwise) | {fd.rtol:g} | "
               f"{fd.atol:g} | {_md_escape(fd.why)} |")
    return out + [
        "",
        "The test suite checks with the same table (`functional_cnn/verify.py: TOLERANCES`). "
        "`--dtype float64` checks custom vs autodiff at `1e-10` relative instead. The tool exits "
        "with status 1 when any comparison fails or a case raises.",
        "",
    ]


def _report_ops(results, summary) -> list[str]:
    """One section per op and per loss: its rule and its cases."""
    out = []
    for title, kind in (("Ops", "op"), ("Losses", "loss")):
        names = [s["op"] for s in summary if s["kind"] == kind]
        if not names:
            continue
        out += [f"## {title}", ""]
        for op in names:
            rs = [r for r in results if r.op == op]
            module = REGISTRY[op].module if op in REGISTRY else ""
            out += [f"### {op}", "", f"Rule in `{module}`, from its docstring:", "",
                    rule_text(op), "",
                    md_table(rs), ""]
    return out


def _report_networks(results, dtype) -> list[str]:
    """The whole networks: their table, then every parameter leaf of each."""
    nets = [r for r in results if r.kind == "network"]
    if not nets:
        return []
    ntol = verify.tolerance("network", dtype)
    out = ["## Whole networks", "",
           "Gradient of the mean cross-entropy of a training-mode forward pass (BatchNorm "
           "uses batch statistics) over every parameter leaf, custom rules vs autodiff of "
           "the same network, random MNIST-shaped input; time is one jitted training step "
           f"(forward + backward). Tolerance `{ntol.atol:g} + {ntol.rtol:g} max|ref|` per "
           "leaf.", "",
           md_table(nets), ""]
    for r in nets:
        out += [f"### {r.op}", "", "| parameter | max \\|grad\\| | abs err | rel err |",
                "|---|---|---|---|"]
        for leaf in r.leaves:
            note = " (zero up to rounding)" if leaf["scale"] < 1e-6 else ""
            out.append(f"| {leaf['name']} | {leaf['scale']:.2e}{note} | "
                       f"{_e(leaf['abs'])} | {_e(leaf['rel'])} |")
        out.append("")
    return out


def write_report(results, args, seconds, path, chart_path):
    summary = per_op_summary(results)
    rel_chart = os.path.relpath(chart_path, os.path.dirname(path)) if chart_path else None
    out = [*_report_summary(results, args, seconds, summary, rel_chart), "",
           *READING_GUIDE, "", *_report_tolerances(args.dtype),
           *_report_ops(results, summary), *_report_networks(results, args.dtype)]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(out).rstrip() + "\n")
    return path



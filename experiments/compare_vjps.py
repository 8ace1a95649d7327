"""Audit every hand-written VJP against JAX autodiff, finite differences and PyTorch.

    python -m experiments.compare_vjps [--json PATH] [--ops conv2d,max_pool2d,...]
                                       [--dtype float32|float64] [--repeats N] [--grid N]

For every op and loss in ``fcn.functional.REGISTRY`` (and every network in
``functional_cnn.models``), over the op's default config, its edge cases
(``testing.edge_cases``) and ``--grid`` more configurations from ``testing.grid``, prints one row
per case: the max abs and max relative error of the custom VJP against autodiff, the error
against float64 central finite differences and against torch, and the jitted forward+backward
time of both paths (median of ``--repeats`` alternating rounds, after compilation) with their
ratio. Exits 1 when any error exceeds its tolerance (``experiments/_vjp_audit.py: TOLERANCES``).

A full run (no ``--ops``) also writes ``docs/VJP_REPORT.md`` and ``docs/figures/vjp_speed.png``
(``--report``/``--chart`` to change, ``--report none`` to skip).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time
import warnings

import jax
import numpy as np
from tqdm import tqdm

from . import _vjp_audit as A
from functional_cnn.functional import REGISTRY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_REPORT = os.path.join(ROOT, "docs", "VJP_REPORT.md")
DEFAULT_CHART = os.path.join(ROOT, "docs", "figures", "vjp_speed.png")


# ----------------------------------------------------------------------------------- formatting

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
    fd_note = "skip" if r["fd_note"] and r["kind"] != "network" else None
    return [r["op"], r["short"], _e(r["max_abs_err"]), _e(r["max_rel_err"]),
            _e(r["fd_err"], fd_note), _e(r["torch_err"]), _ms(r["custom_ms"]),
            _ms(r["autodiff_ms"]), _ratio(r["ratio"]),
            "ok" if r["passed"] else "FAIL: " + "; ".join(r["failures"])]


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
        if r["fd_note"] and r["kind"] != "network":
            cells[3] = f"n/a ({r['fd_note'].split(':')[0]})"
        lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- summary

def per_op_summary(results) -> list[dict]:
    out = []
    for op in dict.fromkeys(r["op"] for r in results):
        rs = [r for r in results if r["op"] == op]

        def worst(key):
            vals = [r[key] for r in rs if r[key] is not None]
            return max(vals) if vals else None

        ratios = [r["ratio"] for r in rs if r["ratio"] is not None]
        out.append(dict(op=op, kind=rs[0]["kind"], cases=len(rs),
                        failed=sum(not r["passed"] for r in rs),
                        rel=worst("max_rel_err"), fd=worst("fd_err"), torch=worst("torch_err"),
                        ratio=float(np.median(ratios)) if ratios else None,
                        ratio_min=min(ratios) if ratios else None,
                        ratio_max=max(ratios) if ratios else None,
                        custom_ms=float(np.median([r["custom_ms"] for r in rs
                                                   if r["custom_ms"] is not None] or [np.nan]))))
    return out


def summary_text(results, seconds) -> str:
    failed = [r for r in results if not r["passed"]]
    ops = [s for s in per_op_summary(results)]
    lines = [f"{len(results)} cases ({sum(r['kind'] != 'network' for r in results)} op/loss "
             f"cases, {sum(r['kind'] == 'network' for r in results)} networks) in "
             f"{seconds:.0f} s: " + ("all within tolerance" if not failed else
                                     f"{len(failed)} FAILED")]
    for key, label in (("max_rel_err", "custom vs autodiff"), ("fd_err", "vs finite differences"),
                       ("torch_err", "vs torch")):
        vals = [(r[key], r) for r in results if r[key] is not None]
        if vals:
            v, r = max(vals, key=lambda t: t[0])
            lines.append(f"  worst rel err {label}: {_e(v)} ({r['op']}, {r['short']})")
    lines.append("  autodiff/custom time, median per op: " + ", ".join(
        f"{s['op']} {_ratio(s['ratio'])}" for s in ops))
    for r in failed:
        lines.append(f"  FAIL {r['op']} [{r['short']}]: {'; '.join(r['failures'])}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- report

RULES = {
    "linear": """`y = x Wᵀ + b` is bilinear: `∂y[m,o]/∂x[m,i] = W[o,i]` and `∂y[m,o]/∂W[o,i] = x[m,i]`
for every row `m` (all leading axes flattened). Contracting the cotangent `g` against these
Jacobians gives `dx = g W`, `dW = Σ_m g[m]ᵀ x[m]` (a sum over all rows) and `db = Σ_m g[m]`:
one `dot_general` each. Autodiff emits the same contractions, so the two paths usually agree
to the last bit.""",
    "conv2d": """`y` is linear in `x` and in `W` separately, so each gradient is the adjoint of a linear
map. Input position `p` of the padded input feeds every output `i` with `i s + a d = p`:
collecting those terms gives a *full* correlation of the cotangent, with `s - 1` zeros inserted
between its entries (the stride becomes input dilation), against the kernel rotated by 180°
with its in/out channel axes swapped inside each group, padded by `d (k - 1) - pad`. The
high-side padding is exact only if the forward's padded length reaches exactly the last
window; `_windows.py` computes that geometry once for conv and pooling, which is what makes
stride above kernel, `"same"`, dilation and odd sizes free of off-by-ones. For the weight,
`dW[o,c,a,b] = Σ_{n,i,j} g[n,o,i,j] xp[n,c,i s + a d, j s + b d]` is again a correlation: of
the input with the cotangent used as the kernel, where stride and dilation swap roles
(the cotangent is dilated by `s`, the window steps by `d`) and the batch becomes the
contracted axis; groups split it with `batch_group_count`. `db = Σ_{n,i,j} g`.""",
    "max_pool2d": """Each output is the maximum of its window, a piecewise-linear function: where the maximum is
unique, `∂y[i,j]/∂xp` is 1 at the argmax and 0 elsewhere, so the whole cotangent `g[i,j]` goes
to that one input, and overlapping windows add up. At ties the derivative does not exist and
the rule picks the *first* maximum in row-major window order, PyTorch's convention (ties are
the norm after ReLU). The forward saves only the winning offset `k*`; the backward masks `g`
with `k* == (a, b)` for each kernel offset and scatters it with one strided `lax.pad`
(interior padding `s - 1`, low padding `a d`), then crops the padding. Because the forward is
written as a gather of the same first argmax, autodiff routes ties identically, which is why
tie cases can be compared to autodiff and torch but not to finite differences. A window whose
inputs are all `-inf` sends its cotangent to its first element inside the input, never to the
`-inf` padding (PyTorch's choice), on both paths.""",
    "avg_pool2d": """A linear map: `y[i,j] = (1/N[i,j]) Σ_{a,b} xp[i s + a, j s + b]`, with `N[i,j]` the number of
window elements inside the padded input (`count_include_pad=True`) or inside the unpadded input
(`False`); a ceil-mode overhang past the padding never counts. Its adjoint hands every element of
a window the same share `g[i,j] / N[i,j]`: a sum over kernel offsets of the strided, shifted
`g / N`, then the padding is cropped. `N` depends only on the geometry, so it is a
compile-time constant and nothing is saved from the forward.""",
    "batch_norm": """In training each channel is normalized by its own batch mean `μ` and biased variance `σ²`,
both functions of every `x` of the channel (`M` elements). With `x̂ = (x - μ)/σ`,
`σ = sqrt(σ² + eps)` and `gx = g γ`, the chain rule has three paths: the direct one `gx / σ`,
through the mean `-Σ gx / (M σ)`, and through the variance (`∂σ²/∂x = 2 (x - μ) / M`, and
`Σ (x - μ) = 0` removes the mean's share) `-x̂ Σ (gx x̂) / (M σ)`. Together
`dx = (M gx - Σ gx - x̂ Σ gx x̂) / (M σ)`, `dγ = Σ g x̂`, `dβ = Σ g`. The result is orthogonal
to constant shifts and to `x̂` (`Σ dx = 0`, `Σ dx x̂ = 0`), which is why a conv bias in front of
BatchNorm gets a gradient of zero up to rounding, and why relative errors need an absolute
floor. The op also returns the batch mean and variance (for the running statistics); the rule
adds their cotangents through `∂μ/∂x = 1/M` and `∂σ²/∂x = 2 (x - μ) / M`, which are zero here
because only `y` is differentiated. In eval mode the statistics are inputs and the map is
affine in `x`: `dx = gx / σ`,
`dμ = -Σ dx`, `dσ² = -Σ gx x̂ / (2 (σ² + eps))`. The running statistics are updated outside
any gradient (unbiased variance, as PyTorch).""",
    "relu": """`y = max(x, 0)` has derivative 1 for `x > 0` and 0 for `x < 0`; at `x = 0` it has none, and the
rule takes 0 (PyTorch's choice): `dx = g [not x <= 0]`, saving only the mask. The forward is
written with `where(x <= 0, 0, x)`, not `maximum`, because autodiff of `maximum` splits a tie
and would give 1/2 at exact zeros (and a NaN passes through with its gradient, as in PyTorch).""",
    "leaky_relu": """Piecewise linear with slopes 1 and `negative_slope`: `dx = g` where `x > 0`, `slope g` elsewhere
(the slope at `x = 0`, as PyTorch). Only the mask is saved.""",
    "sigmoid": """`σ'(x) = σ(x)(1 - σ(x))`, so the rule saves the output `y = lax.logistic(x)` and computes
`dx = g y (1 - y)` with no `exp` recomputed. For inputs scaled to `|x| ~ 30`, `y` rounds to 1
in float32 on the positive side and `dx` to 0, where the true derivative is ~1e-13: an
absolute error far below the tolerance, and the same rounding autodiff sees.""",
    "tanh": """`tanh' = 1 - tanh²`, from the saved output: `dx = g (1 - y²)`.""",
    "softmax": """The Jacobian of `y = softmax(x)` is `diag(y) - y yᵀ`; contracting with `g` gives
`dx = y ⊙ (g - Σ g y)` along `dim`, O(n) instead of forming the n×n Jacobian. Shifting by
`max x` does not change `y`, so the shift has no gradient and the rule ignores it; with
logits of 1e4, `y` is a one-hot up to rounding and `dx` is exactly zero.""",
    "log_softmax": """`y = z - log Σ exp z` with `z = x - max x`; its Jacobian is `I - 1 softmax(x)ᵀ`, so
`dx = g - softmax(x) Σ g`, with `softmax(x) = exp(y)` recovered from the saved output.""",
    "dropout": """`y = x ⊙ m / (1 - p)` with a fixed Bernoulli keep-mask `m` drawn from the key: a diagonal linear
map, so its transpose is itself, `dx = g ⊙ m / (1 - p)` (the rule literally reapplies the
forward to `g`; the mask is saved, not redrawn, and gets no gradient). Eval mode, `p = 0` and
`p = 1` return `x` or zeros before the custom op is entered, so those edge cases check the
plumbing (identity and zero gradients), not the rule.""",
    "cross_entropy": """With target distribution `q = (1 - ε) onehot + ε/C` (label smoothing `ε`) and `Σ q = 1`,
`loss = -Σ_c q_c log softmax(x)_c = logsumexp(x) - Σ_c q_c x_c`, whose gradient is
`softmax(x) - q`. The reduction only rescales: `g / N` for mean (N counts all label
positions, extra dimensions included), `g` for sum, `g[n]` for none. The log-sum-exp is shifted
by the max, so logits of 1e4 give finite losses and exact one-hot-minus-target gradients.""",
    "binary_cross_entropy_with_logits": """Written stably as `|x| w + log1p(exp(-|x|))`,
with `w = 1 - t` for `x >= 0` and `t` below, whose derivative in `x` is `σ(x) - t` and in `t`
is `-x`, each scaled by the reduction's share of `g`. `|x|` is a `where` on `x >= 0`, so
autodiff at `x = 0` gives `1/2 - t` too (`max(x, 0)` and `abs` each pick a one-sided
derivative there: `-t`), and `w |x|` is 0 when `w` is, so `x = -inf, t = 0` has its exact
loss 0 (PyTorch: nan). Nothing overflows at logits of 1e4.""",
    "mse_loss": """`(p - t)²` has `dp = 2 (p - t) share(g)` and `dt = -dp`, with `share` undoing the reduction
(`g / N`, `g`, or `g` elementwise).""",
}


def rule_text(op: str) -> str:
    if op in RULES:
        return RULES[op]
    doc = REGISTRY[op].doc if op in REGISTRY else ""
    return "From the op's docstring (no prose written for it yet):\n\n```\n" + doc.strip() + "\n```"


def observations(results) -> list[str]:
    """Data-driven bullet points for the report's summary."""
    lines = []
    ops = [r for r in results if r["kind"] != "network"]
    summary = per_op_summary(results)
    exact = [s["op"] for s in summary if s["kind"] != "network" and s["rel"] == 0.0]
    if exact:
        lines.append(f"- Bitwise identical to autodiff on every case (max abs error 0): "
                     f"{', '.join(exact)}.")
    for key, label in (("max_rel_err", "against autodiff"), ("fd_err", "against float64 "
                       "finite differences"), ("torch_err", "against torch")):
        vals = [r for r in ops if r[key] is not None]
        if vals:
            r = max(vals, key=lambda r: r[key])
            lines.append(f"- Worst relative error {label}: {_e(r[key])} ({r['op']}, "
                         f"{r['short']}).")
    skipped = sum(r["fd_note"] is not None for r in ops)
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
        per_case = [r["ratio"] for r in results if r["op"] == s["op"] and r["ratio"]]
        ax.plot(per_case, [y] * len(per_case), "k|", markersize=8)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(ys, [s["op"] for s in summary], fontsize=8)
    ax.set_xlabel("autodiff time / custom time, jitted forward+backward (>1: custom faster)",
                  fontsize=8)
    ax.set_title("Median per op (bars), each case (ticks); blue op, orange loss, green network",
                 fontsize=8)
    lo = min(min(r["ratio"] for r in results if r["ratio"]), 0.5)
    hi = max(max(r["ratio"] for r in results if r["ratio"]), 2.0)
    ax.set_xlim(lo / 1.2, hi * 1.2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _report_summary(results, args, seconds, summary, rel_chart) -> list[str]:
    """The title, how the report was made, and the per-op summary table."""
    dtype = args.dtype
    failed = [r for r in results if not r["passed"]]
    cmd = "python -m experiments.compare_vjps" + ("" if dtype == "float32" else f" --dtype {dtype}")
    out = [
        "# Hand-written VJPs against JAX autodiff",
        "",
        f"Generated by `{cmd}` (dtype {dtype}, {args.repeats} timing rounds, the default config "
        f"and edge cases of every op plus {args.grid} more from its grid) on "
        f"{datetime.date.today().isoformat()}, {platform.machine()} CPU with "
        f"{os.cpu_count()} cores, jax {jax.__version__}; the run took {seconds:.0f} s. "
        "Re-run the command to regenerate this file and the chart.",
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
    "fixed random cotangent `ct` (`testing.cotangent`), inside one jitted "
    "forward+backward per path.",
    "- **rel err**: per gradient leaf, `max|custom - ref| / (max|ref| + floor)` with "
    "`floor = atol / rtol`, maximized over the leaves. Dividing by the leaf's largest "
    "magnitude (not elementwise) keeps it meaningful where single entries are ~0, and the "
    "floor keeps it meaningful where a whole leaf is zero up to rounding (a conv bias before "
    "BatchNorm, BatchNorm over two values per channel, dropout with p = 1). A leaf passes "
    "when `rel err <= rtol`, which is exactly `max|diff| <= atol + rtol * max|ref|`, the "
    "criterion of the test suite (`tests/conftest.py: assert_close`).",
    "- **fd err**: the custom rule in float64 against central differences "
    f"`(f(x + e) - f(x - e)) / 2e`, `e = {A.FD_EPS:g}`, at up to {A.FD_ENTRIES} "
    "sampled entries per input (the same positions as `testing.finite_difference_grads`, "
    "evaluated in one vmapped call), elementwise: `max |exact - fd| / (|fd| + atol/rtol)`. "
    "It is computed in float64 even in a float32 run (the case is rebuilt in float64 with "
    "the same config and seed). **n/a** where differences say nothing: configs with exact "
    "zeros (relu/leaky_relu at their kink), tied maxima (max_pool2d's first-max convention is "
    "a choice, not a derivative), and logits scaled by 1e4 (a step of 1e-6 is far below the "
    "resolution of a number of size 1e4, and the loss is piecewise linear there anyway).",
    "- **torch err**: the same rel err against `torch.nn.functional` with the same inputs and "
    "cotangent (`testing.torch_value_and_grads`); `-` without torch.",
    "- **custom ms / autodiff ms**: per call of the jitted forward+backward, median over the "
    "timing rounds, after compilation. Rounds alternate the order of the two paths, and each "
    "round repeats a call enough times to last 1 ms (whole networks get three times the rounds). **These timings are noisy**: they come "
    "from a shared 2-core machine with other jobs running, and for the tiny elementwise ops "
    "(a few µs) they measure dispatch overhead, not arithmetic: a ratio within ~0.8-1.25 "
    "is a tie. **auto/custom** is `autodiff ms / custom ms`: above 1 the hand-written rule "
    "is faster.",
]


def _report_tolerances(dtype) -> list[str]:
    """The tolerance table of ``dtype`` and how it compares with the test suite's."""
    tol, fd = A.TOLERANCES[dtype], A.verify.tolerance("fd")
    out = ["### Tolerances", "", "| comparison | rtol | atol | why |", "|---|---|---|---|"]
    for name, label in (("autodiff", "custom vs autodiff, ops"), ("torch", "custom vs torch"),
                        ("network", "custom vs autodiff, whole networks")):
        t = tol[name]
        out.append(f"| {label} ({dtype}) | {t.rtol:g} | {t.atol:g} | {_md_escape(t.why)} |")
    out.append(f"| custom vs finite differences (float64, elementwise) | {fd.rtol:g} | "
               f"{fd.atol:g} | {_md_escape(fd.why)} |")
    return out + [
        "",
        "None is looser than the test suite's (custom vs autodiff `1e-5 + 1e-5 max|ref|`, vs "
        "torch `1e-5 + 1e-4 max|ref|`, finite differences `rtol 1e-6, atol 1e-7` in float64). "
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
            rs = [r for r in results if r["op"] == op]
            module = REGISTRY[op].module if op in REGISTRY else ""
            out += [f"### {op}", "", f"Rule in `{module}`. " + rule_text(op), "",
                    md_table(rs), ""]
    return out


def _report_networks(results, dtype) -> list[str]:
    """The whole networks: their table, then every parameter leaf of each."""
    nets = [r for r in results if r["kind"] == "network"]
    if not nets:
        return []
    ntol = A.TOLERANCES[dtype]["network"]
    out = ["## Whole networks", "",
           "Gradient of the mean cross-entropy of a training-mode forward pass (BatchNorm "
           "uses batch statistics) over every parameter leaf, custom rules vs autodiff of "
           "the same network, random MNIST-shaped input; time is one jitted training step "
           f"(forward + backward). Tolerance `{ntol.atol:g} + {ntol.rtol:g} max|ref|` per "
           "leaf.", "",
           md_table(nets), ""]
    for r in nets:
        out += [f"### {r['op']}", "", "| parameter | max \\|grad\\| | abs err | rel err |",
                "|---|---|---|---|"]
        for leaf in r["leaves"]:
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
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(out).rstrip() + "\n")
    return path


# ----------------------------------------------------------------------------------- main

def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.compare_vjps", description=__doc__.splitlines()[0])
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
    parser.add_argument("--report", metavar="PATH|none",
                        help="markdown report (default: docs/VJP_REPORT.md for a full run)")
    parser.add_argument("--chart", metavar="PATH|none",
                        help="PNG chart (default: docs/figures/vjp_speed.png with the report)")
    args = parser.parse_args(argv)
    ops, nets = A.op_names(), list(A.networks())
    if args.ops:
        wanted = [n.strip() for n in args.ops.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in ops and n not in nets]
        if unknown:
            parser.error(f"--ops: unknown {unknown}; choose from {ops + nets}")
        ops = [n for n in ops if n in wanted]
        nets = [n for n in nets if n in wanted]
    full = not args.ops
    if args.report is None:
        args.report = DEFAULT_REPORT if full else None
    elif args.report.lower() == "none":
        args.report = None
    if args.chart is None:
        args.chart = (DEFAULT_CHART if args.report == DEFAULT_REPORT else
                      (os.path.splitext(args.report)[0] + "_speed.png" if args.report else None))
    elif args.chart.lower() == "none":
        args.chart = None
    return args, ops, nets


def load_torch(disabled):
    if disabled:
        return None
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    return torch


def run(args, ops, nets, stream=sys.stderr):
    torch = load_torch(args.no_torch)
    results = []
    x64 = jax.enable_x64(True) if args.dtype == "float64" else contextlib.nullcontext()
    with x64, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "same"-padding notice
        with tqdm(total=len(ops) + len(nets), file=stream, unit="op", desc="configs",
                  dynamic_ncols=True) as bar:
            plan = []
            for op in ops:
                bar.set_description(f"configs {op}")
                plan += [(op, c) for c in A.configs(op, args.grid, np.dtype(args.dtype))]
                bar.update()
            bar.reset(total=len(plan) + len(nets))
            for op, config in plan:
                bar.set_description(f"{op} [{A.short_config(op, config)}]"[:70])
                try:
                    results.append(A.audit_case(op, config, args.dtype, args.repeats, torch=torch,
                                                fd=not args.no_fd, seed=args.seed))
                except Exception as exc:  # a case that raises is a failure, and reported
                    results.append(A.error_result(op, config, args.dtype, exc))
                bar.update()
            for name in nets:
                bar.set_description(f"network {name}")
                try:
                    results.append(A.audit_network(name, args.dtype, args.repeats,
                                                   seed=args.seed))
                except Exception as exc:
                    results.append(A.error_result(name, {}, args.dtype, exc, kind="network"))
                bar.update()
    return results


def main(argv=None) -> int:
    args, ops, nets = parse_args(argv)
    start = time.perf_counter()
    results = run(args, ops, nets)
    seconds = time.perf_counter() - start
    print(text_table(results))
    print()
    print(summary_text(results, seconds))
    if args.json:
        keep = ("kind", "op", "config", "dtype", "max_abs_err", "max_rel_err", "fd_err",
                "fd_abs_err", "fd_note", "torch_err", "custom_ms", "autodiff_ms", "ratio",
                "passed", "failures", "leaves")
        records = [{k: A.jsonable(r[k]) for k in keep} for r in results]
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1, default=str)
        print(f"wrote {args.json}")
    if args.report:
        chart_path = chart(results, args.chart) if args.chart else None
        write_report(results, args, seconds, args.report, chart_path)
        print(f"wrote {args.report}" + (f" and {chart_path}" if chart_path else ""))
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

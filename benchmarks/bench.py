"""Benchmark one AdamW training step: hand-written VJPs vs JAX autodiff vs PyTorch eager.

    python -m benchmarks.bench [--models lenet,mytorch_net,mlp] [--batch 64,256,1024]
                                [--rounds 9] [--json PATH] [--report docs/BENCHMARKS.md]

For every model and batch size, implementations of the same step (same network, same weights,
cross-entropy, AdamW with torch's defaults: this library's two gradient paths, plain JAX, and
PyTorch eager as written and with care, :data:`TORCH_VARIANTS`) run in one process, in
alternating rounds, so that load on the machine hits them all alike; each round times several
steps, and the table gives the median over rounds with the spread (min-max). Each step row also
gets its textbook FLOPs (``benchmarks/_flops.py``: convolutions and matrix products, forward and
the gradients the backward computes) and the GFLOP/s that custom and torch achieve, as a
fraction of the machine's matmul peak (``benchmarks/_peak.py``: a 2048x2048 float32 matmul in
JAX and torch, measured once per run and stated with the CPU model). The custom step also runs,
in the same rounds, inside a scanned epoch of 16 batches, as the library's trainer runs it.
Also: compile time of each jitted step, XLA's temporary memory for it, per-op forward+backward
times at the networks' layer shapes, and (with the MNIST files present) one full LeNet training
epoch through the engine.

The tables go into ``--report`` between the markers ``<!-- bench:begin -->`` and
``<!-- bench:end -->`` (other sections of that file are left alone), with a PNG chart beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np
import optax
from jax import numpy as jnp
from tqdm import tqdm

import functional_cnn as fcn
import functional_cnn.functional as F
from functional_cnn import data, train
from experiments._machine import cpu_model
from benchmarks._flops import model_step_flops
from benchmarks._peak import machine_text, matmul_peak
from benchmarks import _report
from benchmarks._report import BENCHMARKS, command, write_section
from functional_cnn.audit.timing import calls, race

# this library's two gradient paths, and the straightforward network in plain JAX (autodiff)
IMPLEMENTATIONS = ("custom", "autodiff", "plain")
SCANNED = "custom_scanned"  # the custom step inside a scanned epoch, as the trainer runs it


# --------------------------------------------------------------------------- the three steps

def adamw_step(apply, loss_fn):
    """``(step, optimizer)``: an AdamW step of ``apply(params, state, x) -> (logits, state)``,
    ``step(params, state, opt_state, x, y) -> (params, state, opt_state, loss)``."""
    optimizer = train.adamw()

    def step(params, state, opt_state, x, y):
        def loss(p):
            logits, new_state = apply(p, state, x)
            return loss_fn(logits, y), new_state

        (value, new_state), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state, opt_state, value

    return step, optimizer


def jax_step(apply, loss_fn):
    """:func:`adamw_step`, jitted and donating its buffers: one program call per step."""
    step, optimizer = adamw_step(apply, loss_fn)
    return jax.jit(step, donate_argnums=(0, 1, 2)), optimizer


def implementation(model, impl):
    """``(apply, loss)`` of ``model`` as this library (``impl`` a vjp mode) or plain JAX."""
    if impl == "plain":
        from benchmarks import plain_jax
        return plain_jax.APPLY[model], plain_jax.loss
    net = getattr(fcn.models, model)()
    return (lambda p, s, x: net.apply(p, s, x, train=True, vjp=impl),
            lambda logits, y: fcn.cross_entropy(logits, y, vjp=impl))


def _initial(model: str, batch: int):
    """``(params, state)`` of an article network by name, for MNIST batches of ``batch``."""
    return getattr(fcn.models, model)().init(jax.random.key(0), (batch, 1, 28, 28))[1:]


def _compiled(jitted, *args):
    """``(executable, compile seconds, XLA's temporary MB or None)`` of ``jitted`` for
    ``args``."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    return compiled, seconds, None if memory is None else memory.temp_size_in_bytes / 2**20


class JaxRunner:
    """One compiled step of an article network by name (``impl`` a vjp mode or ``"plain"``)."""

    def __init__(self, model, batch, impl, x, y):
        self.params, self.state = _initial(model, batch)
        step, optimizer = jax_step(*implementation(model, impl))
        self.opt_state = optimizer.init(self.params)
        self.x, self.y = jnp.asarray(x), jnp.asarray(y)
        self.step, self.compile_s, self.temp_mb = _compiled(
            step, self.params, self.state, self.opt_state, self.x, self.y)

    def __call__(self, n):
        for _ in range(n):
            self.params, self.state, self.opt_state, loss = self.step(
                self.params, self.state, self.opt_state, self.x, self.y)
        jax.block_until_ready(loss)


class ScannedRunner:
    """The custom step as the library's trainer runs it (``make_trainer``'s default): inside
    one ``lax.scan`` over ``steps_per_call`` batches, each a different draw (the same batch
    every step would let XLA hoist its input's work out of the loop). A call is that many
    steps: :func:`bench_step` divides its times by them."""

    def __init__(self, model, batch, rng, steps_per_call=16):
        params, state = _initial(model, batch)
        step, optimizer = adamw_step(*implementation(model, "custom"))
        xs = jnp.asarray(rng.standard_normal((steps_per_call, batch, 1, 28, 28)), jnp.float32)
        ys = jnp.asarray(rng.integers(0, 10, (steps_per_call, batch)), jnp.int32)

        def epoch(carry, xs, ys):
            def body(carry, xy):
                *carry, loss = step(*carry, *xy)
                return tuple(carry), loss
            return jax.lax.scan(body, carry, (xs, ys))

        self.steps_per_call, self.xs, self.ys = steps_per_call, xs, ys
        self.carry = (params, state, optimizer.init(params))
        self.epoch, self.compile_s, self.temp_mb = _compiled(
            jax.jit(epoch, donate_argnums=0), self.carry, xs, ys)

    def __call__(self, n):
        for _ in range(n):
            self.carry, losses = self.epoch(self.carry, self.xs, self.ys)
        jax.block_until_ready(losses)


# torch eager as its twins run by default, and written with care: activations and weights
# channels-last and AdamW's fused kernel, the same arithmetic in other kernels. With care,
# article 001's Net stepped in 0.46-0.60 of the default's time, LeNet in 0.63-0.70 and the MLP
# in 0.73-0.86, at batches 64-256 (AMD EPYC, session 19, three runs): the targets' bar is the
# faster of the two (:func:`fastest_torch`).
TORCH_VARIANTS = {"torch": False, "torch_careful": True}
TORCH_LABELS = {"torch": "torch eager",
                "torch_careful": "torch eager, channels-last, fused AdamW"}


class TorchRunner:
    """One eager step of an article network's torch twin; ``careful``: channels-last
    activations and weights and ``AdamW(fused=True)`` (:data:`TORCH_VARIANTS`)."""

    def __init__(self, torch, model, x, y, careful=False):
        from benchmarks.torch_twins import TWINS
        self.torch = torch
        self.net = TWINS[model](torch.nn)
        layout = torch.channels_last if careful else torch.contiguous_format
        self.net = self.net.to(memory_format=layout)
        self.opt = torch.optim.AdamW(self.net.parameters(), 1e-3, weight_decay=1e-2,
                                     fused=careful or None)
        self.x = torch.as_tensor(np.array(x)).contiguous(memory_format=layout)
        self.y = torch.as_tensor(np.array(y)).long()
        self.compile_s, self.temp_mb = None, None

    def __call__(self, n):
        F_ = self.torch.nn.functional
        for _ in range(n):
            self.opt.zero_grad(set_to_none=True)
            F_.cross_entropy(self.net(self.x), self.y).backward()
            self.opt.step()


def bench_step(model, batch, rounds, torch, peak_gflop_s):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    runners = {impl: JaxRunner(model, batch, impl, x, y) for impl in IMPLEMENTATIONS}
    runners[SCANNED] = ScannedRunner(model, batch, rng)
    if torch is not None:
        runners.update({name: TorchRunner(torch, model, x, y, careful)
                        for name, careful in TORCH_VARIANTS.items()})
    timing = race(runners, rounds)
    steps = runners[SCANNED].steps_per_call
    timing[SCANNED] = {k: v / steps if k.endswith("_ms") else v  # ms a call -> ms a step
                       for k, v in timing[SCANNED].items()}
    gflop = model_step_flops(model, batch)["step"] / 1e9
    record = {"model": model, "batch": batch, "gflop_per_step": gflop, "scanned_steps": steps}
    for name, t in timing.items():
        record[name] = {**t, "images_per_s": batch / t["median_ms"] * 1e3,
                        "gflop_per_s": gflop / t["median_ms"] * 1e3,
                        "peak_fraction": gflop / t["median_ms"] * 1e3 / peak_gflop_s,
                        "compile_s": runners[name].compile_s, "temp_mb": runners[name].temp_mb}
    return record


# --------------------------------------------------------------------------- per-op times

def layer_cases(batch):
    """``(name, fn(x, *params, vjp), shapes)`` for the article networks' conv/pool/dense layers."""
    return [
        ("lenet conv1 1->10 k5", lambda x, w, b, vjp: F.conv2d(x, w, b, vjp=vjp),
         [(batch, 1, 28, 28), (10, 1, 5, 5), (10,)]),
        ("lenet conv2 10->20 k5", lambda x, w, b, vjp: F.conv2d(x, w, b, vjp=vjp),
         [(batch, 10, 12, 12), (20, 10, 5, 5), (20,)]),
        ("lenet maxpool 2", lambda x, vjp: F.max_pool2d(x, 2, vjp=vjp), [(batch, 10, 24, 24)]),
        ("net001 conv1 1->32 k3 s2", lambda x, w, b, vjp: F.conv2d(x, w, b, 2, 1, vjp=vjp),
         [(batch, 1, 28, 28), (32, 1, 3, 3), (32,)]),
        ("net001 maxpool 3 s2", lambda x, vjp: F.max_pool2d(x, 3, 2, vjp=vjp),
         [(batch, 32, 14, 14)]),
        ("net001 conv2 32->64 k3 s2", lambda x, w, b, vjp: F.conv2d(x, w, b, 2, 1, vjp=vjp),
         [(batch, 32, 6, 6), (64, 32, 3, 3), (64,)]),
        ("net001 batchnorm 64", lambda x, w, b, vjp: F.batch_norm(
            x, None, None, w, b, training=True, vjp=vjp)[0], [(batch, 64, 3, 3), (64,), (64,)]),
        ("mlp linear 784->512", lambda x, w, b, vjp: F.linear(x, w, b, vjp=vjp),
         [(batch, 784), (512, 784), (512,)]),
    ]


def bench_ops(batch, rounds):
    records = []
    for name, fn, shapes in layer_cases(batch):
        keys = jax.random.split(jax.random.key(0), len(shapes))
        args = [jax.random.normal(k, s) for k, s in zip(keys, shapes)]
        runners = {}
        for vjp in fcn.VJP_MODES:
            grad = jax.jit(jax.grad(lambda *a, vjp=vjp: jnp.sum(fn(*a, vjp=vjp) ** 2),
                                    argnums=tuple(range(len(args)))))
            runners[vjp] = calls(grad, *args)
        timing = race(runners, rounds, target_s=0.05)
        records.append({"op": name, "batch": batch,
                        **{f"{v}_ms": timing[v]["median_ms"] for v in fcn.VJP_MODES}})
    return records


# --------------------------------------------------------------------------- one MNIST epoch

def bench_epoch(vjp, scan, train_set):
    trainer = train.make_trainer(fcn.models.lenet(), batch_size=64, vjp=vjp, scan=scan,
                                 preprocess=lambda u8: data.normalize(u8, 0.1307, 0.3081))
    ts = trainer.init(jax.random.key(0), (-1, 1, 28, 28))
    start = time.perf_counter()
    ts, metrics = trainer.epoch(ts, train_set.images, train_set.labels)
    jax.block_until_ready(ts)
    return {"vjp": vjp, "scan": scan, "seconds_incl_compile": time.perf_counter() - start}


def _mnist_train():
    """The MNIST training set, or None (the epoch rows are skipped) when it is not there."""
    try:
        return data.load("MNIST", "train")
    except (data.DataFileError, data.CorruptDataError):
        return None


# --------------------------------------------------------------------------- report

def _versions(torch):
    import jaxlib
    return {"python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "optax": optax.__version__,
            "torch": None if torch is None else torch.__version__,
            "torch_threads": None if torch is None else torch.get_num_threads(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {jax.devices()[0].platform}",
            "cpu_model": cpu_model()}


def _fmt(t):
    return f"{t['median_ms']:.2f} ({t['min_ms']:.2f}-{t['max_ms']:.2f})"


def fastest_torch(record):
    """The faster of the torch variants timed in a step ``record`` (the targets' bar), or
    None without torch."""
    timed = [record[name] for name in TORCH_VARIANTS if record.get(name)]
    return min(timed, key=lambda t: t["median_ms"], default=None)


def _over(t, c):
    """``t``'s median over ``c``'s as ``1.23x``, or n/a without ``t``."""
    return f"{t['median_ms'] / c['median_ms']:.2f}x" if t else "n/a"


def _step_table(steps):
    rows = []
    for r in steps:
        c = r["custom"]
        cells = [r["model"], r["batch"]] + [_fmt(r[n]) for n in IMPLEMENTATIONS]
        cells += [_fmt(r[n]) if r.get(n) else "n/a" for n in TORCH_VARIANTS]
        cells += [_over(fastest_torch(r), c)] + [_over(r.get(n), c)
                                                  for n in ("torch", "autodiff", "plain")]
        cells.append(", ".join(f"{r[n]['compile_s']:.2f}" for n in IMPLEMENTATIONS))
        cells.append(", ".join(f"{r[n]['temp_mb']:.1f}" for n in IMPLEMENTATIONS))
        rows.append(cells)
    header = (["model", "batch", "custom", "autodiff", "plain JAX"]
              + [TORCH_LABELS[n] for n in TORCH_VARIANTS]
              + ["faster torch / custom", "torch eager / custom", "autodiff / custom",
                 "plain / custom", "compile s (custom, autodiff, plain)",
                 "XLA temp MB (custom, autodiff, plain)"])
    return (["### One AdamW training step (ms per step: median over alternating rounds, "
             "min-max in brackets)", ""] + _report.table(header, rows)
            + ["", "Ratios above 1 mean the hand-written rules are faster. The targets' bar is "
               "the faster torch: its twin run as written (`torch eager`) or with its "
               "activations and weights channels-last and AdamW's fused kernel."])


def _scanned_table(steps):
    rows = []
    for r in steps:
        c, s, t = r["custom"], r[SCANNED], fastest_torch(r)
        rows.append([r["model"], r["batch"], _fmt(c), _fmt(s), _fmt(t) if t else "n/a",
                     _over(t, s), _over(c, s)])
    header = ["model", "batch", "custom, a call a step", "custom, scanned", "faster torch",
              "faster torch / scanned", "a call a step / scanned"]
    calls = sorted({r["scanned_steps"] for r in steps})
    return (["### The custom step inside a scanned epoch (ms per step)", "",
             "The step inside one `lax.scan` over "
             f"{' or '.join(map(str, calls))} different batches a call, in the same rounds as "
             "the table above, as the library's trainer runs an epoch by default (which also "
             "slices and normalizes each batch in the program); its min-max are of "
             "averages over a call's steps. The targets compare the step called once a step, "
             "as torch's is. Ratios above 1 mean the scanned step is faster."]
            + [""] + _report.table(header, rows))


def _rate(record):
    """``12.3 (10%)``: GFLOP/s at the median step time and its share of the matmul peak."""
    if not record:
        return "n/a"
    return f"{record['gflop_per_s']:.1f} ({record['peak_fraction']:.0%})"


def twice_torch_needs(record, peak_gflop_s):
    """``246.0 (125%)``: the GFLOP/s a step must reach to take half the median time of the
    faster torch (the 2x target, as the step table's ratios compare), and that rate's share of
    the matmul peak. Above 100% no formulation of these products meets the target on this
    machine, before a single elementwise op; n/a without torch."""
    torch = fastest_torch(record)
    if torch is None:
        return "n/a"
    needed = record["gflop_per_step"] / (torch["median_ms"] / 2) * 1e3
    return f"{needed:.1f} ({needed / peak_gflop_s:.0%})"


def _throughput_table(steps, peak_gflop_s):
    rows = [[r["model"], r["batch"], f"{r['gflop_per_step']:.3f}", _rate(r["custom"])]
            + [_rate(r.get(n)) for n in TORCH_VARIANTS] + [twice_torch_needs(r, peak_gflop_s)]
            for r in steps]
    header = (["model", "batch", "GFLOP / step", "custom GFLOP/s"]
              + [f"{TORCH_LABELS[n]} GFLOP/s" for n in TORCH_VARIANTS]
              + ["2x the faster torch needs GFLOP/s"])
    return (["### Throughput (textbook GFLOP per step; GFLOP/s at the median step time, "
             "% of the matmul peak in brackets)", ""] + _report.table(header, rows)
            + ["", "FLOPs per step: `2 x` the multiply-adds of every convolution and "
               "matrix product in the forward, again for each weight gradient and for each "
               "input gradient except the first layer's (`benchmarks/_flops.py`, counted on "
               "the plain-JAX twin); elementwise ops, pooling, BatchNorm, the loss and the "
               "optimizer are not counted. The last column is what the 2x target asks: "
               "these FLOPs in half the faster torch's median time; above 100% of the peak "
               "it cannot be met on this machine."])


def _op_table(ops):
    rows = [[r["op"], r["batch"], f"{r['custom_ms']:.3f}", f"{r['autodiff_ms']:.3f}",
             f"{r['autodiff_ms'] / r['custom_ms']:.2f}x"] for r in ops]
    return (["### Forward + backward per op at the networks' layer shapes (ms, median)", ""]
            + _report.table(["op", "batch", "custom", "autodiff", "autodiff / custom"], rows))


def _epoch_table(epochs):
    if not epochs:
        return []
    rows = [[r["vjp"], "one lax.scan" if r["scan"] else "a call per step",
             f"{r['seconds_incl_compile']:.1f}"] for r in epochs]
    return (["### One full MNIST epoch of LeNet (batch 64, 938 steps, compile included)", ""]
            + _report.table(["vjp", "epoch as", "seconds"], rows))


def markdown(result, command):
    lines = ["## One training step (`benchmarks.bench`)", "",
             f"Measured on: {result['machine']}.", "", f"Generated by `{command}`.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()), ""]
    for table in (_step_table(result["steps"]), _scanned_table(result["steps"]),
                  _throughput_table(result["steps"], result["matmul_peak"]["peak_gflop_s"]),
                  _op_table(result["ops"]), _epoch_table(result["epochs"])):
        if table:  # no epoch table without the MNIST files
            lines += table + [""]
    return "\n".join(lines + ["![step time](figures/bench_steps.png)", ""])


def chart(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = result["steps"]
    labels = [f"{r['model']}\nB{r['batch']}" for r in steps]
    names = [n for n in IMPLEMENTATIONS + tuple(TORCH_VARIANTS) if n in steps[0]]
    fig, ax = plt.subplots(figsize=(1.6 * len(steps) + 2, 3.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar(np.arange(len(steps)) + i * width,
               [r[name]["images_per_s"] for r in steps], width, label=name)
    ax.set_xticks(np.arange(len(steps)) + width * (len(names) - 1) / 2, labels)
    ax.set_ylabel("images / s (higher is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet,mytorch_net,mlp")
    parser.add_argument("--batch", default="64,256,1024")
    parser.add_argument("--op-batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-epoch", action="store_true")
    parser.add_argument("--peak-n", type=int, default=2048,
                        help="size of the float32 matmul that measures the machine's peak")
    parser.add_argument("--json")
    parser.add_argument("--report", default=BENCHMARKS, help="'none' to skip")
    args = parser.parse_args(argv)
    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            torch = None
    models = [m for m in args.models.split(",") if m]
    batches = [int(b) for b in args.batch.split(",") if b]
    peak = matmul_peak(torch, args.peak_n)
    result = {"machine": machine_text(peak), "matmul_peak": peak, "versions": _versions(torch),
              "steps": [], "ops": [], "epochs": []}
    print(f"Measured on: {result['machine']}")
    jobs = [(m, b) for m in models for b in batches]
    for model, batch in tqdm(jobs, desc="training steps", file=__import__("sys").stderr):
        result["steps"].append(bench_step(model, batch, args.rounds, torch,
                                          peak["peak_gflop_s"]))
    result["ops"] = bench_ops(args.op_batch, args.rounds)
    train_set = None if args.no_epoch else _mnist_train()
    if train_set is not None:
        for vjp, scan in (("custom", True), ("custom", False), ("autodiff", False)):
            result["epochs"].append(bench_epoch(vjp, scan, train_set))
    for r in result["steps"]:
        line = f"{r['model']:<12} B{r['batch']:<5} {r['gflop_per_step']:.3f} GFLOP" + "".join(
            f"  {n} {r[n]['median_ms']:8.2f} ms ({r[n]['gflop_per_s']:.1f} GFLOP/s)"
            for n in IMPLEMENTATIONS + (SCANNED, *TORCH_VARIANTS) if n in r)
        print(line)
    for r in result["ops"]:
        print(f"{r['op']:<28} custom {r['custom_ms']:.3f} ms  autodiff {r['autodiff_ms']:.3f} ms")
    for r in result["epochs"]:
        print(f"lenet epoch vjp={r['vjp']} scan={r['scan']}: {r['seconds_incl_compile']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.report != "none":
        figures = os.path.join(os.path.dirname(args.report), "figures")
        os.makedirs(figures, exist_ok=True)
        chart(result, os.path.join(figures, "bench_steps.png"))
        write_section(args.report, "bench", markdown(result, command("benchmarks.bench", argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

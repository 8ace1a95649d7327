"""One-epoch smoke runs of every experiment on a few images of the shared MNIST, and the CLI."""
import importlib
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from functional_cnn import data, dataparallel, tuning
from tests.conftest import needs_mnist

ROOT = pathlib.Path(__file__).resolve().parents[1]

SMOKE = {  # experiment -> train range (conv3x3 is batch size 1: keep it short)
    "conv3x3": (0, 20), "mytorch_net": (0, 64), "lenet": (0, 64), "mlp": (0, 64),
    "best": (0, 64)}


@needs_mnist
@pytest.mark.parametrize("name", sorted(SMOKE))
def test_one_epoch_smoke(name, tmp_path):
    module = importlib.import_module(f"experiments.{name}")
    start, stop = SMOKE[name]
    out = tmp_path / "r.json"
    argv = ["--epochs", "1", "--train-range", str(start), str(stop), "--eval-limit", "50",
            "--no-progress", "--json", str(out)]
    if name == "mytorch_net":
        argv += ["--plot", str(tmp_path / "r.png")]
    result = module.run(module.PROTOCOL, argv)
    saved = json.loads(out.read_text())
    for field in ("test_accuracy", "final_train_loss", "train_seconds", "epochs", "vjp",
                  "devices", "processes", "cpu_model", "cpu_flags", "jax_version"):
        assert field in saved
    assert saved["devices"] == jax.device_count()  # default: every device of the run
    assert saved["epochs"] == 1 and saved["vjp"] == "custom"
    assert 0.0 <= saved["test_accuracy"] <= 1.0 and saved["final_train_loss"] > 0
    assert saved["train_range"] == ["train", start, stop]
    assert saved["test_accuracy"] == result["test_accuracy"]
    if name == "mytorch_net":
        assert (tmp_path / "r.png").stat().st_size > 10_000


@needs_mnist
@pytest.mark.parametrize("name, argv, scan", [
    ("lenet", ["--vjp", "custom"], True), ("lenet", ["--vjp", "autodiff"], False),
    ("mlp", ["--vjp", "autodiff"], True), ("lenet", ["--per-step"], False)])
def test_epochs_scan_but_for_conv_protocols_under_autodiff_or_when_asked(name, argv, scan,
                                                                      monkeypatch):
    """LeNet's protocol (``autodiff_per_step``): one scanned epoch with the hand-written rules,
    a call per step under JAX autodiff, whose NCHW convolution transposes are slow in loops;
    the MLP's scans either way; ``--per-step`` asks for calls (and the JSON says which)."""
    module = importlib.import_module(f"experiments.{name}")
    from functional_cnn import train
    made = []
    make = train.make_trainer
    monkeypatch.setattr(train, "make_trainer", lambda *a, **k: made.append(k) or make(*a, **k))
    result = module.run(module.PROTOCOL, ["--epochs", "1", "--train-range", "0", "64",
                                          "--eval-limit", "20", "--no-progress", *argv])
    assert [k["scan"] for k in made] == [scan] and result["scan"] == scan


@needs_mnist
def test_formulations_flag_pins_the_convolutions_in_training(monkeypatch):
    """``--formulations PINS`` pins each convolution's training formulation (the JSON says
    which; none by default); ``tuned`` asks :mod:`functional_cnn.tuning`, with a scanned
    trainer however the run's epochs go; a wrong count, an unknown name or a network without
    convolutions to pin exit saying so."""
    from experiments import lenet, mlp
    from functional_cnn import train, tuning
    made = []
    make = train.make_trainer
    monkeypatch.setattr(train, "make_trainer",
                        lambda net, *a, **k: made.append((repr(net), k)) or make(net, *a, **k))
    argv = ["--epochs", "1", "--train-range", "0", "64", "--eval-limit", "20", "--no-progress"]
    assert lenet.run(lenet.PROTOCOL, argv)["formulations"] is None
    assert "train_formulation" not in made[-1][0]
    result = lenet.run(lenet.PROTOCOL, argv + ["--formulations", "banded,none"])
    assert result["formulations"] == ["banded", None]
    first, second = made[-1][0].split("ReLU")[:2]
    assert "train_formulation='banded'" in first and "train_formulation" not in second

    asked = []

    def measured(make_pinned, convolutions, input_shape, example):
        asked.append((make_pinned((None,) * convolutions).config.scan, convolutions,
                      input_shape, example.shape, example.dtype))
        return tuning.Tuning(("im2col", None), {}, True)
    monkeypatch.setattr(tuning, "tune_formulations", measured)
    made.clear()
    result = lenet.run(lenet.PROTOCOL, argv + ["--formulations", "tuned", "--per-step"])
    assert asked == [(True, 2, (-1, 1, 28, 28), (28, 28), np.uint8)]
    assert result["formulations"] == ["im2col", None] and result["scan"] is False
    assert "train_formulation='im2col'" in made[-1][0] and made[-1][1]["scan"] is False
    for module, pins, message in ((lenet, "banded", "expected 2 comma-separated"),
                                  (lenet, "banded,fft", "expected 2 comma-separated"),
                                  (mlp, "none", "mlp's network takes no formulations")):
        with pytest.raises(SystemExit, match=message):
            module.run(module.PROTOCOL, argv + ["--formulations", pins])


@needs_mnist
def test_cli_resume_matches_uninterrupted(tmp_path):
    from experiments import mlp
    base = ["--train-range", "0", "40", "--eval-limit", "30", "--no-progress", "--seed", "3"]
    full = mlp.run(mlp.PROTOCOL, base + ["--epochs", "2"])
    ck = str(tmp_path / "ck")
    cut = mlp.run(mlp.PROTOCOL, base + ["--epochs", "2", "--stop-after", "1", "--checkpoint", ck])
    assert cut["epochs"] == 1
    resumed = mlp.run(mlp.PROTOCOL, base + ["--epochs", "2", "--checkpoint", ck, "--resume"])
    assert resumed["resumed_from_epoch"] == 1
    assert resumed["test_accuracy"] == full["test_accuracy"]
    assert resumed["final_train_loss"] == full["final_train_loss"]


def test_missing_data_message(tmp_path, capsys):
    from experiments import lenet
    with pytest.raises(FileNotFoundError) as err:
        data.load("MNIST", "train", root=tmp_path, download=False)
    assert "train-images-idx3-ubyte" in str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in str(err.value)
    with pytest.raises(SystemExit):
        lenet.run(lenet.PROTOCOL, ["--resume"])  # --resume without --checkpoint
    assert "--resume needs --checkpoint" in capsys.readouterr().err


def _article_adamw_steps(w, grads, lr=0.01, betas=(0.9, 0.999), eps=1e-8):
    """Article 001's ``mytorch.AdamW._block_step``, line for line, on one numpy array."""
    beta1, beta2 = betas
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, gt in enumerate(grads, start=1):
        mt, vt = m, v
        w = w - lr * gt
        m = beta1 * mt + (1 - beta1) * gt
        v = beta2 * vt + (1 - beta2) * (gt * gt)
        mt = mt / (1 - np.power(beta1, t))
        vt = vt / (1 - np.power(beta2, t))
        w = w - lr * mt / (np.sqrt(vt) + eps)
    return w


def test_mytorch_adamw_is_the_articles_optimizer():
    import optax
    from experiments.mytorch_net import mytorch_adamw

    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(3, 4))
    grads = [rng.normal(size=(3, 4)) * 10 for _ in range(4)]  # sums over a batch of 10
    expected = _article_adamw_steps(w0, [g / 10 for g in grads])  # its backward: the mean's
    opt = mytorch_adamw(0.01, grad_scale=1 / 10)
    params = {"w": jax.numpy.asarray(w0, jax.numpy.float32)}
    opt_state = opt.init(params)
    for g in grads:
        updates, opt_state = opt.update({"w": jax.numpy.asarray(g, jax.numpy.float32)},
                                        opt_state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(params["w"]), expected, rtol=1e-5, atol=1e-6)
    # and it is not torch's AdamW: no decay, an extra SGD step, moments one step late
    torch_like = optax.adamw(0.01, weight_decay=1e-2)
    p, s = {"w": jax.numpy.asarray(w0, jax.numpy.float32)}, torch_like.init(params)
    for g in grads:
        u, s = torch_like.update({"w": jax.numpy.asarray(g / 10, jax.numpy.float32)}, s, p)
        p = optax.apply_updates(p, u)
    assert np.max(np.abs(np.asarray(p["w"]) - expected)) > 1e-3


@needs_mnist
def test_time_to_accuracy_runs_and_reports(tmp_path):
    from experiments import time_to_accuracy

    out = tmp_path / "tta.json"
    # one device: this process's devices must not depend on which test touches JAX first
    argv = ["--steps", "200", "--batch-size", "64", "--target", "0.9", "--json", str(out),
            "--devices", "1"]
    code = time_to_accuracy.main(argv)
    result = json.loads(out.read_text())
    assert code == 0 and result["reached"]  # 200 steps of batch 64 are far above 90%
    assert result["devices"] == 1
    assert [h["steps"] for h in result["history"]] == [200]
    assert result["history"][0]["images"] == 200 * 64
    assert 0.9 <= result["history"][0]["test_accuracy"] <= 1.0
    assert 0 < result["seconds"] == result["history"][-1]["seconds"]
    assert result["cpu_model"] and result["framework"] == "functional_cnn"
    # nothing measured in this session's cache: the recipe's pins
    assert result["formulations"] == list(time_to_accuracy.FORMULATIONS) == ["taps", "lax"]
    assert result["formulations_from"] == "recipe" and result["prng"] == "fmix32"
    assert result["eval_formulations"] == [None, "lax"]  # the evaluation's own pins
    assert result["fusion_emitters"] is False  # the loop emitters: less to compile
    assert result["recipe"]["first_conv"] == "pca"  # frozen at the patches' components


@needs_mnist
def test_time_to_accuracy_trains_on_two_host_devices_by_default(tmp_path):
    """A fresh process (JAX splits the CPU before its first use): two host devices where
    there are two cores, training each its half of every batch, the evaluation on one."""
    out = tmp_path / "tta.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    done = subprocess.run([sys.executable, "-m", "experiments.time_to_accuracy", "--steps",
                           "150", "--target", "0.8", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    cores = len(os.sched_getaffinity(0))
    assert result["devices"] == min(2, cores) and result["reached"], result
    assert 0.8 <= result["history"][0]["test_accuracy"] <= 1.0
    if cores >= 2:  # a batch that does not split: said before anything compiles
        odd = subprocess.run([sys.executable, "-m", "experiments.time_to_accuracy",
                              "--batch-size", "31"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert odd.returncode != 0 and "Traceback" not in odd.stderr, odd.stderr[-3000:]
        assert "global batch size 31 does not divide evenly over 2 devices" in odd.stderr


def test_time_to_accuracy_devices_flag(capsys):
    from experiments import time_to_accuracy as tta
    with pytest.raises(SystemExit):
        tta.parser().parse_args(["--devices", "0"])
    assert "expected a positive number of devices, got 0" in capsys.readouterr().err
    jax.devices()  # this process's backend is up: it cannot be split any more
    assert tta.host_mesh(1) is None
    n = jax.device_count()
    mesh = tta.host_mesh(n + 1)  # more than the backend has: what it has, and it says so
    assert (1 if mesh is None else mesh.size) == n
    assert f"asked for {n + 1} host devices, but JAX's CPU backend started with {n}" in \
        capsys.readouterr().out


def test_time_to_accuracy_pins_this_machines_measurement_where_there_is_one(tmp_path,
                                                                            monkeypatch):
    from experiments import time_to_accuracy as tta
    from functional_cnn import tuning
    from functional_cnn.functional import _formulation
    monkeypatch.setenv(_formulation.CACHE_DIR_ENV, str(tmp_path))
    _formulation.forget()
    args = tta.parser().parse_args([])
    assert tta.formulations(args) == (tta.FORMULATIONS, "recipe")
    key = tuning.cache_key(tta.trainer_for(args)((None, None)), tta.INPUT_SHAPE,
                           jax.ShapeDtypeStruct((28, 28), jax.numpy.uint8))
    _formulation.remember(key, {"choice": ["im2col", "lax"]})
    assert tta.formulations(args) == (("im2col", "lax"), "measured before (cached)")
    mesh = dataparallel.make_mesh(1)  # training over a mesh: its own measurement
    assert tta.formulations(args, mesh) == (tta.FORMULATIONS, "recipe")
    _formulation.remember(tuning.cache_key(tta.trainer_for(args, mesh)((None, None)),
                                           tta.INPUT_SHAPE, tta.EXAMPLE), {"choice": ["lax", None]})
    assert tta.formulations(args, mesh) == (("lax", None), "measured before (cached)")
    args.formulations = "none,taps"  # the command line wins
    assert tta.formulations(args) == ((None, "taps"), "command line")
    args.formulations, args.widths = None, (4, 8)  # another network: not measured
    assert tta.formulations(args) == (tta.FORMULATIONS, "recipe")
    _formulation.forget()


def test_time_to_accuracy_evaluation_pins_reach_the_evaluating_network_only():
    from experiments import time_to_accuracy as tta
    args = tta.parser().parse_args([])
    pins = tta.evaluation_pins(args)
    assert pins == (None, "lax")  # the recipe's, on a CPU
    evaluating = repr(tta.trainer_for(args, None, pins)(tta.FORMULATIONS).config.net)
    assert evaluating.count("eval_formulation='lax'") == 1
    assert "eval_formulation='lax'" in evaluating.split("Conv2d(16")[1]  # the second conv
    # the tuner's networks (and so its cache keys) carry no evaluation pins
    assert "eval_formulation" not in repr(tta.trainer_for(args)((None, None)).config.net)
    assert tta.evaluation_pins(tta.parser().parse_args(["--widths", "8"])) == (None,)
    assert tta.evaluation_pins(tta.parser().parse_args(
        ["--eval-formulations", "none,none"])) == (None, None)
    with pytest.raises(ValueError, match="expected 2 comma-separated formulations"):
        tta.evaluation_pins(tta.parser().parse_args(["--eval-formulations", "lax"]))


def test_time_to_accuracy_falls_back_to_its_recipe_where_cached_pins_cannot_run(monkeypatch,
                                                                                capsys):
    from experiments import time_to_accuracy as tta

    def abstract_init_only(trainer, input_shape, **_):  # what refuses a pin in precompile
        jax.eval_shape(lambda k: trainer.config.net.init(k, input_shape), jax.random.key(0))
        return trainer
    monkeypatch.setattr(tta, "precompile", abstract_init_only)
    args = tta.parser().parse_args([])
    bad = (None, "taps")  # 8*5*5 = 200 products per output: more than taps takes
    trainer, evaluator, pins, pins_from = tta.compiled_trainer(args, bad, tuning.CACHED)
    assert evaluator is trainer  # no mesh given: one trainer trains and evaluates
    assert pins == tta.FORMULATIONS and pins_from.startswith("recipe")
    assert "train_formulation='taps'" in repr(trainer.config.net).split("BatchNorm2d")[0]
    assert "the cached formulations none,taps cannot run" in capsys.readouterr().out
    with pytest.raises(ValueError, match="taps"):  # asked for on the command line: an error
        tta.compiled_trainer(args, bad, "command line")


@needs_mnist
@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
def test_denoise_smoke(vjp, tmp_path):
    from experiments import denoise
    out, png = tmp_path / "d.json", tmp_path / "d.png"
    result = denoise.main(["--train-limit", "256", "--test-limit", "200", "--width", "4",
                           "--vjp", vjp, "--json", str(out), "--plot", str(png)])
    saved = json.loads(out.read_text())
    for field in ("test_psnr_db", "noisy_psnr_db", "train_seconds", "epochs", "vjp", "seed",
                  "cpu_model", "jax_version", "history"):
        assert field in saved
    assert saved == json.loads(json.dumps(result))
    # sigma 0.5 on [0, 1] pixels, unclipped: the noisy MSE is 0.25, 6.02 dB (200 x 784 draws)
    assert abs(saved["noisy_psnr_db"] - 6.02) < 0.1
    assert np.isfinite(saved["test_psnr_db"]) and saved["history"][0]["curve"]
    assert png.stat().st_size > 10_000

"""The time-to-accuracy race's pieces: the plain-PyTorch script's network is ours (weights copy
across), its hand-written AdamW is torch.optim.AdamW, both sides' one-cycle rate is optax's,
and a short run of the torch script writes its record."""
import importlib.util
import json
import os
import sys

import jax
import numpy as np
import optax
import pytest
from jax import numpy as jnp

import functional_cnn as fcn
from experiments._tta_common import feature_size, one_cycle, pca_filters
from experiments.time_to_accuracy import net
from tests._train_helpers import tiny_data
from tests.conftest import assert_close, float64, needs_mnist


@pytest.mark.parametrize("widths, kernel, padding, hidden, activation, first_conv",
                         [((8, 16), 5, 0, 128, "silu", "trained"),
                          ((8, 16), 5, 0, 128, "relu", "trained"),
                          ((4, 8), 3, 1, 0, "silu", "trained"),
                          ((8, 16), 5, 0, 128, "silu", "pca")])
def test_torch_network_gives_our_logits(torch, widths, kernel, padding, hidden, activation,
                                        first_conv):
    from benchmarks.time_to_accuracy_torch import ACTIVATIONS, network
    from experiments._tta_common import ACTIVATIONS as NAMES
    from experiments.time_to_accuracy import ACTIVATIONS as OURS
    assert set(ACTIVATIONS) == set(OURS) == set(NAMES)
    ours = net(widths, kernel, padding, hidden, activation=activation, first_conv=first_conv)
    _, params, state = ours.init(jax.random.key(0), (-1, 1, 28, 28))
    filters = None if first_conv == "trained" else pca_filters(
        np.asarray(tiny_data(50).images), widths[0], kernel, 0.1307, 0.3081)
    module = network(widths, kernel, padding, hidden, activation, filters)
    if filters is not None:  # frozen there as here: not a parameter to train on either side
        assert not module[0].weight.requires_grad and module[1].weight is None
        assert params[0] == params[1] == {}
        np.testing.assert_array_equal(module[0].weight.detach().numpy(), filters)
    with torch.no_grad():  # non-trivial running statistics, so eval mode is really tested
        for bn in (module[1], module[5]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    params, state = fcn.load_state_dict(params, state, module.state_dict())
    x = np.random.default_rng(0).normal(size=(4, 1, 28, 28)).astype(np.float32)
    logits, _ = ours.apply(params, state, jnp.asarray(x), train=False)
    module.eval()
    with torch.no_grad():
        expected = module(torch.tensor(x)).numpy()
    assert_close(logits, expected, 1e-5, 1e-5, "logits")


@pytest.mark.parametrize("channels, kernel", [(8, 5), (3, 3), (25, 5)])
def test_pca_filters_are_the_patches_principal_components(channels, kernel):
    images = np.asarray(tiny_data(30).images)
    filters = pca_filters(images, channels, kernel, 0.1307, 0.3081, count=20)
    assert filters.shape == (channels, 1, kernel, kernel) and filters.dtype == np.float32
    rows = filters.reshape(channels, -1).astype(np.float64)
    np.testing.assert_allclose(rows @ rows.T, np.eye(channels), atol=1e-5)  # orthonormal
    # an independent computation: the leading right singular vectors of the centered patches
    x = (images[:20].astype(np.float64) / 255 - 0.1307) / 0.3081
    patches = np.lib.stride_tricks.sliding_window_view(x, (kernel, kernel), axis=(1, 2))
    patches = patches[:, ::2, ::2].reshape(-1, kernel * kernel)
    _, _, vt = np.linalg.svd(patches - patches.mean(axis=0), full_matrices=False)
    signs = np.sign(np.sum(vt[:channels] * rows, axis=1))
    np.testing.assert_allclose(rows, vt[:channels] * signs[:, None], atol=1e-4)
    variances = np.var(patches @ rows.T, axis=0)
    assert np.all(np.diff(variances) <= 1e-9 * variances[0])  # largest variance first
    # each filter's entry of largest magnitude is positive: the same signs on every machine
    assert np.all(rows[np.arange(channels), np.abs(rows).argmax(axis=1)] > 0)


def test_pca_filters_refuses_more_filters_than_components():
    with pytest.raises(ValueError, match="3x3 patches have 9 principal components; asked for "
                                         "16 filters"):
        pca_filters(np.asarray(tiny_data(4).images), 16, 3, 0.1307, 0.3081)
    # both scripts check it with the recipe, before anything loads or compiles
    from benchmarks.time_to_accuracy_torch import main as torch_main
    from experiments.time_to_accuracy import main as our_main
    for main in (torch_main, our_main):
        with pytest.raises(SystemExit, match="--first-conv pca: pca_filters: 3x3 patches have 9 "
                                             "principal components; asked for 16 filters"):
            main(["--first-conv", "pca", "--kernel", "3", "--widths", "16,32"])


def test_frozen_first_convolution_is_set_and_not_trained():
    from experiments import time_to_accuracy as tta
    args = tta.parser().parse_args(["--first-conv", "pca", "--steps", "3", "--batch-size", "8",
                                    "--widths", "4,8", "--hidden", "16"])
    trainer = tta.trainer_for(args)(("taps", None))
    ds = tiny_data(40)
    filters = pca_filters(np.asarray(ds.images), 4, 5, tta.MEAN, tta.STD)
    ts = tta.with_first_filters(trainer.init(jax.random.key(0), tta.INPUT_SHAPE), filters)
    before = np.asarray(ts.params[4]["weight"])  # the epoch takes ts's buffers (donated)
    assert tta.with_first_filters(ts, None) is ts
    after, _ = trainer.epoch(ts, ds.images, ds.labels)
    # AdamW's weight decay touches every parameter: the frozen filters are none of them
    np.testing.assert_array_equal(after.state[0]["weight"], filters)
    assert not np.allclose(after.params[4]["weight"], before)


def test_feature_size():
    assert feature_size(5, 0) == 4 and feature_size(3, 1) == 7 and feature_size(5, 2) == 7


def test_torch_adamw_is_torch_optim_adamw(torch):
    from benchmarks.time_to_accuracy_torch import AdamW
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    mine, reference = AdamW(ours, 5e-4), torch.optim.AdamW(theirs, lr=1e-2, weight_decay=5e-4)
    for step in range(5):
        lr = 1e-2 * (step + 1) / 5  # a changing rate, as the schedule gives
        for group in reference.param_groups:
            group["lr"] = lr
        grads = [torch.randn_like(p) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        mine.step(lr)
        reference.step()
    for p, q in zip(ours, theirs):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-6,
                                   atol=1e-7)
    assert all(p.grad is None for p in ours)  # zeroed for the next backward


def test_torch_nesterov_adamw_is_optax_nadamw(torch):
    from benchmarks.time_to_accuracy_torch import AdamW
    from benchmarks.bench_time_to_accuracy import OPTIMIZER_NAMES
    from experiments._tta_common import OPTIMIZERS
    assert set(OPTIMIZER_NAMES) == set(OPTIMIZERS)  # the report names each
    rng = np.random.default_rng(0)
    params = [rng.standard_normal((3, 4)), rng.standard_normal(5)]
    ours = [torch.nn.Parameter(torch.tensor(p)) for p in params]  # float64: the update's math
    mine, rates = AdamW(ours, 5e-4, nesterov=True), [1e-2 * (step + 1) / 5 for step in range(5)]
    reference = fcn.train.adamw(lambda count: jnp.asarray(rates)[count], 5e-4, nesterov=True)
    with float64():
        expected = [jnp.asarray(p) for p in params]
        state = reference.init(expected)
        for lr in rates:
            grads = [rng.standard_normal(p.shape) for p in params]
            for p, g in zip(ours, grads):
                p.grad = torch.tensor(g)
            mine.step(lr)
            updates, state = reference.update([jnp.asarray(g) for g in grads], state, expected)
            expected = optax.apply_updates(expected, updates)
    for p, q in zip(ours, expected):
        np.testing.assert_allclose(p.detach().numpy(), np.asarray(q), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("steps", [4, 16, 350, 900])
def test_one_cycle_is_optax(steps):
    peak = 1e-2
    schedule = optax.cosine_onecycle_schedule(steps, peak_value=peak, pct_start=0.25)
    ours = [one_cycle(i, steps, peak) for i in range(steps + 5)]  # past the end: held
    expected = np.array([float(schedule(i)) for i in range(steps + 5)])
    # optax computes in float32: near the end (values ~1e-6) that is 1e-10 absolute
    np.testing.assert_allclose(ours, expected, rtol=2e-5, atol=1e-9)
    assert int(np.argmax(ours)) == int(np.argmax(expected)) == int(0.25 * steps)


@needs_mnist
@pytest.mark.parametrize("first_conv", ["trained", "pca"])
def test_short_run_writes_the_json(tmp_path, torch, first_conv):
    from benchmarks import time_to_accuracy_torch
    out = tmp_path / "r.json"
    code = time_to_accuracy_torch.main(["--steps", "20", "--batch-size", "32", "--target",
                                        "0.5", "--widths", "4,8", "--json", str(out),
                                        "--first-conv", first_conv])
    saved = json.loads(out.read_text())
    assert code == (0 if saved["reached"] else 1)
    assert saved["framework"] == "torch" and saved["threads"] == torch.get_num_threads()
    assert saved["target"] == 0.5 and isinstance(saved["reached"], bool)
    assert saved["cpu_model"] and saved["cpu_count"] >= 1  # the figure's machine
    assert saved["recipe"]["steps"] == 20 and saved["recipe"]["widths"] == [4, 8]
    assert saved["recipe"]["first_conv"] == first_conv
    entry, = saved["history"]
    assert entry["steps"] == 20 and entry["images"] == 640
    assert 0.0 <= entry["test_accuracy"] <= 1.0
    assert entry["seconds"] == saved["seconds"] > 0
    assert saved["reached"] == (entry["test_accuracy"] >= 0.5)


def test_the_recipe_line_names_pinned_formulations():
    from benchmarks.bench_time_to_accuracy import _recipe
    run = {"recipe": {"widths": [8, 16], "kernel": 5, "padding": 0, "hidden": 128,
                      "batch_size": 32, "steps": 1500, "peak_lr": 0.01, "label_smoothing": 0.1}}
    assert _recipe(run).startswith("8/16-channel 5x5 convolutions (padding 0)")
    assert "formulations" not in _recipe({**run, "formulations": [None, None]})
    assert _recipe({**run, "formulations": ["taps", None]}).endswith(
        "1500 steps (0.80 epochs), one-cycle AdamW peaking at 0.01, label smoothing 0.1, "
        "conv2d's formulations in training taps, as chosen")
    assert _recipe({**run, "formulations": ["taps", "lax"], "eval_formulations": [None, "lax"]
                    }).endswith("formulations in training taps, lax, in evaluation as chosen, lax")
    assert "one-cycle AdamW with Nesterov momentum peaking at 0.01, label smoothing 0.1, " \
        "weight decay 0.0005, b2 0.99" in _recipe(
            {**run, "recipe": {**run["recipe"], "weight_decay": 5e-4, "b2": 0.99,
                               "optimizer": "nadamw"}})
    assert _recipe({**run, "prng": "fmix32"}).endswith(
        "label smoothing 0.1, keys from functional_cnn.prng's FMIX32")
    assert "prng" not in _recipe({**run, "prng": "threefry"})
    assert _recipe({**run, "devices": 2}).endswith(
        "on 2 host devices (each its share of every batch, with its own BatchNorm statistics)")
    assert "devices" not in _recipe({**run, "devices": 1})
    assert _recipe({**run, "fusion_emitters": False}).endswith(
        "label smoothing 0.1, compiled with XLA:CPU's loop emitters")
    assert "emitters" not in _recipe({**run, "fusion_emitters": True}) + _recipe(run)
    frozen = _recipe({**run, "recipe": {**run["recipe"], "first_conv": "pca"}})
    assert frozen.startswith("8/16-channel 5x5 convolutions (padding 0) with BatchNorm and ReLU, "
                             "the first frozen at the principal components of the training "
                             "images' patches (its BatchNorm without affine parameters), a "
                             "128-wide hidden layer")
    assert "frozen" not in _recipe({**run, "recipe": {**run["recipe"], "first_conv": "trained"}})


def test_the_race_alternates_its_order(monkeypatch):
    from benchmarks import bench_time_to_accuracy as B
    order = []

    def fake_run(template, workdir):
        order.append(next(name for name, t in B.RUNS.items() if t == template))
        return {"reached": True, "seconds": 1.0, "history": [{"test_accuracy": 0.99}]}
    monkeypatch.setattr(B, "run_once", fake_run)
    monkeypatch.setattr(B, "write_bytecode", lambda: None)
    B.race(2)
    names = list(B.RUNS)
    assert order == [names[1]] + names + names[::-1]  # priming, then each round's order


def test_the_race_is_also_compared_round_by_round():
    from benchmarks.bench_time_to_accuracy import paired_text

    def runs(*seconds):
        return [{"seconds": t} for t in seconds]
    text = paired_text({"functional_cnn, cold start": runs(6.0, 9.0, 5.0),
                        "torch": runs(5.0, 6.0, 5.5)})
    assert text == ("Round by round, functional_cnn, cold start over torch: 1.20 median "
                    "(0.91-1.50); faster in 1 of 3 rounds.")


def test_the_race_writes_bytecode_even_where_python_would_not(tmp_path, monkeypatch):
    # this project's machines set PYTHONDONTWRITEBYTECODE: without the cache every run of the
    # race compiled the library's source again
    from benchmarks import bench_time_to_accuracy as B
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("X = 1\n")
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    B.write_bytecode(tmp_path, ("pkg",))
    assert os.path.exists(importlib.util.cache_from_source(str(tmp_path / "pkg" / "mod.py")))
    (tmp_path / "pkg" / "bad.py").write_text("X = (\n")
    with pytest.raises(SystemExit, match="pkg does not compile"):
        B.write_bytecode(tmp_path, ("pkg",))

"""conv2d's formulations, part by part, and how a part's formulation is chosen
(``functional/_formulation.py``): every part of every formulation that applies gives XLA's
numbers; "auto" measures once, caches in a file and reads it back; "lax" runs XLA's convolution.
The rest of the suite runs in mode "gates" (tests/conftest.py), so only these tests measure."""
import json
import os

import jax
import numpy as np
import pytest
from jax import numpy as jnp

import functional_cnn.functional as F
from functional_cnn.functional import _formulation, conv

# (x shape, weight shape, stride, padding, dilation): the networks' convolutions, small batches
SHAPES = [
    ((2, 1, 28, 28), (10, 1, 5, 5), 1, 0, 1),  # LeNet's first
    ((2, 10, 12, 12), (20, 10, 5, 5), 1, 0, 1),  # LeNet's second
    ((2, 32, 6, 6), (64, 32, 3, 3), 2, 1, 1),  # article 001's second
    ((2, 8, 14, 14), (16, 8, 5, 5), 1, 0, 1),
    ((2, 16, 14, 14), (32, 16, 3, 3), 1, 1, 1),
    ((0, 10, 12, 12), (20, 10, 5, 5), 1, 0, 1),  # empty batch
    ((1, 1, 28, 28), (32, 1, 3, 3), 2, 1, 1),  # article 001's first, one sample
    ((2, 3, 9, 6), (4, 3, 3, 3), (2, 1), (1, 0), (2, 1)),  # dilated and strided rows
]


PATCHES = ("im2col", "im2col_nhwc")  # the two im2col formulations apply alike


def _parts_against_lax(cfg, x_shape, w_shape):
    """Every applicable formulation's forward, dx and dW beside XLA's, all in one compiled
    function (compiled unoptimized: XLA's optimizations keep values, and compiling is most of
    this test's time)."""
    rng = np.random.default_rng(0)
    g_shape = (x_shape[0], w_shape[0]) + tuple(a.out_size for a in cfg.axes)
    x, w, g = (rng.standard_normal(s).astype(np.float32) for s in (x_shape, w_shape, g_shape))
    names = [n for n, f in conv._FORMULATIONS.items() if f.applies(cfg, x_shape, w_shape)]

    def every_part(x, w, g):
        return {n: (f.forward(cfg, x, w), f.dx(cfg, w, g), f.dw(cfg, x, g))
                for n, f in conv._FORMULATIONS.items() if n in names}

    compiled = jax.jit(every_part).lower(x, w, g).compile({"xla_backend_optimization_level": 0})
    results = jax.device_get(compiled(x, w, g))
    for name in names:
        for part, got, want in zip(("forward", "dx", "dw"), results[name], results["lax"]):
            assert got.shape == want.shape, (name, part)
            scale = max(float(np.max(np.abs(want), initial=0.0)), 1.0)
            np.testing.assert_allclose(got / scale, want / scale, atol=1e-5,
                                       err_msg=f"{name} {part} at x {x_shape}, w {w_shape}")
    return names


@pytest.mark.parametrize("x_shape, w_shape, stride, padding, dilation", SHAPES)
def test_every_part_of_every_formulation_matches_xla(x_shape, w_shape, stride, padding,
                                                     dilation):
    cfg = conv.conv_config("test", x_shape, w_shape, stride, padding, dilation, 1)
    names = set(_parts_against_lax(cfg, x_shape, w_shape))
    few_products = x_shape[1] * w_shape[2] * w_shape[3] <= conv._TAPS_MAX_TERMS
    assert names == {"banded", *PATCHES, "lax"} | ({"taps"} if few_products else set())


@pytest.mark.parametrize("stride, padding, output_padding, kernel", [
    (2, 1, 1, (3, 2)), (3, 0, 0, (2, 2))])  # windows overlapping, and stride above kernel
def test_parts_at_a_transposed_convolutions_geometry(stride, padding, output_padding, kernel):
    # conv_transpose2d runs conv2d's parts on the convolution it transposes
    in_shape, w_shape = (2, 4, 5, 4), (4, 3) + kernel
    cfg = conv.conv_transpose_config("test", in_shape, w_shape, stride, padding, output_padding,
                                     1, 1)
    assert set(_parts_against_lax(cfg, conv._conv_input_shape(cfg, in_shape, w_shape),
                                  w_shape)) == {"banded", *PATCHES, "lax", "taps"}


def test_what_cannot_run_a_shape_is_no_candidate():
    def applicable(x_shape, w_shape, dilation=1, groups=1):
        cfg = conv.conv_config("test", x_shape, w_shape, 1, 0, dilation, groups)
        return {n for n, f in conv._FORMULATIONS.items() if f.applies(cfg, x_shape, w_shape)}

    assert applicable((2, 4, 8, 8), (4, 2, 3, 3), groups=2) == {"lax"}
    assert applicable((2, 4, 8, 8), (4, 4, 3, 3), dilation=(1, 2)) == {*PATCHES, "lax", "taps"}
    assert applicable((2, 8, 8, 8), (4, 8, 3, 3)) == {"banded", *PATCHES, "lax"}  # 72 taps
    # taps runs only where asked for: "auto" never times it
    cfg = conv.conv_config("test", (2, 1, 28, 28), (10, 1, 5, 5), 1, 0, 1, 1)
    assert conv._candidates(cfg, (2, 1, 28, 28), (10, 1, 5, 5)) == ["banded", *PATCHES, "lax"]
    # one image: the band of a tile of 2 columns is 1.6M entries (a whole row's would be 780M),
    # its row blocks 5.9M (62 rows x 31 tiles x 3 x 256 x 4), the patches 8.9M
    assert applicable((1, 256, 64, 64), (256, 256, 3, 3)) == {"banded", *PATCHES, "lax"}
    # eight: row blocks of 47M entries and patches of 71M, both over 32M
    assert applicable((8, 256, 64, 64), (256, 256, 3, 3)) == {"lax"}
    # patches (419M) and a tile's band (5 * 512 * 8 * 512 * 4 = 42M) too big
    assert applicable((8, 512, 68, 68), (512, 512, 5, 5)) == {"lax"}


# ------------------------------------------------------------------ choosing and caching

SMALL = ((2, 2, 6, 6), (3, 2, 3, 3))  # every formulation applies (auto never times taps)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """Mode "auto" with a cache of its own, nothing in memory before or after."""
    monkeypatch.setenv(_formulation.MODE_ENV, "auto")
    monkeypatch.setenv(_formulation.CACHE_DIR_ENV, str(tmp_path))
    _formulation.forget()
    yield tmp_path
    _formulation.forget()


def _loss(x, w):
    return (F.conv2d(x, w) ** 2).sum()


def _jitted_grads(x_shape, w_shape):
    """Gradients of a conv2d, traced afresh (a new function each call: jit's cache cannot
    answer), under an outer jax.jit."""
    x, w = jnp.ones(x_shape), jnp.ones(w_shape) / 7
    return jax.jit(jax.grad(lambda x, w: _loss(x, w), argnums=(0, 1)))(x, w)


def _jaxpr_text(x_shape, w_shape, fn=_loss):
    return str(jax.make_jaxpr(jax.grad(fn, argnums=(0, 1)))(jnp.ones(x_shape),
                                                              jnp.ones(w_shape)))


def _no_measuring(*args):
    raise AssertionError("measured although the cache holds the answer")


def test_auto_measures_under_jit_writes_the_cache_and_reads_it_back(cache_dir, monkeypatch):
    monkeypatch.setattr(_formulation, "REPEATS", 2)
    monkeypatch.setattr(_formulation, "TARGET_SECONDS", 1e-4)
    grads = _jitted_grads(*SMALL)
    entries = json.loads((cache_dir / _formulation.CACHE_NAME).read_text())
    assert entries["format"] == 1 and list(entries["machines"]) == [_formulation.machine_key()]
    chosen = entries["machines"][_formulation.machine_key()]
    assert [k.split()[0] for k in chosen] == ["conv2d.all"]  # one choice for the three parts
    for entry in chosen.values():
        assert set(entry["seconds"]) == {"banded", *PATCHES, "lax"}
        assert all(s > 0 for s in entry["seconds"].values())
        assert entry["choice"] == _formulation.fastest(entry["seconds"])
    assert F.conv_formulations() == chosen
    with F.conv_formulation("gates"):
        want = _jitted_grads(*SMALL)
    for got, ref in zip(grads, want):
        np.testing.assert_allclose(got, ref, rtol=1e-5)
    # a fresh process's view: the file alone answers
    _formulation.forget()
    monkeypatch.setattr(_formulation, "measure", _no_measuring)
    _jitted_grads(*SMALL)


def _write_cache(cache_dir, x_shape, w_shape, choice):
    cfg = conv.conv_config("test", x_shape, w_shape, 1, 0, 1, 1)
    key = conv._signature("all", cfg, x_shape, w_shape, jnp.float32)
    entries = {key: {"choice": choice, "seconds": {}}}
    data = {"format": 1, "machines": {_formulation.machine_key(): entries}}
    (cache_dir / _formulation.CACHE_NAME).write_text(json.dumps(data))


@pytest.mark.parametrize("choice, present, absent", [
    ("banded", ["dot_general"], ["conv_general_dilated"]),  # the gates' choice for SMALL
    ("im2col", ["dot_general", "conv_general_dilated"], []),  # its input gradient is XLA's
    ("lax", ["conv_general_dilated"], ["dot_general"])])
def test_the_cached_choice_is_what_runs(cache_dir, monkeypatch, choice, present, absent):
    _write_cache(cache_dir, *SMALL, choice)
    monkeypatch.setattr(_formulation, "measure", _no_measuring)
    text = _jaxpr_text(*SMALL)
    assert all(p in text for p in present) and not any(a in text for a in absent)


def _fake_measure(candidates, specs):
    times = {"lax": 1.0, "banded": 0.5, "im2col": 0.8, "im2col_nhwc": 0.9}
    return {name: times[name] for name in candidates}


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"format": 1, "machines": 3}'])
def test_a_corrupt_cache_is_ignored_and_replaced(cache_dir, monkeypatch, content):
    path = cache_dir / _formulation.CACHE_NAME
    path.write_text(content)
    monkeypatch.setattr(_formulation, "measure", _fake_measure)
    with pytest.warns(UserWarning, match="conv formulations: ignoring"):
        text = _jaxpr_text(*SMALL)
    assert "conv_general_dilated" not in text  # measured afresh: the band (fake times) won
    chosen = json.loads(path.read_text())["machines"][_formulation.machine_key()]
    assert {e["choice"] for e in chosen.values()} == {"banded"}
    assert [p.name for p in cache_dir.iterdir()] == [_formulation.CACHE_NAME]  # no temp file


def test_an_entry_that_cannot_run_its_shape_is_measured_again(cache_dir, monkeypatch):
    x_shape, w_shape = (2, 2, 6, 6), (3, 2, 3, 3)
    cfg = conv.conv_config("test", x_shape, w_shape, 1, 0, (1, 2), 1)  # no band: dilated width
    key = conv._signature("all", cfg, x_shape, w_shape, jnp.float32)
    data = {"format": 1, "machines": {_formulation.machine_key(): {key: {"choice": "banded"}}}}
    (cache_dir / _formulation.CACHE_NAME).write_text(json.dumps(data))
    monkeypatch.setattr(_formulation, "measure", _fake_measure)
    with F.conv_formulation("auto"):
        y = F.conv2d(jnp.ones(x_shape), jnp.ones(w_shape), dilation=(1, 2))
    assert F.conv_formulations()[key]["choice"] == "im2col"
    np.testing.assert_allclose(y, 18.0)  # 2 channels x 9 taps of ones


def test_an_unwritable_cache_warns_and_keeps_the_choice_in_memory(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(_formulation.CACHE_DIR_ENV, str(tmp_path / "file"))  # not a folder
    _formulation.forget()
    monkeypatch.setattr(_formulation, "measure", _fake_measure)
    try:
        with F.conv_formulation("auto"), pytest.warns(UserWarning) as caught:
            F.conv2d(jnp.ones(SMALL[0]), jnp.ones(SMALL[1]))
        assert any("conv formulations: cannot write the cache" in str(w.message)
                   for w in caught)
        assert {e["choice"] for e in F.conv_formulations().values()} == {"banded"}
    finally:
        _formulation.forget()


def _transpose_loss(x, w):
    return (F.conv_transpose2d(x, w, stride=2) ** 2).sum()


@pytest.mark.parametrize("x_shape, w_shape, fn", [
    ((2, 1, 28, 28), (10, 1, 5, 5), _loss),  # LeNet's first: the gates take the band
    ((2, 2, 9, 9), (2, 1, 3, 3), _transpose_loss)])  # dx on one channel: the gates take im2col
def test_lax_mode_runs_xlas_convolution_everywhere(monkeypatch, x_shape, w_shape, fn):
    assert "dot_general" in _jaxpr_text(x_shape, w_shape, fn)  # mode "gates" (conftest)
    with F.conv_formulation("lax"):
        text = _jaxpr_text(x_shape, w_shape, fn)
    assert "conv_general_dilated" in text and "dot_general" not in text
    monkeypatch.setenv(_formulation.MODE_ENV, "lax")  # the variable, read when tracing
    assert "dot_general" not in _jaxpr_text(x_shape, w_shape, fn)


def test_modes_are_checked(monkeypatch):
    monkeypatch.setenv(_formulation.MODE_ENV, "fastest")
    with pytest.raises(ValueError, match=r"\$FUNCTIONAL_CNN_CONV: the convolution formulation "
                                         r"mode must be one of \('auto', 'gates', 'lax'\), "
                                         r"got 'fastest'"):
        F.conv2d(jnp.ones(SMALL[0]), jnp.ones(SMALL[1]))
    with pytest.raises(ValueError, match="conv_formulation: .* got 'fast'"):
        with F.conv_formulation("fast"):
            pass
    with F.conv_formulation("lax"):  # the context wins over the variable
        assert _formulation.mode() == "lax"


def test_auto_and_gates_are_lax_off_the_cpu_and_auto_for_empty_batches(cache_dir, monkeypatch):
    monkeypatch.setattr(_formulation, "measure", _no_measuring)
    everything = {"lax": None, "banded": None}
    spec, empty = jax.ShapeDtypeStruct((2, 3), jnp.float32), jax.ShapeDtypeStruct((0, 3),
                                                                                   jnp.float32)
    with monkeypatch.context() as patched:
        patched.setattr(jax, "default_backend", lambda: "gpu")
        assert _formulation.choose("auto", "k", everything, (spec,), "banded") == "lax"
        assert _formulation.choose("gates", "k", everything, (spec,), "banded") == "lax"
    assert _formulation.choose("auto", "k", everything, (empty,), "banded") == "lax"
    assert _formulation.choose("auto", "k", {"lax": None}, (spec,), "lax") == "lax"
    assert _formulation.choose("gates", "k", everything, (spec,), "banded") == "banded"
    assert _formulation.choose("lax", "k", everything, (spec,), "banded") == "lax"
    assert not os.listdir(cache_dir)


def test_xla_wins_unless_another_is_clearly_faster():
    assert _formulation.fastest({"lax": 1.0, "banded": 0.96, "im2col": 0.97}) == "lax"
    assert _formulation.fastest({"lax": 1.0, "banded": 0.90, "im2col": 0.80}) == "im2col"
    assert _formulation.fastest({"banded": 2.0, "im2col": 1.0}) == "im2col"
    assert _formulation.fastest({}) == "lax"


def test_the_default_is_the_static_gates(monkeypatch):
    """Measured choices made whole steps slower (the module docstring): not the default."""
    monkeypatch.delenv(_formulation.MODE_ENV, raising=False)
    assert _formulation.mode() == "gates"
    with F.conv_formulation("auto"):
        assert _formulation.mode() == "auto"

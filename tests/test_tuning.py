"""functional_cnn.tuning: each convolution's formulation chosen inside the training step."""
import json

import jax
import numpy as np
import optax
import pytest
from jax import numpy as jnp

import functional_cnn as fcn
from functional_cnn import dataparallel, train, tuning
from functional_cnn.audit import timing
from functional_cnn.functional import CONV_FORMULATIONS, _formulation

INPUT = (-1, 1, 8, 8)
EXAMPLE = jax.ShapeDtypeStruct((8, 8), jnp.uint8)


def make(pins):
    """1 -> 8 -> 4 channels, 3x3: the second convolution has 8*3*3 = 72 products per output,
    more than taps takes (64), so taps cannot run it."""
    net = fcn.serial(fcn.Conv2d(8, 3, bias=False, train_formulation=pins[0]), fcn.ReLU(),
                     fcn.Conv2d(4, 3, train_formulation=pins[1]), fcn.Flatten(), fcn.Linear(10))
    return train.make_trainer(net, optax.sgd(0.1), batch_size=4)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(_formulation.CACHE_DIR_ENV, str(tmp_path))
    _formulation.forget()
    yield tmp_path
    _formulation.forget()


class _NotCompiled:
    """Stands in for a compiled epoch: the fake races below never call it."""

    def __init__(self, lowered, *args):
        self.text = lowered.as_text()


class FakeTiming:
    """Patches the tuner's race: each program takes the time (ms a step; default 2.0) that
    ``ms_by_pins`` gives the pins compiled to it; ``raced`` counts the programs of each race."""

    def __init__(self, monkeypatch, ms_by_pins):
        self.ms_by_pins, self.raced, self.pins_of_text = ms_by_pins, [], {}
        lower = tuning._lowered_epoch

        def lowered_epoch(trainer, *args):
            lowered = lower(trainer, *args)
            pins = tuple(None if "train_formulation" not in layer else layer.split("'")[1]
                         for layer in repr(trainer.config.net).split("Conv2d(")[1:])
            self.pins_of_text.setdefault(lowered.as_text(), []).append(pins)
            return lowered
        monkeypatch.setattr(tuning, "_lowered_epoch", lowered_epoch)
        monkeypatch.setattr(tuning, "_Epochs", _NotCompiled)
        monkeypatch.setattr(timing, "race", self.race)

    def race(self, runners, rounds):
        self.raced.append(len(runners))
        return {program: {"min_ms": 50 * min(self.ms_by_pins.get(p, 2.0)
                                             for p in self.pins_of_text[runner.text])}
                for program, runner in runners.items()}


def test_each_convolution_gets_the_fastest_pin_beyond_the_margin_and_it_is_cached(
        cache_dir, monkeypatch):
    # conv1: taps 25% faster; banded is conv2d's own choice there: one program with "none",
    # one time. conv2: im2col 2% faster, within the 5% margin: conv2d's choice
    fake = FakeTiming(monkeypatch, {("taps", None): 1.5, ("banded", None): 1.8,
                                    ("taps", "im2col"): 1.96})
    result = tuning.tune_formulations(make, 2, INPUT, EXAMPLE, steps=50)
    assert result.pins == ("taps", None) and result.measured
    assert fake.raced == [5, 4]  # 6 and 5 variants (taps cannot run conv2), banded = none
    assert set(result.ms) == {f"conv1 {f}" for f in ("none", *CONV_FORMULATIONS)} | {
        "conv2 none", "conv2 banded", "conv2 im2col", "conv2 im2col_nhwc", "conv2 lax"}
    assert result.ms["conv1 taps"] == pytest.approx(1.5)
    assert result.ms["conv1 banded"] == result.ms["conv1 none"] == pytest.approx(1.8)
    saved = json.loads((cache_dir / _formulation.CACHE_NAME).read_text())
    entry = saved["machines"][_formulation.machine_key()][
        tuning.cache_key(make((None, None)), INPUT, EXAMPLE)]
    assert entry["choice"] == ["taps", None] and entry["ms_per_step"] == result.ms

    # a later process reads it instead of measuring; remeasure=True measures again
    _formulation.forget()
    monkeypatch.setattr(timing, "race", lambda *a: pytest.fail("measured a cached choice"))
    again = tuning.tune_formulations(make, 2, INPUT, EXAMPLE)
    assert again.pins == ("taps", None) and not again.measured and again.ms == result.ms
    FakeTiming(monkeypatch, {(None, "lax"): 1.0})
    assert tuning.tune_formulations(make, 2, INPUT, EXAMPLE, remeasure=True).pins == \
        (None, "lax")


def test_the_cache_key_is_the_unpinned_network_input_batch_modes_and_xla_options():
    key = tuning.cache_key(make((None, None)), INPUT, EXAMPLE)
    assert "train_formulation" not in key and "Conv2d(8, kernel_size=3" in key
    assert key.endswith("| input (1, 8, 8) | example (8, 8) uint8 | batch 4 | vjp custom | "
                        f"conv mode gates | tuning {tuning.TUNING_VERSION}")
    wider = train.make_trainer(make((None, None)).config.net, batch_size=8)
    assert tuning.cache_key(wider, INPUT, EXAMPLE) != key
    with fcn.functional.conv_formulation("auto"):  # another baseline: another measurement
        assert tuning.cache_key(make((None, None)), INPUT, EXAMPLE) != key
    loop = train.make_trainer(make((None, None)).config.net, batch_size=4,
                              compiler_options={"xla_cpu_use_fusion_emitters": False})
    assert tuning.cache_key(loop, INPUT, EXAMPLE) == key.replace(
        " | tuning", " | XLA {'xla_cpu_use_fusion_emitters': False} | tuning")


def test_a_pin_is_checked_at_the_trainers_batch_size(monkeypatch):
    from functional_cnn.functional import conv
    # conv1's im2col patches: 9 * 36 = 324 entries per image: room for one, not for 4
    monkeypatch.setattr(conv, "_IM2COL_MAX_ELEMENTS", 500)
    assert tuning._can_run(make((None, None)), INPUT)
    assert not tuning._can_run(make(("im2col", None)), INPUT)
    one = train.make_trainer(make(("im2col", None)).config.net, batch_size=1)
    assert tuning._can_run(one, INPUT)


def test_the_returned_timings_are_not_the_cache(cache_dir, monkeypatch):
    FakeTiming(monkeypatch, {})
    result = tuning.tune_formulations(make, 2, INPUT, EXAMPLE)
    result.ms["conv1 taps"] = -1.0
    again = tuning.tune_formulations(make, 2, INPUT, EXAMPLE)
    assert not again.measured and again.ms["conv1 taps"] == pytest.approx(2.0)
    again.ms.clear()
    assert tuning.tune_formulations(make, 2, INPUT, EXAMPLE).ms["conv1 taps"] == 2.0


def test_step_entries_stay_out_of_conv2ds_per_shape_listing(cache_dir):
    _formulation.remember(tuning.cache_key(make((None, None)), INPUT, EXAMPLE),
                          {"choice": ["taps", None]})
    _formulation.remember("forward | some shape", {"choice": "lax", "seconds": {"lax": 1.0}})
    assert list(_formulation.conv_formulations()) == ["forward | some shape"]
    assert tuning.cached_formulations(make, 2, INPUT, EXAMPLE) == ("taps", None)


@pytest.mark.parametrize("text,pins", [("taps,none", ("taps", None)),
                                       ("none,lax", (None, "lax"))])
def test_pins_on_a_command_line(text, pins):
    assert tuning.parse_pins(text, 2) == pins and tuning.pins_text(pins) == text


@pytest.mark.parametrize("text", ["taps", "taps,none,none", "taps,fft", ""])
def test_pins_on_a_command_line_must_name_each_convolution(text):
    with pytest.raises(ValueError, match=r"expected 2 comma-separated formulations, each one "
                                         r"of \('none', 'banded'.*got '"):
        tuning.parse_pins(text, 2)


@pytest.mark.parametrize("choice", [["taps"], ["taps", "fourier"], "taps,none", ["none", None]])
def test_a_malformed_cache_entry_is_not_used(cache_dir, choice):
    _formulation.remember(tuning.cache_key(make((None, None)), INPUT, EXAMPLE),
                          {"choice": choice})
    assert tuning.cached_formulations(make, 2, INPUT, EXAMPLE) is None


def test_a_cached_pin_that_cannot_run_is_not_used_unless_unchecked(cache_dir):
    _formulation.remember(tuning.cache_key(make((None, None)), INPUT, EXAMPLE),
                          {"choice": [None, "taps"]})  # taps cannot run the second one
    assert tuning.cached_formulations(make, 2, INPUT, EXAMPLE) is None
    assert tuning.cached_formulations(make, 2, INPUT, EXAMPLE, check=False) == (None, "taps")
    with pytest.raises(ValueError, match="Conv2d.*taps.*cannot run"):
        make((None, "taps")).init(jax.random.key(0), (4, 1, 8, 8))


def test_a_real_tuning_compiles_and_times_every_variant_from_one_state(cache_dir):
    result = tuning.tune_formulations(make, 2, INPUT, EXAMPLE, steps=2, rounds=1)
    assert result.measured and all(p is None or p in CONV_FORMULATIONS for p in result.pins)
    assert set(result.ms) == {f"conv1 {f}" for f in ("none", *CONV_FORMULATIONS)} | {
        f"conv2 {f}" for f in ("none", "banded", "im2col", "im2col_nhwc", "lax")}
    assert all(ms > 0 for ms in result.ms.values())
    assert tuning.cached_formulations(make, 2, INPUT, EXAMPLE) == result.pins


def on_mesh(pins):
    """:func:`make`'s trainer over a mesh of this process's one device."""
    return train.make_trainer(make(pins).config.net, optax.sgd(0.1), batch_size=4,
                              mesh=dataparallel.make_mesh(1))


def test_a_trainer_over_a_mesh_is_tuned_over_it_under_a_key_of_its_own(cache_dir):
    key = tuning.cache_key(on_mesh((None, None)), INPUT, EXAMPLE)
    assert key == tuning.cache_key(make((None, None)), INPUT, EXAMPLE).replace(
        " | tuning", " | devices 1 | tuning")
    result = tuning.tune_formulations(on_mesh, 2, INPUT, EXAMPLE, steps=2, rounds=1)
    assert result.measured and len(result.ms) == 11
    assert tuning.cached_formulations(on_mesh, 2, INPUT, EXAMPLE) == result.pins
    assert tuning.cached_formulations(make, 2, INPUT, EXAMPLE) is None  # not one device's


def test_every_epoch_of_a_timing_starts_from_the_same_state():
    unpinned = make((None, None))
    ts = unpinned.init(jax.random.key(0), INPUT)
    images, labels = tuning._random_data(EXAMPLE, 8, 10)
    assert images.dtype == jnp.uint8 and images.shape == (8, 8, 8) and labels.max() < 10
    run = tuning._Epochs(tuning._lowered_epoch(unpinned, 2, ts, images, labels), ts, images,
                         labels)
    run(3)  # donates a copy each time: the initial state is intact
    np.testing.assert_array_equal(run.ts.params[0]["weight"], ts.params[0]["weight"])
    assert int(run.ts.step) == int(ts.step) == 0


def test_bad_arguments_are_refused_before_anything_is_compiled():
    with pytest.raises(ValueError, match="convolutions a positive int, got 0"):
        tuning.tune_formulations(make, 0, INPUT, EXAMPLE)
    with pytest.raises(TypeError, match="must return a train.Trainer, got Layer"):
        tuning.tune_formulations(lambda pins: make(pins).config.net, 2, INPUT, EXAMPLE)
    with pytest.raises(ValueError, match="a trainer with scan=True .* got scan=False"):
        tuning.tune_formulations(lambda pins: train.make_trainer(
            make(pins).config.net, batch_size=4, scan=False), 2, INPUT, EXAMPLE)



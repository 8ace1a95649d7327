"""fcn.summary: rows, shapes and counts against the layers' own init and the torch twins; FLOPs
against an analytic count; the README's pasted table against the real one."""
import math
import pathlib
import re

import jax
import pytest

import functional_cnn as fcn
from benchmarks.torch_twins import TWINS

ROOT = pathlib.Path(__file__).resolve().parents[1]
MNIST = (-1, 1, 28, 28)


# fcn.summary of test_rows_of_a_serial_residual_net's network, the rows between the rules.
RESIDUAL_NET_ROWS = """\
serial                                               (-1, 3)                             --     --
  0 Conv2d(2, kernel_size=3, padding=1)              (-1, 2, 4, 4)                       20     --
  1 residual                                         (-1, 2, 4, 4)                       --     --
    1.0 fan_out(2)                                   ((-1, 2, 4, 4), (-1, 2, 4, 4))      --     --
    1.1 parallel                                     ((-1, 2, 4, 4), (-1, 2, 4, 4))      --     --
      1.1.0 serial                                   (-1, 2, 4, 4)                       --     --
        1.1.0.0 Conv2d(2, kernel_size=3, padding=1)  (-1, 2, 4, 4)                       38     --
        1.1.0.1 BatchNorm2d()                        (-1, 2, 4, 4)                        4      4
      1.1.1 Identity()                               (-1, 2, 4, 4)                       --     --
    1.2 fan_in_sum()                                 (-1, 2, 4, 4)                       --     --
  2 Flatten()                                        (-1, 32)                            --     --
  3 Linear(3)                                        (-1, 3)                             99     --
"""


def footer_number(text, label):
    match = re.search(rf"^{re.escape(label)}: ([\d,]+)", text, re.M)
    assert match, f"no {label!r} line in\n{text}"
    return int(match.group(1).replace(",", ""))


def params_and_state(net, input_shape):
    """``net.init``'s params and state as shapes: an eager init compiles op by op (seconds)."""
    return jax.eval_shape(lambda key: net.init(key, input_shape)[1:], jax.random.key(1))


def leaf_count(tree):
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def lenet_summary():
    return fcn.summary(fcn.models.lenet(), MNIST)


@pytest.mark.parametrize("name", ["lenet", "mytorch_net"])
def test_totals_match_the_torch_twin_and_the_leaves(name, torch, lenet_summary):
    text = lenet_summary if name == "lenet" else fcn.summary(getattr(fcn.models, name)(), MNIST)
    params, state = params_and_state(getattr(fcn.models, name)(), MNIST)
    twin = TWINS[name](torch.nn)
    running = sum(b.numel() for n, b in twin.named_buffers() if "running" in n)
    assert footer_number(text, "Trainable params") == leaf_count(params) == sum(
        p.numel() for p in twin.parameters())
    assert footer_number(text, "Non-trainable params (state)") == leaf_count(state) == running
    assert footer_number(text, "Total params") == leaf_count(params) + leaf_count(state)
    assert footer_number(text, "Params + state size") == 4 * (leaf_count(params) +
                                                              leaf_count(state))
    assert footer_number(text, "Forward FLOPs") > 0


def test_rows_of_a_serial_residual_net():
    net = fcn.serial(fcn.Conv2d(2, 3, padding=1),
                     fcn.residual(fcn.Conv2d(2, 3, padding=1), fcn.BatchNorm2d()),
                     fcn.Flatten(), fcn.Linear(3))
    lines = fcn.summary(net, (-1, 1, 4, 4)).splitlines()
    assert lines[1].split() == ["Layer", "Output", "shape", "Params", "State"]
    assert lines[3:15] == RESIDUAL_NET_ROWS.splitlines()
    assert set(lines[0]) == set(lines[2]) == set(lines[15]) == {"="}
    # The paths are the params tree's: 1.1.0.0 is params[1][1][0][0].
    params, _ = params_and_state(net, (-1, 1, 4, 4))
    assert leaf_count(params[1][1][0][0]) == 38 and leaf_count(params[3]) == 99


def test_parallel_and_concat_rows_and_totals():
    net = fcn.serial(fcn.fan_out(2), fcn.parallel(fcn.Conv2d(3, 1), fcn.MaxPool2d(3, 1, 1)),
                     fcn.fan_in_concat(), fcn.Flatten(), fcn.Linear(2, bias=False))
    text = fcn.summary(net, (5, 2, 3, 3))
    rows = [re.split(r"\s{2,}", line.strip())[0] for line in text.splitlines()[3:10]]
    assert rows == ["serial", "0 fan_out(2)", "1 parallel", "1.0 Conv2d(3, kernel_size=1)",
                    "1.1 MaxPool2d(3, stride=1, padding=1)", "2 fan_in_concat()", "3 Flatten()"]
    assert "((5, 3, 3, 3), (5, 2, 3, 3))" in text.splitlines()[5]
    assert "(5, 5, 3, 3)" in text.splitlines()[8] and "batch of 5" in text
    assert footer_number(text, "Total params") == 3 * 2 + 3 + 45 * 2
    # A network that starts with parallel takes a tuple of input shapes.
    text = fcn.summary(fcn.parallel(fcn.Linear(3), fcn.Linear(4)), ((-1, 2), (-1, 5)))
    assert footer_number(text, "Total params") == 9 + 24
    assert footer_number(text, "Forward FLOPs") == 2 * 2 * 3 + 3 + 2 * 5 * 4 + 4


@pytest.mark.parametrize("batch", [-1, 4])
def test_flops_of_a_linear_layer_are_near_two_multiply_adds_per_weight(batch):
    text = fcn.summary(fcn.Linear(30), (batch, 50))
    rows = 1 if batch == -1 else batch
    analytic = 2 * 50 * 30 * rows  # one multiply and one add per weight and row
    assert analytic <= footer_number(text, "Forward FLOPs") <= 1.2 * analytic
    assert ("batch of 1 for -1" if batch == -1 else "batch of 4") in text


@pytest.mark.parametrize("analysis,shown", [
    ([{"flops": 7.0}], "7 "), ({"flops": 8.0}, "8 "), (None, "n/a"), ([], "n/a"), ({}, "n/a"),
    ({"flops": -1.0}, "n/a")])
def test_cost_analysis_in_each_form_jax_has_returned(monkeypatch, analysis, shown):
    monkeypatch.setattr(jax.stages.Compiled, "cost_analysis", lambda self: analysis)
    text = fcn.summary(fcn.Linear(2), (-1, 3))
    assert f"Forward FLOPs: {shown}" in text


def test_bad_input_shape_raises_the_located_init_error():
    with pytest.raises(ValueError, match=r"^serial\[0\] > Conv2d: expected a 4-D input"):
        fcn.summary(fcn.models.lenet(), (-1, 28, 28))


def test_a_custom_layer_is_one_row():
    base = fcn.serial(fcn.Linear(4), fcn.ReLU())
    custom = fcn.Layer(base.init, base.apply)  # no children recorded: not walked into
    lines = fcn.summary(custom, (-1, 3)).splitlines()
    assert lines[3].split() == ["Layer", "(-1,", "4)", "16", "--"] and set(lines[4]) == {"="}


def test_readme_shows_the_real_lenet_summary(lenet_summary):
    readme = (ROOT / "README.md").read_text()
    call = "print(fcn.summary(fcn.models.lenet(), (-1, 1, 28, 28)))"
    block = re.search(re.escape(call) + r"\n```\n+```text\n(.*?)\n```", readme, re.S)
    assert block, "README lost its fcn.summary example"
    # The FLOPs depend on how XLA compiles the convolutions; the rest must match exactly.
    strip_flops = [line for line in lenet_summary.splitlines() if "FLOPs" not in line]
    assert [line for line in block.group(1).splitlines() if "FLOPs" not in line] == strip_flops

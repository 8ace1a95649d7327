"""``benchmarks/time_to_accuracy_torch.py``, the PyTorch twin of ``experiments.time_to_accuracy``:
its network matches the JAX one, its schedule matches optax's, and a short run on a few images."""
import json

import jax
import numpy as np
import optax
import pytest
from jax import numpy as jnp

import functional_cnn as fcn
from benchmarks.torch_twins import TWINS
from experiments.time_to_accuracy import net
from tests.conftest import assert_close, needs_mnist


def test_twin_gives_the_same_logits_as_the_jax_net(torch):
    jax_net = net()
    _, params, state = jax_net.init(jax.random.key(0), (-1, 1, 28, 28))
    module = TWINS["time_to_accuracy"](torch.nn)
    with torch.no_grad():  # non-trivial running statistics, so eval mode is really tested
        for bn in (module[1], module[5]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    params, state = fcn.load_state_dict(params, state, module.state_dict())
    x = np.random.default_rng(0).normal(size=(4, 1, 28, 28)).astype(np.float32)
    logits, _ = jax_net.apply(params, state, jnp.asarray(x), train=False)
    module.eval()
    with torch.no_grad():
        expected = module(torch.tensor(x)).numpy()
    assert_close(logits, expected, 1e-5, 1e-5, "logits")


@pytest.mark.parametrize("steps", [4, 16, 469, 938])
def test_torch_schedule_matches_optax_and_holds_its_end(steps, torch):
    from benchmarks.time_to_accuracy_torch import onecycle
    peak = 1e-2
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = onecycle(optimizer, peak, steps)
    ours = []
    for _ in range(steps + 5):  # past the end, as a run beyond --epochs does
        ours.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler.last_epoch < steps:
            scheduler.step()
    schedule = optax.cosine_onecycle_schedule(steps, peak_value=peak, pct_start=0.25)
    expected = np.array([float(schedule(i)) for i in range(steps + 5)])
    np.testing.assert_allclose(ours, expected, rtol=2e-3, atol=1e-9)
    assert int(np.argmax(ours)) == int(np.argmax(expected)) == int(0.25 * steps)


@needs_mnist
def test_short_run_writes_the_json(tmp_path, torch):
    from benchmarks import time_to_accuracy_torch
    out = tmp_path / "r.json"
    code = time_to_accuracy_torch.main(["--max-epochs", "1", "--epochs", "1", "--target", "0.5",
                                        "--train-limit", "2000", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert code == (0 if saved["reached"] else 1)
    assert saved["framework"] == "torch" and saved["threads"] == torch.get_num_threads()
    assert saved["target"] == 0.5 and isinstance(saved["reached"], bool)
    assert saved["cpu_model"] and saved["cpu_count"] >= 1  # the figure's machine
    assert len(saved["history"]) == 1
    entry = saved["history"][0]
    assert entry["epoch"] == 1 and 0.0 <= entry["test_accuracy"] <= 1.0
    assert entry["seconds"] == saved["seconds"] > 0
    assert saved["reached"] == (entry["test_accuracy"] >= 0.5)

"""One-epoch smoke runs of every experiment on a few images of the shared MNIST, and the CLI."""
import importlib
import json
import os

import jax
import pytest

from functional_cnn import data

ROOT = os.environ.get(data.ENV_VAR)
HAVE_MNIST = bool(ROOT) and all(
    data._find(data.raw_dir("MNIST", ROOT), stem) for stem in sum(data._FILES.values(), ()))
needs_mnist = pytest.mark.skipif(
    not HAVE_MNIST, reason=f"MNIST raw files not found under ${data.ENV_VAR}/MNIST/raw "
                           f"(set {data.ENV_VAR}, as .ci/run does)")

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
                  "devices", "processes"):
        assert field in saved
    assert saved["devices"] == jax.device_count()  # default: every device of the run
    assert saved["epochs"] == 1 and saved["vjp"] == "custom"
    assert 0.0 <= saved["test_accuracy"] <= 1.0 and saved["final_train_loss"] > 0
    assert saved["train_range"] == ["train", start, stop]
    assert saved["test_accuracy"] == result["test_accuracy"]
    if name == "mytorch_net":
        assert (tmp_path / "r.png").stat().st_size > 10_000


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

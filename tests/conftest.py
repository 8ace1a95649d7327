"""Shared fixtures: a single-threaded torch oracle, hypothesis profiles, ``needs_mnist``;
``assert_close`` is the package's own (``functional_cnn.verify``)."""
import os
import sys
import tempfile

import pytest
from hypothesis import HealthCheck, settings

from functional_cnn.verify import assert_close  # noqa: F401  (the tests' import point)

# conv2d picks each part's formulation by the static gates, not by measuring every random
# shape hypothesis draws (mode "auto"); subprocesses inherit it. tests/functional/
# test_conv_formulation.py sets "auto" where it tests it.
os.environ["FUNCTIONAL_CNN_CONV"] = "gates"
# Measured choices (conv2d's "auto", functional_cnn.tuning) go to a cache of the session's own:
# one left in the user's cache by earlier runs would change what the tests run.
os.environ["FUNCTIONAL_CNN_CACHE_DIR"] = tempfile.mkdtemp(prefix="functional_cnn_tests_")

settings.register_profile(
    "default", deadline=None, max_examples=25, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
# CI: the same examples on every run, so a red build is reproducible.
# Fewer examples per op there (every op's edge cases always run besides them; the audit walks
# the whole grid): 25 ops x 25 examples, each compiling both paths, was most of the suite.
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True,
                          max_examples=6)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def _have_mnist() -> bool:
    from functional_cnn import data
    root = os.environ.get(data.ENV_VAR)
    return bool(root) and all(data._find(data.raw_dir("MNIST", root), stem)
                              for stem in sum(data._FILES.values(), ()))


needs_mnist = pytest.mark.skipif(
    not _have_mnist(), reason="MNIST raw files not found under $FUNCTIONAL_CNN_DATA/MNIST/raw "
                              "(set FUNCTIONAL_CNN_DATA, as .ci/run does)")


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Torch's global generator at the same state before every test: a test that draws torch
    weights draws the same ones whatever ran before it in its worker."""
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(0)


@pytest.fixture(scope="session")
def torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch


def float64():
    """Context in which JAX computes in float64 (``jax.experimental.enable_x64`` in older JAX)."""
    import jax
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64
    return enable_x64()

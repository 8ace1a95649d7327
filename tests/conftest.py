"""Shared fixtures: a single-threaded torch oracle, hypothesis profiles, ``needs_mnist``."""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, max_examples=25, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
# CI: the same examples on every run, so a red build is reproducible.
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def _have_mnist() -> bool:
    from functional_cnn import data
    root = os.environ.get(data.ENV_VAR)
    return bool(root) and all(data._find(data.raw_dir("MNIST", root), stem)
                              for stem in sum(data._FILES.values(), ()))


needs_mnist = pytest.mark.skipif(
    not _have_mnist(), reason="MNIST raw files not found under $FUNCTIONAL_CNN_DATA/MNIST/raw "
                              "(set FUNCTIONAL_CNN_DATA, as .ci/run does)")


@pytest.fixture(scope="session")
def torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch


def assert_close(actual, expected, rtol, atol, what=""):
    """Leaf-wise ``|a - e| <= atol + rtol * max|e|`` (scale of the whole leaf, not per element)."""
    import jax
    for i, (a, e) in enumerate(zip(jax.tree.leaves(actual), jax.tree.leaves(expected))):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert a.shape == e.shape, f"{what} leaf {i}: shape {a.shape} != {e.shape}"
        scale = float(np.max(np.abs(e))) if e.size else 0.0
        err = float(np.max(np.abs(a - e))) if e.size else 0.0
        assert err <= atol + rtol * scale, (
            f"{what} leaf {i}: max abs error {err:.3g} > {atol} + {rtol} * {scale:.3g}")


def float64():
    """Context in which JAX computes in float64 (``jax.experimental.enable_x64`` in older JAX)."""
    import jax
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64
    return enable_x64()

"""Package-level promises: torch-free import, hand-written rules, registry, README commands."""
import ast
import pathlib
import re
import subprocess
import sys

import functional_cnn as fcn
from functional_cnn.functional import REGISTRY

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = {"vjp", "grad", "jvp", "linearize", "linear_transpose", "value_and_grad", "hessian",
             "jacfwd", "jacrev"}


def test_import_does_not_import_torch():
    code = "import sys, functional_cnn, functional_cnn.audit, functional_cnn.verify; " \
           "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.strip()
    assert out == "[]"


def test_backward_rules_never_call_jax_differentiation():
    offenders = []
    for path in sorted((ROOT / "functional_cnn" / "functional").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN and \
                    isinstance(node.value, ast.Name) and node.value.id == "jax":
                offenders.append(f"{path.name}:{node.lineno} jax.{node.attr}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jax") and \
                    any(alias.name in FORBIDDEN for alias in node.names):
                offenders.append(f"{path.name}:{node.lineno} from {node.module} import ...")
    assert offenders == []


def test_registry_lists_every_public_op_and_loss():
    assert set(fcn.functional.ops("loss")) == {"cross_entropy", "binary_cross_entropy_with_logits",
                                               "mse_loss", "nll_loss", "huber_loss"}
    assert set(fcn.functional.ops("op")) == {
        "linear", "conv2d", "max_pool2d", "avg_pool2d", "batch_norm", "relu", "leaky_relu",
        "sigmoid", "tanh", "softmax", "log_softmax", "dropout",
        "conv_transpose2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "interpolate",
        "layer_norm", "group_norm", "dropout2d", "gelu", "silu", "elu", "softplus", "hardtanh"}
    for name, info in REGISTRY.items():
        assert getattr(fcn.functional, name) is info.fn
    for name in fcn.functional.ops("loss"):
        assert getattr(fcn, name) is REGISTRY[name].fn


def test_readme_first_code_block_holds_the_two_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```[a-z]*\n(.*?)```", text, re.S).group(1)
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) == 2
    assert "pip install -r requirements.txt" in lines[0] and "experiments." in lines[0]
    assert "pip install -r requirements.txt" in lines[1] and "pytest" in lines[1]

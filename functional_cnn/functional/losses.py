"""Losses with hand-written rules: ``cross_entropy``, ``nll_loss``,
``binary_cross_entropy_with_logits``, ``mse_loss``, ``huber_loss``. All share the reduction and
its transpose."""
from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
from jax import lax
from jax import numpy as jnp

from .. import _checks
from . import _spaces as S
from ._registry import check_vjp, register, two_gradients

REDUCTIONS = ("mean", "sum", "none")


class LossConfig(NamedTuple):
    reduction: str
    label_smoothing: float = 0.0


def _reduce(cfg, per_element):
    if cfg.reduction == "mean":
        return per_element.mean()
    return per_element.sum() if cfg.reduction == "sum" else per_element


def _unreduce(cfg, g, shape):
    """Transpose of :func:`_reduce`: each element's share of the output cotangent."""
    if cfg.reduction == "none":
        return g
    scale = 1 / max(int(np.prod(shape)), 1) if cfg.reduction == "mean" else 1
    return jnp.broadcast_to(g * np.array(scale, g.dtype), shape)


def _check_reduction(where, reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{where}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_elementwise_pair(where, vjp, reduction, a, b, names):
    """The checks of an elementwise loss of two same-shaped floating arrays."""
    check_vjp(where, vjp)
    _check_reduction(where, reduction)
    _checks.check_floating(where, a, names[0])
    _checks.check_floating(where, b, names[1])
    if jnp.shape(a) != jnp.shape(b):
        raise ValueError(f"{where}: expected {names[1]} of the same shape as {names[0]} "
                         f"{tuple(jnp.shape(a))}, got {tuple(jnp.shape(b))}")


def _class_axis_last(where, name, scores, labels):
    """``scores (N, C, d1, ...)`` with the class axis moved last, and ``labels (N, d1, ...)``,
    after checking them against each other; unbatched ``(C,)`` scores become ``(1, C)``."""
    if jnp.ndim(scores) == 0:
        raise ValueError(f"{where}: expected {name} of shape (N, C, ...) or (C,), got a scalar")
    if jnp.ndim(scores) == 1:
        scores, labels = scores[None], jnp.reshape(labels, (1,))
    class_axis_last = jnp.moveaxis(scores, 1, -1)
    if jnp.shape(labels) != class_axis_last.shape[:-1]:
        raise ValueError(f"{where}: expected labels of shape {class_axis_last.shape[:-1]} for "
                         f"{name} {tuple(scores.shape)}, got {tuple(jnp.shape(labels))}")
    _checks.check_labels(where, labels, scores.shape[1])
    return class_axis_last, labels


def _outside_classes(labels, classes: int):
    """Where a label is no class index: the rows cross_entropy and nll_loss make NaN."""
    return (labels < 0) | (labels >= classes)


def _unbatched(scores, loss):
    """``reduction="none"`` of unbatched ``(C,)`` scores: the one element's loss, a scalar as in
    PyTorch, not the ``(1,)`` of the batch :func:`_class_axis_last` made of it."""
    return jnp.reshape(loss, ()) if jnp.ndim(scores) == 1 else loss


# ----------------------------------------------------------------------------- cross_entropy

def _picked(log_probs, labels):
    return jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]


def _log_probs(logits):
    z = logits - lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    return z - jnp.log(jnp.exp(z).sum(axis=-1, keepdims=True))


def _nan_outside_classes(logits, labels):
    """``logits`` with the row of every label outside ``[0, C)`` set to NaN.

    Under jit the labels' values are unknown to Python, so the concrete check cannot run, and
    the gather alone would turn them into a finite loss (a negative label wraps around) with a
    finite gradient. A NaN row makes the row's loss and its gradient NaN on both paths (the
    custom rule reads the NaN probabilities; autodiff differentiates through the addition), so
    a bad label shows instead of training on quietly. One compare and add per logit: free
    beside the softmax.
    """
    outside = _outside_classes(labels, logits.shape[-1])
    return logits + jnp.where(outside, np.array(np.nan, logits.dtype),
                              np.array(0, logits.dtype))[..., None]


def _ce_forward(cfg, logits, labels):
    logp = _log_probs(_nan_outside_classes(logits, labels))
    nll = -_picked(logp, labels)
    eps = cfg.label_smoothing
    if eps:
        nll = (1 - eps) * nll - eps * logp.mean(axis=-1)
    return _reduce(cfg, nll)


def _ce_fwd(cfg, logits, labels):
    probs = jnp.exp(_log_probs(_nan_outside_classes(logits, labels)))
    return _ce_forward(cfg, logits, labels), (probs, labels)


def _ce_bwd(cfg, residuals, g):
    probs, labels = residuals
    classes = probs.shape[-1]
    eps = cfg.label_smoothing
    onehot = labels[..., None] == jnp.arange(classes)
    target = jnp.where(onehot, 1 - eps + eps / classes, eps / classes).astype(probs.dtype)
    share = _unreduce(cfg, g, labels.shape)
    return (probs - target) * share[..., None], None


_cross_entropy = two_gradients(_ce_forward, _ce_fwd, _ce_bwd)


@register(kind="loss")
def cross_entropy(logits, labels, reduction: str = "mean", label_smoothing: float = 0.0, *,
                  vjp: str = "custom"):
    """Softmax cross-entropy with integer labels, ``torch.nn.functional.cross_entropy``.

    ``logits (N, C)`` or ``(N, C, d1, ...)`` with ``labels (N,)`` or ``(N, d1, ...)``, or
    unbatched ``(C,)`` with a scalar label. With smoothing ``eps`` the target distribution is
    ``q = (1 - eps) onehot(label) + eps / C`` and per element::

        loss = -sum_c q_c log softmax(x)_c     (log-sum-exp shifted by max x: finite at 1e4)

    Backward rule: ``dx = (softmax(x) - q) * share(g)`` where ``share`` undoes the reduction
    (``g / N`` for mean, ``g`` for sum, ``g[n]`` for none).

    Smooth in the logits: ties (a zero-initialized last layer) need no choice, both paths
    give the derivative.

    Labels outside ``[0, C)`` (negative ones too) raise ``ValueError`` when their values are
    known (eager calls); under jit they are not, and the element's loss and its row of the
    gradient are NaN instead, on both paths.
    """
    where = "cross_entropy"
    check_vjp(where, vjp)
    _check_reduction(where, reduction)
    _checks.check_floating(where, logits, "logits")
    _checks.check_probability(where, "label_smoothing", label_smoothing)
    class_axis_last, labels = _class_axis_last(where, "logits", logits, labels)
    cfg = LossConfig(reduction, float(label_smoothing))
    return _unbatched(logits, _cross_entropy(vjp, cfg, class_axis_last, labels))


# ----------------------------------------------------------------------------- BCE with logits

@jax.custom_jvp
def _times(a, w):
    """``a * w`` with ``inf * 0 = 0``: a term whose weight is 0 is off, also at an infinite
    logit (the exact loss of ``x = -inf, t = 0`` is 0, not ``nan``)."""
    return jnp.where(w == 0, jnp.zeros((), a.dtype), a * w)


@_times.defjvp
def _times_jvp(primals, tangents):
    # The product rule, d(a w) = w da + a dw, so the weight's derivative stays ``a`` (-x for
    # the target: +-inf at an infinite logit, as the hand-written rule says) where the value
    # is switched off; a double ``where`` would make it 0 there.
    (a, w), (da, dw) = primals, tangents
    return _times(a, w), w * da + a * dw


def _bce_forward(cfg, logits, targets):
    """``t softplus(-x) + (1 - t) softplus(x)`` as ``|x| w + log(1 + exp(-|x|))`` with weight
    ``w = 1 - t`` for ``x >= 0`` and ``t`` below: never exponentiates a large positive number.
    ``|x|`` is written as a ``where`` on ``x >= 0``, so autodiff at ``x = 0`` takes the ``x >= 0``
    side of both terms, whose derivatives sum to the true one, ``sigmoid(0) - t``. (``max(x, 0)``
    and ``abs`` would each pick their own one-sided derivative there and give ``-t``.)"""
    nonneg = logits >= 0
    size = jnp.where(nonneg, logits, -logits)
    weight = jnp.where(nonneg, 1 - targets, targets)
    return _reduce(cfg, _times(size, weight) + jnp.log1p(jnp.exp(-size)))


def _bce_fwd(cfg, logits, targets):
    return _bce_forward(cfg, logits, targets), (logits, targets)


def _bce_bwd(cfg, residuals, g):
    logits, targets = residuals
    share = _unreduce(cfg, g, logits.shape)
    return (lax.logistic(logits) - targets) * share, -logits * share


_bce_with_logits = two_gradients(_bce_forward, _bce_fwd, _bce_bwd)


@register(kind="loss")
def binary_cross_entropy_with_logits(logits, targets, reduction: str = "mean", *,
                                     vjp: str = "custom"):
    """``-[t log sigmoid(x) + (1 - t) log(1 - sigmoid(x))]``, computed stably, then reduced.

    Backward rule: ``dx = (sigmoid(x) - t) share(g)`` and ``dt = -x share(g)``.

    The loss is smooth in ``x``: both paths give ``sigmoid(0) - t = 1/2 - t`` at ``x = 0`` (as
    PyTorch), where the stable form's ``|x|`` has its kink. At ``x = -inf, t = 0`` and
    ``x = +inf, t = 1`` the loss is its exact 0 (PyTorch: nan), with ``dx = 0`` and
    ``dt = -x`` (``+-inf``) on both paths; any other target there gives ``inf``.
    """
    _check_elementwise_pair("binary_cross_entropy_with_logits", vjp, reduction, logits,
                            targets, ("logits", "targets"))
    return _bce_with_logits(vjp, LossConfig(reduction), logits, targets)


# ----------------------------------------------------------------------------- mse

def _mse_forward(cfg, pred, target):
    diff = pred - target
    return _reduce(cfg, diff * diff)


def _mse_fwd(cfg, pred, target):
    return _mse_forward(cfg, pred, target), pred - target


def _mse_bwd(cfg, diff, g):
    dpred = 2 * diff * _unreduce(cfg, g, diff.shape)
    return dpred, -dpred


_mse_loss = two_gradients(_mse_forward, _mse_fwd, _mse_bwd)


@register(kind="loss")
def mse_loss(pred, target, reduction: str = "mean", *, vjp: str = "custom"):
    """``(pred - target)^2``, reduced. Backward rule: ``dpred = 2 (pred - target) share(g)``,
    ``dtarget = -dpred``. Smooth: both paths give the derivative everywhere."""
    _check_elementwise_pair("mse_loss", vjp, reduction, pred, target, ("pred", "target"))
    return _mse_loss(vjp, LossConfig(reduction), pred, target)


# ----------------------------------------------------------------------------- nll

def _nll_forward(cfg, log_probs, labels):
    # a row whose label is outside [0, C) times NaN: its loss and (through the product, on
    # the autodiff path too) its gradient NaN, as cross_entropy's; the gather alone would wrap
    # a negative label around to a finite loss under jit, where labels cannot be checked
    bad = _outside_classes(labels, log_probs.shape[-1])
    flagged = log_probs * jnp.where(bad, np.array(np.nan, log_probs.dtype),
                                    np.array(1, log_probs.dtype))[..., None]
    return _reduce(cfg, -_picked(flagged, labels))


def _nll_fwd(cfg, log_probs, labels):
    return _nll_forward(cfg, log_probs, labels), (labels, log_probs.shape[-1])


def _nll_bwd(cfg, residuals, g):
    labels, classes = residuals
    share = _unreduce(cfg, g, labels.shape)
    onehot = labels[..., None] == jnp.arange(classes)
    grad = jnp.where(onehot, -share[..., None], jnp.zeros((), share.dtype))
    return jnp.where(_outside_classes(labels, classes)[..., None],
                     np.array(np.nan, grad.dtype), grad), None


_nll_loss = two_gradients(_nll_forward, _nll_fwd, _nll_bwd)


@register(kind="loss")
def nll_loss(log_probs, labels, reduction: str = "mean", *, vjp: str = "custom"):
    """Negative log-likelihood of integer labels, ``torch.nn.functional.nll_loss`` (no class
    weights, no ignore_index).

    ``log_probs (N, C)`` or ``(N, C, d1, ...)`` with ``labels (N,)`` or ``(N, d1, ...)``, or
    unbatched ``(C,)`` with a scalar label; per element ``loss = -log_probs[n, label_n]``, then
    the mean over all elements, their sum, or none. The input is taken as given (any floats).

    Backward rule: linear, ``dlog_probs = -onehot(label) share(g)`` where ``share`` undoes the
    reduction (``g / N`` for mean, ``g`` for sum, ``g[n]`` for none).
    Linear in ``log_probs``: both paths give the same gradient everywhere, ties included.

    Labels outside ``[0, C)`` raise ``ValueError`` when their values are known (eager calls);
    under jit the element's loss and its row of the gradient are NaN, on both paths.
    """
    where = "nll_loss"
    check_vjp(where, vjp)
    _check_reduction(where, reduction)
    _checks.check_floating(where, log_probs, "log_probs")
    class_axis_last, labels = _class_axis_last(where, "log_probs", log_probs, labels)
    return _unbatched(log_probs, _nll_loss(vjp, LossConfig(reduction), class_axis_last, labels))


# ----------------------------------------------------------------------------- huber

class HuberConfig(NamedTuple):
    reduction: str
    delta: float


def _huber_forward(cfg, pred, target):
    diff = pred - target
    size = jnp.abs(diff)
    per = jnp.where(size < cfg.delta, 0.5 * diff * diff, cfg.delta * (size - 0.5 * cfg.delta))
    return _reduce(cfg, per)


def _huber_fwd(cfg, pred, target):
    return _huber_forward(cfg, pred, target), pred - target


def _huber_bwd(cfg, diff, g):
    clipped = jnp.where(jnp.abs(diff) < cfg.delta, diff, cfg.delta * jnp.sign(diff))
    dpred = clipped * _unreduce(cfg, g, diff.shape)
    return dpred, -dpred


_huber_loss = two_gradients(_huber_forward, _huber_fwd, _huber_bwd)


@register(kind="loss")
def huber_loss(pred, target, reduction: str = "mean", delta: float = 1.0, *,
               vjp: str = "custom"):
    """``0.5 d^2`` where ``|d| < delta``, else ``delta (|d| - 0.5 delta)``, with
    ``d = pred - target``, reduced (``torch.nn.functional.huber_loss``).

    Backward rule: ``dpred = clip(d, -delta, delta) share(g)``, ``dtarget = -dpred``. The
    derivative is continuous at ``|d| == delta`` (both pieces give ``delta sign(d)``), so there
    is no subgradient to choose; the second derivative jumps there, and both paths take the
    outer piece's 0.
    """
    where = "huber_loss"
    _check_elementwise_pair(where, vjp, reduction, pred, target, ("pred", "target"))
    if not delta > 0:
        raise ValueError(f"{where}: delta must be positive, got {delta!r}")
    return _huber_loss(vjp, HuberConfig(reduction, float(delta)), pred, target)


# ------------------------------------------------ hyperparameter spaces (tests, audit)

def _classification_case(name, input_name, extra=()):
    """Builder for a loss of class scores ``(N, C, ...)`` and integer labels."""
    def build(rng, c, dtype):
        n, classes, extra_dims = c["batch"], c["classes"], tuple(c["extra_dims"])
        scores = S.normal(rng, (n, classes) + extra_dims, dtype, c.get("scale", 1.0))
        labels = rng.integers(0, classes, (n,) + extra_dims)
        kw = dict(reduction=c["reduction"], **{k: c[k] for k in extra})
        fn = S.op(name)
        return S.Case(name, c, {input_name: scores},
                    lambda z, vjp="custom": fn(z, jnp.asarray(labels), vjp=vjp, **kw),
                    lambda torch, z: getattr(torch.nn.functional, name)(
                        z, torch.as_tensor(labels), **kw))
    return build


def _bce_case(rng, c, dtype):
    shape = tuple(c["shape"])
    inputs = {"logits": S.normal(rng, shape, dtype, c["scale"]),
              "targets": rng.uniform(0, 1, shape).astype(dtype)}
    return S.Case("binary_cross_entropy_with_logits", c, inputs,
                lambda z, t, vjp="custom": binary_cross_entropy_with_logits(
                    z, t, c["reduction"], vjp=vjp),
                lambda torch, z, t: torch.nn.functional.binary_cross_entropy_with_logits(
                    z, t, reduction=c["reduction"]))


def _regression_case(name, extra=()):
    """Builder for a loss of two same-shaped arrays ``pred``, ``target``."""
    def build(rng, c, dtype):
        shape = tuple(c["shape"])
        pred = S.normal(rng, shape, dtype, c.get("scale", 1.0))
        target = S.normal(rng, shape, dtype)
        if c.get("kinks"):  # |pred - target| == delta exactly, where huber's pieces meet
            S.at_kinks(pred, (c["delta"], -c["delta"]))
            S.at_kinks(target, (0.0,))
        kw = {k: c[k] for k in extra}
        fn = S.op(name)
        return S.Case(name, c, {"pred": pred, "target": target},
                    lambda p, t, vjp="custom": fn(p, t, c["reduction"], vjp=vjp, **kw),
                    lambda torch, p, t: getattr(torch.nn.functional, name)(
                        p, t, reduction=c["reduction"], **kw))
    return build


S.register_space(
    "cross_entropy",
    dict(batch=(4, 1), classes=(10, 2), extra_dims=((), (3,)),
         reduction=("mean", "sum", "none"), label_smoothing=(0.0, 0.1),
         scale=(1.0, 1e4)),
    _classification_case("cross_entropy", "logits", ("label_smoothing",)),
    ({"scale": 1e4}, {"scale": 1e4, "label_smoothing": 0.1},
     {"batch": 1, "extra_dims": (3,)}))

S.register_space(
    "binary_cross_entropy_with_logits",
    dict(shape=S.SHAPES, reduction=("mean", "sum", "none"), scale=(1.0, 1e4)),
    _bce_case,
    ({"scale": 1e4},))

S.register_space(
    "mse_loss",
    dict(shape=S.SHAPES, reduction=("mean", "sum", "none")),
    _regression_case("mse_loss"))

S.register_space(
    "nll_loss",
    dict(batch=(4, 1), classes=(10, 2), extra_dims=((), (3,)),
         reduction=("mean", "sum", "none")),
    _classification_case("nll_loss", "log_probs"),
    ({"batch": 1, "extra_dims": (3,)}, {"reduction": "none", "classes": 2}))

S.register_space(
    "huber_loss",
    dict(shape=S.SHAPES, reduction=("mean", "sum", "none"), delta=(1.0, 0.5, 2.0),
         scale=(1.0, 3.0), kinks=(False, True)),
    _regression_case("huber_loss", ("delta",)),
    ({"scale": 3.0, "delta": 0.5}, {"kinks": True},
     {"kinks": True, "delta": 2.0, "reduction": "none"}))

"""The one SGD kernel: pure numpy over flat float32 vectors, no I/O, no torch.

Modelled on ``torch/optim/sgd.py``: a functional ``sgd(params, grads, momentum_buffer, *, lr, …)``
that takes the state in and hands the new state back, beside a small stateful ``SGD`` that keeps it.
The board's ORT backend, the large-batch server optimisers (SGD, LARS) and FedAvgM all step through
it, and ``check_sgd_hyper`` is the one place their hyper-parameters are checked.

One step, for each entry (``w`` the parameters, ``g`` the gradient):

1. ``d = g + prox_mu·(w − w_prox) + weight_decay·w`` — FedProx's proximal gradient (Li et al., MLSys
   2020, "Federated Optimization in Heterogeneous Networks") and L2 weight decay.
2. LARS only (You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional Networks",
   Algorithm 1): per layer segment ``l``, ``d_l ← lr·trust_l·d_l`` with
   ``trust_l = η‖w_l‖ / (‖g_l‖ + weight_decay·‖w_l‖)``; 1 for 1-D tensors (biases, norm scales, as is
   common practice) and where either norm is zero.
3. Momentum as torch.optim.SGD (Sutskever et al., ICML 2013): ``buf ← d`` on the first step, else
   ``buf ← μ·buf + (1 − dampening)·d``; the direction is ``d + μ·buf`` with Nesterov, else ``buf``.
4. ``w ← w − lr·direction`` — or, with LARS, ``w ← w − direction``: there the learning rate already
   entered before the momentum (step 2), as in the paper, so a warm-up's changing lr does not rescale
   the velocity built up at earlier rates.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import ConfigError


def check_positive(value: float, name: str) -> float:
    """A scale (LARS η, an adaptive optimiser's τ): finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_lr(lr: float, name: str = "lr") -> float:
    """A learning rate: finite and > 0."""
    return check_positive(lr, f"learning rate {name}")


def check_unit_interval(value: float, name: str) -> float:
    """A momentum-like coefficient (momentum, dampening, Adam's betas): in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def check_nonnegative(value: float, name: str) -> float:
    """A penalty weight (weight decay, FedProx's mu): finite and >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_sgd_hyper(*, lr: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
                    weight_decay: float = 0.0, prox_mu: float = 0.0, trust_coefficient: float | None = None,
                    names: dict[str, str] | None = None) -> None:
    """Every SGD-family hyper-parameter, checked once; ``names`` renames a parameter in the messages
    (e.g. ``{"lr": "base_lr"}``) so an error names the setting the caller actually has."""
    named = {"lr": "lr", "momentum": "momentum", "dampening": "dampening", "weight_decay": "weight_decay",
             "prox_mu": "prox_mu", "trust_coefficient": "trust_coefficient", **(names or {})}
    check_lr(lr, named["lr"])
    check_unit_interval(momentum, named["momentum"])
    check_unit_interval(dampening, named["dampening"])
    check_nonnegative(weight_decay, named["weight_decay"])
    check_nonnegative(prox_mu, named["prox_mu"])
    if nesterov and (momentum == 0 or dampening != 0):
        raise ConfigError(f"nesterov needs {named['momentum']} > 0 and {named['dampening']} 0, "
                          f"got {momentum} and {dampening}")
    if trust_coefficient is not None:
        check_positive(trust_coefficient, named["trust_coefficient"])


@dataclass(frozen=True)
class LayerSegment:
    """One tensor's slice ``[start, stop)`` of the flat vector; ``adapt``: LARS scales it (ndim > 1)."""

    start: int
    stop: int
    adapt: bool


def layer_segments(shapes: Sequence[tuple[int, ...]]) -> tuple[LayerSegment, ...]:
    """The flat vector's per-tensor segments, in order, from the tensors' shapes."""
    segments, offset = [], 0
    for shape in shapes:
        size = math.prod(shape)
        segments.append(LayerSegment(offset, offset + size, len(shape) > 1))
        offset += size
    return tuple(segments)


def lars_trust_ratios(params: np.ndarray, grads: np.ndarray, segments: Sequence[LayerSegment], *,
                      trust_coefficient: float, weight_decay: float = 0.0) -> np.ndarray:
    """You et al. 2017's local learning rate per segment: η‖w_l‖ / (‖g_l‖ + λ‖w_l‖) (norms in float64);
    1 for segments that do not adapt and where a norm is zero."""
    covered = segments[-1].stop if segments else 0
    if covered != params.size:
        raise ConfigError(f"LARS layer shapes cover {covered} entries, the vector has {params.size}")
    trust = np.ones(len(segments), dtype=np.float64)
    for i, segment in enumerate(segments):
        if not segment.adapt:
            continue
        w_norm = float(np.linalg.norm(params[segment.start:segment.stop].astype(np.float64)))
        g_norm = float(np.linalg.norm(grads[segment.start:segment.stop].astype(np.float64)))
        if w_norm > 0 and g_norm > 0:
            trust[i] = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm)
    return trust


def _flat_pair(params: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    params = np.asarray(params, dtype=np.float32)
    grads = np.asarray(grads, dtype=np.float32)
    if params.ndim != 1 or grads.shape != params.shape:
        raise ConfigError(f"sgd needs flat params and grads of one shape, got {params.shape} and {grads.shape}")
    return params, grads


def _descent(params: np.ndarray, grads: np.ndarray, *, lr: float, weight_decay: float, prox_mu: float,
             prox_center: np.ndarray | None, trust_coefficient: float | None,
             segments: Sequence[LayerSegment] | None) -> np.ndarray:
    """Steps 1–2 of the module docstring: the gradient with its penalties, LARS-scaled if asked."""
    d = grads.copy()
    if prox_mu:
        if prox_center is None or prox_center.shape != params.shape:
            raise ConfigError("prox_mu > 0 needs prox_center: the parameters at the start of local training")
        d += np.float32(prox_mu) * (params - prox_center)
    if weight_decay:
        d += np.float32(weight_decay) * params
    if trust_coefficient is not None:
        if segments is None:
            raise ConfigError("LARS (trust_coefficient) needs the layer segments of the flat vector")
        trust = lars_trust_ratios(params, grads, segments, trust_coefficient=trust_coefficient,
                                  weight_decay=weight_decay)
        for segment, ratio in zip(segments, trust):
            d[segment.start:segment.stop] *= np.float32(lr * ratio)
    return d


def sgd(params: np.ndarray, grads: np.ndarray, momentum_buffer: np.ndarray | None, *, lr: float,
        momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
        prox_mu: float = 0.0, prox_center: np.ndarray | None = None, trust_coefficient: float | None = None,
        segments: Sequence[LayerSegment] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """One SGD step (see the module docstring); returns (new params, new momentum buffer).

    Functional: nothing passed in is modified. ``momentum_buffer`` None means the first step; the
    returned buffer is None when ``momentum`` is 0. ``trust_coefficient`` (η) turns on LARS over
    ``segments``.
    """
    check_sgd_hyper(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                    weight_decay=weight_decay, prox_mu=prox_mu, trust_coefficient=trust_coefficient)
    params, grads = _flat_pair(params, grads)
    d = _descent(params, grads, lr=lr, weight_decay=weight_decay, prox_mu=prox_mu, prox_center=prox_center,
                 trust_coefficient=trust_coefficient, segments=segments)
    buffer = None
    if momentum:
        if momentum_buffer is None:
            buffer = d.copy()
        else:
            if momentum_buffer.shape != params.shape:
                raise ConfigError(f"momentum buffer has shape {momentum_buffer.shape}, params {params.shape}")
            scaled = d if dampening == 0 else np.float32(1.0 - dampening) * d
            buffer = np.float32(momentum) * momentum_buffer.astype(np.float32, copy=False) + scaled
        d = d + np.float32(momentum) * buffer if nesterov else buffer
    step = d if trust_coefficient is not None else np.float32(lr) * d
    return (params - step).astype(np.float32, copy=False), buffer


@dataclass(frozen=True)
class SGDHyper:
    """SGD-family settings, checked once (``check_sgd_hyper``) when built."""

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    prox_mu: float = 0.0
    trust_coefficient: float | None = None  # LARS η; None: plain SGD

    def __post_init__(self) -> None:
        check_sgd_hyper(lr=self.lr, momentum=self.momentum, dampening=self.dampening, nesterov=self.nesterov,
                        weight_decay=self.weight_decay, prox_mu=self.prox_mu,
                        trust_coefficient=self.trust_coefficient)


class SGD:
    """``sgd`` with its state kept: the momentum buffer, and FedProx's centre (the parameters this
    optimiser started from). One instance per local training call, so no state leaks across rounds."""

    def __init__(self, hyper: SGDHyper, start_params: np.ndarray,
                 segments: Sequence[LayerSegment] | None = None) -> None:
        if hyper.trust_coefficient is not None and segments is None:
            raise ConfigError("LARS (trust_coefficient) needs the layer segments of the flat vector")
        self.hyper = hyper
        self.segments = segments
        self.prox_center = np.array(start_params, dtype=np.float32, copy=True) if hyper.prox_mu else None
        self.momentum_buffer: np.ndarray | None = None

    def step(self, params: np.ndarray, grads: np.ndarray) -> np.ndarray:
        """The parameters after one step from ``params`` along ``grads``."""
        h = self.hyper
        new, self.momentum_buffer = sgd(params, grads, self.momentum_buffer, lr=h.lr, momentum=h.momentum,
                                        dampening=h.dampening, nesterov=h.nesterov,
                                        weight_decay=h.weight_decay, prox_mu=h.prox_mu,
                                        prox_center=self.prox_center, trust_coefficient=h.trust_coefficient,
                                        segments=self.segments)
        return new

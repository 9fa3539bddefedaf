"""The torch (eager) runtime: rebuilds the bundle's model from ``edgetrain.sdk.models`` and trains it.

Weights are read with safetensors' numpy loader (no pickle, no ``torch.load``). Thread count is the
caller's business (``torch.set_num_threads``); nothing here changes it.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..bundle import Manifest, check_flat, read_initial_parameters
from ..errors import BundleError, ConfigError
from .base import EvalResult, GradientResult, Runtime, TrainConfig, TrainStep, check_batch, check_evaluation


def _tensors(batch: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """A checked numpy batch (``check_batch``) as tensors, sharing its memory."""
    return torch.from_numpy(batch[0]), torch.from_numpy(batch[1])


@torch.no_grad()
def _sgd_step(params: list[torch.Tensor], momentum_buffers: list[torch.Tensor | None], config: TrainConfig) -> None:
    """One step of ``torch.optim.SGD`` (dampening 0), op for op as its single-tensor kernel, so the result is the
    same to the bit (tests pin the two together). Not torch.optim itself: constructing a torch optimiser imports
    torch._dynamo, ~800 modules and ~1 CPU-second of every device's start-up (ten on two cores: seconds of wall
    time; on a board, more). ``momentum_buffers`` is updated in place; parameters without a gradient are skipped."""
    for i, param in enumerate(params):
        grad = param.grad
        if grad is None:
            continue
        if config.weight_decay != 0:
            grad = grad.add(param, alpha=config.weight_decay)
        if config.momentum != 0:
            buffer = momentum_buffers[i]
            if buffer is None:
                buffer = momentum_buffers[i] = torch.clone(grad).detach()
            else:
                buffer.mul_(config.momentum).add_(grad)
            grad = grad.add(buffer, alpha=config.momentum) if config.nesterov else buffer
        param.add_(grad, alpha=-config.lr)


class TorchRuntime(Runtime):
    """A bundle's model in torch eager mode; parameters cross the seam as one flat float32 vector."""

    name = "torch"

    def __init__(self, manifest: Manifest, model: nn.Module) -> None:
        super().__init__(manifest)
        self.model = model
        self._params = [p for _, p in model.named_parameters()]

    def set_threads(self, threads: int) -> None:
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)

    def get_parameters(self) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([p.detach().reshape(-1) for p in self._params]).numpy().copy()

    def set_parameters(self, flat: np.ndarray) -> None:
        check_flat(flat, self.manifest)
        if not flat.flags.writeable:  # a host's shared replica: torch warns on read-only memory, even to copy it
            flat = flat.copy()
        with torch.no_grad():
            for spec, param in zip(self.manifest.params, self._params):
                chunk = flat[spec.offset : spec.offset + spec.size].reshape(spec.shape)
                param.copy_(torch.from_numpy(np.ascontiguousarray(chunk)).reshape(spec.shape))

    @contextmanager
    def _training(self, config: TrainConfig) -> Iterator[TrainStep]:
        """SGD as torch.optim.SGD steps it (``_sgd_step``), fresh momentum per call; with ``prox_mu`` > 0
        the objective gets FedProx's mu/2·||w − w_start||² (Li et al., "Federated Optimization in
        Heterogeneous Networks", MLSys 2020)."""
        self.model.train()
        momentum_buffers: list[torch.Tensor | None] = [None] * len(self._params)
        w_start = [p.detach().clone() for p in self._params] if config.prox_mu > 0 else []

        def step(x: np.ndarray, y: np.ndarray) -> float:
            x_t, y_t = _tensors((x, y))
            for param in self._params:
                param.grad = None
            loss = F.cross_entropy(self.model(x_t), y_t)
            objective = loss
            if w_start:
                proximal = sum(torch.sum((p - p0) ** 2) for p, p0 in zip(self._params, w_start))
                objective = loss + 0.5 * config.prox_mu * proximal
            objective.backward()
            _sgd_step(self._params, momentum_buffers, config)
            return float(loss.detach())

        yield step

    @contextmanager
    def _buffers_kept(self) -> Iterator[None]:
        """The model's buffers (BatchNorm running statistics) as they were before the block, whatever it does."""
        saved_buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, saved in saved_buffers:
                    buffer.copy_(saved)

    def warm_up(self) -> None:
        """One SGD step with momentum on a dummy batch, then parameters and buffers restored: torch's first
        backward allocates and picks its kernels here, not in round 1."""
        saved_params = self.get_parameters()
        dummy_x = np.zeros((2, *self.manifest.input_shape), np.float32)
        dummy_y = np.zeros(2, np.int64)
        with self._buffers_kept():
            try:
                self.train([(dummy_x, dummy_y)], TrainConfig(lr=0.01, momentum=0.9))
            finally:
                self.set_parameters(saved_params)

    def gradient(self, x: np.ndarray, y: np.ndarray) -> GradientResult:
        """Mean-loss gradient in train mode (as a training step would see it), parameters untouched.

        BatchNorm running statistics are restored afterwards: computing a gradient must not change
        the model, or large-batch workers would drift apart from the averaged state.
        """
        x_t, y_t = _tensors(check_batch(x, y, self.manifest, nonempty_for="gradient"))
        self.model.train()
        with self._buffers_kept():
            loss = F.cross_entropy(self.model(x_t), y_t)
            grads = torch.autograd.grad(loss, self._params)
        flat = torch.cat([g.reshape(-1) for g in grads]).numpy().astype(np.float32, copy=True)
        return GradientResult(gradient=flat, loss=float(loss.detach()), examples=len(y_t))

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> EvalResult:
        x_t, y_t = _tensors(check_evaluation(x, y, self.manifest, batch_size))
        self.model.eval()
        loss_sum = 0.0
        correct = 0
        with torch.no_grad():
            for start in range(0, len(y_t), batch_size):
                logits = self.model(x_t[start : start + batch_size])
                targets = y_t[start : start + batch_size]
                loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
                correct += int((logits.argmax(dim=1) == targets).sum())
        n = len(y_t)
        return EvalResult(examples=n, loss=loss_sum / n, accuracy=correct / n)


def _check_layout(model: nn.Module, manifest: Manifest, bundle_dir: Path) -> None:
    """The rebuilt model's parameters must be exactly the manifest's layout (names, shapes, order)."""
    built = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    listed = [(p.name, p.shape) for p in manifest.params]
    if built != listed:
        mismatched = sorted(set(built) ^ set(listed)) or ["(same tensors, different order)"]
        raise BundleError(f"{bundle_dir}: model {manifest.model} with config {dict(manifest.model_config)} does "
                          f"not match the manifest's parameter layout; differing: {mismatched[:4]}")


def _load_buffers(model: nn.Module, bundle_dir: Path, manifest: Manifest) -> None:
    """BatchNorm running statistics, when the bundle carries them; every model buffer must be there."""
    expected = {name for name, _ in model.named_buffers()}
    rel = manifest.runtime_info.get("buffers_file")
    if rel is None:
        if expected:
            raise BundleError(f"{bundle_dir}: model has buffers {sorted(expected)} but the bundle carries none")
        return
    if rel not in manifest.files:
        raise BundleError(f"{bundle_dir}: buffers file {rel!r} is not listed (and hashed) in the manifest")
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(bundle_dir / rel))
    except Exception as exc:  # safetensors raises its own types; name the file
        raise BundleError(f"{bundle_dir / rel}: cannot read safetensors buffers ({exc})") from exc
    if set(tensors) != expected:
        raise BundleError(f"{bundle_dir / rel}: holds buffers {sorted(tensors)}, the model has {sorted(expected)}")
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            # reshape: np.ascontiguousarray turns a 0-d array (num_batches_tracked) into 1-d
            stored = np.asarray(tensors[name])
            value = torch.from_numpy(np.ascontiguousarray(stored)).reshape(stored.shape)
            if value.shape != buffer.shape:
                raise BundleError(f"{bundle_dir / rel}: buffer {name} has shape {tuple(value.shape)}, "
                                  f"the model expects {tuple(buffer.shape)}")
            buffer.copy_(value.to(buffer.dtype))


def load(bundle_dir: Path, manifest: Manifest) -> TorchRuntime:
    """Rebuild the bundle's model and load its weights (and BatchNorm statistics, if any)."""
    from edgetrain.sdk.models import build_model

    if manifest.runtime != "torch":
        raise BundleError(f"{bundle_dir}: a {manifest.runtime} bundle cannot be loaded by the torch runtime")
    try:
        model = build_model(manifest.model, manifest.model_config, seed=0)  # weights replaced below
    except ConfigError as exc:
        raise BundleError(f"{bundle_dir}: cannot rebuild the manifest's model ({exc})") from exc
    _check_layout(model, manifest, bundle_dir)
    runtime = TorchRuntime(manifest, model)
    runtime.set_parameters(read_initial_parameters(bundle_dir, manifest))
    _load_buffers(model, bundle_dir, manifest)
    return runtime

"""ExecuTorch on-device training backend (bundle runtime "executorch"), through its Python bindings.

The bundle's ``.pte`` holds a joint forward-backward program traced at one batch size
(``manifest.fixed_batch_size``, B). Any batch is handled exactly: it is cut into chunks of B and the
last chunk is padded with weight-0 rows; the program's loss is Σ wᵢ·ceᵢ / Σ wᵢ, so padding rows add
nothing to loss or gradient, and chunk gradients are recombined weighted by their real example count.
Padding rather than skipping keeps every example of a device's data in every epoch. This is exact
only because the exporter refuses layers that couple examples (BatchNorm).

The optimiser is ExecuTorch's SGD (momentum, weight decay, Nesterov); FedProx's proximal gradient
mu·(w − w_start) (Li et al., MLSys 2020) is added to the gradients handed to its step. The Python
bindings link torch's libraries, so this backend imports torch; the lean on-board path for ExecuTorch
is its C++ runtime (see docs/runtimes-on-boards.md).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ..bundle import Manifest, check_flat, read_initial_parameters
from ..errors import BundleError, RuntimeBackendError
from .base import EvalResult, GradientResult, Runtime, TrainConfig, TrainStep, check_batch, check_evaluation


class ExecutorchRuntime(Runtime):
    """A bundle's ExecuTorch training program; parameters cross the seam as one flat float32 vector."""

    name = "executorch"

    def __init__(self, manifest: Manifest, bundle_dir: Path) -> None:
        super().__init__(manifest)
        try:
            import torch
            from executorch.extension.training import (_load_for_executorch_for_training,
                                                       get_sgd_optimizer)
        except ImportError as exc:
            raise RuntimeBackendError("an executorch bundle needs executorch==1.5.1 (and torch); install them "
                                      "with: pip install 'edgetrain[executorch]'") from exc
        self._torch = torch
        self._get_sgd_optimizer = get_sgd_optimizer
        info = manifest.runtime_info
        program = str(info.get("program", ""))
        if program not in manifest.files:
            raise BundleError(f"{bundle_dir}: ExecuTorch program {program!r} is not listed (and hashed) in the manifest")
        if manifest.fixed_batch_size is None or manifest.fixed_batch_size < 1:
            raise BundleError(f"{bundle_dir}: an executorch bundle must record its fixed_batch_size")
        self.batch_size = manifest.fixed_batch_size
        self._method = str(info.get("method", "forward"))
        self._prefix = str(info.get("parameter_prefix", ""))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "This API is experimental": known, nothing to act on
                self._module = _load_for_executorch_for_training(str(bundle_dir / program))
            # the bindings hand out parameter tensors only after a first run; their storage is the
            # program's own, so writing into them changes the weights the next run uses
            self._run(np.zeros((self.batch_size, *manifest.input_shape), np.float32),
                      np.zeros(self.batch_size, np.int64), np.ones(self.batch_size, np.float32))
            named = self._module.named_parameters()
        except Exception as exc:  # the bindings raise RuntimeError with an error code
            raise BundleError(f"{bundle_dir}: ExecuTorch cannot load or run {program} ({exc})") from exc
        missing = [p.name for p in manifest.params if self._prefix + p.name not in named]
        if missing:
            raise BundleError(f"{bundle_dir}: the program has no parameters {missing}")
        self._params = [named[self._prefix + p.name] for p in manifest.params]
        for spec, tensor in zip(manifest.params, self._params):
            if tuple(tensor.shape) != spec.shape:
                raise BundleError(f"{bundle_dir}: program parameter {spec.name} has shape {tuple(tensor.shape)}, "
                                  f"the manifest says {spec.shape}")

    def _run(self, x: np.ndarray, y: np.ndarray, weight: np.ndarray) -> tuple[float, np.ndarray]:
        """One forward-backward on exactly B rows; returns the weighted loss and the logits."""
        t = self._torch
        loss, logits = self._module.forward_backward(
            self._method, (t.from_numpy(x), t.from_numpy(y), t.from_numpy(weight)))
        return float(loss), logits.numpy()

    def _chunks(self, x: np.ndarray, y: np.ndarray) -> Iterable[tuple[int, float, np.ndarray]]:
        """Per chunk of B rows (the last padded): real rows, mean loss over them, their logits."""
        b = self.batch_size
        for start in range(0, len(y), b):
            n = min(b, len(y) - start)
            xs, ys = x[start:start + n], y[start:start + n]
            weight = np.zeros(b, np.float32)
            weight[:n] = 1.0
            if n < b:  # pad with copies of the first row; weight 0 keeps them out of the loss
                xs = np.concatenate([xs, np.repeat(xs[:1], b - n, axis=0)])
                ys = np.concatenate([ys, np.repeat(ys[:1], b - n)])
            loss, logits = self._run(np.ascontiguousarray(xs), np.ascontiguousarray(ys), weight)
            yield n, loss, logits[:n]

    def _mean_gradient(self, x: np.ndarray, y: np.ndarray) -> tuple[float, list[Any]]:
        """Mean loss and per-parameter mean gradient (manifest order) over all rows of the batch."""
        if len(y) <= self.batch_size:  # one chunk: the weighted loss already averages over the real rows
            ((_, loss, _),) = list(self._chunks(x, y))
            named = self._module.named_gradients()
            return loss, [named[self._prefix + p.name] for p in self.manifest.params]
        loss_sum = 0.0
        grads: list[Any] | None = None
        for n, loss, _ in self._chunks(x, y):
            named = self._module.named_gradients()  # recomputed (not accumulated) by every run
            chunk = [named[self._prefix + p.name] * float(n) for p in self.manifest.params]
            grads = chunk if grads is None else [g + c for g, c in zip(grads, chunk)]
            loss_sum += loss * n
        assert grads is not None
        return loss_sum / len(y), [g / float(len(y)) for g in grads]

    def get_parameters(self) -> np.ndarray:
        return np.concatenate([p.detach().reshape(-1).numpy() for p in self._params]).astype(np.float32, copy=True)

    def set_parameters(self, flat: np.ndarray) -> None:
        check_flat(flat, self.manifest)
        if not flat.flags.writeable:  # a host's shared replica: torch warns on read-only memory, even to copy it
            flat = flat.copy()
        with self._torch.no_grad():
            for spec, param in zip(self.manifest.params, self._params):
                chunk = np.ascontiguousarray(flat[spec.offset:spec.offset + spec.size]).reshape(spec.shape)
                param.copy_(self._torch.from_numpy(chunk))

    @contextmanager
    def _training(self, config: TrainConfig) -> Iterator[TrainStep]:
        """ExecuTorch's SGD, fresh per call, over the padded-chunk mean gradient; FedProx's
        mu·(w − w_start) is added to the gradients it is handed."""
        t = self._torch
        names = [self._prefix + p.name for p in self.manifest.params]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "This API is experimental"
            optimizer = self._get_sgd_optimizer(dict(zip(names, self._params)), config.lr, config.momentum, 0.0,
                                                config.weight_decay, config.nesterov)
        w_start = [p.detach().clone() for p in self._params] if config.prox_mu > 0 else []

        def step(x: np.ndarray, y: np.ndarray) -> float:
            loss, grads = self._mean_gradient(x, y)
            if w_start:
                with t.no_grad():
                    grads = [g + config.prox_mu * (p - p0) for g, p, p0 in zip(grads, self._params, w_start)]
            optimizer.step(dict(zip(names, grads)))
            return loss

        yield step

    def gradient(self, x: np.ndarray, y: np.ndarray) -> GradientResult:
        x, y = check_batch(x, y, self.manifest, nonempty_for="gradient")
        loss, grads = self._mean_gradient(x, y)
        flat = np.concatenate([g.reshape(-1).numpy() for g in grads]).astype(np.float32, copy=True)
        return GradientResult(gradient=flat, loss=loss, examples=len(y))

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> EvalResult:
        """Mean loss and accuracy; runs in chunks of the program's batch size (``batch_size`` only checked)."""
        x, y = check_evaluation(x, y, self.manifest, batch_size)
        loss_sum = 0.0
        correct = 0
        start = 0
        for n, loss, logits in self._chunks(x, y):
            loss_sum += loss * n
            correct += int((logits.argmax(axis=1) == y[start:start + n]).sum())
            start += n
        return EvalResult(examples=len(y), loss=loss_sum / len(y), accuracy=correct / len(y))


def load(bundle_dir: Path, manifest: Manifest) -> ExecutorchRuntime:
    """Load an executorch bundle's program and set the initial weights from ``weights.safetensors``."""
    if manifest.runtime != "executorch":
        raise BundleError(f"{bundle_dir}: a {manifest.runtime} bundle cannot be loaded by the executorch runtime")
    runtime = ExecutorchRuntime(manifest, Path(bundle_dir))
    runtime.set_parameters(read_initial_parameters(bundle_dir, manifest))
    return runtime

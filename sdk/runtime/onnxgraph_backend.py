"""Standard-op ONNX training graph backend (bundle runtime "onnxgraph"). Never imports torch.

The bundle's ``train_step.onnx`` maps ``(x, y, *params)`` to ``(loss, *grads)`` and ``eval.onnx`` to
``(loss, logits)`` (``export/onnxgraph_export.py``); both are ordinary inference graphs, so plain
``onnxruntime.InferenceSession`` runs them — the PyPI wheel on Linux aarch64 included, where no
onnxruntime-training build exists — and so does ``onnxruntime-training-cpu``'s on x86. The
parameters live here, in one flat float32 vector in manifest order; the session reads them through
per-tensor views of it, so a step copies nothing in. The optimiser is the SDK's SGD kernel
(``edgetrain.sdk.optim``: torch.optim.SGD's rule plus FedProx's proximal term, Li et al., MLSys 2020)
under the shared training loop (``Runtime.train``). Large batch's gradient-only task runs ``train_step.onnx`` without the update.
"""
from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..bundle import Manifest, check_flat, read_initial_parameters
from ..errors import BundleError, ConfigError, RuntimeBackendError
from ..optim import SGD
from .base import EvalResult, GradientResult, Runtime, TrainConfig, TrainStep, check_batch, check_evaluation
from .ort_backend import _threads_from_environment, import_training_api

_GRAPHS = ("train_step", "eval")


def _import_onnxruntime() -> Any:
    """``onnxruntime``, torch-free. A board's plain onnxruntime imports nothing more; x86's
    onnxruntime-training-cpu would import torch (its build check loads ORTModule), which
    ``import_training_api`` prevents — so that build is imported through it."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        raise RuntimeBackendError("an onnxgraph bundle needs onnxruntime; install it with: "
                                  "pip install 'edgetrain[onnxgraph]'")
    if (Path(spec.origin).parent / "training" / "api").is_dir():
        import_training_api()
    import onnxruntime

    return onnxruntime


class OnnxGraphRuntime(Runtime):
    """A bundle's training and eval graphs in two InferenceSessions; the weights in numpy."""

    name = "onnxgraph"

    def __init__(self, manifest: Manifest, bundle_dir: Path, threads: int | None = None) -> None:
        super().__init__(manifest)
        self._ort = _import_onnxruntime()
        info = manifest.runtime_info
        graphs = info.get("graphs")
        if not isinstance(graphs, dict):
            raise BundleError(f"{bundle_dir}: runtime_info.graphs is missing or not an object")
        self._paths = {}
        for key in _GRAPHS:
            rel = graphs.get(key)
            if not isinstance(rel, str) or rel not in manifest.files:
                raise BundleError(f"{bundle_dir}: the {key} graph {rel!r} is not a file listed (and hashed) in "
                                  "the manifest")
            self._paths[key] = bundle_dir / rel
        self._input_name = str(info.get("input_name", "x"))
        self._labels_name = str(info.get("labels_name", "y"))
        self._flat = np.zeros(manifest.num_params, dtype=np.float32)
        self._views = manifest.split(self._flat)  # the session's parameter feeds: views, no copies
        # the train step writes its gradients here, through per-tensor views bound as its outputs
        self._gradient = np.zeros(manifest.num_params, dtype=np.float32)
        self._loss = np.zeros((), dtype=np.float32)
        self._threads = threads if threads is not None else _threads_from_environment()
        self._bundle_dir = bundle_dir
        self._open()

    def _open(self) -> None:
        options = self._ort.SessionOptions()
        options.log_severity_level = 3
        if self._threads is not None:
            options.intra_op_num_threads = self._threads
            options.inter_op_num_threads = 1
        try:
            self._sessions = {key: self._ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                              for key, path in self._paths.items()}
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise BundleError(f"{self._bundle_dir}: onnxruntime cannot load the onnxgraph bundle ({exc})") from exc
        self._check_signatures()
        self._step_binding = self._bind_train_step()

    def _bind_train_step(self) -> Any:
        """An IO binding of the train step over our own memory: the parameters read in place from the
        flat vector, the loss and the gradients written in place into ``_loss`` and ``_gradient`` (an
        OrtValue over a CPU numpy array wraps its buffer). So a step allocates and copies nothing but
        the batch's binding, where ``run`` allocated every gradient and we copied each into the flat one."""
        session = self._sessions["train_step"]
        binding = session.io_binding()
        wrap = self._ort.OrtValue.ortvalue_from_numpy
        for name, view in self._views.items():
            binding.bind_ortvalue_input(name, wrap(view))
        outputs = [output.name for output in session.get_outputs()]
        binding.bind_ortvalue_output(outputs[0], wrap(self._loss))
        for output, spec in zip(outputs[1:], self.manifest.params):
            view = self._gradient[spec.offset:spec.offset + spec.size].reshape(spec.shape)
            binding.bind_ortvalue_output(output, wrap(view))
        return binding

    def _check_signatures(self) -> None:
        """The graphs take (x, y, *params in manifest order) and the train step returns one gradient
        per parameter, shaped like it: the flat layout depends on it."""
        expected_inputs = [self._input_name, self._labels_name, *(p.name for p in self.manifest.params)]
        for key, session in self._sessions.items():
            inputs = session.get_inputs()
            if [i.name for i in inputs] != expected_inputs:
                raise BundleError(f"{self._bundle_dir}: the {key} graph's inputs {[i.name for i in inputs]} are not "
                                  f"{expected_inputs}")
            for spec, graph_input in zip(self.manifest.params, inputs[2:]):
                if tuple(graph_input.shape) != spec.shape:
                    raise BundleError(f"{self._bundle_dir}: the {key} graph takes {spec.name} with shape "
                                      f"{graph_input.shape}, the manifest says {spec.shape}")
        outputs = self._sessions["train_step"].get_outputs()
        if len(outputs) != 1 + len(self.manifest.params):
            raise BundleError(f"{self._bundle_dir}: the train_step graph has {len(outputs)} outputs, expected the "
                              f"loss and {len(self.manifest.params)} gradients")
        if len(self._sessions["eval"].get_outputs()) != 2:
            raise BundleError(f"{self._bundle_dir}: the eval graph must return (loss, logits)")

    def set_threads(self, threads: int) -> None:
        """Cap onnxruntime's intra-op threads (the sessions are rebuilt; the parameters stay)."""
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        self._threads = threads
        self._open()

    def get_parameters(self) -> np.ndarray:
        return self._flat.copy()

    def set_parameters(self, flat: np.ndarray) -> None:
        check_flat(flat, self.manifest)
        self._flat[:] = flat

    def _feeds(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        return {self._input_name: x, self._labels_name: y, **self._views}

    def _loss_and_gradient(self, x: np.ndarray, y: np.ndarray) -> float:
        """One run of the train step: the loss; the gradient is left in ``_gradient`` (overwritten by
        the next run). A gradient shaped unlike its parameter makes ORT refuse the bound output."""
        wrap = self._ort.OrtValue.ortvalue_from_numpy
        self._step_binding.bind_ortvalue_input(self._input_name, wrap(x))
        self._step_binding.bind_ortvalue_input(self._labels_name, wrap(y))
        try:
            self._sessions["train_step"].run_with_iobinding(self._step_binding)
        except Exception as exc:  # ORT raises its own Fail/InvalidArgument types
            raise RuntimeBackendError(f"the onnxgraph train step failed ({exc})") from exc
        return float(self._loss)

    @contextmanager
    def _training(self, config: TrainConfig) -> Iterator[TrainStep]:
        """The numpy SGD kernel (``edgetrain.sdk.optim``) over the graph's gradients; a fresh one per call.
        Plain SGD (no momentum, weight decay or proximal term) applies the kernel's rule in place instead."""
        hyper = config.sgd_hyper()
        if not (hyper.momentum or hyper.weight_decay or hyper.prox_mu):
            yield self._plain_sgd_step(np.float32(hyper.lr))
            return
        sgd = SGD(hyper, self._flat)

        def step(x: np.ndarray, y: np.ndarray) -> float:
            loss = self._loss_and_gradient(x, y)
            self._flat[:] = sgd.step(self._flat, self._gradient)  # in place: the bound inputs are views of it
            return loss

        yield step

    def _plain_sgd_step(self, lr: np.float32) -> TrainStep:
        """``w ← w − lr·g``, the SGD kernel's float32 rule for plain SGD, computed in place (the scaled
        gradient overwrites the gradient buffer): the kernel is functional and allocates three
        parameter-sized arrays a step, measured at ~0.2 ms of a ~2.5 ms cnn step."""

        def step(x: np.ndarray, y: np.ndarray) -> float:
            loss = self._loss_and_gradient(x, y)
            np.multiply(self._gradient, lr, out=self._gradient)
            np.subtract(self._flat, self._gradient, out=self._flat)  # in place: the bound inputs are views of it
            return loss

        return step

    def gradient(self, x: np.ndarray, y: np.ndarray) -> GradientResult:
        x, y = check_batch(x, y, self.manifest, nonempty_for="gradient")
        loss = self._loss_and_gradient(x, y)
        return GradientResult(gradient=self._gradient.copy(), loss=loss, examples=len(y))

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> EvalResult:
        x, y = check_evaluation(x, y, self.manifest, batch_size)
        loss_sum = 0.0
        correct = 0
        for start in range(0, len(y), batch_size):
            targets = y[start:start + batch_size]
            loss, logits = self._sessions["eval"].run(None, self._feeds(x[start:start + batch_size], targets))
            loss_sum += float(loss) * len(targets)
            correct += int((np.asarray(logits).argmax(axis=1) == targets).sum())
        return EvalResult(examples=len(y), loss=loss_sum / len(y), accuracy=correct / len(y))


def load(bundle_dir: Path, manifest: Manifest, threads: int | None = None) -> OnnxGraphRuntime:
    """Load an onnxgraph bundle's graphs and set the initial weights from ``weights.safetensors``."""
    if manifest.runtime != "onnxgraph":
        raise BundleError(f"{bundle_dir}: a {manifest.runtime} bundle cannot be loaded by the onnxgraph runtime")
    runtime = OnnxGraphRuntime(manifest, Path(bundle_dir), threads=threads)
    runtime.set_parameters(read_initial_parameters(bundle_dir, manifest))
    return runtime

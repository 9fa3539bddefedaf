"""ONNX Runtime on-device training backend (bundle runtime "onnx"). Never imports torch.

ORT's training API (onnxruntime-training 1.19.2, the last release with it) runs the bundle's training,
eval and optimizer models. Its flat parameter buffer follows the training graph's input order; the
manifest's layout (torch ``named_parameters`` order, shared by every runtime so mixed fleets average
one vector) is mapped to it here, per tensor.

Optimiser: the bundle's ORT optimizer model does the step when it can — plain SGD (lr set with
``set_learning_rate``) or AdamW with betas/eps/weight decay baked at export. ORT's SGD block has no
momentum or weight decay, so for an SGD bundle a round asking for momentum, Nesterov, weight decay or
FedProx's proximal term (Li et al., MLSys 2020) steps with the SDK's numpy SGD kernel
(``edgetrain.sdk.optim``, torch.optim.SGD's update rule) over ORT's gradients instead.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..bundle import Manifest, check_flat, read_initial_parameters
from ..errors import BundleError, ConfigError, RuntimeBackendError
from ..optim import SGD
from .base import EvalResult, GradientResult, Runtime, TrainConfig, TrainStep, check_batch, check_evaluation


def import_training_api() -> Any:
    """``onnxruntime.training.api`` without torch, whether or not torch is installed.

    Two imports pull torch in: ``onnxruntime/training/__init__.py`` (it imports ORTModule, and fails
    without torch), and ``import onnxruntime`` itself, whose build validation imports ORTModule when
    it can. The api subpackage needs only the C extension. So, before onnxruntime is first imported:
    an empty package shell stands in for ``onnxruntime.training`` (with the real ``__path__``, so its
    submodules still load), and ``onnxruntime.training.ortmodule`` — the torch-bound half, unused
    here — is marked absent, which the validation treats as "no ORTModule". If onnxruntime was
    imported earlier in the process, whatever it loaded stays.
    """
    if "onnxruntime.training" not in sys.modules:
        spec = importlib.util.find_spec("onnxruntime")  # locates the package without running it
        if spec is None or spec.origin is None:
            raise RuntimeBackendError("an onnx bundle needs onnxruntime-training-cpu==1.19.2; install it with: "
                                      "pip install 'edgetrain[ort]'")
        package_dir = Path(spec.origin).parent / "training"
        if not (package_dir / "api").is_dir():
            raise RuntimeBackendError(f"the installed onnxruntime ({package_dir.parent}) has no training API; "
                                      "install onnxruntime-training-cpu==1.19.2 instead of plain onnxruntime")
        shell = types.ModuleType("onnxruntime.training")
        shell.__path__ = [str(package_dir)]
        shell.__package__ = "onnxruntime.training"
        sys.modules["onnxruntime.training"] = shell
        sys.modules.setdefault("onnxruntime.training.ortmodule", None)  # type: ignore[arg-type]
        import onnxruntime

        onnxruntime.training = shell  # type: ignore[attr-defined]
    return importlib.import_module("onnxruntime.training.api")


class OrtRuntime(Runtime):
    """A bundle's ORT training artifacts; parameters cross the seam as one flat float32 vector."""

    name = "onnx"

    def __init__(self, manifest: Manifest, bundle_dir: Path, threads: int | None = None) -> None:
        super().__init__(manifest)
        api = import_training_api()
        from onnxruntime import OrtValue, SessionOptions

        self._api = api
        self._ort_value = OrtValue
        info = manifest.runtime_info
        files = info.get("artifacts", {})
        paths = {key: bundle_dir / str(files.get(key, "")) for key in
                 ("training_model", "eval_model", "optimizer_model", "checkpoint")}
        for key, path in paths.items():
            if path.name not in manifest.files:
                raise BundleError(f"{bundle_dir}: ORT {key} file {path.name!r} is not listed (and hashed) "
                                  "in the manifest")
        self._options = SessionOptions()
        # errors only: the optimizer model's "Error merging shape info … lenient merge" warning is benign
        self._options.log_severity_level = 3
        self._set_thread_options(threads if threads is not None else _threads_from_environment())
        self._paths = paths
        try:
            self._open()
        except Exception as exc:  # ORT raises its own Fail/RuntimeError types
            raise BundleError(f"{bundle_dir}: ORT cannot load the training artifacts ({exc})") from exc
        self._optimizer_used = False
        self._optimizer_path = paths["optimizer_model"]
        self._optimizer_name = str(info.get("ort_optimizer", manifest.optimizer.get("name", "sgd")))
        self._ort_names = [str(n) for n in info.get("ort_parameter_order", [])]
        self._ort_order = self._check_order(bundle_dir, self._ort_names)

    def _set_thread_options(self, threads: int | None) -> None:
        if threads is not None:
            self._options.intra_op_num_threads = threads
            self._options.inter_op_num_threads = 1

    def set_threads(self, threads: int) -> None:
        """Cap ORT's intra-op threads (sessions are rebuilt, parameters kept; AdamW state is reset)."""
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        self._set_thread_options(threads)
        self._reopen_keeping_parameters()

    def _open(self) -> None:
        self._state = self._api.CheckpointState.load_checkpoint(str(self._paths["checkpoint"]))
        self._module = self._api.Module(str(self._paths["training_model"]), self._state,
                                        str(self._paths["eval_model"]), session_options=self._options)

    def _reopen_keeping_parameters(self) -> None:
        """A fresh checkpoint state: the only way to clear AdamW's moments and step count, which ORT
        keeps in the state across Optimizer objects (measured: ~60 ms for the 215k CNN, once a call)."""
        ort_flat = self._ort_parameters()
        self._open()
        self._write_ort_parameters(ort_flat)

    def _check_order(self, bundle_dir: Path, order: list[str]) -> list[tuple[int, int, int]]:
        """(ORT offset, manifest offset, size) per tensor, after checking ORT holds the manifest's tensors."""
        specs = {p.name: p for p in self.manifest.params}
        if sorted(order) != sorted(specs):
            raise BundleError(f"{bundle_dir}: runtime_info.ort_parameter_order {order} does not name the "
                              f"manifest's parameters {sorted(specs)}")
        segments = []
        ort_offset = 0
        for name in order:
            spec = specs[name]
            stored = np.asarray(self._state.parameters[name].data)
            if tuple(stored.shape) != spec.shape:
                raise BundleError(f"{bundle_dir}: ORT parameter {name} has shape {stored.shape}, "
                                  f"the manifest says {spec.shape}")
            segments.append((ort_offset, spec.offset, spec.size))
            ort_offset += spec.size
        if self._module.get_parameters_size(True) != ort_offset:
            raise BundleError(f"{bundle_dir}: ORT holds {self._module.get_parameters_size(True)} trainable "
                              f"values, the manifest {ort_offset}")
        return segments

    # --- the flat vector, in ORT's order and in the manifest's -------------------------------------
    def _ort_parameters(self) -> np.ndarray:
        return np.array(self._module.get_contiguous_parameters(trainable_only=True).numpy(), copy=True)

    def _write_ort_parameters(self, ort_flat: np.ndarray) -> None:
        buffer = self._ort_value.ortvalue_from_numpy(np.ascontiguousarray(ort_flat, dtype=np.float32))
        self._module.copy_buffer_to_parameters(buffer._ortvalue, trainable_only=True)

    def _ort_gradient(self) -> np.ndarray:
        return np.concatenate([np.asarray(self._state.parameters[n].grad, dtype=np.float32).reshape(-1)
                               for n in self._ort_names])

    def _to_manifest(self, ort_flat: np.ndarray) -> np.ndarray:
        flat = np.empty(self.manifest.num_params, dtype=np.float32)
        for ort_offset, manifest_offset, size in self._ort_order:
            flat[manifest_offset:manifest_offset + size] = ort_flat[ort_offset:ort_offset + size]
        return flat

    def _to_ort(self, flat: np.ndarray) -> np.ndarray:
        ort_flat = np.empty(self.manifest.num_params, dtype=np.float32)
        for ort_offset, manifest_offset, size in self._ort_order:
            ort_flat[ort_offset:ort_offset + size] = flat[manifest_offset:manifest_offset + size]
        return ort_flat

    def get_parameters(self) -> np.ndarray:
        return self._to_manifest(self._ort_parameters())

    def set_parameters(self, flat: np.ndarray) -> None:
        check_flat(flat, self.manifest)
        self._write_ort_parameters(self._to_ort(flat))

    # --- training -----------------------------------------------------------------------------------
    def _uses_ort_optimizer(self, config: TrainConfig) -> bool:
        """True when the bundle's optimizer model does exactly what ``config`` asks; refuses what no
        path here can do."""
        if self._optimizer_name == "adamw":
            baked = float(self.manifest.optimizer.get("weight_decay", 0.0))
            asked = []
            if config.momentum or config.nesterov:
                asked.append(f"momentum {config.momentum} / nesterov {config.nesterov} (AdamW has neither)")
            if config.weight_decay != baked:
                asked.append(f"weight decay {config.weight_decay} (baked into the optimizer model: {baked})")
            if config.prox_mu:
                asked.append(f"FedProx prox_mu {config.prox_mu} (not expressible through ORT's AdamW step)")
            if asked:
                raise RuntimeBackendError("this onnx bundle's AdamW optimizer model cannot do: " + "; ".join(asked)
                                          + "; re-export with --optimizer sgd for SGD-family rounds")
            return True
        if self._optimizer_name != "sgd":
            raise RuntimeBackendError(f"onnx bundle names an unknown ORT optimizer {self._optimizer_name!r}")
        return not (config.momentum or config.weight_decay or config.prox_mu)

    @contextmanager
    def _training(self, config: TrainConfig) -> Iterator[TrainStep]:
        """The bundle's ORT optimizer when it does what ``config`` asks, else the numpy SGD kernel."""
        if self._uses_ort_optimizer(config):
            step = self._ort_optimizer_step(config)
        else:
            step = self._kernel_step(config)
        self._module.train()
        try:
            yield step
        finally:
            self._module.lazy_reset_grad()

    def _forward_backward(self, x: np.ndarray, y: np.ndarray) -> float:
        self._module.lazy_reset_grad()  # ORT accumulates gradients across calls until reset
        return float(self._module(x, y)[0])

    def _ort_optimizer_step(self, config: TrainConfig) -> TrainStep:
        # a fresh optimiser per call: state must not leak across rounds once parameters are replaced
        if self._optimizer_used and self._optimizer_name == "adamw":
            self._reopen_keeping_parameters()
        optimizer = self._api.Optimizer(str(self._optimizer_path), self._module)
        self._optimizer_used = True
        optimizer.set_learning_rate(config.lr)

        def step(x: np.ndarray, y: np.ndarray) -> float:
            loss = self._forward_backward(x, y)
            optimizer.step()
            return loss

        return step

    def _kernel_step(self, config: TrainConfig) -> TrainStep:
        # The weights stay in numpy between steps (only this loop changes them), so a step writes
        # them to ORT once instead of also reading them back.
        weights = self._ort_parameters()
        sgd = SGD(config.sgd_hyper(), weights)

        def step(x: np.ndarray, y: np.ndarray) -> float:
            nonlocal weights
            loss = self._forward_backward(x, y)
            weights = sgd.step(weights, self._ort_gradient())
            self._write_ort_parameters(weights)
            return loss

        return step

    def gradient(self, x: np.ndarray, y: np.ndarray) -> GradientResult:
        x, y = check_batch(x, y, self.manifest, nonempty_for="gradient")
        self._module.train()
        self._module.lazy_reset_grad()
        loss = float(self._module(x, y)[0])
        gradient = self._to_manifest(self._ort_gradient())
        self._module.lazy_reset_grad()
        return GradientResult(gradient=gradient, loss=loss, examples=len(y))

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> EvalResult:
        x, y = check_evaluation(x, y, self.manifest, batch_size)
        self._module.eval()
        loss_sum = 0.0
        correct = 0
        for start in range(0, len(y), batch_size):
            targets = y[start:start + batch_size]
            loss, logits = self._module(x[start:start + batch_size], targets)
            loss_sum += float(loss) * len(targets)
            correct += int((np.asarray(logits).argmax(axis=1) == targets).sum())
        self._module.train()
        return EvalResult(examples=len(y), loss=loss_sum / len(y), accuracy=correct / len(y))


def _threads_from_environment() -> int | None:
    """OMP_NUM_THREADS, which ORT ignores but edgetrain's simulation sets per device process."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def load(bundle_dir: Path, manifest: Manifest, threads: int | None = None) -> OrtRuntime:
    """Load an onnx bundle's ORT artifacts and set the initial weights from ``weights.safetensors``."""
    if manifest.runtime != "onnx":
        raise BundleError(f"{bundle_dir}: a {manifest.runtime} bundle cannot be loaded by the onnx runtime")
    runtime = OrtRuntime(manifest, Path(bundle_dir), threads=threads)
    runtime.set_parameters(read_initial_parameters(bundle_dir, manifest))
    return runtime

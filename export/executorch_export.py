"""torch → ExecuTorch joint forward-backward program (``.pte``) for on-device training (host side).

Flow (ExecuTorch 1.5.1, NOTES-runtimes): ``torch.export.export`` of the model wrapped with its loss →
``_export_forward_backward`` → ``to_edge`` → ``to_executorch``. ExecuTorch fixes every tensor shape at
export, so the program trains on exactly ``fixed_batch_size`` examples; the loss takes a per-example
weight so the device can pad a short last batch with weight-0 rows without changing the gradient mean.
Like the ONNX path, the program is run once before it is accepted and its gradient compared with torch
autograd; measured refusals are listed in ``UNSUPPORTED_MODULES``.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgetrain.sdk.atomic_write import atomic_write_bytes
from edgetrain.sdk.errors import ConfigError

from edgetrain.sdk.models import INPUT_SHAPE, NUM_CLASSES

PROGRAM_NAME = "model.pte"
METHOD_NAME = "forward"
DEFAULT_FIXED_BATCH_SIZE = 32
# the wrapper's attribute name: ExecuTorch reports parameters as "<prefix><torch name>"
PARAMETER_PREFIX = "model."
GRADIENT_CHECK_RTOL = 1e-4

# Measured with ExecuTorch 1.5.1 + torch 2.13 (portable kernels):
UNSUPPORTED_MODULES: Mapping[type, str] = {
    nn.modules.pooling._MaxPoolNd: (
        "MaxPool: the portable max_pool2d backward kernel does not zero its output, so conv gradients "
        "are wrong and the loss turns NaN (pytorch/executorch issue #21686, not fixed in 1.5.1)"),
    nn.modules.pooling._AvgPoolNd: "AvgPool: ExecuTorch 1.5.1 has no aten::avg_pool2d_backward kernel",
    nn.modules.pooling._AdaptiveMaxPoolNd: "AdaptiveMaxPool: max-pool backward is wrong in ExecuTorch 1.5.1",
    nn.modules.pooling._AdaptiveAvgPoolNd: "AdaptiveAvgPool: no avg-pool backward kernel in ExecuTorch 1.5.1",
    nn.modules.batchnorm._BatchNorm: (
        "BatchNorm: its training-mode op (_native_batch_norm_legit_functional) is not in the Core ATen "
        "opset, so to_edge refuses the joint graph; it also couples the examples of a batch, so the "
        "padded last batch would change the statistics"),
}


class WeightedCrossEntropy(nn.Module):
    """``model`` plus the per-example-weighted mean cross-entropy: Σ wᵢ·ceᵢ / Σ wᵢ.

    Weights of 1 give the plain mean; weight-0 padding rows drop out of loss and gradient exactly.
    The loss is the first output (ExecuTorch differentiates it); the logits ride along for evaluation.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        per_example = F.cross_entropy(logits, y, reduction="none")
        return (per_example * weight).sum() / weight.sum(), logits.detach()


@dataclass(frozen=True)
class ExecutorchArtifacts:
    """What ``write_executorch_program`` put in the bundle directory."""

    files: tuple[str, ...]
    runtime_info: Mapping[str, Any]
    fixed_batch_size: int


def check_executorch_trainable(model: nn.Module) -> None:
    """Refuse, with the measured reason, a model containing a layer ExecuTorch 1.5.1 cannot train."""
    for name, module in model.named_modules():
        for kind, reason in UNSUPPORTED_MODULES.items():
            if isinstance(module, kind):
                raise ConfigError(f"runtime executorch cannot train layer {name!r}: {reason}")


def _example_batch(batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, *INPUT_SHAPE), generator=generator)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
    return x, y, torch.ones(batch_size)


def build_training_program(model: nn.Module, batch_size: int) -> tuple[bytes, list[str]]:
    """The joint forward-backward program for ``model`` at ``batch_size``, checked against autograd,
    and the program's own parameter order."""
    if not isinstance(batch_size, int) or batch_size < 2:
        raise ConfigError(f"runtime executorch: fixed batch size must be an integer >= 2, got {batch_size!r}")
    check_executorch_trainable(model)
    try:
        from executorch.exir import to_edge
        from torch.export.experimental import _export_forward_backward
    except ImportError as exc:
        raise ConfigError(f"runtime executorch needs executorch==1.5.1 on the host ({exc}); "
                          "install it with: pip install 'edgetrain[executorch]'") from exc
    wrapped = WeightedCrossEntropy(copy.deepcopy(model).train())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.export.export(wrapped, _example_batch(batch_size, 0), strict=True)
            joint = _export_forward_backward(exported)
            program = to_edge(joint).to_executorch().buffer
    except Exception as exc:  # export errors come in many types; keep the first line of the message
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ConfigError(f"runtime executorch: cannot export the joint forward-backward graph ({first_line})") from exc
    worst, order = _check_gradients(model, program, batch_size)
    if not worst <= GRADIENT_CHECK_RTOL:
        raise ConfigError(f"runtime executorch: the program's gradient differs from torch autograd by {worst:.2e} "
                          f"(relative, allowed {GRADIENT_CHECK_RTOL:.0e}); refusing a model ExecuTorch trains wrongly")
    return program, order


def _check_gradients(model: nn.Module, program: bytes, batch_size: int) -> tuple[float, list[str]]:
    """Run the program once, last row masked out, against autograd on the other rows."""
    from executorch.extension.training import _load_for_executorch_for_training_from_buffer

    x, y, weight = _example_batch(batch_size, 1)
    weight[-1] = 0.0  # also checks that a weight-0 padding row leaves the gradient mean alone
    reference = copy.deepcopy(model).train()
    loss = F.cross_entropy(reference(x[:-1]), y[:-1])
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "This API is experimental"
            module = _load_for_executorch_for_training_from_buffer(program)
        et_loss = float(module.forward_backward(METHOD_NAME, (x, y, weight))[0])
        et_grads = module.named_gradients()
    except Exception as exc:  # e.g. "Missing operator" surfaces here, at run time
        raise ConfigError(f"runtime executorch: the exported program fails to run ({exc})") from exc
    expected_loss = float(loss.detach())
    worst = abs(et_loss - expected_loss) / max(abs(expected_loss), 1e-12)
    order = list(et_grads)
    if not np.isfinite(et_loss):
        return float("inf"), order
    for (name, _), expected in zip(reference.named_parameters(), grads):
        got = et_grads.get(PARAMETER_PREFIX + name)
        if got is None:
            raise ConfigError(f"runtime executorch: the program computes no gradient for parameter {name!r}")
        diff = float((got - expected).abs().max()) / max(float(expected.abs().max()), 1e-12)
        worst = max(worst, diff if np.isfinite(diff) else float("inf"))
    return worst, order


def write_executorch_program(model: nn.Module, out_dir: Path, batch_size: int) -> ExecutorchArtifacts:
    """Build, check and write ``model.pte`` for ``model`` at ``batch_size`` into ``out_dir``."""
    import executorch

    program, order = build_training_program(model, batch_size)
    atomic_write_bytes(out_dir / PROGRAM_NAME, program)
    info = {
        "program": PROGRAM_NAME,
        "method": METHOD_NAME,
        "inputs": ["input", "labels", "example_weight"],
        "outputs": ["loss", "logits"],
        "parameter_prefix": PARAMETER_PREFIX,
        # ExecuTorch's own parameter order (its gradient/parameter outputs), for reference
        "executorch_parameter_order": order,
        "last_batch": "padded with weight-0 rows (weighted mean loss), so the gradient is the mean over real rows",
        "executorch_version": getattr(executorch, "__version__", "unknown"),
        "torch_version": torch.__version__,
    }
    return ExecutorchArtifacts(files=(PROGRAM_NAME,), runtime_info=info, fixed_batch_size=batch_size)

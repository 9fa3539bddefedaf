"""torch → a standard-op ONNX training graph (bundle runtime "onnxgraph"), host side.

The board runs it with plain ``onnxruntime.InferenceSession`` — no training build, no torch — so it
installs from PyPI on Linux aarch64. Two graphs, parameters as inputs (the weights live in numpy on
the device, in manifest order):

- ``train_step.onnx``: ``(x, y, *params) -> (loss, *grads)``, the mean cross-entropy and its gradient
  per parameter, in manifest order. Training (numpy SGD on the device) and the gradient-only task of
  large-batch training both use it.
- ``eval.onnx``: ``(x, y, *params) -> (loss, logits)``.

Recipe (measured, NOTES-boards.md): trace ``torch.autograd.grad`` of a ``functional_call`` with
``make_fx`` (symbolic shapes, so the batch size stays free), decomposing
``aten.convolution_backward`` into a ConvTranspose and a Conv that ONNX has; write the loss as
``-log_softmax(z).gather(y).mean()`` (the exporter's ``nll_loss_backward`` scaled the gradient by the
batch size); export with ``torch.onnx.export(dynamo=True)``. Every export is checked: ORT's loss and
gradients must equal torch autograd's on random batches of two sizes, or the model is refused.
"""
from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgetrain.sdk.errors import ConfigError
from edgetrain.sdk.models import INPUT_SHAPE, NUM_CLASSES

TRAIN_STEP_MODEL = "train_step.onnx"
EVAL_MODEL = "eval.onnx"
GRAPH_FILES = (TRAIN_STEP_MODEL, EVAL_MODEL)
INPUT_NAME = "x"
LABELS_NAME = "y"
LOSS_NAME = "loss"
LOGITS_NAME = "logits"
GRADIENT_PREFIX = "grad."
# the export-time check: max |ORT − torch| over max |torch|, per gradient tensor
GRADIENT_CHECK_RTOL = 1e-4
_CHECK_BATCHES = (3, 17)  # two sizes: the exported batch dimension must really be free


@dataclass(frozen=True)
class OnnxGraphArtifacts:
    """What ``write_onnxgraph`` put in the bundle directory."""

    files: tuple[str, ...]
    runtime_info: Mapping[str, Any]


def check_onnxgraph_trainable(model: nn.Module) -> None:
    """Refuse models whose training changes state other than the parameters: the graph returns
    gradients only, so BatchNorm's running statistics would never be updated."""
    for name, _ in model.named_buffers():
        raise ConfigError(f"runtime onnxgraph cannot train a model with buffers ({name!r}, e.g. BatchNorm's "
                          "running statistics): its graph returns only the loss and the gradients")


def _convolution_backward(grad_out: torch.Tensor, inputs: torch.Tensor, weight: torch.Tensor,
                          bias_sizes: Sequence[int] | None, stride: Sequence[int], padding: Sequence[int],
                          dilation: Sequence[int], transposed: bool, output_padding: Sequence[int], groups: int,
                          output_mask: Sequence[bool]) -> tuple[torch.Tensor | None, ...]:
    """``aten.convolution_backward`` for a 2-D convolution, in forward ops ONNX has (Conv,
    ConvTranspose); ``torch.nn.grad.conv2d_*`` would recurse into ``convolution_backward`` itself."""
    if transposed or groups != 1 or weight.dim() != 4:
        raise ConfigError("runtime onnxgraph: only plain 2-D convolutions (groups 1, not transposed) are supported")
    kernel = weight.shape[2:]
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        # the output padding that gives back the input's size when the stride dropped rows/columns
        restore = [inputs.shape[2 + i] - ((grad_out.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                          + dilation[i] * (kernel[i] - 1) + 1) for i in range(2)]
        grad_input = F.conv_transpose2d(grad_out, weight, stride=stride, padding=padding, output_padding=restore,
                                        dilation=dilation)
    if output_mask[1]:
        grad_weight = _convolution_weight_gradient(grad_out, inputs, kernel, stride, padding, dilation)
    if output_mask[2]:
        grad_bias = grad_out.sum((0, 2, 3))
    return grad_input, grad_weight, grad_bias


def _convolution_weight_gradient(grad_out: torch.Tensor, inputs: torch.Tensor, kernel: Sequence[int],
                                 stride: Sequence[int], padding: Sequence[int],
                                 dilation: Sequence[int]) -> torch.Tensor:
    """The weight gradient as one Conv: ``inputs`` correlated with ``grad_out`` over the batch (batch
    and channel axes swap roles, and so do stride and dilation). The trailing padding is cut to what
    the kernel reaches, so the Conv computes exactly ``kernel`` rows and columns: with the forward's
    symmetric padding it computed rows the forward never reached (6×6 for a 5×5 kernel at stride 2,
    44 % more work) only to crop them."""
    trailing = [(kernel[i] - 1) * dilation[i] + stride[i] * (grad_out.shape[2 + i] - 1) + 1
                - inputs.shape[2 + i] - padding[i] for i in range(2)]
    # F.pad's order is (left, right, top, bottom); ORT fuses a constant zero Pad into the Conv. Where
    # the forward dropped input rows (a stride that does not divide them) the Conv overshoots: crop.
    padded = F.pad(inputs.transpose(0, 1), (padding[1], max(trailing[1], 0), padding[0], max(trailing[0], 0)))
    grad_weight = F.conv2d(padded, grad_out.transpose(0, 1), stride=dilation, dilation=stride).transpose(0, 1)
    if min(trailing) < 0:
        grad_weight = grad_weight[:, :, :kernel[0], :kernel[1]]
    return grad_weight


def _threshold_backward(grad_out: torch.Tensor, inputs: torch.Tensor, threshold: float) -> torch.Tensor:
    """ReLU's backward as a multiplication by its 0/1 mask: torch's ``where(x <= t, 0, grad)`` becomes
    ONNX Where, which onnxruntime runs ~7× slower than Greater, Cast and Mul (measured, 32×16×14×14)."""
    return grad_out * (inputs > threshold).to(grad_out.dtype)


def _mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # not F.cross_entropy: the exporter's translation of nll_loss_backward mis-scales the mean
    return -F.log_softmax(logits, dim=1).gather(1, labels[:, None]).mean()


def _traced(function: Callable[..., tuple[torch.Tensor, ...]], example: Sequence[torch.Tensor]) -> nn.Module:
    """``function`` traced to aten ops with symbolic shapes, as a module taking named positional
    inputs (x, y, p0, p1, …) — the exporter needs one named argument per dynamic-shape spec."""
    from torch.fx.experimental.proxy_tensor import make_fx

    decompositions = {torch.ops.aten.convolution_backward.default: _convolution_backward,
                      torch.ops.aten.threshold_backward.default: _threshold_backward}
    graph = make_fx(function, decomposition_table=decompositions, tracing_mode="symbolic")(*example)
    arguments = ", ".join(["x", "y", *(f"p{i}" for i in range(len(example) - 2))])
    namespace: dict[str, Any] = {}
    # a generated signature: torch.export cannot give dynamic shapes to *args
    exec(f"def forward(self, {arguments}):\n    return self.graph({arguments})\n", namespace)  # noqa: S102
    wrapper_type = type("TracedGraph", (nn.Module,), {"forward": namespace["forward"]})
    wrapper = wrapper_type()
    wrapper.graph = graph
    return wrapper


def _export(module: nn.Module, example: Sequence[torch.Tensor], parameter_names: Sequence[str],
            output_names: Sequence[str], path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    shapes = {"x": {0: batch}, "y": {0: batch}, **{f"p{i}": None for i in range(len(parameter_names))}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, tuple(example), dynamo=True, dynamic_shapes=shapes, verbose=False,
                                    input_names=[INPUT_NAME, LABELS_NAME, *parameter_names],
                                    output_names=list(output_names))
    tmp = path.with_name(f".{path.name}.tmp")
    program.save(str(tmp))
    os.replace(tmp, path)


def _check_against_torch(model: nn.Module, directory: Path, parameter_names: Sequence[str]) -> float:
    """ORT's loss, gradients and logits vs torch autograd on random batches; the worst relative error."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    step = onnxruntime.InferenceSession(str(directory / TRAIN_STEP_MODEL), options, providers=["CPUExecutionProvider"])
    evaluate = onnxruntime.InferenceSession(str(directory / EVAL_MODEL), options, providers=["CPUExecutionProvider"])
    params = {name: p.detach().numpy() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(1234)
    worst = 0.0

    def relative(got: np.ndarray, expected: np.ndarray) -> float:
        return float(np.abs(got - expected).max() / max(float(np.abs(expected).max()), 1e-12))

    for size in _CHECK_BATCHES:
        x = torch.randn((size, *INPUT_SHAPE), generator=generator)
        y = torch.randint(0, NUM_CLASSES, (size,), generator=generator)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        feeds = {INPUT_NAME: x.numpy(), LABELS_NAME: y.numpy().astype(np.int64), **params}
        got_loss, *got_grads = step.run(None, feeds)
        worst = max(worst, relative(np.asarray(got_loss), loss.detach().numpy()))
        worst = max([worst, *(relative(g, e.numpy()) for g, e in zip(got_grads, grads))])
        eval_loss, eval_logits = evaluate.run(None, feeds)
        worst = max(worst, relative(np.asarray(eval_loss), loss.detach().numpy()),
                    relative(eval_logits, logits.detach().numpy()))
    return worst


def write_onnxgraph(model: nn.Module, out_dir: Path) -> OnnxGraphArtifacts:
    """Trace, export, check and write the training and eval graphs of ``model`` into ``out_dir``."""
    # Over 50 lines on purpose: one staging directory's lifetime spans export, the gradient check against
    # torch and the move into the bundle; split apart, the pieces would hand a half-built bundle around.
    check_onnxgraph_trainable(model)
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (drives torch's dynamo exporter)
    except ImportError as exc:
        raise ConfigError(f"runtime onnxgraph needs onnxscript and onnxruntime on the host ({exc}); install them "
                          "with: pip install 'edgetrain[export]'") from exc
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    model = model.train()
    names = [name for name, _ in model.named_parameters()]

    def train_step(x: torch.Tensor, y: torch.Tensor, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        loss = _mean_cross_entropy(torch.func.functional_call(model, dict(zip(names, params)), (x,)), y)
        return (loss, *torch.autograd.grad(loss, params))

    def evaluate(x: torch.Tensor, y: torch.Tensor, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = torch.func.functional_call(model, dict(zip(names, params)), (x,))
        return _mean_cross_entropy(logits, y), logits

    x = torch.zeros((3, *INPUT_SHAPE))
    y = torch.zeros(3, dtype=torch.int64)
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    with tempfile.TemporaryDirectory(prefix=".onnxgraph-", dir=out_dir) as tmp:
        staging = Path(tmp)
        try:
            _export(_traced(train_step, [x, y, *params]), [x, y, *params], names,
                    [LOSS_NAME, *(GRADIENT_PREFIX + n for n in names)], staging / TRAIN_STEP_MODEL)
            with torch.no_grad():
                _export(_traced(evaluate, [x, y, *params]), [x, y, *params], names, [LOSS_NAME, LOGITS_NAME],
                        staging / EVAL_MODEL)
            worst = _check_against_torch(model, staging, names)
        except ConfigError:
            raise
        except Exception as exc:  # tracing/export/ORT errors carry long context; keep the last line
            last_line = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"runtime onnxgraph: cannot export a training graph for this model ({last_line})") from exc
        if not worst <= GRADIENT_CHECK_RTOL:
            raise ConfigError(f"runtime onnxgraph: the exported graph differs from torch autograd by {worst:.2e} "
                              f"(relative, allowed {GRADIENT_CHECK_RTOL:.0e}); refusing a model it trains wrongly")
        for name in GRAPH_FILES:
            os.replace(staging / name, out_dir / name)
    info = {
        "graphs": {"train_step": TRAIN_STEP_MODEL, "eval": EVAL_MODEL},
        "input_name": INPUT_NAME,
        "labels_name": LABELS_NAME,
        "train_step_outputs": [LOSS_NAME, *(GRADIENT_PREFIX + n for n in names)],
        "eval_outputs": [LOSS_NAME, LOGITS_NAME],
        "export_gradient_check_rel_error": worst,
        "export_onnxruntime_version": onnxruntime.__version__,
        "torch_version": torch.__version__,
    }
    return OnnxGraphArtifacts(files=GRAPH_FILES, runtime_info=info)

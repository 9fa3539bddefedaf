"""Reference models for Fashion-MNIST (1×28×28 in, 10 logits out; loss is cross-entropy).

Each model is defined once here; the host exports it and the torch runtime rebuilds it from the
bundle's ``model`` + ``model_config``. The CNN downsamples with stride-2 convolutions and has no
pooling: ExecuTorch 1.5.1's MaxPool2d backward is wrong and AvgPool2d has none (NOTES-runtimes), and
stride-2 convolutions are also the all-convolutional design of Springenberg et al., ICLR-W 2015.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from edgetrain.sdk.errors import ConfigError

INPUT_SHAPE: tuple[int, int, int] = (1, 28, 28)
NUM_CLASSES = 10
NORMS = ("none", "batch", "group")
GROUPNORM_GROUPS = 8


class MLP(nn.Module):
    """784 → hidden… → 10 with ReLU."""

    def __init__(self, hidden: tuple[int, ...]) -> None:
        super().__init__()
        widths = (math.prod(INPUT_SHAPE), *hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], NUM_CLASSES))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _conv_output_size(size: int, kernel_size: int) -> int:
    # stride 2 with "same"-style padding k//2 halves the side (rounding up)
    return (size + 2 * (kernel_size // 2) - kernel_size) // 2 + 1


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(GROUPNORM_GROUPS, channels)
    return nn.Identity()


class CNN(nn.Module):
    """Two stride-2 convolutions (optionally normalised) + two fully connected layers, ReLU."""

    def __init__(self, channels: tuple[int, int], kernel_size: int, hidden: int, norm: str) -> None:
        super().__init__()
        # a conv followed by a norm layer does not need its own bias (the norm's shift replaces it)
        conv_bias = norm == "none"
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(INPUT_SHAPE[0], channels[0], kernel_size, stride=2, padding=pad, bias=conv_bias)
        self.norm1 = _norm_layer(norm, channels[0])
        self.conv2 = nn.Conv2d(channels[0], channels[1], kernel_size, stride=2, padding=pad, bias=conv_bias)
        self.norm2 = _norm_layer(norm, channels[1])
        side = _conv_output_size(_conv_output_size(INPUT_SHAPE[1], kernel_size), kernel_size)
        self.fc1 = nn.Linear(channels[1] * side * side, hidden)
        self.fc2 = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm1(self.conv1(x)))
        x = torch.relu(self.norm2(self.conv2(x)))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def _positive_ints(value: Any, field: str, model: str, length: int | None = None) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"model {model}: {field} must be a non-empty list of positive integers, got {value!r}")
    if length is not None and len(value) != length:
        raise ConfigError(f"model {model}: {field} must have {length} entries, got {len(value)}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ConfigError(f"model {model}: {field} must hold positive integers, got {value!r}")
    return tuple(int(v) for v in value)


def _mlp_from_config(config: Mapping[str, Any]) -> nn.Module:
    return MLP(_positive_ints(config["hidden"], "hidden", "mlp"))


def _cnn_from_config(config: Mapping[str, Any]) -> nn.Module:
    channels = _positive_ints(config["channels"], "channels", "cnn", length=2)
    kernel_size = config["kernel_size"]
    if not isinstance(kernel_size, int) or isinstance(kernel_size, bool) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ConfigError(f"model cnn: kernel_size must be a positive odd integer, got {kernel_size!r}")
    (hidden,) = _positive_ints([config["hidden"]], "hidden", "cnn")
    norm = config["norm"]
    if norm not in NORMS:
        raise ConfigError(f"model cnn: norm must be one of {NORMS}, got {norm!r}")
    if norm == "group" and any(c % GROUPNORM_GROUPS for c in channels):
        raise ConfigError(f"model cnn: norm 'group' uses {GROUPNORM_GROUPS} groups, so channels "
                          f"must be multiples of {GROUPNORM_GROUPS}, got {list(channels)}")
    return CNN((channels[0], channels[1]), kernel_size, hidden, norm)


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its defaults and how to build it from a complete config."""

    defaults: Mapping[str, Any]
    build: Callable[[Mapping[str, Any]], nn.Module]


MODELS: Mapping[str, ModelSpec] = {
    "mlp": ModelSpec(defaults={"hidden": [256, 128]}, build=_mlp_from_config),
    # 16/32 channels, 5×5 kernels, 128 hidden: 215,370 parameters with norm "none"
    "cnn": ModelSpec(defaults={"channels": [16, 32], "kernel_size": 5, "hidden": 128, "norm": "none"},
                     build=_cnn_from_config),
}


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r} (expected one of {sorted(MODELS)})")
    return MODELS[name]


def default_config(name: str) -> dict[str, Any]:
    """A fresh copy of the model's default config."""
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in _spec(name).defaults.items()}


def resolve_config(name: str, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults overlaid with ``config``; unknown keys are refused so typos don't pass silently."""
    resolved = default_config(name)
    unknown = sorted(set(config or {}) - set(resolved))
    if unknown:
        raise ConfigError(f"model {name}: unknown config keys {unknown} (known: {sorted(resolved)})")
    resolved.update({k: list(v) if isinstance(v, tuple) else v for k, v in (config or {}).items()})
    return resolved


def build_model(name: str, config: Mapping[str, Any] | None, seed: int) -> nn.Module:
    """Build model ``name`` with seeded initial weights (same seed → identical weights).

    Torch's global RNG is forked, so building a model never disturbs the caller's random stream.
    """
    spec = _spec(name)
    resolved = resolve_config(name, config)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.build(resolved)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameter count."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

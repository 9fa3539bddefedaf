"""Reference models: sizes, seeded determinism, config checking, no pooling."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from edgetrain.export import cli as export_cli  # noqa: E402
from edgetrain.sdk.models import (  # noqa: E402
    MODELS,
    NORMS,
    build_model,
    count_parameters,
    default_config,
    resolve_config,
)
from edgetrain.sdk.errors import ConfigError  # noqa: E402


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("norm", NORMS)
def test_cnn_parameter_count_in_range(norm: str) -> None:
    model = build_model("cnn", {"norm": norm}, seed=0)
    assert 100_000 <= count_parameters(model) <= 250_000


def test_mlp_parameter_count_follows_hidden_sizes() -> None:
    hidden = [64, 32]
    model = build_model("mlp", {"hidden": hidden}, seed=0)
    widths = [28 * 28, *hidden, 10]
    expected = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    assert count_parameters(model) == expected
    assert default_config("mlp")["hidden"] == [256, 128]


@pytest.mark.parametrize("name,config", [("mlp", None), ("cnn", {"norm": "none"}), ("cnn", {"norm": "batch"}),
                                         ("cnn", {"norm": "group"})])
def test_models_map_images_to_ten_logits(name: str, config: dict | None) -> None:
    model = build_model(name, config, seed=1)
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_seed_same_weights_other_seed_other_weights(name: str) -> None:
    a, b, c = (_state(build_model(name, None, seed=s)) for s in (7, 7, 8))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_building_a_model_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_model("cnn", None, seed=5)
    assert torch.equal(torch.rand(4), expected)


def test_cnn_downsamples_with_stride_two_convolutions_and_no_pooling() -> None:
    model = build_model("cnn", None, seed=0)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 2 and all(c.stride == (2, 2) for c in convs)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2
    pooling = (torch.nn.MaxPool2d, torch.nn.AvgPool2d, torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveMaxPool2d)
    assert not [m for m in model.modules() if isinstance(m, pooling)]


def test_norm_option_selects_the_norm_layer() -> None:
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in build_model("cnn", {"norm": "batch"}, 0).modules())
    group = [m for m in build_model("cnn", {"norm": "group"}, 0).modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(group) == 2 and all(g.num_groups == 8 for g in group)
    assert not list(build_model("cnn", {"norm": "none"}, 0).buffers())


@pytest.mark.parametrize("name,config,needle", [
    ("resnet", None, "unknown model"),
    ("mlp", {"hiden": [10]}, "unknown config keys"),
    ("mlp", {"hidden": []}, "hidden"),
    ("mlp", {"hidden": [10, -1]}, "hidden"),
    ("cnn", {"norm": "layer"}, "norm"),
    ("cnn", {"channels": [16]}, "channels"),
    ("cnn", {"kernel_size": 4}, "kernel_size"),
    ("cnn", {"norm": "group", "channels": [12, 32]}, "multiples of 8"),
])
def test_bad_name_or_config_is_a_config_error(name: str, config: dict | None, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        build_model(name, config, seed=0)


def test_bad_seed_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="seed"):
        build_model("mlp", None, seed=-1)


def test_default_config_is_a_fresh_copy() -> None:
    config = default_config("cnn")
    config["channels"].append(99)
    assert default_config("cnn")["channels"] == [16, 32]
    assert resolve_config("cnn", {"norm": "batch"})["norm"] == "batch"


def test_cli_model_choices_match_the_registry() -> None:
    assert sorted(export_cli.MODEL_NAMES) == sorted(MODELS)
    assert tuple(export_cli.NORM_CHOICES) == tuple(NORMS)

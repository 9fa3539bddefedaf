"""The optional extras a board installs resolve, on Linux aarch64, to builds without CUDA.

`pip download --platform` evaluates environment markers for the host, not the target, so this
evaluates pyproject.toml's requirement markers with ``packaging.markers`` for a Linux aarch64
CPython 3.11 (Raspberry Pi OS 64-bit, Jetson) and for Linux x86-64. No network: the facts about which
torch builds are CPU builds (torch <= 2.10.0 on aarch64) are in NOTES-boards.md and docs/runtimes-on-boards.md.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# PyPI's Linux aarch64 torch wheels from 2.11.0 on are CUDA builds; 2.10.0 is the newest CPU one.
NEWEST_CPU_TORCH_AARCH64 = Version("2.10.0")
CUDA_PREFIXES = ("nvidia-", "cuda-", "triton")
# what a board installs; ort, export and executorch are x86-only (see pyproject.toml)
BOARD_EXTRAS = ("torch", "onnxgraph", "bench")


def _environment(machine: str) -> dict[str, str]:
    return {"platform_machine": machine, "sys_platform": "linux", "platform_system": "Linux",
            "os_name": "posix", "python_version": "3.11", "python_full_version": "3.11.2",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def _extras() -> dict[str, list[str]]:
    return tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]


def selected(extra: str, machine: str) -> list[Requirement]:
    """The requirements ``pip install 'edgetrain[extra]'`` selects on Linux ``machine``, with
    edgetrain's own extras (``all``) expanded."""
    chosen: list[Requirement] = []
    for line in _extras()[extra]:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate(_environment(machine)):
            continue
        if requirement.name == "edgetrain":
            for inner in sorted(requirement.extras):
                chosen += selected(inner, machine)
        else:
            chosen.append(requirement)
    return chosen


def _pinned(requirement: Requirement) -> Version:
    pins = [spec for spec in requirement.specifier if spec.operator == "=="]
    assert len(pins) == 1 and len(requirement.specifier) == 1, \
        f"{requirement}: torch must be pinned exactly (a range admits a CUDA build)"
    return Version(pins[0].version)


@pytest.mark.parametrize("extra", sorted(_extras()))
def test_no_extra_pulls_a_cuda_build_on_linux_aarch64(extra: str) -> None:
    for requirement in selected(extra, "aarch64"):
        assert not requirement.name.lower().startswith(CUDA_PREFIXES), f"[{extra}] selects {requirement}"
        if requirement.name.lower() == "torch":
            assert _pinned(requirement) <= NEWEST_CPU_TORCH_AARCH64, \
                f"[{extra}] selects {requirement} on aarch64: PyPI's aarch64 torch > 2.10.0 is a CUDA build"


@pytest.mark.parametrize("extra", BOARD_EXTRAS)
def test_board_extras_select_something_on_aarch64(extra: str) -> None:
    assert selected(extra, "aarch64"), f"[{extra}] installs nothing on a Linux aarch64 board"


def test_torch_extra_is_2_10_cpu_on_aarch64_and_keeps_2_13_on_x86() -> None:
    assert [str(r.specifier) for r in selected("torch", "aarch64")] == ["==2.10.0"]
    assert [str(r.specifier) for r in selected("torch", "x86_64")] == ["==2.13.0"]


def test_onnxgraph_extra_is_plain_onnxruntime_on_aarch64_and_the_training_build_on_x86() -> None:
    # one onnxruntime package per platform: on x86 the ort extra's training build already provides
    # InferenceSession, and plain onnxruntime beside it would overwrite the same package
    assert [(r.name, str(r.specifier)) for r in selected("onnxgraph", "aarch64")] == [("onnxruntime", "==1.22.1")]
    assert [r.name for r in selected("onnxgraph", "x86_64")] == ["onnxruntime-training-cpu"]
    all_x86 = {r.name for r in selected("all", "x86_64")}
    assert "onnxruntime" not in all_x86 and "onnxruntime-training-cpu" in all_x86


def test_the_checker_sees_a_cuda_torch() -> None:
    """Not vacuous: an unmarked torch 2.13.0 pin (today's x86 pin) fails the aarch64 check."""
    requirement = Requirement("torch==2.13.0")
    assert _pinned(requirement) > NEWEST_CPU_TORCH_AARCH64

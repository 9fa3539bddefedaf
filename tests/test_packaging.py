"""One house: the wheel installs everything under ``edgetrain`` (nothing generic such as ``sdk`` or
``export`` at the top of site-packages), and no code in the tree imports the folders by their bare
names or behind ``importlib``."""
from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("sdk", "aggregator", "export", "device_bench")
BARE_IMPORT = re.compile(rf"^\s*(from|import)\s+({'|'.join(FOLDERS)})(\.|\s|$)", re.MULTILINE)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(REPO)], check=True, capture_output=True, timeout=120)
    (built,) = out.glob("edgetrain-*.whl")
    return built


def test_the_wheel_installs_one_top_level_name(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"edgetrain"}
    for folder in FOLDERS:  # every layer is in it, under the one name
        assert f"edgetrain/{folder}/__init__.py" in names
    assert "edgetrain/cli.py" in names and "edgetrain/sdk/energy/power/rapl.py" in names
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["edgetrain"]
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "edgetrain = edgetrain.cli:main" in entry_points


def test_the_wheel_holds_every_module_of_the_tree(wheel: Path) -> None:
    """pyproject lists the packages by hand (package-dir maps the folders): a new sub-package left out of
    that list would install fine in editable mode and be missing from every real install."""
    names = set(zipfile.ZipFile(wheel).namelist())
    roots = {"edgetrain": REPO / "edgetrain", **{f"edgetrain/{folder}": REPO / folder for folder in FOLDERS}}
    missing = [f"{prefix}/{path.relative_to(root).as_posix()}" for prefix, root in roots.items()
               for path in root.rglob("*.py") if "__pycache__" not in path.parts]
    missing = [name for name in missing if name not in names]
    assert missing == []


def test_no_code_imports_the_folders_by_their_bare_names() -> None:
    offenders = []
    for path in REPO.rglob("*.py"):
        if ".venv" in path.parts or "build" in path.parts:
            continue
        text = path.read_text(encoding="utf-8")
        offenders += [f"{path.relative_to(REPO)}: {m.group(0).strip()}" for m in BARE_IMPORT.finditer(text)]
    assert offenders == []


def test_the_sdk_loads_no_upper_layer_through_importlib() -> None:
    upper = re.compile(r"import_module\(\s*f?[\"'](edgetrain\.)?(aggregator|export|device_bench|cli)")
    hits = [str(p.relative_to(REPO)) for p in (REPO / "sdk").rglob("*.py") if upper.search(p.read_text())]
    assert hits == []

"""The wheel ships what an installed apt_hf reads at run time: every module and the model-card templates.

`.ci/run` goes further (scripts/check_wheel.py: install the wheel alone, publish and load from outside the tree);
this is the quick check of the wheel's file list, built exactly as CI builds it (offline, ~3 s).
"""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import apt_hf
from apt_hf.model_card import CARD_KINDS, TEMPLATE_DIR

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "apt_hf"


def load_check_wheel():
    spec = importlib.util.spec_from_file_location("check_wheel", ROOT / "scripts" / "check_wheel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wheel_holds_every_module_and_the_model_card_templates(tmp_path):
    wheel = load_check_wheel().build_wheel(tmp_path / "dist")
    names = set(zipfile.ZipFile(wheel).namelist())

    templates = {f"apt_hf/model_cards/{spec.template}" for spec in CARD_KINDS.values()}
    assert templates <= names, sorted(templates - names)
    shipped = {f"apt_hf/model_cards/{p.name}" for p in (PACKAGE / "model_cards").glob("*.md")}
    assert shipped == templates  # every template in the tree is one a card kind uses, and ships
    modules = {f"apt_hf/{p.relative_to(PACKAGE).as_posix()}" for p in PACKAGE.rglob("*.py")
               if "__pycache__" not in p.parts}
    assert modules <= names, sorted(modules - names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    # library code only: the experiments and runners (benchmarks, the GPU check, reproduce_mini) stay outside
    packages = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert packages == {"apt_hf"}, packages
    runners = ("benchmark", "gpu_check", "reproduce_mini", "correctness", "experiments")
    assert not [n for n in names if any(word in n for word in runners)]


def test_the_library_exposes_no_runner():
    """`apt_hf` and its subpackages hold library code; test-model builders are `apt_hf.testing`."""
    import pkgutil

    modules = {m.name for m in pkgutil.walk_packages(apt_hf.__path__, "apt_hf.")}
    assert "apt_hf.testing" in modules and {"apt_hf.training", "apt_hf.tasks.llava"} <= modules
    assert not [m for m in modules if any(word in m for word in ("benchmark", "gpu_check", "reproduce", "tiny"))]


def test_templates_are_read_from_the_package():
    """The renderer reads the templates inside apt_hf (package data), not a folder of the source checkout."""
    assert Path(str(TEMPLATE_DIR)).resolve() == Path(apt_hf.__file__).resolve().parent / "model_cards"
    for spec in CARD_KINDS.values():
        assert (TEMPLATE_DIR / spec.template).read_text(encoding="utf-8").startswith("---\n{{ card_data }}\n---")

"""Packaging: the Slicer module's CMake lists every core file; the core never imports Slicer or Qt."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIB = REPO / "LiverTumorSeg" / "LiverTumorSegLib"
FORBIDDEN = {"slicer", "qt", "ctk", "vtk", "PythonQt"}


def test_every_core_python_file_is_listed_in_module_cmake():
    cmake = (REPO / "LiverTumorSeg" / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = set(re.findall(r"(?:LiverTumorSegLib|LiverTumorSegSlicer)/[\w/]+\.py", cmake))
    on_disk = {p.relative_to(REPO / "LiverTumorSeg").as_posix()
               for lib in (LIB, REPO / "LiverTumorSeg" / "LiverTumorSegSlicer") for p in lib.rglob("*.py")}
    assert on_disk == listed
    assert "${MODULE_NAME}.py" in cmake and (REPO / "LiverTumorSeg" / "LiverTumorSeg.py").is_file()
    for resource in ("Resources/UI/${MODULE_NAME}.ui", "Resources/Icons/${MODULE_NAME}.png"):
        assert resource in cmake and (REPO / "LiverTumorSeg" / resource.replace("${MODULE_NAME}", "LiverTumorSeg")).is_file()
    assert "WITH_GENERIC_TESTS" in cmake and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in cmake


def test_bundled_weights_are_listed_and_small():
    cmake = (REPO / "LiverTumorSeg" / "CMakeLists.txt").read_text(encoding="utf-8")
    files = sorted((LIB / "weights").rglob("*.ltsm"))
    assert [f.name for f in files] == ["liver.ltsm", "tumor.ltsm"]
    for f in files:
        assert f.relative_to(REPO / "LiverTumorSeg").as_posix() in cmake
        assert f.stat().st_size <= 10e6


def test_training_configs_are_listed():
    cmake = (REPO / "LiverTumorSeg" / "CMakeLists.txt").read_text(encoding="utf-8")
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    configs = sorted((LIB / "configs").glob("*.json"))
    assert configs and '"configs/*.json"' in pyproject
    for f in configs:
        assert f.relative_to(REPO / "LiverTumorSeg").as_posix() in cmake


def test_core_does_not_import_slicer_or_qt():
    for path in LIB.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"


def test_catalog_entry():
    import json

    entry = json.loads((REPO / "LiverTumorSeg.json").read_text(encoding="utf-8"))
    assert entry["category"] == "Segmentation" and entry["build_dependencies"] == ["PyTorch"]
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#") and entry["scm_url"]


def test_extension_metadata():
    s4ext = (REPO / "LiverTumorSeg.s4ext").read_text(encoding="utf-8")
    assert "category Segmentation" in s4ext and "depends PyTorch" in s4ext
    top = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "find_package(Slicer REQUIRED)" in top and "add_subdirectory(LiverTumorSeg)" in top

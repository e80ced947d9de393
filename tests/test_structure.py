"""The project's shape: the import rules of docs/design.md, short files, and presets written once."""
import ast
import os

from conftest import ROOT

import utils

MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def project_imports(module):
    """The project modules a module imports, anywhere in its code."""
    found = set()
    for node in ast.walk(ast.parse(open(os.path.join(ROOT, module + ".py")).read())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found & set(MODULES) - {module}


def test_no_module_imports_itself_through_others():
    graph = {m: project_imports(m) for m in MODULES}
    for start in MODULES:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        assert start not in seen, f"{start} imports itself through {sorted(seen)}"


def test_the_layers_of_the_design():
    assert project_imports("utils") == set()  # the knobs and the schedule stand alone
    assert project_imports("modules") <= {"utils"}  # the network knows no files
    assert "predict" not in project_imports("train") and "train" not in project_imports("predict")


def test_no_file_is_long():
    for name in MODULES:
        assert len(open(os.path.join(ROOT, name + ".py")).read().splitlines()) <= 600, name


def test_the_quick_profile_is_written_once():
    """train_predict.sh and the sweep script both read configs/cpu_quick.args, which parses into valid settings."""
    for script in ("train_predict.sh", os.path.join("docs", "sweep_quick_profile.sh")):
        text = open(os.path.join(ROOT, script)).read()
        assert "@configs/cpu_quick.args" in text and "--patch-size" not in text, script
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        cfg, _ = utils.parse_settings(utils.build_parser("test"), ["@configs/cpu_quick.args", "--batch-size", "8"])
    finally:
        os.chdir(cwd)
    assert (cfg["IMAGE_SIZE"], cfg["PATCH_SIZE"], cfg["TIMESTEP_SAMPLING"], cfg["BATCH_SIZE"]) == (64, 2, "edm", 8)


def test_editing_stays_out_of_generation_and_training():
    """edit.py builds on predict.py, never the other way; training knows nothing of the measures of samples."""
    assert "edit" not in project_imports("predict") and "predict" in project_imports("edit")
    assert "evaluate" not in project_imports("train")

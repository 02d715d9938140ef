"""The structure holds (docs/architecture.md): import-linter's contracts in setup.cfg, and every private name of TRL,
transformers, accelerate, PEFT and DeepSpeed used only in alignkit/_adapter.py. Each check is shown to fail on a
planted violation."""

import ast
import importlib.util
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "alignkit"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
LIBRARIES = ("trl", "transformers", "accelerate", "peft", "deepspeed")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH first: the package under `cwd` is the one analysed (a planted copy in the test below)
    return subprocess.run([str(LINT_IMPORTS), "--config", str(ROOT / "setup.cfg"), "--no-cache"], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(cwd), "PATH": ""})


def test_the_import_contracts_hold():
    proc = _lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken" in proc.stdout, proc.stdout[-2000:]


def test_each_import_contract_fails_on_a_planted_violation(tmp_path):
    copy = tmp_path / "alignkit"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "losses.py", "a") as f:  # the math imports a model library, and a layer above it
        f.write("\nimport transformers  # planted\nfrom alignkit.trainers import fdpo  # planted\n")
    with open(copy / "run" / "plan.py", "a") as f:  # a step imports a later step
        f.write("\nfrom alignkit.run import execute  # planted\n")
    proc = _lint_imports(tmp_path)
    assert proc.returncode != 0
    assert "Contracts: 0 kept, 3 broken" in proc.stdout, proc.stdout[-3000:]
    for planted in ("alignkit.losses -> alignkit.trainers.fdpo", "alignkit.losses -> transformers",
                    "alignkit.run.plan -> alignkit.run.execute"):
        assert planted in proc.stdout, (planted, proc.stdout[-3000:])


# ---- private names of the libraries we build on --------------------------------------------------------------

def _library_files():
    site = Path(importlib.util.find_spec("trl").origin).parents[1]
    for pkg in ("trl", "accelerate", "peft"):
        # trl.experimental's trainers are not ones alignkit builds on; their private names would only collide
        yield from (p for p in (site / pkg).rglob("*.py") if "experimental" not in p.parts)
    transformers = site / "transformers"
    for rel in ("trainer.py", "trainer_callback.py", "trainer_pt_utils.py", "trainer_utils.py", "training_args.py",
                "modeling_utils.py", "tokenization_utils_base.py", "configuration_utils.py", "modelcard.py",
                "integrations/deepspeed.py", "integrations/peft.py", "generation/utils.py"):
        yield transformers / rel
    if importlib.util.find_spec("deepspeed") is not None:
        deepspeed = site / "deepspeed"
        yield deepspeed / "runtime" / "engine.py"
        yield from (deepspeed / "runtime" / "zero").glob("*.py")


def _private(name: str) -> bool:
    return len(name) > 1 and name.startswith("_") and not name.startswith("__")


@lru_cache(maxsize=1)
def library_private_names() -> frozenset[str]:
    """Private names the libraries define: functions, classes, methods, attributes (`obj._x = ...`), and variables
    of modules and class bodies (not a function's local variables, which nothing outside can touch)."""
    names = set()

    def visit(node, scope_is_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if _private(child.name):
                    names.add(child.name)
                visit(child, not isinstance(child, ast.ClassDef))
                continue
            if isinstance(child, ast.Attribute) and isinstance(child.ctx, ast.Store) and _private(child.attr):
                names.add(child.attr)
            elif isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store) and _private(child.id) and \
                    not scope_is_function:
                names.add(child.id)
            visit(child, scope_is_function)

    for path in _library_files():
        try:
            visit(ast.parse(path.read_text()), False)
        except (OSError, SyntaxError):
            continue
    return frozenset(names)


def private_uses(source: str, private: frozenset[str], declared_hooks: frozenset[str]) -> list[tuple[int, str]]:
    """(line, what) for each use of a library's private name in `source`: an import of a private module or name
    from one of LIBRARIES; an attribute, a method or a string that is one of `private`. A method of a class that
    overrides a hook the adapter declares (OVERRIDDEN_HOOKS), and calls of it on `self` or `super()`, are allowed:
    the adapter checks those hooks' signatures."""
    found = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBRARIES:
            if any(part.startswith("_") for part in node.module.split(".")) or \
                    any(_private(a.name) for a in node.names):
                found.append((node.lineno, f"from {node.module} import {', '.join(a.name for a in node.names)}"))
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name in private and item.name not in declared_hooks:
                    found.append((item.lineno, f"def {item.name} (a private method of theirs, not declared)"))
        elif isinstance(node, ast.Attribute) and node.attr in private:
            on_self = isinstance(node.value, ast.Name) and node.value.id == "self"
            on_super = isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "super"
            if not (node.attr in declared_hooks and (on_self or on_super)):
                found.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in private:
            found.append((node.lineno, repr(node.value)))
    return found


def _declared_hooks() -> frozenset[str]:
    from alignkit._adapter import OVERRIDDEN_HOOKS

    return frozenset(name for _, name, _ in OVERRIDDEN_HOOKS)


def test_private_names_of_the_libraries_are_used_only_in_the_adapter():
    private, hooks = library_private_names(), _declared_hooks()
    assert {"_prepare_inputs", "_remove_unused_columns", "_tied_weights_keys", "_name_or_path"} <= private
    problems = [f"{path.relative_to(ROOT)}:{line}: {what}"
                for path in sorted(PACKAGE.rglob("*.py")) if path.name != "_adapter.py"
                for line, what in private_uses(path.read_text(), private, hooks)]
    assert not problems, "declare these in alignkit/_adapter.py and use them through it:\n" + "\n".join(problems)


@pytest.mark.parametrize("planted", [
    "def f(trainer, batch):\n    return trainer._prepare_inputs(batch)\n",
    "def f(model):\n    return model.config._name_or_path\n",
    "def f(model):\n    return getattr(model, '_tied_weights_keys', None)\n",
    "from trl.trainer.utils import _some_helper\n",
    "from transformers.integrations._private import thing\n",
    "class T:\n    def _wrap_model(self, model):\n        return model\n",  # overrides an undeclared hook
])
def test_the_private_name_scan_catches_a_planted_use(planted):
    assert private_uses(planted, library_private_names(), _declared_hooks())


def test_the_scan_allows_a_declared_hook_and_its_super_call():
    source = ("class T:\n    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):\n"
              "        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)\n")
    assert private_uses(source, library_private_names(), _declared_hooks()) == []


def test_no_module_is_over_600_lines():
    """Past that a module does several jobs (the redesign split runner.py, ppo.py and losses.py on this line)."""
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= 600, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]

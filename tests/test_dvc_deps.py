"""dvc.yaml lists, for every stage, exactly the project code it runs: the stage module and every
project module it imports, directly or not (found statically from the source: `import` statements
anywhere in a module, function bodies included). A missing dep means a code change does not rerun
the stage; an extra one reruns it for nothing. Params deps are checked against what each stage
reads (the sections its module loads)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "models", "stages")


def module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*parts)
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.exists():
            return cand
    return None


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)  # `from models import registry`
    return out


def code_closure(module: str) -> set[str]:
    """Repository-relative paths of the project files ``module`` runs (itself included)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        f = module_file(todo.pop())
        if f is None or f in seen:
            continue
        seen.add(f)
        todo.extend(imported_modules(f))
    return {str(p.relative_to(ROOT)) for p in seen if p.name != "__init__.py"}  # package docstrings only


def stages() -> dict[str, dict]:
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, body in dvc.items():
        if "foreach" in body:
            for item in body["foreach"]:
                out[f"{name}@{item}"] = yaml.safe_load(yaml.safe_dump(body["do"]).replace("${item}", item))
        else:
            out[name] = body
    return out


STAGES = stages()


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_code_deps_are_exactly_what_the_stage_imports(stage):
    body = STAGES[stage]
    module = body["cmd"].split()[2]  # python -m stages.<name> [--item x]
    declared = {d for d in body.get("deps", []) if d.endswith(".py")}
    needed = code_closure(module)
    assert not needed - declared, f"{stage}: dvc.yaml misses code deps {sorted(needed - declared)}"
    assert not declared - needed, f"{stage}: dvc.yaml lists code it does not run {sorted(declared - needed)}"


def test_closure_follows_imports_inside_functions():
    """The checker itself can fail: a stage module's lazy import is found."""
    assert "pipeline/checkpoint.py" in code_closure("stages.latents")
    assert "models/tokenizers.py" in code_closure("stages.tokenizer")
    assert "stages/tokenizer.py" not in code_closure("stages.latents")  # stages never import each other


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stages_never_import_other_stages(stage):
    module = STAGES[stage]["cmd"].split()[2]
    others = {p for p in code_closure(module) if p.startswith("stages/")} - {module.replace(".", "/") + ".py"}
    assert not others, f"{module} imports other stage modules {sorted(others)}; move shared code to pipeline/"

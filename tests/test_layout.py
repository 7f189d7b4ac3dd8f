"""The package's layering, as the README's Layout section draws it: training and inference never import each other,
the shared layers import no stage, and every module is named in that section."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "medldm"

# what each part of medldm may import from medldm (besides itself); anything else is a layering error
ALLOWED = {
    "errors": set(),
    "versions": set(),
    "config": {"errors", "data"},  # data.io's readers for config files
    "devices": {"errors"},
    "viz": {"errors", "data"},
    "data": {"errors", "config", "versions", "viz"},
    "models": {"errors", "config", "devices"},
    "artifacts": {"errors", "config", "data", "models"},
    "evaluation": {"errors", "config", "data", "devices", "models", "artifacts", "versions", "viz"},
    "training": {"errors", "config", "data", "devices", "models", "artifacts", "evaluation", "versions", "viz"},
    "inference": {"errors", "config", "data", "devices", "models", "artifacts", "evaluation", "versions", "viz"},
    "view": {"errors", "config", "data", "artifacts", "evaluation"},
    "demo": {"errors", "config", "data", "models", "artifacts", "evaluation", "training", "inference", "view"},
    "cli": {"errors", "config", "data", "devices", "models", "artifacts", "evaluation", "training", "inference",
            "demo", "versions", "view"},
    "__main__": {"cli"},
    "__init__": set(),
}


def part(module: Path) -> str:
    rel = module.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_parts(module: Path) -> set[str]:
    """The parts of medldm a module imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from medldm import __version__` reads the package itself, which every part may
            names = [node.module] if node.module != "medldm" else [f"medldm.{a.name}" for a in node.names
                                                                   if not a.name.startswith("__")]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name.startswith("medldm."):
                found.add(name.split(".")[1])
    return found


def test_no_module_imports_across_the_layers():
    wrong = []
    for module in sorted(PACKAGE.rglob("*.py")):
        mine = part(module)
        assert mine in ALLOWED, f"{module}: a new part of medldm; give it its place in ALLOWED and the README"
        for other in imported_parts(module) - {mine} - ALLOWED[mine]:
            wrong.append(f"{module.relative_to(ROOT)} imports medldm.{other}")
    assert not wrong, "\n".join(wrong)


def test_training_and_inference_share_only_the_lower_layers():
    # the rule the layering exists for, stated on its own
    for stage, other in (("training", "inference"), ("inference", "training")):
        for module in (PACKAGE / stage).glob("*.py"):
            assert other not in imported_parts(module), f"{module} imports medldm.{other}"


def test_the_readme_layout_names_every_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", section))
    missing = [str(m.relative_to(ROOT)) for m in sorted(PACKAGE.rglob("*.py"))
               if m.stem not in ("__init__", "__main__") and m.stem not in words]
    assert not missing, f"README.md's Layout section does not name {missing}"
    named = set(re.findall(r"medldm/([a-z_/]+?)(?:\.py|/)", section))
    gone = [n for n in named if not (PACKAGE / n).exists() and not (PACKAGE / f"{n}.py").exists()]
    assert not gone, f"README.md's Layout section names {gone}, which medldm no longer has"

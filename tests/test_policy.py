"""Project policies kept by tests: layers import only downward, every CLI verb is documented, the repo stands alone."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

from keel.cli import app

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "keel"


def documented_layers() -> list[set[str]]:
    """The layer table of docs/architecture.md, lowest first: each row's `keel/<name>` packages and modules."""
    rows = [line for line in (ROOT / "docs" / "architecture.md").read_text().splitlines() if line.startswith("| ")]
    layers = [set(re.findall(r"`keel/([\w_]+?)(?:\.py)?/?`", row.split("|")[2])) for row in rows]
    return [names for names in layers if names][::-1]


# A module may import its own layer and those below it.
LAYERS = documented_layers()


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else module
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"keel.{top} is in no layer of docs/architecture.md; add it to the table there and here")


def keel_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("keel."):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("keel.")]
    return found


def test_no_module_imports_from_a_layer_above_it():
    violations = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(rel.parts)
        if module == "keel.__init__":
            continue
        own = layer_of(module)
        for imported in keel_imports(path):
            if layer_of(imported) > own:
                violations.append(f"{module} imports {imported}")
    assert not violations, violations


def test_every_layer_names_modules_that_exist():
    named = [name for names in LAYERS for name in names]
    missing = [name for name in named if not (SRC / name).is_dir() and not (SRC / f"{name}.py").is_file()]
    assert not missing, f"layers list modules that do not exist: {missing}"


def test_the_layer_table_has_five_layers_from_ground_to_face():
    assert len(LAYERS) == 5 and "config" in LAYERS[0] and "cli" in LAYERS[-1], LAYERS


def test_nothing_in_the_repo_points_outside_it():
    # A clone has no ../shared: the design and the torch notes the code relies on live in docs/.
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in tracked:
        if name.endswith((".py", ".md", ".toml", "Makefile")) and name != "tests/test_policy.py":
            text = (ROOT / name).read_text(errors="replace")
            offenders += [name for needle in ("../shared", "DESIGN.md", "TORCH-CPU-NOTES") if needle in text]
    assert not offenders, f"these files point outside the repository: {sorted(set(offenders))}"


def test_every_cli_verb_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    verbs = [c.name or c.callback.__name__ for c in app.registered_commands]
    for group in app.registered_groups:  # a group and each of its verbs: `keel data`, `keel data card`, ...
        verbs.append(group.name)
        verbs += [f"{group.name} {c.name or c.callback.__name__}" for c in group.typer_instance.registered_commands]
    assert verbs
    missing = [v for v in verbs if f"keel {v}" not in readme]
    assert not missing, f"document these verbs in README.md: {missing}"


def test_readme_opens_with_the_two_setup_commands():
    head = (ROOT / "README.md").read_text().split("\n## ")[0]
    assert "make demo" in head and "make test" in head

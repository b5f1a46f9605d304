"""Packages import downward only (docs/DESIGN.md, "Layers"): a lower layer never imports a higher one,
and packages of one layer never import each other; a module beside the packages (``json_files.py``)
sits below them all and imports none. Checked on the source (every ``import``, also
inside functions), so a lazy import cannot hide an upward dependency."""

import ast
from pathlib import Path

import megatron_cosmos3

# Lowest first. model <- objectives <- parallel <- checkpoint/inference <- eval_suite <- training <- release; data
# is independent of training and of the parallel machinery; evaluation (metrics) sits beside parallel,
# under everything that runs a model, so the trainer and an eval command can both use it; the generated
# world (and its environment) sits there too: whatever runs a model in it lives higher up.
LAYERS = [
    {"model", "encoders", "tasks"},
    {"objectives", "data", "conversion"},
    {"parallel", "evaluation", "world"},
    {"checkpoint", "inference"},
    {"eval_suite"},
    {"training"},
    {"release"},
    {"testing"},
]
# ``python -m`` entry points that only forward to a command living higher up (nothing imports them):
# file -> the one module it may import from above.
FORWARDERS = {"conversion/__main__.py": "megatron_cosmos3.release.convert_cli"}
LAYER_OF = {package: level for level, packages in enumerate(LAYERS) for package in packages}
ROOT = Path(megatron_cosmos3.__file__).parent


def imported_packages(path: Path) -> set[str]:
    """The megatron_cosmos3 packages that the module at ``path`` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "megatron_cosmos3" and len(parts) > 1 and parts[1] in LAYER_OF:
                found.add(parts[1])
    return found


def forwards_only(path: Path, target: str) -> bool:
    """The module is a docstring, ``import sys``, ``from <target> import main`` and the
    ``if __name__ == "__main__": sys.exit(main())`` guard: nothing else."""
    body = ast.parse(path.read_text()).body
    allowed = (
        lambda node: isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant),
        lambda node: isinstance(node, ast.Import) and [a.name for a in node.names] == ["sys"],
        lambda node: (
            isinstance(node, ast.ImportFrom) and node.module == target and [a.name for a in node.names] == ["main"]
        ),
        lambda node: (
            isinstance(node, ast.If) and ast.unparse(node) == "if __name__ == '__main__':\n    sys.exit(main())"
        ),
    )
    return all(any(rule(node) for rule in allowed) for node in body)


def violations(root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if len(relative.parts) < 2:  # the package's own __init__, or a module below every package
            if relative.name != "__init__.py":
                bad += [
                    f"{relative} (below every package) imports {other}" for other in sorted(imported_packages(path))
                ]
            continue
        package = relative.parts[0]
        if str(relative) in FORWARDERS and forwards_only(path, FORWARDERS[str(relative)]):
            continue
        for other in sorted(imported_packages(path) - {package}):
            if LAYER_OF[other] >= LAYER_OF[package]:
                bad.append(f"{relative} (layer {LAYER_OF[package]}) imports {other} (layer {LAYER_OF[other]})")
    return bad


def test_every_package_has_a_layer():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(LAYER_OF)


def test_packages_import_downward_only():
    assert violations() == []


def test_an_upward_import_is_caught(tmp_path):
    """Control: the check sees an upward import, also a lazy one inside a function."""
    for package in LAYER_OF:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "model" / "bad.py").write_text(
        "def f():\n    from megatron_cosmos3.training.train import main\n    import megatron_cosmos3.parallel\n"
    )
    (tmp_path / "data" / "sideways.py").write_text("from megatron_cosmos3 import conversion\n")
    (tmp_path / "json_files.py").write_text("from megatron_cosmos3.model.config import MoTConfig\n")
    assert violations(tmp_path) == [
        "data/sideways.py (layer 1) imports conversion (layer 1)",
        "json_files.py (below every package) imports model",
        "model/bad.py (layer 0) imports parallel (layer 2)",
        "model/bad.py (layer 0) imports training (layer 5)",
    ]


def test_a_forwarding_entry_point_may_only_forward(tmp_path):
    """Control: the forwarding entry point is exempt only while it does nothing but forward."""
    for package in LAYER_OF:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    shim = tmp_path / "conversion" / "__main__.py"
    shim.write_text((ROOT / "conversion" / "__main__.py").read_text())
    assert violations(tmp_path) == []
    shim.write_text(shim.read_text() + "from megatron_cosmos3.training.train import main as train\n")
    assert violations(tmp_path) == [
        "conversion/__main__.py (layer 1) imports release (layer 6)",
        "conversion/__main__.py (layer 1) imports training (layer 5)",
    ]

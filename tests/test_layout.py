"""The package's layering: every module imports only from layers below its own (dependencies point down)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "meta_vqa"

# rank of each top-level part of the package; a module may import parts of a lower rank or its own part
RANK = {
    "errors": 0,
    "device": 0.5,
    "io": 0.5,  # raises the errors
    "_quiet": 0.5,  # what a run does not print
    "progress": 0.5,  # the progress line (Lightning only)
    "nets": 1,
    "diffusion": 1,
    "meta": 2,  # the MAML loop uses the networks' losses
    "data": 3,
    "eval": 4,
    "stages": 5,
    "callbacks": 5,
    "lightning_cli": 6,
    "prepare": 6,  # builders may train with a stage (the small CLIP)
    "slurm": 6.5,  # the pipeline's batch jobs: written from a plan the pipeline hands it
    "pipeline": 7,
    "generate": 7,
    "bench": 7,
    "cli": 8,
    "__main__": 9,
    "__init__": 9,
}


def _part(module: str) -> str:
    return module.split(".")[1] if module.startswith("meta_vqa.") else ""


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("meta_vqa.")}


def test_dependencies_point_down():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        part = rel.parts[0].removesuffix(".py")
        assert part in RANK, f"{rel}: add its part to RANK"
        for module in _imports(path):
            other = _part(module)
            if other != part and RANK[other] >= RANK[part]:
                bad.append(f"{rel} imports {module}")
    assert not bad, "\n".join(bad)

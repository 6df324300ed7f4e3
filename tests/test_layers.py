"""The package's layers, read from its imports: data flows one way (read -> tokenize -> plan ->
run -> write), and only job/ puts the compute side (engines, tasks) and the storage side (io,
state) together. Every import counts, also those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import bulkinfer

PACKAGE = Path(bulkinfer.__file__).parent

# layer -> layers of ours it may import (besides itself)
ALLOWED = {
    "errors": set(),
    "planner": set(),
    "configs": set(),
    "spec": {"errors", "grammars"},
    "faults": set(),
    "grammars": set(),
    "io": {"errors", "faults", "grammars", "process"},
    "engines": {"errors", "observe", "configs", "grammars"},
}
# layer -> layers of ours it must never import
FORBIDDEN = {
    "prepare": {"job", "engines", "tasks", "state", "executors"},
    "tasks": {"job", "state", "io", "executors"},
    "state": {"job", "engines", "tasks", "prepare", "executors"},
    "observe": {"job", "engines", "tasks", "prepare", "executors"},
    "executors": {"job", "engines", "tasks", "state", "prepare"},
    "model_files": {"job", "engines", "tasks", "state", "io"},
}
COMPUTE = {"engines", "tasks"}
STORAGE = {"io", "state"}
COMPOSERS = {"job", "cli", "api", "__init__", "__main__"}


def layer(module: str) -> str:
    """bulkinfer.io.readers -> io; bulkinfer.planner -> plan."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    return "bulkinfer." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def our_imports(path: Path, module: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("bulkinfer")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("bulkinfer"):
                found.add(name)
    return {m for m in found if m != "bulkinfer"}


def modules() -> dict[str, set[str]]:
    return {
        str(p.relative_to(PACKAGE)): {layer(m) for m in our_imports(p, module_name(p))}
        - {layer_of(p)}
        for p in sorted(PACKAGE.rglob("*.py"))
    }


def layer_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def test_each_layer_imports_only_what_it_may():
    problems = []
    for name, imported in modules().items():
        own = layer_of(PACKAGE / name)
        if own in ALLOWED and imported - ALLOWED[own]:
            problems.append(f"{name} imports {sorted(imported - ALLOWED[own])}")
        if own in FORBIDDEN and imported & FORBIDDEN[own]:
            problems.append(f"{name} imports {sorted(imported & FORBIDDEN[own])}")
    assert not problems, "\n".join(problems)


def test_only_job_composes_compute_and_storage():
    mixed = [
        name
        for name, imported in modules().items()
        if layer_of(PACKAGE / name) not in COMPOSERS
        and (imported | {layer_of(PACKAGE / name)}) & COMPUTE
        and (imported | {layer_of(PACKAGE / name)}) & STORAGE
    ]
    assert not mixed, f"only job/ may put engines or tasks together with io or state: {mixed}"


def test_the_walk_sees_imports_inside_functions_and_relative_ones(tmp_path):
    """A rule that cannot fail proves nothing: a probe module breaks two."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def f():\n    from bulkinfer.job.runner import run_job\n    from ..spec import JobSpec\n"
    )
    imported = {layer(m) for m in our_imports(probe, "bulkinfer.io.probe")}
    assert imported == {"job", "spec"}
    assert imported - ALLOWED["io"] == {"job", "spec"}

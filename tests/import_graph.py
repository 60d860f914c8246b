"""The project's import graph, read from the source, and the layer rules it must follow.

`python -m tests.import_graph` prints the graph; `--write` puts it into docs/DESIGN.md between
the markers, where `tests/test_layering.py` checks it is current, so the document cannot drift.
Every import counts, also the lazy ones inside functions.
"""

from __future__ import annotations

import ast
import os
import sys
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# folder -> import prefix, bottom layer first
LAYERS = [("runtime", "edm_deploy.runtime"), ("training", "edm_deploy.training"),
          ("export", "edm_deploy.export"), ("edm_deploy", "edm_deploy")]
# inside the runtime, its sub-packages in layers too (a package imports only from lower ones and itself)
RUNTIME_PACKAGES = {"core": 0, "fid": 1, "output": 1, "backends": 1, "sampling": 2, "serving": 3}
BEGIN, END = "<!-- import-graph:begin -->", "<!-- import-graph:end -->"
DESIGN = os.path.join(REPO, "docs", "DESIGN.md")


def modules() -> dict[str, str]:
    """import name -> file, for every module of the four packages."""
    found = {}
    for folder, prefix in LAYERS:
        root = os.path.join(REPO, folder)
        for dirpath, _, files in os.walk(root):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), root)[:-3].replace(os.sep, ".")
                    name = prefix if rel == "__init__" else f"{prefix}.{rel.removesuffix('.__init__')}"
                    found[name] = os.path.join(dirpath, f)
    return found


def layer_of(module: str) -> int:
    for level in range(len(LAYERS) - 1, -1, -1):
        prefix = LAYERS[level][1]
        if level < len(LAYERS) - 1 and (module == prefix or module.startswith(prefix + ".")):
            return level
    return len(LAYERS) - 1


def runtime_package_of(module: str):
    """(sub-package, its layer) of a runtime module; None for the runtime's own __init__ and other layers."""
    parts = module.split(".")
    if parts[:2] != ["edm_deploy", "runtime"] or len(parts) < 3:
        return None
    if parts[2] not in RUNTIME_PACKAGES:
        raise AssertionError(f"{module} is in no runtime sub-package; known: {', '.join(RUNTIME_PACKAGES)}")
    return parts[2], RUNTIME_PACKAGES[parts[2]]


def imports_of(path: str, module: str) -> set[str]:
    """Project modules imported anywhere in the file (top level or inside functions)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("edm_deploy"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.startswith("edm_deploy"):
                known = modules()
                for a in node.names:
                    full = f"{base}.{a.name}"
                    out.add(full if full in known else base)
    return out


def graph() -> dict[str, list[str]]:
    mods = modules()
    return {m: sorted(i for i in imports_of(p, m) if i != m) for m, p in sorted(mods.items())}


def violations() -> list[str]:
    """Imports that go up a layer (runtime < training < export < app; inside the runtime,
    core < fid, output, backends < sampling < serving)."""
    return [why for module, deps in graph().items() for dep in deps if (why := upward(module, dep))]


def upward(module: str, dep: str) -> Optional[str]:
    """Why `module` may not import `dep`, or None when it may."""
    if layer_of(dep) > layer_of(module):
        return f"{module} imports {dep}"
    here, there = runtime_package_of(module), runtime_package_of(dep)
    if here and there and here[0] != there[0] and there[1] >= here[1]:
        return f"{module} imports {dep} (runtime/{here[0]} may not import runtime/{there[0]})"
    return None


def render() -> str:
    names = {0: "runtime", 1: "training", 2: "export", 3: "app"}
    lines = ["```"]
    for module, deps in sorted(graph().items(), key=lambda item: (layer_of(item[0]), item[0])):
        short = module.removeprefix("edm_deploy.")
        lines.append(f"[{names[layer_of(module)]}] {short}" + (" -> " + ", ".join(d.removeprefix("edm_deploy.") for d in deps)
                                                              if deps else ""))
    lines.append("```")
    return "\n".join(lines)


def document_section() -> str:
    text = open(DESIGN, encoding="utf-8").read()
    return text[text.index(BEGIN) + len(BEGIN): text.index(END)].strip("\n")


def write() -> None:
    text = open(DESIGN, encoding="utf-8").read()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    with open(DESIGN, "w", encoding="utf-8") as f:
        f.write(text[:start] + "\n" + render() + "\n" + text[end:])


if __name__ == "__main__":
    write() if "--write" in sys.argv else print(render())

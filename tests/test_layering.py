"""Imports run one way (runtime < training < export < app), read from the source; the graph in
docs/DESIGN.md is the current one."""

from __future__ import annotations

import sys

import pytest

from tests import import_graph
from tests.conftest import requires_onnx


def test_no_module_imports_a_layer_above_its_own():
    assert import_graph.violations() == []


def test_the_graph_in_the_design_document_is_current():
    assert import_graph.document_section() == import_graph.render(), (
        "docs/DESIGN.md's import graph is stale: run `python -m tests.import_graph --write`")


def test_the_checker_sees_lazy_imports_and_would_catch_an_upward_one(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from edm_deploy.loading import load\n    from . import errors\n")
    found = import_graph.imports_of(str(source), "edm_deploy.runtime.core.mod")
    assert "edm_deploy.loading" in found and "edm_deploy.runtime.core.errors" in found
    assert import_graph.layer_of("edm_deploy.loading") > import_graph.layer_of("edm_deploy.runtime.core.mod")


def test_inside_the_runtime_core_may_not_import_sampling_but_serving_may():
    up = import_graph.upward
    assert up("edm_deploy.runtime.core.manifest", "edm_deploy.runtime.sampling.schedule_file")
    assert up("edm_deploy.runtime.fid.fid", "edm_deploy.runtime.output.writers")  # siblings: neither above
    assert up("edm_deploy.runtime.sampling.planner", "edm_deploy.runtime.serving.engine")
    assert up("edm_deploy.runtime.serving.engine", "edm_deploy.runtime.sampling.planner") is None
    assert up("edm_deploy.runtime.sampling.planner", "edm_deploy.runtime.sampling.solvers") is None
    assert up("edm_deploy.training.loss", "edm_deploy.runtime.core.errors") is None
    assert up("edm_deploy.runtime", "edm_deploy.runtime.sampling.reference") is None  # the package's face


SAMPLING_MODULES = {f"edm_deploy.runtime.sampling.{m}" for m in ("generate", "planner", "sampling", "settings",
                                                                  "solvers")} | {"edm_deploy.runtime.core.schedules"}


@pytest.fixture(scope="module")
def warm_model(tmp_path_factory):
    """A model file, sampled once so that the imports happen before any profiler starts."""
    from edm_deploy.cli import cli
    from tests.onnx_oracles import gaussian_onnx

    folder = tmp_path_factory.mktemp("walk")
    model = gaussian_onnx(str(folder / "g.onnx"))
    cli.main(["sample", model, "-n", "1", "--steps", "2", "--npz", str(folder / "warm.npz")], standalone_mode=False)
    return model


@requires_onnx
@pytest.mark.parametrize("solver,nfe", [("ipndm", "5"), ("heun", "7")])
def test_sample_reaches_the_solver_entering_no_module_twice(warm_model, tmp_path, solver, nfe):
    """Every chain of calls from `sample --solver S --nfe K` into the sampling modules, recorded by a profiler:
    no module is entered again below itself (the walk DESIGN.md draws under "The planner")."""
    from edm_deploy.cli import cli

    stack: list = []
    chains: set = set()

    def record(frame, event, arg):
        if event == "call":
            module = frame.f_globals.get("__name__", "")
            stack.append(module if module.startswith("edm_deploy") else None)
            walk = [m for m in stack if m is not None]
            walk = [m for i, m in enumerate(walk) if i == 0 or walk[i - 1] != m]  # calls within a module: one step
            if walk and walk[-1] in SAMPLING_MODULES:
                chains.add(tuple(walk))
        elif event == "return" and stack:
            stack.pop()

    sys.setprofile(record)
    try:
        cli.main(["sample", warm_model, "--solver", solver, "--nfe", nfe, "-n", "2", "--npz", str(tmp_path / "a.npz")],
                 standalone_mode=False)
    finally:
        sys.setprofile(None)
    assert any(chain[-1] == "edm_deploy.runtime.sampling.solvers" and "edm_deploy.runtime.sampling.planner" in chain for chain in chains)
    entered_twice = [chain for chain in chains if len(set(chain)) != len(chain)]
    assert entered_twice == []

"""Imports run one way (runtime < training < export < app), read from the source; the graph in
docs/DESIGN.md is the current one."""

from __future__ import annotations

from tests import import_graph


def test_no_module_imports_a_layer_above_its_own():
    assert import_graph.violations() == []


def test_the_graph_in_the_design_document_is_current():
    assert import_graph.document_section() == import_graph.render(), (
        "docs/DESIGN.md's import graph is stale: run `python -m tests.import_graph --write`")


def test_the_checker_sees_lazy_imports_and_would_catch_an_upward_one(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from edm_deploy.loading import load\n    from . import errors\n")
    found = import_graph.imports_of(str(source), "edm_deploy.runtime.mod")
    assert "edm_deploy.loading" in found and "edm_deploy.runtime.errors" in found
    assert import_graph.layer_of("edm_deploy.loading") > import_graph.layer_of("edm_deploy.runtime.mod")

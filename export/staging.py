"""Artifacts appear under their final names only after they passed their checks.

An export writes several files (``model.onnx``, its ``.onnx.data`` when large, ``model.plan`` and
its ``.plan.json``) and verifies them, which can take long and can fail or be killed. `Staging`
builds them in one hidden folder beside the outputs, named after the first output
(``.tmp-export-model.onnx.partial``), under the output's lock:

* `commit()` moves the verified files to their final names (data files before the files that
  refer to them), so the final name only ever holds an artifact that passed;
* `keep_failed()` moves a file that failed verification to ``<stem>.failed<suffix>`` for
  inspection, a name that says so;
* leaving the block removes the staging folder, whatever happened; a staging folder left by a
  killed export (SIGKILL cannot be caught) is removed by the next export of that output, which
  holds the lock and so knows no other export is using it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Iterable

from edm_deploy.runtime.core.fileio import (
    TEMP_PREFIX,
    TEMP_SUFFIX,
    exclusive_output,
    refuse_foreign_file,
    track_temporary,
    untrack_temporary,
)


def failed_name(path: str) -> str:
    stem, ext = os.path.splitext(path)
    return f"{stem}.failed{ext}"


def companions(path: str) -> list[str]:
    """Files that travel with an artifact: external weights of an ONNX file, an engine's sidecar."""
    return [path + ".data"] if path.endswith(".onnx") else [path + ".json"] if path.endswith((".plan", ".engine")) else []


def written_by_us(path: str) -> bool:
    """Whether an existing file at an export's output name is an artifact edm-deploy exported (an
    ONNX file with its manifest, an engine with its sidecar manifest, or their companions), which
    a new export may replace; anything else is the user's (`fileio.refuse_foreign_file`)."""
    from edm_deploy.runtime.core.jsonio import has_format
    from edm_deploy.runtime.core.manifest import MANIFEST_FORMAT
    from edm_deploy.runtime.core.onnx_file import has_manifest

    for suffix in (".data", ".json"):
        owner = path[:-len(suffix)]
        if path.endswith(suffix) and path in companions(owner):
            return (suffix == ".data" or has_format(path, (MANIFEST_FORMAT,))) and written_by_us(owner)
    if path.endswith(".onnx"):
        return has_manifest(path)
    sidecars = companions(path)
    return bool(sidecars) and has_format(sidecars[0], (MANIFEST_FORMAT,))


def refuse_foreign_outputs(finals: Iterable[str]) -> None:
    """Before an export works: every file it may write or replace (its artifacts, their companions,
    the names a failed one is kept under) must be absent or an earlier export's."""
    for final in finals:
        for path in (final, *companions(final), failed_name(final), *companions(failed_name(final))):
            refuse_foreign_file(path, f"output {os.path.basename(path)}", written_by_us, "an exported model file")
        folder = os.path.splitext(final)[0] + ".failed"  # where `keep_failed` puts a file with companions
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                refuse_foreign_file(os.path.join(folder, name), f"output {os.path.basename(folder)}/{name}",
                                    written_by_us, "an exported model file")


class Staging:
    """A hidden folder beside `final` where an export's files are built and checked."""

    def __init__(self, final: str):
        self.final = os.path.abspath(final)
        name = os.path.basename(self.final)
        if len(name) > 96:  # keep the folder's name under the 255 limit, and apart from other long names
            name = name[:80] + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]
        self.folder = os.path.join(os.path.dirname(self.final), f"{TEMP_PREFIX}export-{name}{TEMP_SUFFIX}")
        self._lock = exclusive_output(self.final)

    def __enter__(self) -> Staging:
        self._lock.__enter__()
        try:
            shutil.rmtree(self.folder, ignore_errors=True)  # left by a killed export of this output
            track_temporary(self.folder, is_folder=True)
            os.makedirs(self.folder)
        except BaseException:  # a signal may land right after the folder was made: it goes too
            shutil.rmtree(self.folder, ignore_errors=True)
            untrack_temporary(self.folder)
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            shutil.rmtree(self.folder, ignore_errors=True)
            untrack_temporary(self.folder)
        finally:
            self._lock.__exit__(*exc_info)

    def path(self, final: str) -> str:
        """Where the file that will become `final` is built (same base name, so ONNX external-data
        references stay valid after the move)."""
        return os.path.join(self.folder, os.path.basename(final))

    def _move(self, final: str, target: str) -> None:
        staged = self.path(final)
        for comp_final, comp_target in zip(companions(final), companions(target)):
            comp_staged = self.path(comp_final)
            if os.path.exists(comp_staged):
                os.replace(comp_staged, comp_target)
            elif os.path.exists(comp_target) and target == final:
                os.unlink(comp_target)  # external data of an earlier, larger export under this name
        os.replace(staged, target)

    def commit(self, finals: Iterable[str]) -> None:
        """Move staged files to their final names, companions first."""
        for final in finals:
            self._move(final, final)

    def keep_failed(self, final: str) -> str:
        """Move a staged file that failed its check to a name that says so; return that name.

        A file with companions (an ONNX with external data refers to it by name) is kept with
        them, under their own names, in a folder ``<stem>.failed/``.
        """
        staged_companions = [c for c in companions(final) if os.path.exists(self.path(c))]
        if not staged_companions:
            target = failed_name(final)
            os.replace(self.path(final), target)
            return target
        folder = os.path.splitext(final)[0] + ".failed"
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        for f in [final, *staged_companions]:
            os.replace(self.path(f), os.path.join(folder, os.path.basename(f)))
        return os.path.join(folder, os.path.basename(final))

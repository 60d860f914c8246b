"""Help, README and behaviour agree (issue 23, section 5).

Every example command line in `edm-deploy --help`, in each command's `--help` and in the
README is parsed by the command it names (flags exist, values are accepted), and every output
name an example promises (``# -> ckpt-fp16.onnx``, ``... writes `a` and `b```) is the name the
code derives for that command line. A help text that drifts from the code fails here.
"""

from __future__ import annotations

import os
import re
import shlex

import click
import pytest

from edm_deploy.cli import COMMANDS, cli
from tests.conftest import REPO, run_main

# Placeholders the README writes in example lines, and a value of the right kind for each.
PLACEHOLDERS = {"MODEL": "model.onnx", "FILE.pkl": "net.pkl"}


def _help_texts(capsys) -> dict[str, str]:
    texts = {"edm-deploy": run_main(["--help"], capsys)[1]}
    for name in COMMANDS:
        texts[name] = run_main([name, "--help"], capsys)[1]
        command = cli.get_command(click.Context(cli), name)
        for sub in getattr(command, "commands", {}):
            texts[f"{name} {sub}"] = run_main([name, sub, "--help"], capsys)[1]
    return texts


def _example_lines(text: str) -> list[tuple[str, str]]:
    """(command line after `edm-deploy`, its trailing comment) for each example in `text`."""
    lines, out, pending = text.splitlines(), [], ""
    for raw in lines:
        line = raw.strip()
        if pending:
            line = pending + " " + line
            pending = ""
        if line.endswith("\\"):
            pending = line[:-1].strip()
            continue
        match = re.match(r"^(?:\$ )?(?:edm-deploy|torchrun .*?-m edm_deploy\.cli) (.*)$", line)
        if not match:
            continue
        command, _, comment = match.group(1).partition("#")
        out.append((command.strip(), comment.strip()))
    return out


def _readme_examples() -> list[tuple[str, str]]:
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    found = [(cmd.strip(), "") for cmd in re.findall(r"`edm-deploy ([^`]+)`", readme)]
    for block in re.findall(r"```\n(.*?)```", readme, re.S):
        found += _example_lines(block)
    return found


def _context(args: list[str]) -> click.Context:
    """The parsed context of the (sub)command an example runs; parsing fails on a bad flag or value."""
    args = [PLACEHOLDERS.get(a, a) for a in args]
    command: click.Command = cli
    while isinstance(command, click.Group) and args and args[0] != "--help":
        name, args = args[0], args[1:]
        sub = command.get_command(click.Context(command), name)
        assert sub is not None, f"unknown command {name!r}"
        command = sub
    try:
        ctx = command.make_context(command.name, list(args), resilient_parsing=False)
    except click.exceptions.Exit as exc:  # `--help` prints the help and stops, as it should
        assert exc.exit_code == 0 and "--help" in args
        ctx = command.make_context(command.name, [a for a in args if a != "--help"], resilient_parsing=True)
    return ctx


def _promised_names(comment: str) -> list[str]:
    """File names after an arrow in an example's comment: ``# -> a.onnx (+ b.plan with TensorRT)``."""
    if "->" not in comment:
        return []
    tail = comment.split("->", 1)[1]
    return re.findall(r"[\w./-]+\.(?:onnx|plan|json|png|md|npz|pt|zip)\b", tail)


def _derived_outputs(args: list[str], ctx: click.Context) -> set[str]:
    """Every file the command line writes, as the code derives it."""
    name = args[0]
    if name == "export":
        from edm_deploy.export.pipeline import output_paths
        from edm_deploy.export.staging import companions

        p = ctx.params
        precision = "int8" if p["int8"] else "fp16" if p["fp16"] else "fp32"
        onnx_path, plan_path = output_paths(p["model"], precision, p["out_path"], engine=p["fmt"] != "onnx")
        finals = [f for f in (onnx_path, plan_path) if f]
        return {f for path in finals for f in (path, *companions(path))}
    if name == "demo":
        from edm_deploy.demo import GRID_NAME, REPORT_NAME, default_outdir

        outdir = ctx.params["outdir"] or default_outdir(ctx.params["data"])
        return {os.path.join(outdir, GRID_NAME), os.path.join(outdir, REPORT_NAME)}
    raise AssertionError(f"an example of `{name}` promises output names: teach this test how `{name}` derives them")


def _check(args_text: str, comment: str) -> None:
    args = shlex.split(args_text)
    if len(args) == 1 and not comment:  # prose naming a command ("`edm-deploy schedule` runs ..."): it must exist
        assert args[0] in COMMANDS, f"no command {args[0]!r}"
        return
    ctx = _context(args)  # raises click.UsageError / BadParameter for a stale flag or value
    promised = _promised_names(comment)
    if promised:
        derived = _derived_outputs(args, ctx)
        missing = [n for n in promised if n not in derived]
        assert not missing, f"`edm-deploy {args_text}` promises {missing}, the code writes {sorted(derived)}"


def test_every_help_example_parses_and_names_the_outputs_the_code_writes(capsys):
    examples = [(where, cmd, comment) for where, text in _help_texts(capsys).items()
                for cmd, comment in _example_lines(text)]
    assert len(examples) >= 25  # every command shows examples
    assert sum(1 for *_, c in examples if _promised_names(c)) >= 4
    for where, cmd, comment in examples:
        try:
            _check(cmd, comment)
        except (click.ClickException, AssertionError) as exc:
            message = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
            pytest.fail(f"help of `{where}`: `edm-deploy {cmd}`: {message}")


def test_every_readme_example_parses_and_its_stated_outputs_are_derived():
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    examples = _readme_examples()
    assert len(examples) >= 15
    for cmd, comment in examples:
        try:
            _check(cmd, comment)
        except click.ClickException as exc:
            pytest.fail(f"README: `edm-deploy {cmd}`: {exc.format_message()}")
    # prose of the form "`edm-deploy CMD` writes `a`, `b` and `c`"
    stated = re.findall(r"`edm-deploy ([^`]+)`\s+writes\s+((?:`[^`]+`(?:,\s*|\s+and\s+)?)+)", readme)
    assert stated, "the README states what an export writes"
    for cmd, names in stated:
        args = shlex.split(cmd)
        derived = _derived_outputs(args, _context(args))
        for name in re.findall(r"`([^`]+)`", names):
            assert name in derived, f"README: `edm-deploy {cmd}` writes {name}? The code writes {sorted(derived)}"


def test_the_checks_above_catch_a_wrong_promise():
    with pytest.raises(AssertionError, match="promises \\['ckpt.onnx'\\]"):
        _check("export ckpt.pt --fp16", "-> ckpt.onnx (+ engine with TensorRT)")
    with pytest.raises(click.UsageError):
        _check("sample model.onnx --no-such-flag", "")
    _check("export ckpt.pt --fp16", "-> ckpt-fp16.onnx (+ ckpt-fp16.plan with TensorRT)")


def test_train_flags_show_the_training_options_defaults():
    """`train --help` states each default as `TrainingOptions` (and ECT's start, `CONSISTENCY_DEFAULTS`) hold it."""
    import dataclasses

    from edm_deploy.training.options import TrainingOptions
    from edm_deploy.training.presets import CONSISTENCY_DEFAULTS

    defaults = {f.name: f.default for f in dataclasses.fields(TrainingOptions)}

    def same(shown: str, value, param) -> bool:
        if isinstance(value, bool):
            return shown == (param.opts[0] if value else param.secondary_opts[0]).lstrip("-")
        return float(shown) == value if isinstance(value, (int, float)) else shown == value

    command = cli.get_command(click.Context(cli), "train")
    checked = 0
    for param in command.params:
        found = re.search(r"\[default: ([^;\]]+)(?:; (\S+) with --consistency)?\]", param.help or "")
        if param.name not in defaults or param.name == "data" or not found:  # the CLI requires --data or a preset
            continue
        assert param.default is None, param.name  # unset unless given: a preset or a resume keeps its own value
        assert same(found.group(1), defaults[param.name], param), (param.name, found.group(1))
        if found.group(2) is not None:
            assert same(found.group(2), CONSISTENCY_DEFAULTS[param.name], param), param.name
        checked += 1
    assert checked >= 20

"""The `edm-deploy` command line.

Each sub-command lives in its own module under `edm_deploy.commands` and is imported only when it
runs (or when `--help` lists it), so `edm-deploy sample model.onnx` never pays for importing torch.
`main()` turns every `EdmDeployError` into one ``error: ...`` line and exit code 1.
"""

from __future__ import annotations

import importlib
import re
import sys
import traceback
from typing import Any, Optional

import click

from edm_deploy.runtime.core.errors import EdmDeployError
from edm_deploy.runtime.core.optional import install_hint
from edm_deploy.runtime.core.version import __version__
from edm_deploy.sigterm import exit_cleanly_on_sigterm

# name -> (module, attribute, one-line help shown by `edm-deploy --help` without importing it)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("edm_deploy.commands.demo", "demo", "Digits end to end: train, export, sample a grid, report."),
    "train": ("edm_deploy.commands.train", "train", "Train an EDM denoiser (DDPM++/NCSN++/ADM)."),
    "export": ("edm_deploy.commands.export", "export", "Export a checkpoint to ONNX (and a TensorRT engine)."),
    "sample": ("edm_deploy.commands.sample", "sample", "Generate images from a .plan, .onnx or .pt model."),
    "schedule": ("edm_deploy.commands.schedule", "schedule", "Search a solver's time points at a given NFE (GITS)."),
    "serve": ("edm_deploy.commands.serve", "serve", "Serve a model over HTTP with continuous batching."),
    "convert": ("edm_deploy.commands.convert", "convert", "Convert an official EDM pickle without running its code."),
    "verify": ("edm_deploy.commands.verify", "verify", "Compare an exported model against its checkpoint."),
    "bench": ("edm_deploy.commands.bench", "bench", "Benchmark denoiser and sampler throughput."),
    "fid": ("edm_deploy.commands.fid", "fid", "Compute FID statistics and scores."),
    "info": ("edm_deploy.commands.info", "info", "Print the manifest of a checkpoint, ONNX file or engine."),
    "dataset": ("edm_deploy.commands.dataset", "dataset", "Build a dataset ZIP from an image folder."),
}


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported on demand."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> Optional[click.Command]:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module_name, attr, _ = entry
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("edm_deploy"):
                raise
            raise EdmDeployError(
                f"`edm-deploy {cmd_name}` needs the Python package {exc.name!r}: {install_hint(exc.name)}"
            ) from exc
        command = getattr(module, attr)
        FLAGS.update(flags_of(command))
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # List commands from the static table so `--help` stays fast and torch-free.
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


# API parameter name -> the flag that sets it, for the command being run (filled on loading it).
FLAGS: dict[str, str] = {}


def flags_of(command: click.Command) -> dict[str, str]:
    """{parameter name: its longest flag} over a command and, for groups, its sub-commands."""
    flags: dict[str, str] = {}
    for param in command.params:
        if isinstance(param, click.Option):
            flag = max(param.opts, key=len)
            flags[param.name] = flag
            flags[param.name.rstrip("_")] = flag  # `compile_` sets the API's `compile`
        elif isinstance(param, click.Argument):
            flags[param.name] = param.human_readable_name
    for sub in getattr(command, "commands", {}).values():
        flags.update({k: v for k, v in flags_of(sub).items() if k not in flags})
    return flags


def cli_message(exc: EdmDeployError) -> str:
    """The error text with the API parameter(s) it concerns renamed to their command-line flags."""
    text = str(exc)
    params = exc.param if isinstance(exc.param, (list, tuple)) else [exc.param]
    for param in params:
        flag = FLAGS.get(param or "")
        if flag and f"{param} ({flag})" not in text:  # a message that gives the flag itself keeps its name
            text = re.sub(rf"(?<![\w-]){re.escape(param)}(?!\w)", flag, text, count=1)
    return text


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edm-deploy")
def cli() -> None:
    """edm-deploy: EDM diffusion models from training to fast, reproducible deployment.

    \b
    Quick start:
      edm-deploy demo                          # digits: train -> export -> sample -> report
      edm-deploy export ckpt.pt --fp16         # -> ckpt-fp16.onnx (+ ckpt-fp16.plan with TensorRT)
      edm-deploy sample ckpt-fp16.onnx -n 64 --grid grid.png
    """



def main(argv: Optional[list[str]] = None) -> Any:
    """Entry point: run the CLI, turning user errors into one line and a non-zero exit."""
    exit_cleanly_on_sigterm()
    try:
        rv = cli.main(args=argv, prog_name="edm-deploy", standalone_mode=False)
        if isinstance(rv, int) and rv != 0:
            sys.exit(rv)
        return rv
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        # Bad flags are bad input like any other: one line, exit 1.
        where = exc.ctx.command_path if exc.ctx is not None else "edm-deploy"
        click.echo(f"error: {exc.format_message()} (see `{where} --help`)", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except EdmDeployError as exc:
        click.echo(f"error: {cli_message(exc)}", err=True)
        sys.exit(1)
    except OSError as exc:
        # Disk full, permission denied, a folder vanished: the OS says it best, in one line.
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        click.echo(f"error: {exc.strerror or exc}{where}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # anything else is a bug: show it as one, with where it happened
        traceback.print_exc()
        click.echo(f"internal error: {type(exc).__name__}: {exc}. This is a bug in edm-deploy, not in your "
                   "input; please report it with the traceback above.", err=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()

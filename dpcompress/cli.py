"""Command line: parses options, calls the library, prints. No logic of its own.

Heavy imports (torch, onnxruntime, tensorrt) happen inside the commands that need
them so that ``dpcompress --help`` and ``dpcompress solve`` start fast.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

import click

from dpcompress import __version__
from dpcompress.errors import UserError


class _Group(click.Group):
    """Turns a UserError into one line on stderr and exit status 2 (traceback with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as err:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dpcompress")
@click.option("--debug", is_flag=True, help="Show tracebacks for user errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Latency-aware CNN depth compression: remove activations, merge convolutions."""
    ctx.obj = {"debug": debug}


# Options shared by every command that builds a model.
def model_options(func: Any) -> Any:
    func = click.option("--input-shape", default="1,3,224,224", show_default=True,
                        help="N,C,H,W of the model input.")(func)
    func = click.option("--weights", type=click.Path(dir_okay=False), default=None,
                        help="state_dict file (.pt) to load into the model.")(func)
    func = click.option("--model", "model_spec", required=True,
                        help="torchvision:NAME[?k=v&...], path/to/file.py:factory or package.module:factory.")(func)
    return func


# ---- trace / export (model structure) ----

# ---- solve ----

# ---- profile / bench ----

# ---- importance / finetune / compress ----


if __name__ == "__main__":  # pragma: no cover
    main()

"""``elmkit <command>``: one command per public function, with the same option names.

Each command is a row of ``COMMANDS``: the Python function it calls, the positional-style
arguments (``--model``, ``--data``, ``--out``...) and the config dataclass whose fields become the
remaining options (``FinetuneConfig.max_steps`` -> ``--max-steps``), with the field's docstring as
its help text. So ``elmkit finetune --r 8 --max-steps 100`` is
``elmkit.finetune(model, data, out, FinetuneConfig(r=8, max_steps=100))``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path


@dataclass(frozen=True)
class Command:
    func: Callable
    """The public function the command calls."""
    args: tuple[tuple[str, str, bool], ...]
    """(name, help, required) of the leading arguments, passed by keyword."""
    config: type | None = None
    """Config dataclass whose fields become options; passed as ``cfg``."""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(src).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _converter(tp) -> tuple[Callable[[str], object], bool]:
    """(parse one string, is it a sequence)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        conv, seq = _converter(inner[0])
        return (lambda s: None if s.lower() == "none" else conv(s)), seq
    if origin is typing.Literal:
        return str, False
    if origin in (tuple, list):
        return _converter(typing.get_args(tp)[0])[0], True
    if tp is bool:
        return _parse_bool, False
    if tp in (int, float, str):
        return tp, False
    return str, False


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    group = parser.add_argument_group(f"{cls.__name__} options")
    for f in dataclasses.fields(cls):
        conv, seq = _converter(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = None
        if typing.get_origin(hints[f.name]) is typing.Literal:
            choices = typing.get_args(hints[f.name])
        help_ = f"{docs.get(f.name, '')} (default: {default})"
        group.add_argument(
            "--" + f.name.replace("_", "-"), dest=f"cfg__{f.name}", type=conv,
            nargs="+" if seq else None, default=argparse.SUPPRESS, choices=choices, help=help_,
            metavar=None if choices else f.name.upper(),
        )


def config_from_args(cls: type, ns: argparse.Namespace):
    kw = {k[5:]: v for k, v in vars(ns).items() if k.startswith("cfg__")}
    hints = typing.get_type_hints(cls)
    for k, v in kw.items():
        if isinstance(v, list) and typing.get_origin(hints[k]) is tuple:
            kw[k] = tuple(v)
    return cls(**kw)


# ---------------------------------------------------------------------------------------------
# the commands
# ---------------------------------------------------------------------------------------------


def _commands() -> dict[str, Command]:
    from . import demo, info, remove_layers
    from .eval import EvalConfig, evaluate
    from .train import FinetuneConfig, finetune

    model = ("model", "model folder or hub id", True)
    out = ("out", "run folder to write into", True)
    return {
        "demo": Command(demo, (("out", "run folder", False),)),
        "info": Command(info, (("model", "model folder or hub id", True),)),
        "finetune": Command(finetune, (model, ("data", "training data file", True), out),
                            FinetuneConfig),
        "eval": Command(evaluate, (model, ("data", "evaluation data file", True), out), EvalConfig),
        "remove-layers": Command(
            remove_layers,
            (model, ("layers", "comma-separated layer indices to delete, e.g. 10,11", True), out),
        ),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elmkit",
        description="Compress Hugging Face causal LMs for edge devices and measure the cost.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, cmd in _commands().items():
        doc = inspect.getdoc(cmd.func) or ""
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else "", description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        for arg, help_, required in cmd.args:
            p.add_argument("--" + arg.replace("_", "-"), dest=arg, required=required, help=help_)
        if cmd.config is not None:
            add_config_options(p, cmd.config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 0
    cmd = _commands()[ns.command]
    kw = {a: getattr(ns, a) for a, _, _ in cmd.args if getattr(ns, a) is not None}
    try:
        if cmd.config is not None:
            kw["cfg"] = config_from_args(cmd.config, ns)
        result = cmd.func(**kw)
    except (ValueError, FileNotFoundError) as e:
        print(f"elmkit {ns.command}: error: {e}", file=sys.stderr)
        return 2
    if isinstance(result, dict):
        import json

        print(json.dumps({k: v for k, v in result.items() if k != "loss_curve"}, indent=2,
                         default=str))
    elif isinstance(result, (str, Path)):
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

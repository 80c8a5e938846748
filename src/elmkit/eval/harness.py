"""lm-evaluation-harness (lm-eval) on elmkit models, with elmkit's own offline commonsense tasks.

    run_lm_eval("runs/elm/model", tasks=["commonsense"], data_dir="data/commonsense", limit=100)
    -> {"tasks": {"elmkit_arc_easy": {"acc": .., "acc_norm": .., "n": 100}, ...},
        "suite_mean": {"commonsense": ..}, "lm_eval_version": "0.4.13", ...}

Offline design. The tasks ``elmkit_arc_easy``, ``elmkit_boolq`` and ``elmkit_piqa`` (the suite
``commonsense``) read MosaicML "gauntlet" JSONL files (``{"query", "choices", "gold"}`` per line) from a
folder the caller names, so no dataset is fetched from the hub:

* The task YAMLs ship in ``elmkit/eval/tasks``. Their ``data_files`` hold bare file names, because
  lm-eval resolves relative paths against the working directory, not the YAML's folder. At run time
  each YAML is read into a dict, the file name is joined to ``data_dir`` (an absolute path), and the
  dict is handed to lm-eval directly: no temp include folder, and the YAMLs stay valid lm-eval files
  (run from inside the data folder, ``lm_eval --include_path`` would read them as they are).
* The TaskManager is built with ``include_defaults=False`` when only elmkit tasks are asked for:
  indexing lm-eval's ~15k built-in tasks costs seconds and is not needed. Any other task name is
  looked up in lm-eval's own registry (those tasks download their data, or need the HF cache).
* While only elmkit tasks run, the hub and datasets are switched to offline mode for the call, so
  nothing tries the network (and nothing hangs on a machine without one).
* bootstrap_iters=0: no stderr bootstrap, which would cost more than the evaluation on small models.

Models: a folder is loaded with elmkit's own loaders (ELM folders included); an in-memory causal LM
is used as it is, with its tokenizer. ``via_lm_eval_loader=True`` instead lets lm-eval's ``hf`` model
load the folder itself (``trust_remote_code=True`` for ELM), which shows that a folder elmkit wrote
stands on its own.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"

SUITES = {"commonsense": ("elmkit_arc_easy", "elmkit_boolq", "elmkit_piqa")}

FORMAT = ('a JSONL file with one {"query": str, "choices": [str, ...], "gold": int} object per line '
          '(the MosaicML gauntlet format)')


def own_task_names() -> list[str]:
    """elmkit's shipped task names: one ``<name>.yaml`` per task in TASKS_DIR."""
    return sorted(p.stem for p in TASKS_DIR.glob("elmkit_*.yaml"))


def expand_tasks(tasks: Sequence[str]) -> list[str]:
    """Suite names -> their tasks, duplicates dropped, order kept. Checks elmkit names only."""
    if isinstance(tasks, str):  # a bare string would be iterated letter by letter
        tasks = [tasks]
    names = []
    for t in tasks:
        names += SUITES.get(t, (t,))
    own = own_task_names()
    for t in names:
        if t.startswith("elmkit_") and t not in own:
            raise ValueError(f"unknown elmkit task {t!r}; known: {', '.join(own)} "
                             f"(suites: {', '.join(SUITES)})")
    if not names:
        raise ValueError(f"no tasks given; pass task names or a suite ({', '.join(SUITES)})")
    return list(dict.fromkeys(names))


def task_config(name: str, data_dir: str | Path | None) -> dict:
    """The lm-eval config dict of an elmkit task, its data file made absolute under ``data_dir``."""
    import yaml

    cfg = yaml.safe_load((TASKS_DIR / f"{name}.yaml").read_text())
    file = cfg["dataset_kwargs"]["data_files"]["test"]
    if data_dir is None:
        raise ValueError(f"task {name} needs data_dir: a folder holding {file}, {FORMAT}")
    folder = Path(data_dir).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"data_dir {folder} does not exist; task {name} reads {file} from it, "
                                f"{FORMAT}")
    path = folder / file
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: task {name} needs {file} in data_dir, {FORMAT}")
    cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": {"test": str(path)}}
    return cfg


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


def summarize(out: dict, suites: Sequence[str]) -> dict:
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
    suite_mean = {s: sum(tasks[t]["acc"] for t in SUITES[s]) / len(SUITES[s]) for s in suites}
    return {"tasks": tasks, "suite_mean": suite_mean}


def run_lm_eval(
    model,
    tokenizer=None,
    tasks: Sequence[str] = (),
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    trust_remote_code: bool = False,
    num_fewshot: int | None = None,
    via_lm_eval_loader: bool = False,
    raw: bool = False,
) -> dict:
    """Run lm-eval tasks on a model and return a compact summary.

    Args:
        model: a model folder, or an in-memory causal LM (then ``tokenizer`` is required; the
            model is moved to ``device``).
        tokenizer: the tokenizer; loaded from the folder when omitted.
        tasks: task names and suite names (``commonsense``). ``elmkit_*`` tasks read ``data_dir``;
            any other name is an lm-eval task, which needs the network or the HF datasets cache.
        data_dir: folder holding arc_easy.jsonl, boolq.jsonl, piqa.jsonl (gauntlet JSONL).
        limit: evaluate the first ``limit`` documents of each task.
        trust_remote_code: passed to lm-eval's loader (``via_lm_eval_loader``); elmkit's loader
            always trusts the code that ELM folders carry.
        num_fewshot: few-shot examples per prompt (drawn from the test split for elmkit tasks).
        via_lm_eval_loader: let lm-eval's ``hf`` model load the folder instead of elmkit.
        raw: also return lm-eval's full results under "raw".

    Returns:
        {"tasks": {name: {"acc", "acc_norm", "n"}}, "suite_mean": {suite: mean acc},
        "lm_eval_version", "limit", "num_fewshot"} (+ "raw").
    """
    from importlib.metadata import version

    if limit is not None and limit < 1:
        raise ValueError("limit must be at least 1")
    if isinstance(tasks, str):
        tasks = [tasks]
    names = expand_tasks(tasks)
    suites = [s for s in dict.fromkeys(tasks) if s in SUITES]
    own = set(own_task_names())
    # Build our configs first: a missing file should fail before a model is loaded.
    specs = [task_config(t, data_dir) if t in own else t for t in names]
    only_own = all(t in own for t in names)

    with offline() if only_own else contextlib.nullcontext():
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_defaults=not only_own)
        unknown = [t for t in names if t not in own and t not in manager.all_tasks]
        if unknown:
            raise ValueError(f"unknown task or suite {', '.join(map(repr, unknown))}: not an elmkit suite "
                             f"({', '.join(SUITES)}), not an elmkit task ({', '.join(sorted(own))}), "
                             f"and not in lm-eval's registry")
        lm = wrap_model(model, tokenizer, batch_size, device, trust_remote_code, via_lm_eval_loader)
        out = simple_evaluate(
            model=lm, tasks=specs, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
            bootstrap_iters=0, log_samples=False,
        )

    summary = summarize(out, suites)
    summary.update(lm_eval_version=version("lm_eval"), limit=limit, num_fewshot=num_fewshot)
    if raw:
        summary["raw"] = out
    return summary

"""benchmarks/real_model.py --smoke: the plumbing of the real-model benchmark on the tiny testbed."""

import json
import math
from pathlib import Path

import pytest
import torch
from checks import run_benchmark

from elmkit.data.corpora import c4_head, wikitext2_head


def _run(tmp_path: Path, *extra: str) -> str:
    return run_benchmark("real_model.py", "--smoke", "--model", "testbed:tiny", "--data",
                         str(tmp_path / "data"), "--run", str(tmp_path / "run"), "--out",
                         str(tmp_path / "out"), *extra)


def _data(tmp_path: Path) -> None:
    """The shipped C4 and WikiText-2 slices stand in for the shared samples."""
    docs = c4_head()
    (tmp_path / "data" / "calibration").mkdir(parents=True)
    for i, part in ((1, docs[:200]), (2, docs[200:])):
        (tmp_path / "data" / "calibration" / f"redpajama_c4_sample{i}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in part))
    (tmp_path / "data" / "wikitext2").mkdir()
    (tmp_path / "data" / "wikitext2" / "wiki.test.raw").write_text(wikitext2_head())
    (tmp_path / "data" / "commonsense").mkdir()
    for task in ("arc_easy", "boolq", "piqa"):  # the gauntlet format of ../shared/data/commonsense
        rows = [{"query": f"Question: what is {i} plus {i}?", "choices": [str(2 * i), str(2 * i + 1)],
                 "gold": 0} for i in range(6)]
        (tmp_path / "data" / "commonsense" / f"{task}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.slow
def test_recipe_stage_stops_resumes_and_reports(tmp_path):
    _data(tmp_path)
    recipe = tmp_path / "out" / "recipe"

    assert "stopped at the time budget" in _run(tmp_path, "--budget-s", "0", "--stages", "recipe")
    assert (recipe / "reference.json").is_file() and not list(recipe.glob("unit_*.json"))

    assert '"recipe": "done"' in _run(tmp_path, "--stages", "recipe")
    units = sorted(p.name for p in recipe.glob("unit_*.json"))
    assert len(units) == 6 + 2  # 3 losses x 2 learning rates, and the two ablation units
    data = json.loads((recipe / "recipe.json").read_text())
    assert all(len(u["curve"]) == 2 and all(c["ppl"] > 0 for c in u["curve"]) for u in data["units"])
    assert "| relative |" in (recipe / "recipe.md").read_text() and (recipe / "recipe.png").is_file()
    # the ablation: the winner with kept-layer LoRA, and with its start searched by GPPO
    grid = [json.loads((recipe / u).read_text()) for u in units if not u.startswith("unit_ablation_")]
    best = min(grid, key=lambda u: sum(math.log(c["ppl"]) for c in u["curve"][-2:]))
    abl = {n: json.loads((recipe / f"unit_ablation_{n}.json").read_text()) for n in ("kept-lora", "gppo")}
    assert all(u["base"] == {"loss": best["loss"], "lr": best["lr"]} for u in abl.values())
    assert abl["kept-lora"]["curve"] != best["curve"]  # the kept layers trained too
    ref = json.loads((recipe / "reference.json").read_text())
    gppo = abl["gppo"]
    assert len(gppo["theta"]) == ref["layers"] - ref["settings"]["span"] + 1  # one per candidate start
    if gppo["start"] == ref["start"]:  # the same block as the winner's: its numbers, not a rerun
        assert gppo["curve"] == best["curve"] and gppo["same_as"]
    md = (recipe / "recipe.md").read_text()
    assert "+ kept-layer LoRA r 16" in md and "start by GPPO" in md and "The screen's ELM takes" in md

    before = {p.name: p.read_text() for p in recipe.glob("unit_*.json")}
    out = _run(tmp_path, "--stages", "recipe")  # everything saved: nothing is trained again
    assert '"recipe": "done"' in out and " lr " not in out
    assert before == {p.name: p.read_text() for p in recipe.glob("unit_*.json")}
    (recipe / "recipe.md").unlink()
    _run(tmp_path, "--report-only")
    assert (recipe / "recipe.md").is_file()


@pytest.mark.slow
def test_screen_stage_scores_every_trainer_at_each_budget(tmp_path):
    _data(tmp_path)
    screen = tmp_path / "out" / "screen"
    methods = "original,dense,elm,shortgpt,streamline,reverse,recurrence"
    out = _run(tmp_path, "--stages", "screen", "--methods", methods)
    assert '"screen": "done"' in out
    units = {u["method"]: u for u in json.loads((screen / "screen.json").read_text())["units"]}
    assert set(units) == set(methods.split(","))
    budgets = json.loads((screen / "screen.json").read_text())["settings"]["budgets"]
    for name, u in units.items():
        assert "error" not in u, u
        # one training run scored at every budget; Streamline's layer only at the end; the original
        # model once, untrained
        want = [0] if name == "original" else budgets[-1:] if name == "streamline" else budgets
        assert [c["sequences"] for c in u["curve"]] == want and all(c["ppl"] > 0 for c in u["curve"])
        assert u["wikitext2"]["ppl"] > 0
        # lm-eval on each task's first 4 questions (the smoke limit), accuracy a fraction
        assert {t: r["n"] for t, r in u["tasks"].items()} == {
            "elmkit_arc_easy": 4, "elmkit_boolq": 4, "elmkit_piqa": 4}
        assert all(0 <= r["acc"] <= 1 for r in u["tasks"].values())
    assert units["original"]["layers"] == units["dense"]["layers"] and units["original"]["trainer"] == "none"
    # ELM at inference: 1..M evaluations, and adaptive stopping that uses at most M per token
    inf = units["elm"]["inference"]
    assert list(inf["fixed"]) == ["1", "2", "3"] and all(v["ppl"] > 0 for v in inf["fixed"].values())
    assert len(inf["adaptive"]) == 3 and all(1 <= v["evaluations"] <= 3 for v in inf["adaptive"].values())
    assert "inference" not in units["shortgpt"]
    assert units["dense"]["layers"] == units["elm"]["layers"] + 2  # span 3 -> 1 block in the smoke run
    assert units["shortgpt"]["layers"] == units["reverse"]["layers"] == units["dense"]["layers"] - 2
    assert units["recurrence"]["layers"] == units["dense"]["layers"] - 2  # the same layers kept as ELM
    assert (units["dense"]["trainer"], units["reverse"]["trainer"], units["streamline"]["trainer"]) == (
        "lora", "partial", "own")
    assert "| reverse |" in (screen / "screen.md").read_text() and (screen / "screen.png").is_file()
    again = _run(tmp_path, "--stages", "screen", "--methods", methods)  # all saved: nothing reruns
    assert "== screen" not in again
    section = (tmp_path / "out" / "RESULTS.md").read_text()  # not the repository's RESULTS.md
    assert section.count("<!-- real-model:start -->") == 1 and "| recurrence |" in section


def test_results_md_sections_survive_the_other_writer(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # not a package
    from md_sections import keep, marked, put

    doc = put("# Results\n\ntable\n", "real-model", "## Real\n\nrows")
    assert marked(doc)["real-model"].startswith("<!-- real-model:start -->\n## Real")
    doc = put(doc, "real-model", "## Real\n\nnew rows")  # replaced in place, not appended
    assert doc.count("real-model:start") == 1 and "new rows" in doc and "\nrows" not in doc
    rewritten = keep("# Results\n\nnew table\n", doc)  # results_table.py rewrites its part
    assert "new table" in rewritten and "new rows" in rewritten and "\ntable" not in rewritten


def test_screen_unit_is_measured_again_when_its_settings_change(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # not a package
    import real_model

    want = {"span": 8, "batch": 16, "heal_lr": 2e-4}
    (tmp_path / "unit_dense.json").write_text(json.dumps({"method": "dense", "settings": want}))
    assert real_model._unit_current(tmp_path, "dense", want)
    assert not real_model._unit_current(tmp_path, "dense", {**want, "heal_lr": 1e-4})
    assert not real_model._unit_current(tmp_path, "elm", want)  # never measured
    # a unit saved before units held their settings is measured again, whatever screen.json says
    (tmp_path / "unit_dense.json").write_text(json.dumps({"method": "dense"}))
    (tmp_path / "screen.json").write_text(json.dumps({"settings": want}))
    assert not real_model._unit_current(tmp_path, "dense", want)

    # the report names the units a run would measure again, and the settings that moved
    s, recipe = real_model.screen_settings(), real_model.elm_recipe(tmp_path)
    dense = {**real_model.unit_settings("dense", s, recipe), "task_batch": 64}
    units = [{"method": "sleb", "settings": real_model.unit_settings("sleb", s, recipe)},
             {"method": "dense", "settings": dense}, {"method": "elm"}]
    assert real_model._stale_units(tmp_path, units) == {"dense": ["task_batch"], "elm": ["all"]}


def test_jobs_whose_share_cannot_hold_lm_evals_logits_are_refused(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import real_model

    _data(tmp_path)
    tasks = tmp_path / "data" / "commonsense"
    need = real_model.task_logits_bytes("testbed:tiny", tasks, batch=8)
    assert need > 0 and real_model.task_logits_bytes("testbed:tiny", tasks, batch=16) == 2 * need
    # the longest request sets it: a long passage in one task file raises it
    with (tasks / "boolq.jsonl").open("a") as f:
        f.write(json.dumps({"query": "Passage: " + "the river rose " * 50, "choices": ["no", "yes"],
                            "gold": 1}) + "\n")
    longer = real_model.task_logits_bytes("testbed:tiny", tasks, batch=8)
    assert longer > 10 * need

    # the estimate bounds what lm-eval holds: its fp32 logits and their log-softmax, a batch padded
    # to its longest request (lm-eval drops one token and may group rows, so within a quarter)
    import torch.nn.functional as F

    from elmkit.eval.harness import run_lm_eval
    from elmkit.models import load_model, load_tokenizer

    seen, log_softmax = [], F.log_softmax
    monkeypatch.setattr(F, "log_softmax", lambda x, *a, **k: seen.append(x.numel() * x.element_size())
                        or log_softmax(x, *a, **k))
    model = load_model("testbed:tiny", dtype="float32", device="cpu")  # as the units evaluate
    run_lm_eval(model, load_tokenizer("testbed:tiny"), tasks=list(real_model.TASKS), data_dir=tasks,
                batch_size=real_model.TASK_BATCH)
    assert 2 * max(seen) <= longer < 1.25 * 2 * max(seen)

    real_model.check_task_share(2 * longer, longer, jobs=6)  # the logits fit half the share
    with pytest.raises(SystemExit, match=r"--jobs 6 leaves each unit .* use --jobs 3 or fewer"):
        real_model.check_task_share(longer, longer, jobs=6)


def test_the_claim_needs_the_gap_to_exceed_both_spreads(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import real_model

    def unit(method, seed, acc):
        return {"method": method, "settings": {"seed": seed}, "curve": [{"sequences": 16, "acc": acc}]}

    units = [unit("dense", 0, 0.80), unit("dense", 1, 0.90), unit("elm", 0, 0.80), unit("elm", 1, 0.90),
             unit("sleb", 0, 0.60), unit("sleb", 1, 0.72), unit("elm", 2, 0.5)]  # seed 2: no dense
    kept = real_model.retention(units, task=True)
    # each seed against its own ceiling
    assert kept == {"elm": [1.0, 1.0], "sleb": pytest.approx([0.75, 0.8])}
    v = real_model.verdict(kept)
    assert v["holds"] == "yes" and v["best"]["method"] == "sleb" and v["outcome"] == "ELM leads"
    # a gap inside either spread decides nothing; a mean under the claim with its spread is "no"
    close = real_model.verdict({"elm": [0.9, 0.94], "sleb": [0.92, 0.94]})
    assert close["outcome"] == "no winner within the spreads" and close["holds"] == "no"
    assert real_model.verdict({"elm": [0.97, 1.02]})["holds"] == "within the spread"
    assert real_model.verdict({"elm": [0.8, 0.81], "sleb": [0.95, 0.96]})["outcome"] == "ELM trails"
    assert real_model.verdict({"sleb": [0.9]}) is None  # no ELM yet: nothing to claim


def test_stage_clock_keeps_a_killed_runs_time(tmp_path, monkeypatch):
    import time

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import real_model

    monkeypatch.setattr(real_model.StageClock, "TICK_S", 0.05)
    (tmp_path / "unit_old.json").write_text("{}")
    clock = real_model.StageClock(tmp_path, jobs=3)
    (tmp_path / "unit_new.json").write_text("{}")
    deadline = time.time() + 10
    while not (tmp_path / "gpu_time.json").is_file() and time.time() < deadline:
        time.sleep(0.05)
    # before close, as when the run is killed: the record is there, with the unit it wrote
    run = json.loads((tmp_path / "gpu_time.json").read_text())["runs"]
    assert len(run) == 1 and run[0]["units"] == ["new"] and run[0]["jobs"] == 3
    # a second run writing the same folder meanwhile keeps its own entry beside the first's
    other = real_model.StageClock(tmp_path, jobs=1)
    (tmp_path / "unit_other.json").write_text("{}")
    other.close()
    clock.close()
    runs = json.loads((tmp_path / "gpu_time.json").read_text())["runs"]
    assert sorted(r["jobs"] for r in runs) == [1, 3] and len({r["id"] for r in runs}) == 2
    second = real_model.StageClock(tmp_path, jobs=1)  # a later run with nothing to write: no entry
    second.close()
    assert len(json.loads((tmp_path / "gpu_time.json").read_text())["runs"]) == 2


def test_task_floors_are_random_choice_and_the_best_constant_answer(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import real_model

    folder = tmp_path / "commonsense"
    folder.mkdir()
    golds = {"arc_easy": [0, 1, 1, 3], "boolq": [1, 1, 1, 0], "piqa": [0, 1, 0, 1]}
    for task, gold in golds.items():
        n = 4 if task == "arc_easy" else 2
        rows = [{"query": "q", "choices": [f"c{k}" for k in range(n - (i == 0 and n == 4))], "gold": g}
                for i, g in enumerate(gold)]  # one ARC row with 3 options
        (folder / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    floors = real_model.task_floors(folder, tmp_path)
    assert floors["elmkit_arc_easy"]["random"] == pytest.approx((1 / 3 + 3 / 4) / 4)
    assert floors["elmkit_arc_easy"]["constant"] == 0.5  # always the second option
    assert floors["elmkit_boolq"] == {"n": 4, "random": 0.5, "constant": 0.75}  # always "yes"
    assert floors["elmkit_piqa"]["constant"] == 0.5
    assert json.loads((tmp_path / "floors.json").read_text()) == floors
    note = real_model._tasks_note([{"tasks": {t: {"n": 4} for t in real_model.TASKS}, "lm_eval": "x"}],
                                  tmp_path)
    assert "BoolQ 50.0 at random / 75.0 with one constant answer" in note


def test_units_that_compress_nothing_are_copied_to_another_span(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import real_model

    recipe = real_model.elm_recipe(tmp_path)
    s8 = real_model.screen_settings()
    home = tmp_path / "screen"
    home.mkdir()
    dense = {"method": "dense", "settings": real_model.unit_settings("dense", s8, recipe), "params": 1.0,
             "curve": [{"sequences": 25_600, "ppl": 27.2}], "seconds": 700.0}
    (home / "unit_dense.json").write_text(json.dumps(dense))
    (home / "unit_sleb.json").write_text(json.dumps({**dense, "method": "sleb"}))
    monkeypatch.setitem(real_model.SCREEN, "span", real_model.LONG_SPAN)
    s15, folder = real_model.screen_settings(), tmp_path / "screen_m15"
    folder.mkdir()
    methods = ["original", "dense", "sleb"]
    # original was never measured at M = 8, and SLEB removes layers: only dense is copied
    assert real_model._reuse_span_free(tmp_path, folder, methods, s15, recipe) == ["dense"]
    copy = json.loads((folder / "unit_dense.json").read_text())
    assert copy["reused_from"] == "screen" and copy["curve"] == dense["curve"]
    assert (copy["seconds"], copy["measured_s"]) == (0.0, 700.0)  # no GPU time spent on the copy
    assert real_model._unit_s(copy) == "copy of screen" and real_model._unit_s(dense) == "700"
    assert real_model._unit_current(folder, "dense", real_model.unit_settings("dense", s15, recipe))
    assert real_model._reuse_span_free(tmp_path, folder, methods, s15, recipe) == []  # current already
    # measured at M = 8 with other settings: measured again, not copied
    (folder / "unit_dense.json").unlink()
    stale = {**dense, "settings": {**dense["settings"], "heal_lr": 1.0}}
    (home / "unit_dense.json").write_text(json.dumps(stale))
    assert real_model._reuse_span_free(tmp_path, folder, methods, s15, recipe) == []


def test_gpu_time_counts_units_from_before_the_record_apart(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import real_model

    stage = tmp_path / "screen"
    stage.mkdir()
    for name, seconds in (("old", 120.0), ("new", 60.0)):
        (stage / f"unit_{name}.json").write_text(json.dumps({"seconds": seconds, "device": "H100"}))
    (stage / "gpu_time.json").write_text(json.dumps({"runs": [
        {"id": "a", "seconds": 300.0, "device": "H100", "jobs": 2, "units": ["new"]}]}))
    lines = real_model.gpu_time_lines(tmp_path, ["screen", "absent"])
    row = next(line for line in lines if line.startswith("| screen |"))
    # the run's 5 minutes are the total; the older unit's own 2 minutes are shown, not added
    assert row == "| screen | 1 | 5.0 (+ 1 unit from before this record, own times 2.0) | 2 | H100 |"
    assert "recorded so far: 5.0 minutes, besides the units measured before" in "\n".join(lines)
    assert not any(line.startswith("| absent |") for line in lines)
    # what is left, at 5 GPU minutes per unit: 3 screen units and 2 curve units of 4 screen units each
    text = "\n".join(real_model.gpu_time_lines(tmp_path, ["screen"], {"screen": 3, "curves": 2}))
    assert "5.0 GPU minutes per unit (1 unit), what is left needs about 0.9 GPU hours" in text
    assert "3 screen units (0.2 h) and 2 curve units (0.7 h), each counted as 4.0 screen units" in text
    # a trained unit that spent half its time evaluating: a curve unit weighs 0.5 * 4 + 0.5 screen units
    (tmp_path / "screen" / "unit_new.json").write_text(json.dumps(
        {"seconds": 60.0, "eval_s": 30.0, "trainer": "lora", "device": "H100"}))
    text = "\n".join(real_model.gpu_time_lines(tmp_path, ["screen"], {"screen": 3, "curves": 2}))
    assert "2 curve units (0.4 h), each counted as 2.5 screen units" in text and "50% of a trained" in text
    assert "what is left" not in "\n".join(real_model.gpu_time_lines(tmp_path, ["screen"], {"screen": 0}))


def _recipe_folder(folder: Path, ablation: dict[str, float]) -> None:
    """A complete loss x lr grid (relative at 3e-4 wins, 40.0) and ablation units with these scores."""
    folder.mkdir(parents=True)
    for loss in ("mse", "relative", "channel"):
        for lr in (1e-3, 3e-4):
            ppl = 40.0 if (loss, lr) == ("relative", 3e-4) else 50.0
            (folder / f"unit_{loss}_lr{lr:g}.json").write_text(json.dumps(
                {"loss": loss, "lr": lr, "curve": [{"ppl": ppl}, {"ppl": ppl}], "seconds": 1.0}))
    for name, ppl in ablation.items():
        (folder / f"unit_ablation_{name}.json").write_text(json.dumps(
            {"variant": name, "base": {"loss": "relative", "lr": 3e-4}, "start": 5,
             "curve": [{"ppl": ppl}, {"ppl": ppl}], "seconds": 1.0}))


def test_elm_takes_the_ablations_best_change_only(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import real_model

    _recipe_folder(tmp_path / "a" / "recipe", {"kept-lora": 41.0})
    r = real_model.elm_recipe(tmp_path / "a")
    assert (r["loss"], r["lr"], r["kept_lora_r"], r["start"]) == ("relative", 3e-4, 0, "cosine")
    assert "ablation not measured yet" in r["chosen_by"]  # gppo is missing
    # a unit saved before the ablation existed stays current while the ablation changes nothing
    assert real_model.elm_settings(r) == {"loss": "relative", "lr": 3e-4}

    _recipe_folder(tmp_path / "b" / "recipe", {"kept-lora": 39.0, "gppo": 38.0})  # both win: the best only
    r = real_model.elm_recipe(tmp_path / "b")
    assert (r["kept_lora_r"], r["start"], r["gppo_start"]) == (0, "gppo", 5)
    assert real_model.elm_settings(r) == {"loss": "relative", "lr": 3e-4, "start": "gppo"}

    _recipe_folder(tmp_path / "c" / "recipe", {"kept-lora": 39.0, "gppo": 45.0})
    r = real_model.elm_recipe(tmp_path / "c")
    assert (r["kept_lora_r"], r["start"]) == (16, "cosine") and "not measured" not in r["chosen_by"]


@pytest.mark.slow
def test_screen_elm_waits_for_the_recipes_ablation(tmp_path):
    _data(tmp_path)
    _recipe_folder(tmp_path / "out" / "recipe", {"kept-lora": 41.0})  # the grid done, gppo not yet
    out = _run(tmp_path, "--stages", "screen", "--methods", "original,elm")
    assert "elm waits for the recipe stage's ablation" in out
    assert sorted(p.name for p in (tmp_path / "out" / "screen").glob("unit_*.json")) == ["unit_original.json"]


def test_units_side_by_side_start_only_while_their_slowed_time_fits(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import real_model

    assert real_model.slowdown([]) == 1.0  # nothing finished yet: the saved times as they are
    assert real_model.slowdown([0.6, 0.8]) == 1.0  # faster than before is not counted on
    assert real_model.slowdown([2.0, 3.5, 2.5]) == 2.5  # the median: one straggler does not decide


@pytest.mark.slow
def test_screen_jobs_run_units_side_by_side_and_refuse_missing_task_files(tmp_path):
    _data(tmp_path)
    screen = tmp_path / "out" / "screen"
    out = _run(tmp_path, "--stages", "screen", "--methods", "original,shortgpt,sleb", "--jobs", "2")
    assert '"screen": "done"' in out and out.count("started") == 3
    units = {u["method"]: u for u in json.loads((screen / "screen.json").read_text())["units"]}
    assert set(units) == {"original", "shortgpt", "sleb"} and not any("error" in u for u in units.values())
    assert all((tmp_path / "run" / "screen" / f"unit_{m}.log").is_file() for m in units)
    # the run, not its unit processes, keeps the time it held the device: one entry, three units
    runs = json.loads((screen / "gpu_time.json").read_text())["runs"]
    assert len(runs) == 1 and runs[0]["jobs"] == 2 and runs[0]["units"] == ["original", "shortgpt", "sleb"]
    assert runs[0]["seconds"] > 0 and "| screen | 1 |" in (tmp_path / "out" / "RESULTS.md").read_text()
    _run(tmp_path, "--stages", "screen", "--methods", "original,shortgpt,sleb", "--jobs", "2")
    assert json.loads((screen / "gpu_time.json").read_text())["runs"] == runs  # nothing to do: no entry
    # a unit measured alone gives what it gave beside others: its own seed and data order
    alone = tmp_path / "alone"
    run_benchmark("real_model.py", "--smoke", "--model", "testbed:tiny", "--data", str(tmp_path / "data"),
                  "--run", str(tmp_path / "run2"), "--out", str(alone), "--stages", "screen",
                  "--methods", "shortgpt")
    solo = json.loads((alone / "screen" / "unit_shortgpt.json").read_text())
    assert solo["curve"] == units["shortgpt"]["curve"] and solo["tasks"] == units["shortgpt"]["tasks"]

    (tmp_path / "data" / "commonsense" / "piqa.jsonl").unlink()
    with pytest.raises(AssertionError, match="piqa.jsonl not found"):
        _run(tmp_path, "--stages", "screen", "--methods", "dense")


@pytest.mark.slow
def test_screen_at_another_span_has_its_own_folder_and_section(tmp_path):
    _data(tmp_path)
    out = _run(tmp_path, "--stages", "screen", "--methods", "original,shortgpt,elm", "--span", "2")
    assert '"screen_m2": "done"' in out
    folder = tmp_path / "out" / "screen_m2"
    units = {u["method"]: u for u in json.loads((folder / "screen_m2.json").read_text())["units"]}
    assert units["original"]["layers"] - 1 == units["shortgpt"]["layers"] == units["elm"]["layers"]
    assert not (tmp_path / "out" / "screen").exists() and (folder / "screen_m2.png").is_file()
    section = (tmp_path / "out" / "RESULTS.md").read_text()
    assert "M = 2 of" in section and "screen_m2/screen_m2.png" in section
    assert "- The screen of general retention at M = 8:" in section
    assert "- The screen of task retention at M = 15:" in section
    (folder / "screen_m2.md").unlink()
    _run(tmp_path, "--report-only")
    assert (folder / "screen_m2.md").is_file()


@pytest.mark.slow
def test_teacher_stops_early_and_task_screen_scores_accuracy_against_it(tmp_path):
    from safetensors.torch import load_file

    _data(tmp_path)
    out = _run(tmp_path, "--stages", "teacher,task", "--methods", "original,dense,shortgpt,elm")
    assert '"teacher": "done"' in out and '"task": "done"' in out
    teacher = json.loads((tmp_path / "out" / "teacher" / "teacher.json").read_text())
    # scored every 2 steps; stopped once a score did not beat the best (patience 1), or at step 6
    steps = [c["step"] for c in teacher["curve"]]
    assert steps[0] == 0 and all(b - a == 2 for a, b in zip(steps[1:], steps[2:]))
    assert teacher["steps"] == steps[-1] <= 6 and teacher["best_step"] in steps
    assert teacher["val_acc"] == max(c["val_acc"] for c in teacher["curve"][1:])
    assert 0 <= teacher["test_acc"] <= 1 and len(teacher["adapter_sha256"]) == 64
    task = json.loads((tmp_path / "out" / "task" / "task.json").read_text())
    units = {u["method"]: u for u in task["units"]}
    assert set(units) == {"original", "dense", "shortgpt", "elm"}
    assert units["original"]["curve"] == [{"sequences": 0, "acc": teacher["test_acc"]}]  # the teacher itself
    budgets = task["settings"]["budgets"]
    for name in ("dense", "shortgpt", "elm"):
        assert [c["sequences"] for c in units[name]["curve"]] == budgets
        assert all(0 <= c["acc"] <= 1 for c in units[name]["curve"])
        assert units[name]["settings"]["teacher"] == teacher["adapter_sha256"]
    assert "| shortgpt |" in (tmp_path / "out" / "task" / "task.md").read_text()
    assert set(units["elm"]["inference"]["fixed"]) == {"1", "2", "3"}
    assert all(0 <= v["acc"] <= 1 for v in units["elm"]["inference"]["adaptive"].values())
    section = (tmp_path / "out" / "RESULTS.md").read_text()
    assert "\n## The task teacher" not in section and "\n### The task teacher" in section

    # a later GPU run brings only the adapter: the teacher is rebuilt from it, the same weights
    merged = tmp_path / "run" / "teacher" / "model"
    before = load_file(str(merged / "model.safetensors"))
    (merged / "model.safetensors").unlink()
    (merged / "adapter.sha256").unlink()
    again = _run(tmp_path, "--stages", "teacher,task", "--methods", "original,dense,shortgpt,elm")
    assert "== teacher" not in again and "== task" not in again  # nothing measured again
    after = load_file(str(merged / "model.safetensors"))
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], atol=1e-6, rtol=0)

    # task curves: dense, ELM and the task screen's best (shortgpt) over seeds, to the curves' top
    out = _run(tmp_path, "--stages", "task-curves", "--jobs", "2")
    assert '"task_curves": "done"' in out
    folder = tmp_path / "out" / "task_curves"
    files = sorted(p.name for p in folder.glob("unit_*.json"))
    assert files == sorted(f"unit_{m}_s{s}.json" for m in ("dense", "elm", "shortgpt") for s in (0, 1))
    curves = json.loads((folder / "task_curves.json").read_text())
    assert curves["settings"]["budgets"][-1] > budgets[-1]
    for u in curves["units"]:
        assert [c["sequences"] for c in u["curve"]] == curves["settings"]["budgets"]
        assert u["settings"]["teacher"] == teacher["adapter_sha256"] and "error" not in u
    md = (folder / "task_curves.md").read_text()
    assert "## Task retention against the budget" in md and "| elm | 2 |" in md
    # the tiny teacher may score 0, and then no retention is defined: the claim says which
    claim = (tmp_path / "out" / "claim" / "claim.md").read_text()
    row = next(line for line in claim.splitlines() if line.startswith("| task | 8 |"))
    assert "% (n=2)" in row or "undefined: no seed has both ELM and a dense + LoRA score above 0" in row
    section = (tmp_path / "out" / "RESULTS.md").read_text()
    assert "### The seeds' claim" in section and "task_curves/task_curves.png" in section


@pytest.mark.slow
def test_curves_run_the_chosen_methods_over_seeds_with_mean_and_std(tmp_path):
    _data(tmp_path)
    # the screen ranks shortgpt and sleb; curves take dense, ELM and the screen's best (here both)
    _run(tmp_path, "--stages", "screen", "--methods", "shortgpt,sleb")
    out = _run(tmp_path, "--stages", "curves", "--jobs", "2")
    assert '"curves": "done"' in out
    folder = tmp_path / "out" / "curves"
    files = sorted(p.name for p in folder.glob("unit_*.json"))
    methods = ("dense", "elm", "shortgpt", "sleb")
    assert files == sorted(f"unit_{m}_s{s}.json" for m in methods for s in (0, 1))
    units = json.loads((folder / "curves.json").read_text())["units"]
    budgets = json.loads((folder / "curves.json").read_text())["settings"]["budgets"]
    assert budgets[-1] > 8  # beyond the screen's top budget
    for u in units:
        assert [c["sequences"] for c in u["curve"]] == budgets and "error" not in u
    # the seed changes the run: dense's two seeds differ
    dense = {u["settings"]["seed"]: u for u in units if u["method"] == "dense"}
    assert dense[0]["curve"] != dense[1]["curve"]
    md = (folder / "curves.md").read_text()
    assert "| dense | 2 |" in md and " ± " in md and (folder / "curves.png").is_file()
    # chosen from a screen of two methods: the report says which are missing from it
    chosen = json.loads((folder / "chosen.json").read_text())
    assert sorted(chosen["methods"]) == sorted(methods) and chosen["from"] == "screen"
    assert "elm" in chosen["missing"] and "shortgpt" not in chosen["missing"]
    assert "Methods chosen from `screen` while it still missed original, dense, elm" in md
    # the claim from the curves' top budget: ELM against dense + LoRA of the same seed, both seeds
    claim = json.loads((tmp_path / "out" / "claim" / "claim.json").read_text())["general_m8"]
    assert claim["elm"]["n"] == 2 and claim["best"]["method"] in ("shortgpt", "sleb")
    acc = {(u["method"], u["settings"]["seed"]): sum(t["acc"] for t in u["tasks"].values()) for u in units}
    kept = [acc[("elm", s)] / acc[("dense", s)] for s in (0, 1)]
    assert claim["elm"]["mean"] == pytest.approx(sum(kept) / 2)
    assert "| general | 8 | " in (tmp_path / "out" / "claim" / "claim.md").read_text()
    again = _run(tmp_path, "--stages", "curves")  # all saved: nothing reruns
    assert "started" not in again and "== curves" not in again

"""The text demo (``elmkit demo`` on a non-testbed model) on the tiny testbed's weights, shrunk."""

import shutil

import pytest

from elmkit.data.corpora import c4_head, notice, wikitext2_head
from elmkit.demos import TextDemoConfig, text_demo
from elmkit.models.sources import TINY_PATH

SMALL = TextDemoConfig(window=64, windows=2, steps=3, batch_size=2, max_len=32, calib_samples=4,
                       calib_len=32, evaluations=(1,))


@pytest.fixture
def plain_model(tmp_path):
    """The testbed model as any other folder: no testbed.json, so the demo takes the text path."""
    folder = tmp_path / "model"
    shutil.copytree(TINY_PATH, folder)
    (folder / "testbed.json").unlink()
    return folder


def test_shipped_text_is_there_with_its_licences(shared_data):
    text = wikitext2_head()
    from elmkit.eval.perplexity import read_wikitext2

    assert read_wikitext2(shared_data / "wikitext2" / "wiki.test.raw").startswith(text + "\n\n")
    docs = c4_head()
    assert len(docs) == 400 and all(isinstance(d, str) and d for d in docs)
    assert "CC BY-SA 3.0" in notice() and "ODC-By" in notice()


def test_text_demo_compares_at_one_layer_budget_and_resumes(plain_model, tmp_path, capsys):
    out = tmp_path / "demo"
    m = text_demo(out, str(plain_model), plain_model, SMALL)
    dense, elm, adaptive, short = m["rows"]
    n, span = 12, 3  # round(0.25 x 12)
    assert dense["layers"] == n and elm["layers"] == short["layers"] == n - span + 1
    kept = (n - span + 1) / n
    assert elm["kv_bytes_4k"] == short["kv_bytes_4k"] == pytest.approx(dense["kv_bytes_4k"] * kept)
    assert elm["iterations_per_token"] == span and adaptive["iterations_per_token"] <= span
    assert all(r["tokens"] == 2 * 63 and r["ppl"] > 1 for r in m["rows"])
    assert [r["evaluations"] for r in m["evaluations_curve"]] == [1, span]
    for f in ("report.md", "perplexity.png", "evaluations.png", "residuals.png", "metrics.json",
              "elm/model/config.json", "elm/plan.json"):
        assert (out / f).is_file(), f
    assert "ShortGPT deletes 2 layers" in (out / "report.md").read_text()

    # a rerun reuses every row and the trained ELM: same figures, nothing trained again
    capsys.readouterr()
    again = text_demo(out, str(plain_model), plain_model, SMALL)
    printed = capsys.readouterr().out
    assert "trained in an earlier run" in printed and printed.count("measured in an earlier run") == 5
    assert again["rows"] == m["rows"]

    with pytest.raises(ValueError, match="another demo run"):
        text_demo(out, str(plain_model), plain_model, TextDemoConfig(windows=3))


def test_a_folder_of_another_demo_is_refused_before_any_work(plain_model, tmp_path):
    """e.g. `elmkit demo` (the task demo) then `elmkit demo --model M`, both into runs/demo: the
    testbed's trained ELM must not be picked up as M's."""
    from elmkit.io import write_json

    out = tmp_path / "demo"
    write_json(out / "config.json", {"command": "demo", "model": "testbed:tiny"})
    with pytest.raises(ValueError, match="another demo run"):
        text_demo(out, str(plain_model), plain_model, SMALL)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_each_model_gets_its_own_default_folder():
    from elmkit.demos import default_out

    assert default_out("testbed:tiny").as_posix() == "runs/demo"
    assert default_out("smollm2-135m").as_posix() == "runs/demo-smollm2-135m"
    assert default_out("/models/My Model/").as_posix() == "runs/demo-My-Model"
    gguf = "x/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert default_out(gguf).as_posix() == "runs/demo-SmolLM2-135M-Instruct.Q4_1"


def test_bad_demo_settings_say_what_to_fix():
    with pytest.raises(ValueError, match="ratio"):
        TextDemoConfig(ratio=1.0)
    with pytest.raises(ValueError, match="evaluations"):
        TextDemoConfig(evaluations=(0,))

import json

import pytest

from elmkit.data import (
    IGNORE_INDEX,
    DataFormatError,
    Example,
    detect_format,
    encode,
    gsm8k_to_cot,
    pack,
    pad_batch,
    read_examples,
    read_gsm8k,
    read_text,
    render,
)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_alpaca_json_and_jsonl(tmp_path):
    recs = [{"instruction": "Add 2 and 3.", "input": "", "output": "5.\nThe answer is: 5"},
            {"instruction": "Say hi", "output": "hi"}]
    a = _write(tmp_path / "a.json", json.dumps(recs))
    b = _write(tmp_path / "b.jsonl", "\n".join(json.dumps(r) for r in recs))
    for p in (a, b):
        ex = read_examples(p)
        assert ex[0] == Example("Add 2 and 3.", "", "5.\nThe answer is: 5", "5")
        assert ex[1].answer is None and ex[1].input == ""


def test_gsm8k_reader_rewrites_to_metamath_style(tmp_path):
    line = {"question": "Q?", "answer": "2 + 3 = <<2+3=5>>5 apples\n#### 5"}
    ex = read_gsm8k(_write(tmp_path / "g.jsonl", json.dumps(line)))[0]
    assert ex.answer == "5"
    assert ex.output == "2 + 3 = 5 apples\nThe answer is: 5"
    assert ex.instruction.endswith("Q?") and "The answer is: " in ex.instruction
    assert gsm8k_to_cot("#### 7") == "The answer is: 7"


@pytest.mark.parametrize("fields,fmt", [
    ({"instruction": "i", "output": "o"}, "alpaca"),
    ({"question": "q", "answer": "a\n#### 1"}, "gsm8k"),
    ({"question": "q", "answer": "\\frac12"}, "math"),
    ({"query": "q", "response": "The answer is: 1"}, "metamath"),
    ({"text": "t"}, "text"),
])
def test_detect_format(tmp_path, fields, fmt):
    assert detect_format(_write(tmp_path / "x.jsonl", json.dumps(fields))) == fmt


def test_malformed_json_names_file_and_line(tmp_path):
    p = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl, line 2: malformed JSON"):
        read_text(p)
    q = _write(tmp_path / "bad.json", '[{"instruction": "a", "output": "b"},\n {"instruction": ]')
    with pytest.raises(DataFormatError, match=r"bad\.json: malformed JSON at line 2"):
        read_examples(q, "alpaca")


def test_missing_field_names_record_and_expected_fields(tmp_path):
    p = _write(tmp_path / "a.json", json.dumps([{"instruction": "a", "output": "b"},
                                                {"instruction": "a", "input": ""}]))
    with pytest.raises(DataFormatError, match=r"record 1: missing field 'output'.*instruction, output"):
        read_examples(p, "alpaca")
    g = _write(tmp_path / "g.jsonl", json.dumps({"question": "q", "answer": "no hashes"}))
    with pytest.raises(DataFormatError, match=r"line 1: field 'answer' does not end with '####"):
        read_examples(g, "gsm8k")


def test_wrong_path_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        read_examples(tmp_path / "nope.json")
    p = _write(tmp_path / "a.jsonl", json.dumps({"instruction": "a", "output": "b"}))
    with pytest.raises(ValueError, match="unknown data format 'csv'"):
        read_examples(p, "csv")
    with pytest.raises(DataFormatError, match="cannot tell the format"):
        read_examples(_write(tmp_path / "c.jsonl", json.dumps({"foo": 1})))


def test_labels_cover_answer_tokens_only(tokenizer):
    ex = Example("What is 2 + 3?", "", "2 + 3 = 5.\nThe answer is: 5", "5")
    r = render(tokenizer, ex)
    assert r.prompt.endswith("<|im_start|>assistant\n")
    assert r.completion == ex.output + "<|im_end|>\n"
    f = encode(tokenizer, ex, max_len=512)
    n_prompt = len(tokenizer(r.prompt, add_special_tokens=False)["input_ids"])
    assert f["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert f["labels"][n_prompt:] == f["input_ids"][n_prompt:]
    assert tokenizer.decode(f["input_ids"][n_prompt:]) == r.completion
    short = encode(tokenizer, ex, max_len=10)
    assert len(short["input_ids"]) == len(short["labels"]) == 10


def test_plain_fallback_without_chat_template(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    r = render(tok, Example("Say hi", "", "hi"))
    assert r.prompt == "### Instruction:\nSay hi\n\n### Response:\n"
    assert r.completion == "hi" + tok.eos_token


def test_padding_and_packing():
    feats = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    right = pad_batch(feats, pad_id=0)
    assert right["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    left = pad_batch(feats, pad_id=0, side="left")
    assert left["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    blocks = pack(feats * 3, seq_len=4)
    assert [b["input_ids"] for b in blocks] == [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]]
    assert blocks[0]["labels"] == [-100, 2, 3, 4]
    with pytest.raises(ValueError, match="side"):
        pad_batch(feats, 0, side="middle")


def test_byte_tokenizer_is_exact(tokenizer, tmp_path):
    s = "Tom has 1,234 apples; he gives 56 away. Ünïcode ✓\n"
    ids = tokenizer(s)["input_ids"]
    assert ids == list(s.encode("utf-8")) and tokenizer.decode(ids) == s
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(s)["input_ids"] == ids and again.chat_template == tokenizer.chat_template


def test_real_files_parse(shared_data):
    assert len(read_examples(shared_data / "gsm8k/test.jsonl")) == 1319
    assert len(read_examples(shared_data / "math/MATH_test_answers.jsonl")) == 5000
    assert len(read_examples(shared_data / "metamath/GSM8K_test.jsonl")) == 1319
    elm = read_examples(shared_data / "elm/metamathqa_train_sample.json")
    assert len(elm) == 10 and all(e.answer for e in elm)
    elm_gsm = read_examples(shared_data / "elm/gsm8k_test.json")
    assert len(elm_gsm) == 1319 and all(e.answer for e in elm_gsm)  # '#### N' references
    assert len(read_text(shared_data / "calibration/redpajama_c4_sample1.jsonl")) == 1000

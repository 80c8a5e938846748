import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from elmkit.data.synthetic import arithmetic_examples
from elmkit.train import FinetuneConfig, finetune

CFG = FinetuneConfig(r=4, alpha=8, dropout=0.1, lr=2e-2, min_lr=2e-3, batch_size=8,
                     max_steps=8, save_every=4, max_len=96, seed=3, device="cpu")


class Interrupt(Exception):
    pass


def _weights(path):
    return load_file(str(path / "model" / "model.safetensors"))


def test_lora_lowers_loss_and_merge_matches_adapter(tiny_dir, tmp_path):
    from peft import PeftModel

    data = arithmetic_examples(64, seed=1)
    m = finetune(tiny_dir, data, tmp_path / "run", CFG, progress=False)
    assert m["steps"] == 8 and m["examples"] == 64
    assert m["final_loss"] < m["first_loss"], m["loss_curve"]
    assert m["lora_scale"] == CFG.alpha / CFG.r
    for f in ("config.json", "metrics.json", "loss.png", "model/config.json", "adapter/adapter_config.json"):
        assert (tmp_path / "run" / f).is_file(), f

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    adapted = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    q = adapted.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == CFG.alpha / CFG.r  # alpha / r, not inverted
    assert {n.split(".")[-1] for n, _ in adapted.named_modules() if hasattr(_, "lora_A")} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=0)
    assert (tmp_path / "run" / "model" / "tokenizer.json").is_file()
    before = _data_loss(AutoModelForCausalLM.from_pretrained(tiny_dir), data)
    after = _data_loss(merged, data)
    assert after < before - 0.2, (before, after)


@torch.no_grad()
def _data_loss(model, data):
    """Mean answer-token loss over the whole training set."""
    from elmkit.data import byte_tokenizer, encode, pad_batch

    tok = byte_tokenizer()
    batch = pad_batch([encode(tok, ex, 96) for ex in data], tok.pad_token_id)
    return model.eval()(**batch).loss.item()


def test_on_model_returning_true_stops_early_and_saves_what_it_left(tiny_dir, tmp_path):
    # early stopping with the best weights put back: at step 3 the callback restores step 2's LoRA
    # tensors and stops; the saved adapter is step 2's, and the run says where it stopped
    data, kept = arithmetic_examples(64, seed=1), {}

    def best_of_two(step, model):
        lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if step <= 2:
            kept.update({n: p.detach().clone() for n, p in lora.items()})
            return None
        with torch.no_grad():
            for n, p in lora.items():
                p.copy_(kept[n])
        return True

    m = finetune(tiny_dir, data, tmp_path / "run", CFG, progress=False, on_model=best_of_two)
    assert m["steps"] == 3 and m["stopped_early"] == 3 and len(m["loss_curve"]) == 3
    saved = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == len(kept) > 0
    for n, t in kept.items():  # peft saves without the adapter name
        torch.testing.assert_close(saved[n.replace(".default", "")], t, atol=0, rtol=0)
    assert "stopped_early" not in finetune(tiny_dir, data, tmp_path / "full", CFG, progress=False)


def test_interrupted_run_resumes_to_identical_weights(tiny_dir, tmp_path):
    data = arithmetic_examples(64, seed=1)
    full = finetune(tiny_dir, data, tmp_path / "a", CFG, progress=False)

    def stop_at_6(step, loss):
        if step == 6:
            raise Interrupt

    with pytest.raises(Interrupt):
        finetune(tiny_dir, data, tmp_path / "b", CFG, on_step=stop_at_6, progress=False)
    assert (tmp_path / "b/checkpoints/step_000004/weights.safetensors").is_file()
    assert not (tmp_path / "b" / "model").exists()
    resumed = finetune(tiny_dir, data, tmp_path / "b", CFG, progress=False)
    assert resumed["loss_curve"] == full["loss_curve"]
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=0, rtol=0)


def test_resume_refuses_a_different_config(tiny_dir, tmp_path):
    data = arithmetic_examples(16, seed=1)
    cfg = FinetuneConfig(r=2, alpha=2, max_steps=2, save_every=1, batch_size=8, max_len=64, device="cpu")
    finetune(tiny_dir, data, tmp_path / "r", cfg, progress=False)
    other = FinetuneConfig(r=4, alpha=2, max_steps=2, save_every=1, batch_size=8, max_len=64, device="cpu")
    with pytest.raises(ValueError, match="different settings"):
        finetune(tiny_dir, data, tmp_path / "r", other, progress=False)


def test_config_validation():
    with pytest.raises(ValueError, match="--r"):
        FinetuneConfig(r=0)
    with pytest.raises(ValueError, match="--target-modules"):
        FinetuneConfig(target_modules=("qkv",))
    with pytest.raises(ValueError, match="--max-steps"):
        FinetuneConfig(max_steps=0)


@pytest.mark.slow
def test_cli_run_killed_with_sigkill_resumes_exactly(tiny_dir, tmp_path):
    data = tmp_path / "train.json"
    data.write_text(json.dumps([
        {"instruction": e.instruction, "input": "", "output": e.output}
        for e in arithmetic_examples(64, seed=2)]))
    args = ["--model", str(tiny_dir), "--data", str(data), "--r", "4", "--alpha", "8",
            "--lr", "5e-3", "--batch-size", "8", "--max-steps", "60", "--save-every", "5",
            "--max-len", "96", "--device", "cpu"]
    cmd = [sys.executable, "-m", "elmkit.cli", "finetune", *args]
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "killed")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not list(ckpts.glob("step_*")) and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(ckpts.glob("step_*")), "no checkpoint was written before the kill"
    subprocess.run(cmd + ["--out", str(tmp_path / "killed")], check=True, capture_output=True)
    subprocess.run(cmd + ["--out", str(tmp_path / "clean")], check=True, capture_output=True)
    wa, wb = _weights(tmp_path / "killed"), _weights(tmp_path / "clean")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=0, rtol=0)

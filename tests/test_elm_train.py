import copy
import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from elmkit.data.synthetic import arithmetic_examples
from elmkit.io import read_json
from elmkit.methods import elm as E
from elmkit.train.elm import ElmTrainConfig, ce_weight, iteration_draws, train_elm

CFG = ElmTrainConfig(steps=6, batch_size=4, lr=5e-3, warmup=1, save_every=2, max_len=64)


def _setup(make_model, tokenizer, span=4):
    dense = make_model("qwen2", num_layers=6)
    teacher = copy.deepcopy(dense)
    elm = E.apply_(dense, E.plan(dense, start=1, span=span, max_iter=2))
    return elm, teacher


class Stop(Exception):
    pass


def _uninterrupted_and_resumed(make_model, tokenizer, data, cfg, tmp_path, stop_at):
    """Final weights of one straight run, and of a run stopped at ``stop_at`` then resumed."""
    elm_a, teacher = _setup(make_model, tokenizer)
    train_elm(elm_a, teacher, tokenizer, data, tmp_path / "a", cfg, progress=False)

    def stop(step, loss):
        if step == stop_at:
            raise Stop

    elm_b, teacher_b = _setup(make_model, tokenizer)
    with pytest.raises(Stop):
        train_elm(elm_b, teacher_b, tokenizer, data, tmp_path / "b", cfg, progress=False,
                  on_step=stop)
    elm_c, teacher_c = _setup(make_model, tokenizer)  # a fresh process would rebuild it like this
    train_elm(elm_c, teacher_c, tokenizer, data, tmp_path / "b", cfg, progress=False)
    return (load_file(str(tmp_path / "a/model/model.safetensors")),
            load_file(str(tmp_path / "b/model/model.safetensors")))


def test_draws_and_schedule():
    cfg = ElmTrainConfig(steps=100)
    draws = [iteration_draws(s, 8, cfg) for s in range(200)]
    assert draws == [iteration_draws(s, 8, cfg) for s in range(200)]  # pure function of the step
    assert {m for m, _ in draws} == set(range(0, 5)) and {n for _, n in draws} == set(range(1, 5))
    assert all(iteration_draws(s, 1, cfg) == (0, 1) for s in range(20))  # M = 1: one step
    assert ce_weight(10, cfg) == 0 and ce_weight(49, cfg) == 0
    assert 0 < ce_weight(60, cfg) < ce_weight(90, cfg) <= 1
    assert ce_weight(10, ElmTrainConfig(steps=100, ce_schedule="constant")) == 1.0
    with pytest.raises(ValueError, match="--with-grad-min"):
        ElmTrainConfig(with_grad_min=0)


def test_training_moves_only_the_block_and_lowers_distillation(make_model, tokenizer, tmp_path):
    elm, teacher = _setup(make_model, tokenizer)
    before = {n: p.clone() for n, p in elm.named_parameters()}
    cfg = ElmTrainConfig(steps=30, batch_size=8, lr=3e-3, warmup=2, max_len=64, save_every=100,
                         lambda_ce=0.0)  # distillation alone must fall
    m = train_elm(elm, teacher, tokenizer, arithmetic_examples(64, seed=3), tmp_path / "t", cfg,
                  progress=False)
    changed = {n for n, p in elm.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("model.layers.1.") for n in changed)
    assert "model.layers.1.proj.weight" in changed
    assert m["final_distill"] < 0.5 * m["first_distill"], m
    assert (tmp_path / "t" / "model" / "modeling_elm.py").is_file()
    assert (tmp_path / "t" / "loss.png").is_file()


def test_interrupted_training_resumes_to_identical_block(make_model, tokenizer, tmp_path):
    wa, wc = _uninterrupted_and_resumed(make_model, tokenizer, arithmetic_examples(32, seed=4),
                                        CFG, tmp_path, stop_at=5)
    for k in wa:
        torch.testing.assert_close(wa[k], wc[k], atol=0, rtol=0)


def test_sampling_generation_works_through_generation_mixin(make_model, tokenizer):
    elm, _ = _setup(make_model, tokenizer)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    out = elm.generate(ids, max_new_tokens=5, do_sample=True, top_p=0.9, temperature=0.8)
    assert out.shape[0] == 2 and out.shape[1] <= 11


@pytest.mark.slow
def test_demo_main_job_end_to_end(tmp_path):
    from elmkit import demo

    m = demo(tmp_path / "demo")
    dense, elm, adaptive, short = m["rows"]
    assert dense["layers"] == 12 and elm["layers"] == 10 and short["layers"] == 9
    assert dense["accuracy"] >= 0.9
    assert elm["retained"] >= 0.9 and adaptive["retained"] >= 0.9  # the bar is 95%
    assert short["retained"] < 0.5
    assert elm["kv_ratio"] == pytest.approx(10 / 12) and short["kv_ratio"] == pytest.approx(9 / 12)
    assert adaptive["iterations_per_token"] < elm["iterations_per_token"] == 4
    for f in ("report.md", "accuracy.png", "residuals.png", "elm/model/modeling_elm.py",
              "elm/plan.json"):
        assert (tmp_path / "demo" / f).is_file(), f


def test_kept_layer_lora_trains_merges_and_resumes(make_model, tokenizer, tmp_path):
    data = arithmetic_examples(32, seed=5)
    cfg = ElmTrainConfig(steps=6, batch_size=4, lr=5e-3, warmup=1, save_every=2, max_len=64,
                         kept_lora_r=4, kept_lora_alpha=8, ce_schedule="constant")
    elm, teacher = _setup(make_model, tokenizer)
    before = {n: p.clone() for n, p in elm.named_parameters()}
    train_elm(elm, teacher, tokenizer, data, tmp_path / "one", cfg, progress=False)
    assert not any("lora" in n for n, _ in elm.named_parameters())  # merged away
    changed = {n.split(".")[2] for n, p in elm.named_parameters() if not torch.equal(p, before[n])}
    assert "1" in changed and len(changed) > 1  # the block and kept layers moved
    wa, wc = _uninterrupted_and_resumed(make_model, tokenizer, data, cfg, tmp_path, stop_at=3)
    for k in wa:
        torch.testing.assert_close(wa[k], wc[k], atol=0, rtol=0)
    # the official schedule: LoRA above the block has no optimizer state when the checkpoint is
    # taken in the first half (lambda_ce = 0), and must have none after the resume either
    off = dataclasses.replace(cfg, ce_schedule="official", steps=8)
    wa, wc = _uninterrupted_and_resumed(make_model, tokenizer, data, off, tmp_path / "official", stop_at=3)
    for k in wa:
        torch.testing.assert_close(wa[k], wc[k], atol=0, rtol=0)


def test_kept_lora_merge_preserves_logits_and_skips_the_block(make_model, tokenizer):
    from elmkit.train.elm import _add_kept_lora, _merge_kept_lora

    elm, _ = _setup(make_model, tokenizer)
    params = _add_kept_lora(elm, ElmTrainConfig(kept_lora_r=4, kept_lora_alpha=8))
    assert params and not any(k.startswith("model.layers.1.") for k in params)  # block untouched
    with torch.no_grad():
        for k, p in params.items():
            if "lora_B" in k:
                p.normal_(0, 0.05)
        ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(2))
        want = elm(ids).logits
        _merge_kept_lora(elm)
        assert not any("lora" in n for n, _ in elm.named_modules())
        torch.testing.assert_close(elm(ids).logits, want, atol=1e-5, rtol=0)


def test_recomputed_tail_and_chunked_ce_give_the_same_gradients(make_model, tokenizer):
    """recompute_tail and the chunked CE change memory, not the loss or the block's gradients."""
    from elmkit.models.adapters import head_logits
    from elmkit.train.elm import answer_ce

    elm, teacher = _setup(make_model, tokenizer)
    grads = [_step_grads(elm, teacher, recompute=recompute) for recompute in (False, True)]
    assert torch.allclose(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)
    labels = _step_batch()[2]
    h = torch.randn(2, 40, elm.config.hidden_size)
    full = torch.nn.functional.cross_entropy(head_logits(elm, h)[:, :-1].reshape(-1, elm.config.vocab_size),
                                             labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(answer_ce(elm, h, labels, chunk=7), full)


def _step_batch():
    """(ids, mask, labels): two sequences of 40, one left-padded by 5, the first 10 unlabelled."""
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    labels = ids.clone()
    labels[:, :10] = -100
    return ids, mask, labels


def _step_grads(elm, teacher, compiled=None, recompute=False):
    """Loss and block gradients of one SJFB step (m = 1, n = 2) on _step_batch()."""
    from elmkit.train.elm import sjfb_loss

    ids, mask, labels = _step_batch()
    params = list(elm.block.parameters())
    for p in params:
        p.grad = None
        p.requires_grad_(True)
    r = sjfb_loss(elm, teacher, ids, mask, labels, 1, 2, 1.0, 1.0, recompute_tail=recompute,
                  compiled=compiled)
    r.loss.backward()
    return r.loss.detach(), [p.grad.clone() for p in params]


def test_span_teacher_shares_weights_and_gives_the_same_step(make_model, tokenizer):
    """SpanTeacher = the dense teacher for the step, holding only the span's layers of its own."""
    from elmkit.models import count_parameters
    from elmkit.train.elm import SpanTeacher

    dense = make_model("qwen2", num_layers=6)
    full_teacher = copy.deepcopy(dense)
    per_layer = count_parameters(dense.model.layers[0])
    span = SpanTeacher(dense, 1, 4)
    elm = E.apply_(dense, E.plan(dense, start=1, span=4, max_iter=2))
    elm_ptrs = {p.data_ptr() for p in elm.parameters()}
    own = sum(p.numel() for p in span.parameters() if p.data_ptr() not in elm_ptrs)
    assert own == 4 * per_layer  # the embeddings and layer 0 are the ELM's own tensors
    loss_a, grads_a = _step_grads(elm, full_teacher)
    loss_b, grads_b = _step_grads(elm, span)
    torch.testing.assert_close(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b)


def test_span_teacher_errors_and_kept_lora(make_model, tokenizer, tmp_path):
    from elmkit.train.elm import SpanTeacher

    dense = make_model("qwen2", num_layers=6)
    with pytest.raises(ValueError, match="outside the model's 6 layers"):
        SpanTeacher(dense, 3, 4)
    shared = SpanTeacher(dense, 1, 4)
    own = SpanTeacher(dense, 1, 4, own_lower=True)
    elm = E.apply_(dense, E.plan(dense, start=1, span=4, max_iter=2))
    with pytest.raises(ValueError, match="teacher must be the dense model"):
        SpanTeacher(elm, 0, 1)
    data = arithmetic_examples(16, seed=1)
    cfg = ElmTrainConfig(steps=2, batch_size=4, max_len=64, kept_lora_r=2, ce_schedule="constant")
    with pytest.raises(ValueError, match="own_lower=True"):
        train_elm(elm, shared, tokenizer, data, tmp_path / "s", cfg, progress=False)
    before = copy.deepcopy(own.model.layers[0].state_dict())
    train_elm(elm, own, tokenizer, data, tmp_path / "o", cfg, progress=False)
    assert not any("lora" in n for n, _ in own.named_modules())  # the teacher's layers stay dense
    for k, v in own.model.layers[0].state_dict().items():
        assert torch.equal(v, before[k])


def test_compiled_step_gives_the_same_gradients(make_model, tokenizer):
    """compile_step changes speed, not the loss or the block's gradients (aot_eager: no C compiler)."""
    import torch._dynamo

    from elmkit.train import elm as T

    elm, teacher = _setup(make_model, tokenizer)
    want = _step_grads(elm, teacher)
    real = torch.compile
    try:
        torch.compile = lambda fn, **kw: real(fn, backend="aot_eager", **kw)
        compiled = T.compile_step(elm)
    finally:
        torch.compile = real
    for recompute in (False, True):
        got = _step_grads(elm, teacher, compiled, recompute)
        torch.testing.assert_close(got[0], want[0])
        for a, b in zip(got[1], want[1]):
            torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def test_distillation_losses_and_their_invariances():
    from elmkit.train.elm import distillation

    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 3:] = False
    mse = ((z - t) ** 2).mean(-1)[valid].mean()  # the paper's loss, as it was computed before
    torch.testing.assert_close(distillation(z, t, valid, "mse"), mse)
    # relative: one token scaled by 1e3 (a massive activation) keeps its share of the loss
    z2, t2 = z.clone(), t.clone()
    z2[0, 0] *= 1e3
    t2[0, 0] *= 1e3
    torch.testing.assert_close(distillation(z2, t2, valid, "relative"), distillation(z, t, valid, "relative"))
    assert distillation(z2, t2, valid, "mse") > 100 * mse
    # channel: one channel scaled by 1e3 likewise
    z3, t3 = z.clone(), t.clone()
    z3[..., 2] *= 1e3
    t3[..., 2] *= 1e3
    torch.testing.assert_close(distillation(z3, t3, valid, "channel"), distillation(z, t, valid, "channel"))
    for kind in ("mse", "relative", "channel"):  # padding does not count; zero at the target
        z4, t4 = z.clone(), t.clone()
        z4[~valid], t4[~valid] = 1e6, -1e6  # neither the error nor a normaliser may see them
        torch.testing.assert_close(distillation(z4, t4, valid, kind), distillation(z, t, valid, kind))
        assert distillation(t, t, valid, kind) == 0
    with pytest.raises(ValueError, match="--distill-loss"):
        ElmTrainConfig(distill_loss="l1")


def test_plain_text_trains_every_token_and_resumes(make_model, tokenizer, tmp_path):
    """Text records train the block (distillation and CE on every token); an interrupted run
    resumes to the same block."""
    texts = [f"{a} plus {b} is {a + b}. " * 3 for a in range(10) for b in range(4)]
    cfg = dataclasses.replace(CFG, distill_loss="relative", ce_schedule="constant", max_len=32)
    a, b = _uninterrupted_and_resumed(make_model, tokenizer, texts, cfg, tmp_path, stop_at=3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = read_json(tmp_path / "a" / "history.json")
    assert all(h["ce"] > 0 for h in history)
    from elmkit.data.collate import text_features

    feats = text_features(tokenizer, texts[:2], 32)
    assert all(f["labels"] == f["input_ids"] and 2 <= len(f["input_ids"]) <= 32 for f in feats)
    with pytest.raises(ValueError, match="no texts"):
        text_features(tokenizer, [], 32)


import pytest
import torch

from elmkit.data.synthetic import arithmetic_examples
from elmkit.methods import gppo


def test_group_advantages_are_normalised():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    a = gppo.group_advantages(r)
    assert abs(float(a.mean())) < 1e-6 and abs(float(a.std()) - 1) < 1e-4
    assert torch.equal(gppo.group_advantages(torch.full((5,), 3.0)), torch.zeros(5))


def test_ppo_clip_limits_the_ratio():
    old = torch.log(torch.tensor([0.5, 0.5]))
    adv = torch.tensor([1.0, -1.0])
    # ratios 2.0 (positive advantage: clipped at 1.2) and 0.2 (negative: clipped at 0.8)
    logp = torch.log(torch.tensor([1.0, 0.1]))
    loss = gppo.ppo_clip_loss(logp, old, adv, clip=0.2)
    assert float(loss) == pytest.approx(-(1.2 * 1.0 + 0.8 * -1.0) / 2)
    # inside the clip range nothing is clipped
    logp = torch.log(torch.tensor([0.55, 0.5]))
    assert float(gppo.ppo_clip_loss(logp, old, adv, 0.2)) == pytest.approx(-(1.1 - 1.0) / 2)


def test_bandit_with_one_clearly_best_arm_converges_to_it():
    means = [0.0, 0.2, 1.0, 0.1, -0.3, 0.0]
    noise = torch.Generator().manual_seed(5)

    def reward(a):
        return means[a] + 0.3 * float(torch.randn(1, generator=noise))

    pol = gppo.run_bandit(reward, len(means), gppo.GppoConfig(steps=400, group_size=10,
                                                              policy_lr=0.05, seed=1))
    assert int(pol.theta.argmax()) == 2
    assert float(pol.probs()[2]) > 0.5


def test_policy_is_deterministic_for_a_seed():
    def run(seed):
        noise = torch.Generator().manual_seed(0)
        return gppo.run_bandit(lambda a: a * 0.1 + float(torch.rand(1, generator=noise)), 5,
                               gppo.GppoConfig(steps=60, seed=seed)).theta.detach()

    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))


def test_reward_model_shares_the_dense_weights_and_search_is_deterministic(make_model, tokenizer):
    data = arithmetic_examples(32, seed=1)
    cfg = gppo.GppoConfig(span=2, steps=12, group_size=4, batch_size=4, max_len=64, seed=2)

    def search():
        dense = make_model("qwen2", num_layers=6)
        n_dense = sum(p.numel() for p in dense.parameters())
        hist = []
        plan = gppo.plan(dense, tokenizer, data, cfg, progress=False, history=hist)
        lora = sum(p.numel() for n, p in dense.named_parameters() if "lora_" in n)
        base = sum(p.numel() for n, p in dense.named_parameters() if "lora_" not in n)
        assert base == n_dense  # one frozen copy; candidates add only LoRA + projections
        assert 0 < lora < n_dense
        trained = {n.split(".")[2] for n, p in dense.named_parameters()
                   if "lora_B" in n and p.abs().sum() > 0}  # B starts at 0: moved = trained
        assert trained == {str(h["action"]) for h in hist}
        return plan, hist

    p1, h1 = search()
    p2, h2 = search()
    assert p1 == p2 and h1 == h2
    assert len(p1.theta) == 6 - 2 + 1 and p1.start == max(range(5), key=lambda i: p1.theta[i])
    assert {h["action"] for h in h1} <= set(range(5)) and all(h["reward"] < 0 for h in h1)


def test_bad_search_settings_fail_clearly(make_model, tokenizer):
    with pytest.raises(ValueError, match="--group-size"):
        gppo.GppoConfig(group_size=1)
    with pytest.raises(ValueError, match="span M = 6 must be in 1..5"):
        gppo.plan(make_model("qwen2", num_layers=6), tokenizer, arithmetic_examples(4),
                  gppo.GppoConfig(span=6), progress=False)


def test_interrupted_search_resumes_to_the_same_result(make_model, tokenizer, tmp_path):
    data = arithmetic_examples(32, seed=1)
    cfg = gppo.GppoConfig(span=2, steps=12, group_size=4, batch_size=4, max_len=64, seed=2)
    ha, ta = [], []
    a = gppo.plan(make_model("qwen2", num_layers=6), tokenizer, data, cfg, progress=False,
                  history=ha, thetas=ta, ckpt_dir=tmp_path / "a")

    class Stop(Exception):
        pass

    class StopAt6(list):
        def append(self, x):
            if len(self) == 6:
                raise Stop
            super().append(x)

    with pytest.raises(Stop):
        gppo.plan(make_model("qwen2", num_layers=6), tokenizer, data, cfg, progress=False,
                  history=StopAt6(), ckpt_dir=tmp_path / "b")
    hb, tb = [], []
    b = gppo.plan(make_model("qwen2", num_layers=6), tokenizer, data, cfg, progress=False,
                  history=hb, thetas=tb, ckpt_dir=tmp_path / "b")
    assert a == b and ha == hb and ta == tb
    with pytest.raises(ValueError, match="different settings"):
        gppo.plan(make_model("qwen2", num_layers=6), tokenizer, data,
                  gppo.GppoConfig(span=2, steps=12, group_size=4, batch_size=4, max_len=64, seed=9),
                  progress=False, ckpt_dir=tmp_path / "b")

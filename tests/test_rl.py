"""rl.py: hand-computed GRPO advantages and losses, autograd checks, and tiny end-to-end runs."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import StubTokenizer, tiny_config
from attention_lean import rhythm_signals
from attention_metrics import credit_gamma, default_layers
from batching import build_batch, token_logprobs
from rl import GRPO, RLConfig, apply_sign, evaluate, group_advantages, normalize_gamma, policy_loss


# -----------------------------------------------------------------------------
# group_advantages (Eq. 6)

def test_group_advantages_hand_values():
    # group 1: mean 0.5, unbiased std sqrt(1/3); group 2: G=4 all equal -> 0
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.3, 0.3, 0.3]), 4, eps=0.0)
    s = 0.5 / math.sqrt(1 / 3)
    assert torch.allclose(adv, torch.tensor([s, -s, -s, s, 0, 0, 0, 0]), atol=1e-6)
    assert torch.equal(adv[4:], torch.zeros(4))


def test_group_advantages_two_responses_and_eps():
    adv = group_advantages(torch.tensor([2.0, 0.0]), 2, eps=0.1)
    # mean 1, unbiased std sqrt(2): (2 - 1) / (sqrt(2) + 0.1)
    expected = 1 / (math.sqrt(2) + 0.1)
    assert torch.allclose(adv, torch.tensor([expected, -expected]), atol=1e-6)


def test_group_advantages_all_equal_is_zero_not_nan():
    adv = group_advantages(torch.zeros(6), 3, eps=0.0)
    assert torch.equal(adv, torch.zeros(6))


@pytest.mark.parametrize("rewards, G, match", [
    (torch.zeros(5), 2, "does not divide"),
    (torch.zeros(4), 1, "group_size must be >= 2"),
    (torch.zeros(2, 2), 2, "must be 1-D"),
])
def test_group_advantages_bad_input(rewards, G, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, G)


# -----------------------------------------------------------------------------
# apply_sign (Table 7a)

def test_apply_sign_rules():
    gamma = torch.full((3, 2), 1.5)
    adv = torch.tensor([1.0, -1.0, 0.0])
    assert torch.equal(apply_sign(gamma, adv, "both"), gamma)
    assert torch.equal(apply_sign(gamma, adv, "positive"), torch.tensor([[1.5, 1.5], [1, 1], [1, 1]]))
    assert torch.equal(apply_sign(gamma, adv, "negative"), torch.tensor([[1, 1], [1.5, 1.5], [1, 1]]))
    with pytest.raises(ValueError, match="unknown sign"):
        apply_sign(gamma, adv, "pos")


# -----------------------------------------------------------------------------
# policy_loss (Eq. 12-13)

def _case():
    """Two responses, every clipping branch, one padded token with an extreme ratio.

    row 0 (A = +1): ratios 1.5 (clipped at 1.2), 1.1 (inside), 0.5 (A > 0 so unclipped branch)
    row 1 (A = -1): ratios 0.5 (clipped at 0.8), 1.5 (A < 0 so unclipped branch), pad (0.1)
    per-token losses: [-1.2, -1.1, -0.5], [0.8, 1.5, -]
    """
    ratios = torch.tensor([[1.5, 1.1, 0.5], [0.5, 1.5, 0.1]])
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, -2.0]])
    return dict(logp=old + ratios.log(), old_logp=old, advantages=torch.tensor([1.0, -1.0]),
                gamma=torch.ones(2, 3), mask=torch.tensor([[1.0, 1, 1], [1, 1, 0]]))


def test_policy_loss_hand_values_both_norms():
    c = _case()
    loss_seq, diag = policy_loss(**c, norm="sequence")
    assert loss_seq.item() == pytest.approx(((-1.2 - 1.1 - 0.5) / 3 + (0.8 + 1.5) / 2) / 2, abs=1e-6)
    loss_tok, _ = policy_loss(**c, norm="token")
    assert loss_tok.item() == pytest.approx((-1.2 - 1.1 - 0.5 + 0.8 + 1.5) / 5, abs=1e-6)
    assert diag["clip_frac"] == pytest.approx(2 / 5)
    assert diag["ratio_mean"] == pytest.approx((1.5 + 1.1 + 0.5 + 0.5 + 1.5) / 5, abs=1e-6)
    k3 = [1 / r + math.log(r) - 1 for r in (1.5, 1.1, 0.5, 0.5, 1.5)]
    assert diag["approx_kl"] == pytest.approx(sum(k3) / 5, abs=1e-6)


def test_policy_loss_asymmetric_clip():
    c = _case()
    loss, diag = policy_loss(**c, norm="token", clip_eps_high=0.28)
    # only row 0 token 0 changes: clipped at 1.28 instead of 1.2
    assert loss.item() == pytest.approx((-1.28 - 1.1 - 0.5 + 0.8 + 1.5) / 5, abs=1e-6)
    loss, diag = policy_loss(**c, norm="token", clip_eps_high=0.6)
    assert loss.item() == pytest.approx((-1.5 - 1.1 - 0.5 + 0.8 + 1.5) / 5, abs=1e-6)
    assert diag["clip_frac"] == pytest.approx(1 / 5)


def test_policy_loss_gamma_scales_advantage_by_sign_rule():
    c = _case()
    c["gamma"] = torch.tensor([[1.0, 2.0, 1.0], [2.0, 1.0, 1.0]])
    # row 0 token 1: A~ = 2, ratio 1.1 inside -> -2.2; row 1 token 0: A~ = -2, ratio 0.5 -> -min(-1, -1.6) = 1.6
    both = (-1.2 - 2.2 - 0.5 + 1.6 + 1.5) / 5
    positive = (-1.2 - 2.2 - 0.5 + 0.8 + 1.5) / 5
    negative = (-1.2 - 1.1 - 0.5 + 1.6 + 1.5) / 5
    for sign, expected in (("both", both), ("positive", positive), ("negative", negative)):
        loss, _ = policy_loss(**c, norm="token", sign=sign)
        assert loss.item() == pytest.approx(expected, abs=1e-6), sign


def _plain_grpo(logp, old_logp, advantages, mask, eps=0.2):
    """Independent reference: GRPO surrogate with one advantage per response, sequence norm."""
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None]
    per_token = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - eps, 1 + eps) * a)
    return ((per_token * mask).sum(1) / mask.sum(1)).mean()


def test_gamma_one_is_plain_grpo():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 6, generator=g) * 3
    logp = (old + 0.4 * torch.randn(4, 6, generator=g)).requires_grad_()
    adv = torch.randn(4, generator=g)
    mask = torch.ones(4, 6)
    mask[1, :2] = 0
    mask[3, :5] = 0
    loss, _ = policy_loss(logp, old, adv, torch.ones(4, 6), mask)
    ref = _plain_grpo(logp, old, adv, mask)
    assert torch.equal(loss, ref)
    g1, = torch.autograd.grad(loss, logp)
    g2, = torch.autograd.grad(ref, logp)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("norm", ["sequence", "token"])
def test_policy_loss_gradient_at_ratio_one(norm):
    """d loss / d logp_t = -gamma_t * A / |o| / B (sequence) or -gamma_t * A / N (token), 0 on padding."""
    g = torch.Generator().manual_seed(1)
    B, T = 3, 5
    logp = (-torch.rand(B, T, generator=g)).requires_grad_()
    gamma = 1 + 0.5 * (torch.rand(B, T, generator=g) > 0.5).float()
    adv = torch.tensor([0.7, -1.3, 0.2])
    mask = torch.ones(B, T)
    mask[0, :2] = 0
    mask[2, :4] = 0
    loss, diag = policy_loss(logp, logp.detach(), adv, gamma, mask, norm=norm)
    grad, = torch.autograd.grad(loss, logp)
    denom = mask.sum(1, keepdim=True) * B if norm == "sequence" else mask.sum()
    assert torch.allclose(grad, -gamma * adv[:, None] * mask / denom, atol=1e-7)
    assert diag["clip_frac"] == 0 and diag["approx_kl"] == 0 and diag["ratio_mean"] == pytest.approx(1.0)


def test_policy_loss_kl_and_entropy_terms():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    ent = torch.tensor([[2.0, 4.0]])
    base = dict(logp=logp, old_logp=logp, advantages=torch.tensor([0.0]), gamma=torch.ones(1, 2),
                mask=torch.ones(1, 2))
    loss, diag = policy_loss(**base, ref_logp=ref, kl_coef=0.1, entropy=ent, entropy_coef=0.01)
    k3 = [math.exp(x) - x - 1 for x in (-0.5, 1.0)]
    assert diag["kl_ref"] == pytest.approx(sum(k3) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.1 * sum(k3) / 2 - 0.01 * 3.0, abs=1e-6)
    loss0, _ = policy_loss(**base, ref_logp=ref, entropy=ent)  # coefficients default to 0
    assert loss0.item() == 0.0


@pytest.mark.parametrize("change, match", [
    (dict(gamma=torch.ones(2, 4)), "gamma must have the shape"),
    (dict(old_logp=torch.ones(3, 3)), "old_logp must have the shape"),
    (dict(mask=torch.ones(2)), "mask must have the shape"),
    (dict(advantages=torch.ones(2, 1)), "advantages must be"),
    (dict(norm="batch"), "unknown norm"),
    (dict(sign="up"), "unknown sign"),
])
def test_policy_loss_bad_input(change, match):
    with pytest.raises(ValueError, match=match):
        policy_loss(**{**_case(), **change})


# -----------------------------------------------------------------------------
# batch tensors and log-probs

def test_build_batch_layout():
    b = build_batch([[5, 6, 7], [8]], [[1, 2], [3, 4, 9, 10, 11]], pad_id=0)
    assert b["input_ids"].tolist() == [[0, 5, 6, 7, 1, 2], [8, 3, 4, 9, 10, 11]]
    assert b["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert b["starts"].tolist() == [4, 1]
    assert b["response_mask"].tolist() == [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="at least one token"):
        build_batch([[]], [[1]], 0)


def _tiny_model(seed=0):
    from model import Qwen3Config, Transformer

    torch.manual_seed(seed)
    return Transformer(Qwen3Config(**tiny_config()))


def test_token_logprobs_match_unpadded_forward():
    """Padded batched log-probs == log_softmax of each unpadded sequence (off-by-one check)."""
    model = _tiny_model()
    prompts, responses = [[5, 6, 7, 8], [9]], [[1, 2], [3, 4, 11, 12, 13]]
    b = build_batch(prompts, responses, pad_id=0)
    with torch.no_grad():
        logp, ent = token_logprobs(model, b["input_ids"], b["attention_mask"], b["response_mask"].shape[1],
                                   with_entropy=True)
        for row, (p, r) in enumerate(zip(prompts, responses)):
            logits, _ = model(torch.tensor([p + r]))
            lsm = F.log_softmax(logits[0, len(p) - 1:-1].float(), -1)  # (R, V)
            expected = lsm.gather(-1, torch.tensor(r)[:, None])[:, 0]
            assert torch.allclose(logp[row, -len(r):], expected, atol=1e-5)
            assert torch.allclose(ent[row, -len(r):], -(lsm.exp() * lsm).sum(-1), atol=1e-5)


# -----------------------------------------------------------------------------
# end to end on a tiny model

EOS, TARGETS = StubTokenizer.eos_id, set(range(10, 20))


class ContainsTask:
    """Reward 1.0 if the response contains a token in TARGETS (about 1 in 3 at initialisation)."""
    name = "contains"

    def reward(self, response, example):
        return float(any(int(x) in TARGETS for x in response.split()))

    def correct(self, response, example):
        return self.reward(response, example) == 1.0


EXAMPLES = [SimpleNamespace(prompt=p, answer=None) for p in ("1 2 3", "4 5", "6 7 8 9", "30 31")]


def _trainer(strategy, seed=0, **overrides):
    cfg = RLConfig(**{**dict(group_size=4, rollout_batch_size=16, micro_batch_size=8, max_new_tokens=12, lr=1e-2,
                             window=4, h_lo=2, h_hi=8), **overrides, "strategy": strategy, "seed": seed})
    return GRPO(_tiny_model(seed), StubTokenizer(), ContainsTask(), cfg)


def test_lr_schedule_reaches_the_optimizer():
    # defaults: the paper's constant lr; with a warm-up and a decay: linear up, then cosine down
    constant = _trainer("none")
    assert {constant.set_lr_for_step(s, 10) for s in range(10)} == {1e-2}
    trainer = _trainer("none", lr_warmup_steps=2, min_lr_ratio=0.1)
    lrs = [trainer.set_lr_for_step(s, 12) for s in range(12)]
    expected = [5e-3, 1e-2] + [1e-2 * (0.1 + 0.9 * (1 + math.cos(math.pi * i / 9)) / 2) for i in range(10)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [lrs[-1]]


def _without_times(metrics):
    return {k: v for k, v in metrics.items() if not k.startswith("time_")}


@pytest.mark.parametrize("strategy", ["none", "coupled"])
def test_grpo_raises_reward(strategy):
    trainer = _trainer(strategy, micro_batch_size=4)  # 4 optimizer steps per rollout batch
    before = evaluate(trainer, EXAMPLES, greedy=False, k=16)["avg_at_k"]
    history = [trainer.step(EXAMPLES) for _ in range(6)]
    after = evaluate(trainer, EXAMPLES, greedy=False, k=16)["avg_at_k"]
    assert after > before + 0.25, (before, after, [m["reward_mean"] for m in history])
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in history)
    if strategy == "coupled":
        assert all(m["amplified_frac"] > 0 and m["gamma_mean"] > 1 for m in history)
    else:
        assert all(m["amplified_frac"] == 0 and m["gamma_mean"] == 1 for m in history)


def test_update_frees_the_gradients():
    """No gradient is held after a step: the next step's generation would otherwise carry 4 B per
    parameter it never uses (phases.predict counts them inside the update only)."""
    trainer = _trainer("coupled", micro_batch_size=4)
    metrics = trainer.step(EXAMPLES)
    assert metrics["grad_norm"] > 0
    assert all(p.grad is None for p in trainer.model.parameters())


def test_same_seed_same_metrics_and_resume(tmp_path):
    from safetensors.torch import load_file, save_file

    a, b = _trainer("random"), _trainer("random")
    run_a = [_without_times(a.step(EXAMPLES)) for _ in range(3)]
    run_b = [_without_times(b.step(EXAMPLES)) for _ in range(2)]
    assert run_a[:2] == run_b
    assert run_a[0]["logp_gen_gap"] < 1e-4  # recomputed old log-probs agree with generate's
    expected_keys = {"reward_mean", "accuracy", "response_length", "clip_frac", "amplified_frac", "gamma_mean",
                     "loss", "grad_norm", "approx_kl", "ratio_mean"}
    assert expected_keys <= set(run_a[0])

    # resume b from a checkpoint (weights + trainer state through safetensors) into a fresh trainer
    save_file(b.state_dict(), tmp_path / "trainer.safetensors")
    save_file({k: v.clone() for k, v in b.model.state_dict().items() if k != "lm_head.weight"},
              tmp_path / "model.safetensors")
    c = _trainer("random", seed=5)
    c.model.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    c.load_state_dict(load_file(tmp_path / "trainer.safetensors"))
    resumed = c.step(EXAMPLES)
    assert _without_times(resumed) == run_a[2]
    assert {"time_generate", "time_credit", "time_update"} <= set(resumed)


def test_kl_entropy_sign_token_norm_options_run():
    """The non-default knobs together: reference KL, entropy bonus, positive-only sign, token norm, 2 epochs."""
    trainer = _trainer("entropy", kl_coef=0.1, entropy_coef=0.01, sign="positive", norm="token", ppo_epochs=2,
                       temperature=0.7, credit_layers="all", credit_heads="all", credit_method="explicit")
    ref_before = [p.clone() for p in trainer.ref_model.parameters()]
    policy_before = [p.clone() for p in trainer.model.parameters()]
    m = trainer.step(EXAMPLES)
    assert all(torch.equal(a, b) for a, b in zip(ref_before, trainer.ref_model.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(policy_before, trainer.model.parameters()))
    assert m["kl_ref"] > 0 and math.isfinite(m["loss"]) and m["logp_gen_gap"] < 1e-4
    assert 0 < m["amplified_frac"] < 5 / 12  # ceil(q * 12) / 12 of each response with A > 0, none of the rest


@pytest.mark.parametrize("strategy", ["none", "random"])
def test_no_attention_pass_for_none_and_random(strategy, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("rhythm_signals must not run for strategy " + strategy)

    monkeypatch.setattr("rl.rhythm_signals", forbidden)
    monkeypatch.setattr("rl.rhythm_signals_from", forbidden)
    trainer = _trainer(strategy, micro_batch_size=4, ppo_epochs=2)
    m = trainer.step(EXAMPLES)
    # 16 responses / micro-batch 4 = 4 optimizer steps per epoch, 2 epochs
    assert trainer.state_dict()["optim.embed_tokens.weight.step"].item() == 8
    assert (m["amplified_frac"] > 0) == (strategy == "random")


def _count_model_calls(trainer) -> list:
    """Filled with one (what, phase, grad enabled) entry per decoder run ("decoder": model.hidden_states,
    which every forward goes through, the credit's own included) and per LM-head call ("head"), phase
    being the GRPO.step part it ran in: rollout, credit or update. generate decodes through neither."""
    calls, phase = [], ["outside"]
    model = trainer.model
    hidden_states = model.hidden_states

    def counted(*args, **kwargs):
        calls.append(("decoder", phase[0], torch.is_grad_enabled()))
        return hidden_states(*args, **kwargs)

    model.hidden_states = counted
    model.lm_head.register_forward_hook(lambda *_: calls.append(("head", phase[0], torch.is_grad_enabled())))
    for name in ("rollout", "credit", "update"):
        def in_phase(*args, _name=name, _method=getattr(trainer, name), **kwargs):
            phase[0] = _name
            try:
                return _method(*args, **kwargs)
            finally:
                phase[0] = "outside"
        setattr(trainer, name, in_phase)
    return calls


def _no_grad(calls, what, phase=None) -> int:
    return sum(1 for w, p, grad in calls if w == what and not grad and phase in (None, p))


@pytest.mark.parametrize("strategy", ["none", "coupled"])
def test_old_logp_generate_takes_the_samplers_logprobs(strategy):
    """old_logp="generate": every chunk's old log-probs are its generate-time log-probs, no forward
    runs for them, and the step equals the recomputing one up to float noise (the same policy at the
    same weights); logp_gen_gap still compares the two, on the first micro-batch."""
    recompute, generate = _trainer(strategy), _trainer(strategy, old_logp="generate")
    chunks, forwards = [], []
    accumulate, logprobs = generate._accumulate_gradient, generate._logprobs
    generate._accumulate_gradient = lambda batches, n_all: chunks.extend(batches) or accumulate(batches, n_all)
    generate._logprobs = lambda model, batch, **k: forwards.append(1) or logprobs(model, batch, **k)
    calls_a, calls_b = _count_model_calls(recompute), _count_model_calls(generate)
    a, b = recompute.step(EXAMPLES), generate.step(EXAMPLES)
    assert len(chunks) == 2 and all(c["old_logp"] is c["gen_logp"] for c in chunks)
    assert len(forwards) == len(chunks)  # only the training forwards
    # the work of the old log-probs (what time_old_logp times), counted instead of timed: with
    # "generate" the update runs no forward without gradient, only the training forwards, and the
    # whole step runs one LM head per chunk less than the recomputing step (that head gives the old
    # log-probs), and no decoder pass but the credit's own (coupled: its signals, 2 chunks of 8)
    signals = 2 if strategy == "coupled" else 0
    assert _no_grad(calls_b, "decoder", "update") == _no_grad(calls_b, "head", "update") == 0
    assert calls_b.count(("decoder", "update", True)) == calls_b.count(("head", "update", True)) == len(chunks)
    assert _no_grad(calls_b, "decoder") == _no_grad(calls_b, "decoder", "credit") == signals
    assert _no_grad(calls_a, "head") - _no_grad(calls_b, "head") == len(chunks)
    # the recomputing step's old log-probs: from the credit's forward (coupled) or a forward of its own
    assert _no_grad(calls_a, "decoder") == signals + (0 if strategy == "coupled" else len(chunks))
    assert {phase for _, phase, _ in calls_a + calls_b} <= {"credit", "update"}
    assert (a["reward_mean"], a["response_length"]) == (b["reward_mean"], b["response_length"])
    for key in ("loss", "grad_norm", "ratio_mean", "gamma_mean", "amplified_frac"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert b["logp_gen_gap"] < 1e-4 and a["logp_gen_gap"] < 1e-4


def test_credit_forward_gives_old_logprobs_and_signals():
    """The fused credit forward: old log-probs == token_logprobs and gammas == credit_gamma of
    rhythm_signals on the same micro-batches, and the update runs no second no-grad forward."""
    trainer = _trainer("coupled", temperature=0.7, micro_batch_size=4)
    cfg = trainer.config
    roll = trainer.rollout(EXAMPLES, seed=3)
    assert trainer.credit(roll, seed=4) > 0
    layers = default_layers(trainer.model.config.num_hidden_layers, cfg.credit_layers)
    kw = dict(q=cfg.q, gamma_amp=cfg.gamma_amp, k=cfg.k, alpha=cfg.alpha)
    for r0 in range(0, 16, 4):
        rows = list(range(r0, r0 + 4))
        b = build_batch([roll.prompt_ids[i] for i in rows], [roll.response_ids[i] for i in rows], pad_id=0)
        with torch.no_grad():
            logp, _ = token_logprobs(trainer.model, b["input_ids"], b["attention_mask"], b["response_mask"].shape[1],
                                     temperature=0.7)
        signals = rhythm_signals(trainer.model, b["input_ids"], b["starts"], b["attention_mask"], layers=layers,
                                 window=cfg.window, h_lo=cfg.h_lo, h_hi=cfg.h_hi)
        for j, (i, s) in enumerate(zip(rows, signals)):
            R = len(roll.response_ids[i])
            torch.testing.assert_close(roll.old_logp[i], logp[j, -R:], rtol=0, atol=1e-6)
            expected = credit_gamma("coupled", waad=s["waad"], fai=s["fai"], entropy=s["entropy"], **kw)
            assert torch.equal(roll.gammas[i], expected)

    calls = []
    forward = trainer._logprobs
    trainer._logprobs = lambda model, *args, **kwargs: calls.append(model) or forward(model, *args, **kwargs)
    m = trainer.step(EXAMPLES)
    assert len(calls) == 4 and all(model is trainer.policy for model in calls)  # 16 / 4 optimizer steps only
    assert m["logp_gen_gap"] < 1e-4 and m["time_old_logp"] > 0  # the rollout's old log-probs were used


def test_greedy_evaluate_is_deterministic():
    trainer = _trainer("none")
    r1, r2 = evaluate(trainer, EXAMPLES), evaluate(trainer, EXAMPLES)
    assert r1 == r2 and r1["accuracy"] == r1["avg_at_k"]
    with pytest.raises(ValueError, match="greedy decoding gives k identical"):
        evaluate(trainer, EXAMPLES, greedy=True, k=4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(group_size=1), "group_size must be >= 2"),
    (dict(group_size=3, rollout_batch_size=16), "multiple of group_size"),
    (dict(micro_batch_size=5), "must divide rollout_batch_size"),
    (dict(strategy="attention"), "strategy must be one of"),
    (dict(norm="batch"), "norm must be one of"),
    (dict(sign="up"), "sign must be one of"),
    (dict(min_lr_ratio=1.5), "min_lr_ratio must be in \\[0, 1\\]"),
    (dict(lr_warmup_steps=-1), "lr_warmup_steps must be >= 0"),
    (dict(grad_accum=0), r"grad_accum must be >= 1, got 0"),
    (dict(micro_batch_size=8, grad_accum=3), r"grad_accum must divide micro_batch_size \(8\)"),
    (dict(gamma_norm="sum"), "gamma_norm must be one of"),
    (dict(old_logp="cached"), "old_logp must be one of"),
    (dict(seed=-3), "seed must be >= 0, got -3"),
])
def test_config_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RLConfig(**kwargs)


def test_step_needs_prompts_per_step_examples():
    with pytest.raises(ValueError, match="needs rollout_batch_size / group_size = 4 examples"):
        _trainer("none").step(EXAMPLES[:3])


# -----------------------------------------------------------------------------
# gradient accumulation


def _last_gradients(trainer) -> dict:
    """Filled with each parameter's gradient as the trainer's last AdamW step sees it (the update
    frees the gradients when it ends)."""
    grads, step = {}, trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads.update({name: p.grad.clone() for name, p in trainer.model.named_parameters()})
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    return grads


@pytest.mark.parametrize("norm", ["sequence", "token"])
def test_grad_accum_chunks_sum_to_the_micro_batch_gradient(norm):
    """One rollout batch of 8 = one micro-batch of 8, taken whole or as 4 chunks of 2: the same
    gradient (as the last AdamW step sees it), the same AdamW step and the same logged values. Two
    PPO epochs, so the second pass runs at ratios != 1 on moved weights, with the KL and entropy
    terms on and random credit (gamma != 1). AdamW's first steps move a weight by about lr = 1e-4
    whatever the size of its gradient, so the weights agree to rounding of the normalised update
    (measured: 3e-7), and the gradients themselves to 1e-5 of their scale (measured: 2e-6)."""
    kw = dict(rollout_batch_size=8, micro_batch_size=8, norm=norm, ppo_epochs=2, lr=1e-4, kl_coef=0.1,
              entropy_coef=0.01, temperature=0.8, stop_ids=tuple(range(100, 120)))  # responses of unequal length
    whole, chunked = _trainer("random", **kw), _trainer("random", grad_accum=4, **kw)
    calls, lengths = [], []
    forward, update = chunked._logprobs, chunked.update
    chunked._logprobs = lambda model, batch, **k: calls.append(len(batch["advantages"])) or forward(model, batch, **k)
    chunked.update = lambda roll, seed: lengths.extend(map(len, roll.response_ids)) or update(roll, seed)
    grads_whole, grads_chunked = _last_gradients(whole), _last_gradients(chunked)
    a, b = whole.step(EXAMPLES[:2]), chunked.step(EXAMPLES[:2])
    assert set(calls) == {2}  # every forward of the chunked run holds 2 responses
    assert len(set(lengths)) > 2  # so token and sequence norms weigh the chunks differently
    for key in ("loss", "grad_norm", "clip_frac", "approx_kl", "ratio_mean", "kl_ref", "logp_gen_gap"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert a["clip_frac"] >= 0 and a["approx_kl"] > 0  # the second epoch moved off ratio 1
    for (name, p), q in zip(whole.model.named_parameters(), chunked.model.parameters()):
        assert (p - q).abs().max().item() <= 1e-6, name
        scale = grads_whole[name].abs().max().item()
        assert (grads_whole[name] - grads_chunked[name]).abs().max().item() <= 1e-5 * scale + 1e-12, name
    assert whole.state_dict()["optim.embed_tokens.weight.step"].item() == 2  # one AdamW step per micro-batch
    assert chunked.state_dict()["optim.embed_tokens.weight.step"].item() == 2


# -----------------------------------------------------------------------------
# gamma normalisation and the entropy strategy at a temperature


def test_normalize_gamma_mean_one_ratios_kept():
    g = torch.tensor([1.0, 1.5, 1.0, 1.5, 2.0])  # mean 7 / 5
    n = normalize_gamma(g, "mean")
    torch.testing.assert_close(n, g * 5 / 7)
    assert n.mean().item() == pytest.approx(1.0) and n[4] / n[0] == pytest.approx(2.0)
    assert normalize_gamma(g, "none") is g
    assert normalize_gamma(torch.zeros(0), "mean").shape == (0,)
    torch.testing.assert_close(normalize_gamma(torch.ones(3), "mean"), torch.ones(3))
    with pytest.raises(ValueError, match="unknown gamma_norm"):
        normalize_gamma(g, "max")


@pytest.mark.parametrize("strategy", ["random", "coupled"])
def test_gamma_norm_mean_in_the_trainer(strategy):
    plain, normed = _trainer(strategy), _trainer(strategy, gamma_norm="mean")
    ra, rb = plain.rollout(EXAMPLES, seed=3), normed.rollout(EXAMPLES, seed=3)
    plain.credit(ra, seed=4)
    normed.credit(rb, seed=4)
    assert any((g > 1).any() for g in ra.gammas)
    for ga, gb in zip(ra.gammas, rb.gammas):
        if ga.numel():
            assert gb.mean().item() == pytest.approx(1.0, rel=1e-6)
            torch.testing.assert_close(gb, ga / ga.mean())  # the same tokens weigh more, by the same ratios
    m = normed.step(EXAMPLES)
    assert math.isfinite(m["loss"]) and m["gamma_mean"] == pytest.approx(1.0, rel=1e-6)  # sign "both"


def test_entropy_credit_ranks_by_the_sampled_distribution():
    """strategy "entropy" at temperature 0.7 selects by the entropy of softmax(logits / 0.7), the
    distribution the rollout sampled (here from token_logprobs, an independent computation)."""
    trainer = _trainer("entropy", temperature=0.7, micro_batch_size=4)
    roll = trainer.rollout(EXAMPLES, seed=3)
    trainer.credit(roll, seed=4)
    b = build_batch(roll.prompt_ids, roll.response_ids, pad_id=0)
    with torch.no_grad():
        _, tempered = token_logprobs(trainer.model, b["input_ids"], b["attention_mask"], b["response_mask"].shape[1],
                                     temperature=0.7, with_entropy=True)
        _, plain = token_logprobs(trainer.model, b["input_ids"], b["attention_mask"], b["response_mask"].shape[1],
                                  with_entropy=True)
    differ = 0
    for i, gamma in enumerate(roll.gammas):
        R = len(roll.response_ids[i])
        assert torch.equal(gamma, credit_gamma("entropy", entropy=tempered[i, -R:], q=trainer.config.q))
        differ += not torch.equal(gamma, credit_gamma("entropy", entropy=plain[i, -R:], q=trainer.config.q))
    assert differ > 0  # untempered entropy would have picked other tokens


def test_train_flags_grad_accum_gamma_norm_prompts_per_step():
    from train import Parser, UsageError, add_rl_flags, add_run_flags, resolve

    def config(*argv):
        p = Parser()
        add_run_flags(p)
        add_rl_flags(p)
        return resolve(p.parse_args(["--smoke", *argv]))[1]

    rl = config("--prompts-per-step", "2", "--group-size", "8", "--grad-accum", "4", "--gamma-norm", "mean")
    assert (rl.rollout_batch_size, rl.micro_batch_size, rl.grad_accum, rl.gamma_norm) == (16, 8, 4, "mean")
    assert config().grad_accum == 1 and config().gamma_norm == "none"
    with pytest.raises(UsageError, match=r"--rollout-batch \(responses\) or --prompts-per-step \(prompts\), not"):
        config("--prompts-per-step", "4", "--rollout-batch", "16")
    with pytest.raises(UsageError, match="--prompts-per-step must be >= 1"):
        config("--prompts-per-step", "0")
    with pytest.raises(UsageError, match="--grad-accum 3: grad_accum must divide micro_batch_size"):
        config("--grad-accum", "3")

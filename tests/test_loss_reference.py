"""Which gamma reaches which token in the loss: the gradient of GRPO's first optimizer step against
an independent reference built one response at a time, unpadded.

The trainer batches responses of different lengths (left padding, right-aligned gammas, the stop
token kept in the response) and runs its own loss code (rl.policy_loss through GRPO.update). The
reference here runs none of that: for each response alone it takes the log-probs from a plain
forward over prompt + response, the gammas from that one sequence's explicit attention maps
(head_span -> group_heads -> waad / fai -> credit_gamma, PAPER.md Section 3), the advantage from
Eq. 6 by hand, and writes the paper's loss (Eq. 12-13 at ratio 1) out in full. A gamma that lands
one token off (or on the wrong response, or on padding) changes the gradient.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from attention_metrics import credit_gamma, default_layers, fai, group_heads, head_span, token_entropy, waad
from conftest import StubTokenizer, tiny_config
from model import Qwen3Config, Transformer
from rl import GRPO, RLConfig

EOS = StubTokenizer.eos_id  # 299
STOPS = tuple(range(170, 180))  # with EOS: here 5 of the 8 responses stop (at lengths 5 to 12), 3 run to 14
PROMPTS = ["1 2 3", "4 5 6 7 8 9"]  # prompts of different lengths too: padding on both sides of a row
G = 4
TEMPERATURE = 0.7                   # log-probs and entropy under softmax(logits / T), as rl.py samples
KNOBS = dict(window=4, h_lo=2, h_hi=8, q=0.4, gamma_amp=1.5, k=3, alpha=0.5)
ROLLOUT_SEED, CREDIT_SEED, ORDER_SEED = 7, 8, 9


def reward_of(tokens):
    """The stub task's reward: the share of tokens below 100 (the stop token is not part of the text)."""
    return sum(t < 100 for t in tokens) / max(len(tokens), 1)


class ShareTask:
    name = "share"

    def reward(self, text, example):
        return reward_of([int(x) for x in text.split()])

    def correct(self, text, example):
        return False


def _trainer(norm):
    torch.manual_seed(0)
    model = Transformer(Qwen3Config(**tiny_config()))  # fp32
    cfg = RLConfig(group_size=G, rollout_batch_size=G * len(PROMPTS), micro_batch_size=G * len(PROMPTS),
                   max_new_tokens=14, temperature=TEMPERATURE, stop_ids=STOPS, strategy="coupled",
                   credit_method="explicit", norm=norm, lr=1e-3, max_grad_norm=1e9,  # the clip never acts
                   **KNOBS)
    return GRPO(model, StubTokenizer(), ShareTask(), cfg)


def _reference_gamma(model, ids, start, layers):
    """gamma (R,) of one unpadded sequence from its explicit attention maps (PAPER.md Section 3)."""
    with torch.no_grad():
        logits, attn = model(ids, attn_layers=tuple(layers))
    maps = torch.cat([attn[layer][0] for layer in layers]).float()  # (L*H, N, N): the chosen layers' heads pooled
    local, global_ = group_heads(head_span(maps, start))
    a_loc, a_glob = maps[local].mean(0), maps[global_].mean(0)
    w = waad(a_loc, start, KNOBS["window"])
    f = fai(a_glob, start, KNOBS["h_lo"], KNOBS["h_hi"])
    e = token_entropy(logits[0], start, TEMPERATURE)
    return credit_gamma("coupled", waad=w, fai=f, entropy=e, q=KNOBS["q"], gamma_amp=KNOBS["gamma_amp"],
                        k=KNOBS["k"], alpha=KNOBS["alpha"])


def _reference_gradients(model, prompts, responses, rewards, norm, eps=0.2, adv_eps=1e-6):
    """Gradients of the paper's loss at ratio 1, each response alone and unpadded; and the gammas."""
    r = torch.tensor(rewards, dtype=torch.float64).view(-1, G)
    # Eq. 6 by hand: unbiased sample std (divide by G - 1), eps added to the std
    mean = r.sum(1, keepdim=True) / G
    std = ((r - mean) ** 2).sum(1, keepdim=True).div(G - 1).sqrt()
    adv = ((r - mean) / (std + adv_eps)).view(-1).float()
    layers = default_layers(model.config.num_hidden_layers, "middle")
    total_tokens = sum(len(o) for o in responses)
    model.zero_grad(set_to_none=True)
    gammas = []
    for i, (p, o) in enumerate(zip(prompts, responses)):
        ids = torch.tensor([p + o])  # one row, no padding
        start = len(p)
        gamma = _reference_gamma(model, ids, start, layers)
        gammas.append(gamma)
        logits, _ = model(ids)
        logp_all = F.log_softmax(logits[0, start - 1:-1].float() / TEMPERATURE, -1)  # row t-1 predicts token t
        logp = logp_all.gather(-1, torch.tensor(o)[:, None])[:, 0]  # (|o|,)
        ratio = torch.exp(logp - logp.detach())  # 1, with the gradient of logp
        shaped = gamma * adv[i]  # A~_t = gamma_t * A (Eq. 13)
        per_token = -torch.minimum(ratio * shaped, ratio.clamp(1 - eps, 1 + eps) * shaped)  # Eq. 12
        if norm == "sequence":  # 1/|o| per response, then the mean over the B responses
            loss = per_token.sum() / len(o) / len(responses)
        else:  # the mean over every response token of the batch
            loss = per_token.sum() / total_tokens
        loss.backward()  # summed over responses
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads, gammas, adv


@pytest.mark.parametrize("norm", ["sequence", "token"])
def test_first_step_gradient_matches_per_response_reference(norm):
    trainer = _trainer(norm)
    model, cfg = trainer.model, trainer.config
    examples = [SimpleNamespace(prompt=p, answer=None) for p in PROMPTS]

    # rl.py's path: rollout, credit (explicit maps over the padded batch), one update = one AdamW step
    roll = trainer.rollout(examples, seed=ROLLOUT_SEED)

    # the responses, independently: each prompt alone through generate with its own seed (rollout's
    # rule: response i samples with seed + i), stopping on EOS or a stop id, the stop token kept
    prompts = [[int(x) for x in p.split()] for p in PROMPTS for _ in range(G)]
    responses = [model.generate([p], cfg.max_new_tokens, temperature=TEMPERATURE, stop_ids=(EOS, *STOPS),
                                seed=[ROLLOUT_SEED + i])[0] for i, p in enumerate(prompts)]
    assert roll.response_ids == responses
    stopped = [o[-1] in (EOS, *STOPS) for o in responses]  # the stop token stays in the response (and the loss)
    assert any(stopped) and not all(stopped)  # some stopped, some ran to max_new_tokens
    assert len({len(o) for o in responses}) >= 3  # padding inside the batch
    rewards = [reward_of(o[:-1] if s else o) for o, s in zip(responses, stopped)]  # the text has no stop token

    trainer.credit(roll, seed=CREDIT_SEED)
    grads, step = {}, trainer.optimizer.step

    def recording_step(*args, **kwargs):
        assert not grads, "one optimizer step expected (rollout_batch_size == micro_batch_size)"
        grads.update({name: p.grad.clone() for name, p in model.named_parameters()})
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    stats = trainer.update(roll, seed=ORDER_SEED)
    assert stats["grad_norm"] < cfg.max_grad_norm  # clip_grad_norm_ left the gradient as it was
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-6)

    # the reference at the trainer's weights before its step
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])
    ref_grads, ref_gammas, adv = _reference_gradients(model, prompts, responses, rewards, norm)

    torch.testing.assert_close(roll.advantages, adv, rtol=1e-6, atol=1e-6)
    assert all(abs(a) > 0.1 for a in adv.tolist())  # every response carries signal
    # the same gammas (the padded batch's maps agree with each row's own maps)
    for got, expected in zip(roll.gammas, ref_gammas):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    flat = torch.cat(ref_gammas)
    assert (flat > 1).any() and (flat == 1).any()  # a gamma one token off would change the gradient
    assert sum(not torch.equal(g[1:], g[:-1]) for g in ref_gammas) >= len(ref_gammas) - 1

    # tolerance: the trainer's rows are left padded and batched (masked SDPA), the reference's are
    # not, so the two differ by float rounding only. Measured: the gradients' scale (largest entry)
    # is 0.40 (sequence) / 0.31 (token), the largest difference 2.2e-7 / 1.3e-7 absolute, so
    # atol 1e-6 leaves a 5x margin. The same reference with every gamma moved one token to the left
    # differs by 0.18 / 0.22 of the scale, 5 orders of magnitude above the tolerance.
    scale = max(g.abs().max().item() for g in ref_grads.values())
    assert scale > 0.1
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")

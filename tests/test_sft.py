"""sft.py: hand-built loss masks, a per-token reference loss, the lr schedule, and a short warm-up."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from model import Qwen3Config, Transformer
from sft import IGNORE, build_sft_batch, encode_pair, lr_at, sft_loss, warmup
from tasks import make_countdown
from tokenizer import Tokenizer


def _tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(Qwen3Config(**tiny_config(**overrides)))


def test_encode_pair_appends_eos_to_the_response_only():
    tok = Tokenizer.byte_level()
    prompt, response = encode_pair(tok, "3 4 -> 7\n", "<think>3+4=7</think>")
    assert prompt == list(b"3 4 -> 7\n")  # byte-level: ids are the bytes
    # the task markup is one token each, as GRPO's rollouts produce it
    assert response == [tok.special_tokens["<think>"], *b"3+4=7", tok.special_tokens["</think>"], tok.eos_id]


def test_loss_mask_covers_exactly_response_and_eos():
    # row 0: prompt [5, 6, 7], response [8, 9, eos=1]; row 1: prompt [5], response [4, 1], padded with 0
    input_ids, targets = build_sft_batch([([5, 6, 7], [8, 9, 1]), ([5], [4, 1])], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7, 8, 9, 1], [5, 4, 1, 0, 0, 0]]
    # position t predicts token t + 1: the last prompt position predicts the first response token
    assert targets.tolist() == [[IGNORE, IGNORE, 8, 9, 1, IGNORE], [4, 1, IGNORE, IGNORE, IGNORE, IGNORE]]


def test_sft_loss_matches_per_token_reference():
    model = _tiny_model().eval()
    pairs = [([10, 11, 12], [20, 21, 22, 1]), ([13, 14], [23, 1])]
    input_ids, targets = build_sft_batch(pairs, pad_id=0)
    with torch.no_grad():
        loss = sft_loss(model, input_ids, targets)
        terms = []
        for prompt, response in pairs:  # each row alone, unpadded, scored token by token
            row = torch.tensor([prompt + response])
            logp = F.log_softmax(model(row)[0][0].float(), dim=-1)  # (T, V)
            terms += [-logp[len(prompt) - 1 + j, token] for j, token in enumerate(response)]
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-5)


def test_right_padding_does_not_change_the_loss():
    model = _tiny_model().eval()
    pairs = [([10, 11, 12], [20, 21, 22, 1]), ([13], [23, 1])]
    with torch.no_grad():
        losses = [sft_loss(model, *build_sft_batch(pairs, pad_id=pad)) for pad in (0, 2, 299)]
    assert torch.allclose(losses[0], losses[1]) and torch.allclose(losses[0], losses[2])


def test_lr_schedule_hand_values():
    assert lr_at(0, 100, 1.0, warmup_steps=10, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, warmup_steps=10, min_lr_ratio=0.1) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, warmup_steps=10, min_lr_ratio=0.1) == pytest.approx(1.0)
    # half-way through the decay: 0.1 + 0.9 * 0.5 * (1 + cos(pi / 2))
    assert lr_at(10 + 89 / 2, 100, 1.0, warmup_steps=10, min_lr_ratio=0.1) == pytest.approx(0.55)
    assert lr_at(99, 100, 1.0, warmup_steps=10, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert math.isclose(lr_at(5, 10, 2.0, warmup_steps=0, min_lr_ratio=0.0),
                        2.0 * 0.5 * (1 + math.cos(math.pi * 5 / 9)))
    # min_lr_ratio 1 without warm-up is the paper's constant GRPO lr
    assert {lr_at(s, 50, 3.0, warmup_steps=0, min_lr_ratio=1.0) for s in range(50)} == {3.0}


def test_warmup_reduces_loss_and_is_deterministic():
    tok = Tokenizer.byte_level()
    task = make_countdown(seed=0, num_numbers=3, n_train=500, n_test=10, max_number=9, max_target=30,
                          prompt_style="compact")
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    model = _tiny_model(**small)
    losses = warmup(model, tok, task, steps=150, batch_size=16, lr=3e-3, seed=0, progress=False)
    assert len(losses) == 150
    first, last = losses[0], sum(losses[-10:]) / 10
    assert first > 4.0  # about log(300) for a random model
    assert last < 0.2 * first, (first, last)  # about 5.7 -> 0.5 in practice
    again = _tiny_model(**small)
    # the first 3 steps are inside the 20-step lr warm-up, so both runs use the same lrs there
    assert warmup(again, tok, task, steps=3, batch_size=16, lr=3e-3, seed=0, progress=False) == losses[:3]

"""attention_metrics: hand-computed small cases for every equation, the memory-lean path against
explicit maps from the model, credit_gamma against Eq. 14-19, bad input, and the pictures."""

import math
from html.parser import HTMLParser

import pytest
import torch

import attention_lean
import attention_metrics as am
import plots
from model import Qwen3Config, Transformer

# -----------------------------------------------------------------------------
# A 6-token example: prompt = positions 0, 1; response = positions 2..5 (start = 2, R = 4)

# A "local" head: every row from 1 on splits its attention between itself and its left neighbour.
LOCAL = torch.tensor([
    [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [0.5, 0.5, 0.0, 0.0, 0.0, 0.0],
    [0.0, 0.5, 0.5, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.5, 0.5, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.5, 0.5, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.5, 0.5],
])
# A "global" head: the response rows look back at token 0 and at the anchor token 2.
GLOBAL = torch.tensor([
    [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [0.5, 0.0, 0.5, 0.0, 0.0, 0.0],
    [0.5, 0.0, 0.5, 0.0, 0.0, 0.0],
    [0.5, 0.0, 0.5, 0.0, 0.0, 0.0],
    [0.25, 0.0, 0.5, 0.0, 0.0, 0.25],
])
MAPS = torch.stack([LOCAL, GLOBAL])  # (H=2, N=6, N=6)


def test_head_span_by_hand():
    # LOCAL rows 2..5: 0.5*1 + 0.5*0 = 0.5 each -> 0.5
    # GLOBAL rows 2..5: 0.5*2 = 1; 0.5*3 + 0.5*1 = 2; 0.5*4 + 0.5*2 = 3; 0.25*5 + 0.5*3 = 2.75 -> 8.75 / 4
    torch.testing.assert_close(am.head_span(MAPS, 2), torch.tensor([0.5, 2.1875]))
    # a response of one token (row 5): LOCAL 0.5, GLOBAL 2.75
    torch.testing.assert_close(am.head_span(MAPS, 5), torch.tensor([0.5, 2.75]))
    with pytest.raises(ValueError, match="at least one response token"):
        am.head_span(MAPS, 6)


def test_group_heads_sizes_and_ties():
    local, global_ = am.group_heads(torch.tensor([0.5, 2.1875]))  # round(0.3 * 2) = 1 head per group
    assert local.tolist() == [0] and global_.tolist() == [1]
    local, global_ = am.group_heads(torch.tensor([3.0]))  # one head: it is both groups
    assert local.tolist() == [0] and global_.tolist() == [0]
    spans = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])  # 0.3 * 5 = 1.5 rounds half up to 2
    local, global_ = am.group_heads(spans)
    assert local.tolist() == [1, 3] and global_.tolist() == [0, 2]
    assert am.group_size(10) == 3 and am.group_size(4) == 1 and am.group_size(36 * 5) == 54
    local, global_ = am.group_heads(torch.ones(4), frac=0.5)  # all equal: lower indices first
    assert local.tolist() == [0, 1] and global_.tolist() == [0, 1]


def test_waad_by_hand():
    # W = 2, GLOBAL: min(t - s, 2) weights; row 2: 0.5*2 + 0.5*0 = 1; row 3: 0.5*2 + 0.5*1 = 1.5;
    # row 4: 0.5*2 + 0.5*2 = 2; row 5: 0.25*2 + 0.5*2 + 0.25*0 = 1.5
    torch.testing.assert_close(am.waad(GLOBAL, 2, window=2), torch.tensor([1.0, 1.5, 2.0, 1.5]))
    # W = 10 is longer than the response: plain distances 1, 2, 3, 2.75
    torch.testing.assert_close(am.waad(GLOBAL, 2, window=10), torch.tensor([1.0, 2.0, 3.0, 2.75]))
    # the mean of the two maps: (0.5 + x) / 2 row by row
    torch.testing.assert_close(am.waad(MAPS.mean(0), 2, window=10), torch.tensor([0.75, 1.25, 1.75, 1.625]))
    torch.testing.assert_close(am.waad(GLOBAL, 5, window=2), torch.tensor([1.5]))  # R = 1
    assert am.waad(GLOBAL, 6).shape == (0,)  # R = 0


def test_fai_by_hand():
    # h_lo = 1, h_hi = 2: s=2 -> rows {3, 4}: (0.5 + 0.5) / 2 = 0.5; s=3 -> rows {4, 5}: 0;
    # s=4 -> row {5}: 0; s=5 -> no rows: undefined, NaN (project default)
    torch.testing.assert_close(am.fai(GLOBAL, 2, h_lo=1, h_hi=2), torch.tensor([0.5, 0.0, 0.0, float("nan")]),
                               equal_nan=True)
    # h_lo = 0, to the end: s=2 -> rows 2..5 all 0.5; s=3 -> 0; s=4 -> 0; s=5 -> row 5: 0.25
    torch.testing.assert_close(am.fai(GLOBAL, 2, h_lo=0, h_hi=None), torch.tensor([0.5, 0.0, 0.0, 0.25]))
    # LOCAL, h_lo = 0, h_hi = 2: s=2 -> rows 2,3,4: (0.5 + 0.5 + 0) / 3; s=3 -> rows 3,4,5: (0.5 + 0.5 + 0) / 3;
    # s=4 -> rows 4, 5 (clipped at the end): (0.5 + 0.5) / 2; s=5 -> row 5: 0.5
    torch.testing.assert_close(am.fai(LOCAL, 2, h_lo=0, h_hi=2), torch.tensor([1 / 3, 1 / 3, 0.5, 0.5]))
    # a response shorter than h_lo: every future set is empty
    assert torch.isnan(am.fai(GLOBAL, 2, h_lo=10, h_hi=100)).all()
    assert am.fai(GLOBAL, 6).shape == (0,)
    torch.testing.assert_close(am.fai(LOCAL, 5, h_lo=0, h_hi=3), torch.tensor([0.5]))  # R = 1: row 5 only


def test_token_entropy_off_by_one():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, float("-inf")]])
    # row 0: uniform over 2 -> ln 2 = 0.693147; row 1: p = (0.75, 0.25) ->
    # -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335; row 2 (never used: nothing follows it)
    torch.testing.assert_close(am.token_entropy(logits, 1), torch.tensor([0.693147, 0.562335]))
    torch.testing.assert_close(am.token_entropy(logits, 2), torch.tensor([0.562335]))
    assert am.token_entropy(logits, 3).shape == (0,)
    torch.testing.assert_close(am.token_entropy(logits[[2, 0]], 1), torch.tensor([0.0]))  # -inf logit: 0 log 0 = 0
    with pytest.raises(ValueError, match="start=0 is outside"):
        am.token_entropy(logits, 0)


def test_token_entropy_at_a_temperature_ranks_what_was_sampled():
    # row 0: two equal logits and six at -1e4: entropy ln 2 at any temperature (the rest stays ~0).
    # row 1: one logit 5 and seven at 0. At T = 1: p = e^5 / (e^5 + 7), entropy ~0.27 < ln 2;
    # at T = 2 (logits / 2): p = e^2.5 / (e^2.5 + 7), entropy ~1.37 > ln 2.
    two = torch.tensor([0.0, 0.0] + [-1e4] * 6)
    peaked = torch.tensor([5.0] + [0.0] * 7)
    logits = torch.stack([two, peaked, torch.zeros(8)])  # the last row predicts nothing in the response

    def entropy(top, rest, n_rest):  # of softmax over one logit `top` and n_rest logits `rest`
        z = math.exp(top) + n_rest * math.exp(rest)
        p, r = math.exp(top) / z, math.exp(rest) / z
        return -(p * math.log(p) + n_rest * r * math.log(r))

    at_1 = am.token_entropy(logits, 1)
    at_2 = am.token_entropy(logits, 1, temperature=2.0)
    torch.testing.assert_close(at_1, torch.tensor([math.log(2), entropy(5.0, 0.0, 7)]))
    torch.testing.assert_close(at_2, torch.tensor([math.log(2), entropy(2.5, 0.0, 7)]))
    assert entropy(5.0, 0.0, 7) < math.log(2) < entropy(2.5, 0.0, 7)
    # the entropy strategy (q = 0.5: one of two tokens) picks the other token at T = 2
    assert am.credit_gamma("entropy", entropy=at_1, q=0.5).tolist() == [1.5, 1.0]
    assert am.credit_gamma("entropy", entropy=at_2, q=0.5).tolist() == [1.0, 1.5]
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        am.token_entropy(logits, 1, temperature=0.0)


def test_signals_entropy_at_a_temperature(tiny_model, padded_batch):
    ids, mask, starts = padded_batch
    with torch.no_grad():
        logits, _ = tiny_model(ids, attention_mask=mask)
    for method in ("lean", "explicit"):
        signals = attention_lean.rhythm_signals(tiny_model, ids, starts, mask, method=method, temperature=0.5)
        for b, s in enumerate(signals):
            expected = am.token_entropy(logits[b], starts[b], temperature=0.5)
            torch.testing.assert_close(s["entropy"], expected, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(expected, am.token_entropy(logits[b], starts[b]), atol=1e-3)


def test_kurtosis_and_vertical_scores_by_hand():
    # [0, 0, 0, 1]: mean 1/4, m2 = 3/16, m4 = 21/256 -> m4 / m2^2 = 7/3 -> excess -2/3
    # [0, 1, 0, 1]: m2 = 1/4, m4 = 1/16 -> 1 -> excess -2; flat values -> NaN
    k = am.excess_kurtosis(torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]]))
    torch.testing.assert_close(k[:2], torch.tensor([-2 / 3, -2.0]))
    assert math.isnan(k[2])
    # band = 1: GLOBAL s=2 -> rows 3..5: 0.5; s=3 -> rows 4, 5: 0; s=4 -> row 5: 0; s=5 has no row
    # LOCAL s=2 -> (0.5 + 0 + 0) / 3; s=3 -> (0.5 + 0) / 2; s=4 -> 0.5
    torch.testing.assert_close(am.vertical_scores(MAPS, 2, band=1),
                               torch.tensor([[1 / 6, 0.25, 0.5], [0.5, 0.0, 0.0]]))


def test_receiver_heads_pick_the_anchor_head():
    n = 8
    uniform = torch.ones(n, n).tril() / torch.arange(1, n + 1)[:, None]
    local = 0.5 * torch.eye(n) + 0.5 * torch.eye(n).roll(-1, dims=1).tril()
    local[0, 0] = 1.0
    anchor = 0.1 * torch.eye(n)  # from row 1 on: 0.9 on key 1, 0.1 on itself
    anchor[1:, 1] += 0.9
    anchor[0, 0], anchor[1, 1] = 1.0, 1.0
    heads, kurt = am.receiver_heads(torch.stack([uniform, local, anchor]), 0, top_k=2, band=1)
    # anchor, band 1: vertical scores (0, 0.9, 0, 0, 0, 0, 0): one spike among n = 7 values has
    # Pearson kurtosis (n^2 - 3n + 3) / (n - 1) = 31 / 6, excess 13 / 6
    torch.testing.assert_close(kurt[2], torch.tensor(13 / 6))
    assert heads[0].item() == 2 and kurt[2] > kurt[0] and kurt[2] > kurt[1]


# -----------------------------------------------------------------------------
# Credit assignment


def test_top_q_rounding_and_ties():
    x = torch.tensor([0.3, 0.1, 0.3, 0.3, 0.0])
    assert am.top_q(x, 0.4).nonzero().flatten().tolist() == [0, 2]  # ceil(2.0) = 2, earlier tie wins
    assert am.top_q(x, 0.4, bottom=True).nonzero().flatten().tolist() == [1, 4]
    assert am.top_q(torch.arange(10.0), 0.7).sum() == 7  # ceil(0.7 * 10) is 7 despite float error
    assert am.top_q(x, 0.01).sum() == 1 and am.top_q(x, 0.0).sum() == 0 and am.top_q(x, 1.0).all()
    assert am.top_q(torch.ones(5), 0.4).nonzero().flatten().tolist() == [0, 1]  # all equal: the earliest


NAN = float("nan")


def test_top_q_leaves_undefined_scores_out_and_counts_q_over_the_defined():
    x = torch.tensor([NAN, 0.5, 0.1, NAN, 0.3, 0.1])  # 4 defined: ceil(0.4 * 4) = 2
    assert am.top_q(x, 0.4).nonzero().flatten().tolist() == [1, 4]
    assert am.top_q(x, 0.4, bottom=True).nonzero().flatten().tolist() == [2, 5]  # not the NaNs
    assert am.top_q(x, 1.0).nonzero().flatten().tolist() == [1, 2, 4, 5]
    assert am.top_q(x, 0.5, bottom=True).nonzero().flatten().tolist() == [2, 5]  # ceil(2.0): tie 0.1, 0.1
    assert not am.top_q(torch.full((3,), NAN), 1.0).any()


def test_bottom_q_never_selects_the_undefined_tail():
    # FAI of GLOBAL with h_lo = 1, h_hi = 2 is (0.5, 0, 0, undefined): the old placeholder 0 at the
    # last token would have been a bottom pick; now ceil(0.4 * 3) = 2 of the 3 defined, ties early
    fai = am.fai(GLOBAL, 2, h_lo=1, h_hi=2)
    torch.testing.assert_close(am.credit_gamma("global", fai=fai, bottom=True), torch.tensor([1.0, 1.5, 1.5, 1.0]))
    torch.testing.assert_close(am.credit_gamma("global", fai=fai), torch.tensor([1.5, 1.5, 1.0, 1.0]))
    # local: Delta = (4, 3, 4, 3, undefined); the last token (formerly Delta 0) is never chosen
    waad = torch.tensor([1.0, 5.0, 2.0, 6.0, 3.0])
    torch.testing.assert_close(am.credit_gamma("local", waad=waad, bottom=True), torch.tensor([1, 1.5, 1, 1.5, 1]))
    # entropy and random are defined everywhere: the last token can be chosen
    torch.testing.assert_close(am.credit_gamma("entropy", entropy=torch.arange(5.0), q=0.2),
                               torch.tensor([1, 1, 1, 1, 1.5]))
    # coupled, bottom: T_glob from the defined FAI only; T_loc never holds the last token, and
    # tau_Delta (the smallest Delta of T_loc) is a real Delta, not a placeholder 0
    waad = torch.tensor([0.0, 1.0, 3.0, 6.0, 10.0, 15.0])  # Delta = (1, 2, 3, 4, 5, undefined)
    fai = torch.tensor([0.3, 0.1, 0.2, 0.4, NAN, NAN])
    sel = am.coupled_selection(waad, fai, q=0.4, bottom=True)
    assert sel["t_loc"].nonzero().flatten().tolist() == [0, 1]  # ceil(0.4 * 5) = 2 lowest: Delta 1, 2
    assert am.waad_deltas(waad)[sel["t_loc"]].min() == 1.0  # tau_Delta = 1 (with the placeholder: 0)
    assert sel["t_glob"].nonzero().flatten().tolist() == [1, 2]  # ceil(0.4 * 4) = 2 lowest defined FAI
    # 1: WAAD 1 <= tau_waad 3, window {0} Delta 1 >= 1 -> dominated, intro 0; 2: WAAD 3 <= 3,
    # window {0, 1} max Delta 2 (at 1) -> dominated, intro 1
    assert sel["dominated"].nonzero().flatten().tolist() == [1, 2]
    assert sel["intro"].nonzero().flatten().tolist() == [0, 1]


def test_signals_carry_undefined_fai_and_credit_never_selects_it(tiny_model, padded_batch):
    ids, mask, starts = padded_batch
    for method in ("lean", "explicit"):
        for s in attention_lean.rhythm_signals(tiny_model, ids, starts, mask, window=3, h_lo=4, h_hi=9, method=method,
                                   receivers=True):
            R = s["fai"].numel()
            undefined = torch.arange(R) >= R - 4  # T(s) = [s + 4, s + 9] is empty for the last 4 tokens
            assert torch.equal(torch.isnan(s["fai"]), undefined) and torch.equal(torch.isnan(s["fai_receiver"]),
                                                                                undefined)
            assert torch.isfinite(s["waad"]).all() and torch.isfinite(s["entropy"]).all()
            for strategy in ("global", "coupled"):
                for bottom in (False, True):
                    g = am.credit_gamma(strategy, waad=s["waad"], fai=s["fai"], entropy=s["entropy"], bottom=bottom)
                    if strategy == "global":
                        assert (g[undefined] == 1).all() and (g > 1).sum() == math.ceil(0.4 * (R - 4) - 1e-9)
                    else:  # the last token is neither an anchor nor (Delta undefined) a preplan token
                        assert g[-1] == 1.0
            g = am.credit_gamma("local", waad=s["waad"], bottom=True)
            assert g[-1] == 1.0 and (g > 1).sum() == math.ceil(0.4 * (R - 1) - 1e-9)


def test_credit_gamma_coupled_all_equal():
    # all-equal WAAD: Delta = 0 everywhere, T_loc = {0, 1}, tau_Delta = 0, tau_waad = 3;
    # all-equal FAI: T_glob = {0, 1}. Anchor 1: WAAD 3 <= 3 and window {0} has Delta 0 >= 0 ->
    # dominated with intro 0; anchor 0 has no window. So 0: 1.5 + 0.25, 1: 1.25.
    g = am.credit_gamma("coupled", torch.full((5,), 3.0), torch.full((5,), 0.2))
    torch.testing.assert_close(g, torch.tensor([1.75, 1.25, 1.0, 1.0, 1.0]))


def test_credit_gamma_single_set_strategies():
    waad = torch.tensor([1.0, 5.0, 5.0, 2.0, 2.0])  # Delta = (4, 0, 3, 0), last undefined
    torch.testing.assert_close(am.waad_deltas(waad), torch.tensor([4.0, 0.0, 3.0, 0.0, float("nan")]), equal_nan=True)
    g = am.credit_gamma("local", waad=waad)  # ceil(0.4 * 4) = 2 of the 4 defined: Delta 4 (t0), 3 (t2)
    torch.testing.assert_close(g, torch.tensor([1.5, 1.0, 1.5, 1.0, 1.0]))
    g = am.credit_gamma("local", waad=waad, bottom=True)  # lowest Delta: zeros at t1, t3
    torch.testing.assert_close(g, torch.tensor([1.0, 1.5, 1.0, 1.5, 1.0]))
    fai = torch.tensor([0.3, 0.1, 0.3, 0.3, 0.0])
    torch.testing.assert_close(am.credit_gamma("global", fai=fai, gamma_amp=2.0),
                               torch.tensor([2.0, 1.0, 2.0, 1.0, 1.0]))
    torch.testing.assert_close(am.credit_gamma("entropy", entropy=fai, q=0.6), torch.tensor([1.5, 1, 1.5, 1.5, 1]))
    torch.testing.assert_close(am.credit_gamma("none", fai=fai), torch.ones(5))
    torch.testing.assert_close(am.credit_gamma("global", fai=fai, q=0.0), torch.ones(5))
    torch.testing.assert_close(am.credit_gamma("global", fai=fai, q=1.0), torch.full((5,), 1.5))
    assert am.credit_gamma("coupled", waad=torch.zeros(0), fai=torch.zeros(0)).shape == (0,)
    torch.testing.assert_close(am.credit_gamma("coupled", waad=torch.ones(1), fai=torch.ones(1)),
                               torch.tensor([1.5]))  # one token: an anchor that cannot be dominated


def test_credit_gamma_random_is_seeded():
    fai = torch.zeros(10)
    g1 = am.credit_gamma("random", fai=fai, generator=torch.Generator().manual_seed(3))
    g2 = am.credit_gamma("random", fai=fai, generator=torch.Generator().manual_seed(3))
    assert torch.equal(g1, g2) and (g1 == 1.5).sum() == 4 and (g1 == 1.0).sum() == 6


# waad (tau_waad = lower median of 1,1,2,7,7,8,8,8 = 7) and Delta = (6, 6, 0, 7, 0, 6, 0, undefined):
# T_loc = top ceil(0.4 * 7) = 3 of Delta = {3, 0, 1}, tau_Delta = 6.
COUPLED_WAAD = torch.tensor([8.0, 2.0, 8.0, 8.0, 1.0, 1.0, 7.0, 7.0])
# T_glob = top 4 of FAI = {0, 3, 4, 6}
COUPLED_FAI = torch.tensor([0.9, 0.1, 0.2, 0.8, 0.7, 0.3, 0.6, 0.0])


def test_coupled_selection_sets():
    sel = am.coupled_selection(COUPLED_WAAD, COUPLED_FAI)
    # anchor 0: empty window -> not dominated; anchor 3: WAAD 8 > 7 -> not dominated;
    # anchor 4: WAAD 1, window {1,2,3} Delta (6,0,7) max 7 >= 6 -> dominated, intro 3;
    # anchor 6: WAAD 7, window {3,4,5} Delta (7,0,6) -> dominated, intro 3 (shared)
    assert sel["t_loc"].nonzero().flatten().tolist() == [0, 1, 3]
    assert sel["t_glob"].nonzero().flatten().tolist() == [0, 3, 4, 6]
    assert sel["dominated"].nonzero().flatten().tolist() == [4, 6]
    assert sel["intro"].nonzero().flatten().tolist() == [3]


def test_credit_gamma_coupled_by_hand():
    # bonus = gamma_amp - 1 = 1, alpha = 0.3: plain anchor 0 -> 2; dominated anchors 4, 6 keep
    # (1 - alpha) -> 1.7; token 3 is an anchor (+1) and the intro of both 4 and 6 (+alpha once) -> 2.3
    g = am.credit_gamma("coupled", COUPLED_WAAD, COUPLED_FAI, gamma_amp=2.0, alpha=0.3)
    torch.testing.assert_close(g, torch.tensor([2.0, 1.0, 1.0, 2.3, 1.7, 1.0, 1.7, 1.0]))
    # defaults (gamma_amp 1.5, alpha 0.5): 1.5 / 1.75 / 1.25
    g = am.credit_gamma("coupled", COUPLED_WAAD, COUPLED_FAI)
    torch.testing.assert_close(g, torch.tensor([1.5, 1.0, 1.0, 1.75, 1.25, 1.0, 1.25, 1.0]))


def test_credit_gamma_coupled_intro_ties_to_latest():
    # Delta = (4, 4, 4, 4, 0, undefined); q = 0.5 -> ceil(2.5) = 3 tokens; T_loc = {0, 1, 2}, tau_Delta = 4; tau_waad =
    # lower median of (0,0,0,0,4,4) = 0. T_glob = {4, 5, 0} (FAI 1, 0.5, then the earliest 0).
    # Anchor 4: window {1,2,3} all 4 -> intro = latest = 3; anchor 5: window {2,3,4} = (4,4,0) -> 3.
    waad = torch.tensor([0.0, 4.0, 0.0, 4.0, 0.0, 0.0])
    fai = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 0.5])
    g = am.credit_gamma("coupled", waad, fai, q=0.5)
    torch.testing.assert_close(g, torch.tensor([1.5, 1.0, 1.0, 1.25, 1.25, 1.25]))


def test_credit_gamma_coupled_bottom():
    # bottom: T_loc = 3 lowest defined Delta = {2, 4, 6}, tau_Delta = 0; T_glob = 4 lowest FAI = {7, 1, 2, 5}.
    # 1: WAAD 2 <= 7, window {0} -> dominated, intro 0; 2: WAAD 8 > 7 -> plain anchor;
    # 5: WAAD 1, window {2,3,4} Delta (0,7,0) -> intro 3; 7: WAAD 7, window {4,5,6} (0,6,0) -> intro 5.
    # 5 is dominated (0.25) and the intro of 7 (0.25) -> 1.5
    g = am.credit_gamma("coupled", COUPLED_WAAD, COUPLED_FAI, bottom=True)
    torch.testing.assert_close(g, torch.tensor([1.25, 1.25, 1.5, 1.25, 1.0, 1.5, 1.0, 1.25]))


def test_credit_gamma_bad_input():
    with pytest.raises(ValueError, match="unknown credit strategy 'loud'"):
        am.credit_gamma("loud", waad=torch.ones(3))
    with pytest.raises(ValueError, match="got lengths waad=3, fai=4"):
        am.credit_gamma("coupled", waad=torch.ones(3), fai=torch.ones(4))
    with pytest.raises(ValueError, match=r"credit_gamma\('coupled'\) needs fai"):
        am.credit_gamma("coupled", waad=torch.ones(3))
    with pytest.raises(ValueError, match="needs one of waad, fai, entropy"):
        am.credit_gamma("none")
    with pytest.raises(ValueError, match=r"q must be a number in \[0, 1\]"):
        am.credit_gamma("global", fai=torch.ones(3), q=1.5)
    with pytest.raises(ValueError, match="fai must be finite"):
        am.credit_gamma("global", fai=torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match=r"waad must be finite \(no inf or NaN\)"):
        am.credit_gamma("local", waad=torch.tensor([1.0, float("nan")]))


# -----------------------------------------------------------------------------
# Peaks and coupling statistics


def test_find_peaks():
    x = torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0, 5.0, 0.0, 4.0])
    # local maxima (x_t > left, x_t >= right, ends against -inf): 1 (3), 4 (5), 7 (4)
    # top 20%: ceil(1.6) = 2 -> threshold = 2nd largest = 5 -> only 4
    assert am.find_peaks(x).tolist() == [4]
    assert am.find_peaks(x, top_frac=0.5).tolist() == [1, 4, 7]  # threshold = 4th largest = 3
    assert am.find_peaks(torch.full((3,), 2.0)).tolist() == [0]  # a flat signal: its left edge
    assert am.find_peaks(torch.tensor([7.0])).tolist() == [0]
    assert am.find_peaks(torch.zeros(0)).tolist() == []
    # undefined entries are never peaks and count as -inf neighbours; the top 20% is of the defined
    x = torch.tensor([1.0, 3.0, 2.0, 5.0, NAN, 4.0, NAN])  # maxima 1 (3), 3 (5), 5 (4); ceil(0.2 * 5) = 1
    assert am.find_peaks(x).tolist() == [3]
    assert am.find_peaks(x, top_frac=0.6).tolist() == [1, 3, 5]  # 3rd largest defined = 3
    assert am.find_peaks(torch.full((2,), NAN)).tolist() == []


def test_coupling_stats_by_hand():
    a = dict(waad=torch.tensor([1.0, 5, 1, 1, 1, 1, 1, 1]),  # WAAD peak {1}
             entropy=torch.arange(1.0, 9.0),  # entropy at it: 2
             fai_global=torch.tensor([1.0, 2, 3, 9, 1, 1, 1, 1]),  # global peak {3}
             fai_receiver=torch.tensor([1.0, 2, 3, 9, 1, 1, 8, 1]))  # receiver peaks {3, 6}
    b = dict(waad=torch.tensor([1.0, 1, 1, 1, 6]),  # WAAD peak {4}
             entropy=torch.tensor([0.0, 0, 0, 0, 10]),  # entropy at it: 10
             fai=torch.tensor([7.0, 1, 1, 1, 1]),  # global peak {0} ("fai" stands for "fai_global")
             fai_receiver=torch.tensor([1.0, 1, 1, 1, 2]))  # receiver peak {4}
    stats = am.coupling_stats([a, b], num_shuffles=4000)
    e = stats["entropy_at_waad_peaks"]  # (2 + 10) / 2 = 6 vs (36 + 10) / 13; lift = 32 / 46
    assert e["count"] == 2
    assert e["observed"] == pytest.approx(6.0) and e["random"] == pytest.approx(46 / 13)
    assert e["lift"] == pytest.approx(32 / 46)
    r = stats["receiver_peaks_in_global"]  # 1 of 3 receiver peaks vs 2 global peaks / 13 tokens
    assert r["count"] == 3 and r["observed"] == pytest.approx(1 / 3) and r["random"] == pytest.approx(2 / 13)
    assert r["lift"] == pytest.approx(7 / 6)
    f = stats["fai_peaks_after_waad"]  # a: 3 - 1 = 2 <= 3 hit; b: 0 is before 4, miss -> 1 / 2
    # shuffled: one random peak in a hits {1,2,3,4} (4 of 8), in b hits {4} (1 of 5) -> (0.5 + 0.2) / 2
    assert f["count"] == 2 and f["observed"] == pytest.approx(0.5)
    assert f["random"] == pytest.approx(0.35, abs=0.02)
    again = am.coupling_stats([a, b], num_shuffles=4000)
    assert again["fai_peaks_after_waad"]["random"] == f["random"]  # seeded
    with pytest.raises(ValueError, match="record 0 lacks fai_receiver"):
        am.coupling_stats([dict(waad=torch.ones(2), fai=torch.ones(2), entropy=torch.ones(2))])
    with pytest.raises(ValueError, match="record 0: waad, fai_global, fai_receiver and entropy must have equal"):
        am.coupling_stats([dict(a, entropy=torch.ones(3))])


def test_coupling_baselines_use_the_tokens_whose_fai_is_defined():
    # 8 tokens, FAI undefined on the last 4 (empty T(s)). WAAD peak {1}; global FAI peak {2}
    # (ceil(0.2 * 4) = 1 of the 4 defined); receiver peak {2}.
    rec = dict(waad=torch.tensor([1.0, 5, 1, 1, 1, 1, 1, 1]), entropy=torch.ones(8),
               fai_global=torch.tensor([1.0, 2, 3, 1, NAN, NAN, NAN, NAN]),
               fai_receiver=torch.tensor([0.0, 1, 4, 2, NAN, NAN, NAN, NAN]))
    stats = am.coupling_stats([rec], num_shuffles=2000)
    r = stats["receiver_peaks_in_global"]  # 1 of 1 receiver peaks vs 1 global peak among 4 eligible tokens
    assert r["observed"] == 1.0 and r["random"] == pytest.approx(1 / 4)
    f = stats["fai_peaks_after_waad"]  # peak 2 is 1 after WAAD peak 1: hit. Shuffled among tokens 0..3:
    assert f["observed"] == 1.0  # near = {1, 2, 3, 4}, so 3 of the 4 eligible positions hit -> 0.75
    assert f["random"] == pytest.approx(0.75, abs=0.03)  # (over all 8 tokens it would be 4 / 8 = 0.5)


# -----------------------------------------------------------------------------
# Bad maps and bad starts


def test_maps_must_be_causal_row_stochastic_and_start_inside():
    with pytest.raises(ValueError, match="not row-stochastic"):
        am.waad(LOCAL * 0.9, 2)
    with pytest.raises(ValueError, match="not causal"):
        am.fai(LOCAL.T.contiguous() / LOCAL.T.sum(-1, keepdim=True), 2)
    with pytest.raises(ValueError, match=r"start=7 is outside the sequence: expected 0 <= start <= 6"):
        am.head_span(MAPS, 7)
    with pytest.raises(ValueError, match="start=-1 is outside"):
        am.waad(LOCAL, -1)
    with pytest.raises(ValueError, match="square attention map"):
        am.head_span(MAPS[:, :, :5], 2)
    with pytest.raises(ValueError, match=r"h_hi must be None or an int >= h_lo \(10\)"):
        am.fai(LOCAL, 2, h_lo=10, h_hi=5)


def test_default_layers():
    assert am.default_layers(36) == [12, 15, 18, 21, 24]  # floor(36/3) .. floor(72/3), five evenly spaced
    assert am.default_layers(28) == [9, 11, 14, 16, 18]  # 9 + (0, 2.25, 4.5, 6.75, 9) rounded half up
    assert am.default_layers(36, "all") == [0, 9, 18, 26, 35]
    assert am.default_layers(36, "top") == [24, 27, 30, 32, 35]
    assert am.default_layers(36, "bottom") == [0, 3, 6, 9, 12]
    assert am.default_layers(6) == [2, 3, 4]  # a band of three layers: all of them
    assert am.default_layers(1, "top") == [0]
    with pytest.raises(ValueError, match="unknown layer choice 'middle-ish'"):
        am.default_layers(12, "middle-ish")


# -----------------------------------------------------------------------------
# The model paths


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    model = Transformer(config).eval()
    with torch.no_grad():  # sharper, varied attention than the all-ones norms of a fresh model
        for block in model.layers:
            block.self_attn.q_norm.weight.copy_(2.0 + 0.5 * torch.randn(16))
            block.self_attn.k_norm.weight.copy_(2.0 + 0.5 * torch.randn(16))
    return model


@pytest.fixture(scope="module")
def padded_batch():
    torch.manual_seed(1)
    T = 48
    ids = torch.randint(0, 300, (3, T))
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :17] = 0
    return ids, mask, [20, 30, 40]  # response lengths 28, 18, 8 (row 2 is shorter than h_lo + W)


def small_tiles(monkeypatch, model, rows):
    """Force row tiles of `rows` rows and 5-row logits chunks so the tests cross tile boundaries."""
    H = model.config.num_attention_heads
    monkeypatch.setattr(attention_lean, "TILE_BYTES", 4 * H * 48 * rows)
    monkeypatch.setattr(attention_lean, "LOGIT_CHUNK_BYTES", 4 * model.config.vocab_size * 5)


SIGNALS = ("waad", "fai", "entropy", "spans", "fai_receiver", "receiver_kurtosis")
GROUPS = ("local_heads", "global_heads", "receiver_heads")


@pytest.mark.parametrize("kwargs", [dict(), dict(h_hi=None), dict(heads="all"),
                                    dict(layers=[0, 5], window=3, h_lo=0, h_hi=7)])
def test_lean_matches_explicit(tiny_model, padded_batch, monkeypatch, kwargs):
    ids, mask, starts = padded_batch
    small_tiles(monkeypatch, tiny_model, rows=7)
    lean = attention_lean.rhythm_signals(tiny_model, ids, starts, mask, receivers=True, **kwargs)
    explicit = attention_lean.rhythm_signals(tiny_model, ids, starts, mask, receivers=True, method="explicit", **kwargs)
    for row, (a, b) in enumerate(zip(lean, explicit)):
        assert a["waad"].shape == (ids.size(1) - starts[row],)
        for key in SIGNALS:
            rtol = 1e-3 if key == "receiver_kurtosis" else 1e-5  # a ratio of 4th moments of tiny scores
            torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=1e-5, equal_nan=True, msg=key)
        for key in GROUPS:
            assert torch.equal(a[key], b[key]), key
        assert a["layers"] == b["layers"]


def test_lean_matches_maps_of_the_model(tiny_model, padded_batch, monkeypatch):
    """Rebuild row 1 from model(..., attn_layers=...) maps with the public Eq. functions."""
    ids, mask, starts = padded_batch
    small_tiles(monkeypatch, tiny_model, rows=1)
    lean = attention_lean.rhythm_signals(tiny_model, ids, starts, mask, receivers=True)[1]
    layers = am.default_layers(tiny_model.config.num_hidden_layers)
    assert lean["layers"] == layers == [2, 3, 4]
    with torch.no_grad():
        logits, attn = tiny_model(ids, attn_layers=tuple(layers), attention_mask=mask)
    maps = torch.cat([attn[layer][1] for layer in layers])  # (3 * 4, T, T)
    start = starts[1]
    spans = am.head_span(maps, start)
    local, global_ = am.group_heads(spans)
    receivers, _ = am.receiver_heads(maps, start)
    H = tiny_model.config.num_attention_heads
    assert [(layers[i // H], i % H) for i in local.tolist()] == [tuple(p) for p in lean["local_heads"].tolist()]
    assert [(layers[i // H], i % H) for i in receivers.tolist()] == [tuple(p) for p in lean["receiver_heads"].tolist()]
    torch.testing.assert_close(lean["spans"], spans, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lean["waad"], am.waad(maps[local].mean(0), start), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lean["fai"], am.fai(maps[global_].mean(0), start), rtol=1e-5, atol=1e-5,
                               equal_nan=True)
    torch.testing.assert_close(lean["fai_receiver"], am.fai(maps[receivers].mean(0), start), rtol=1e-5, atol=1e-5,
                               equal_nan=True)
    torch.testing.assert_close(lean["entropy"], am.token_entropy(logits[1], start), rtol=1e-5, atol=1e-5)


def test_signals_from_a_callers_forward_equal_rhythm_signals(tiny_model, padded_batch):
    """rhythm_signals_from on the outputs of the caller's hidden_states call == rhythm_signals, exactly."""
    ids, mask, starts = padded_batch
    layers = [1, 3, 4]
    expected = attention_lean.rhythm_signals(tiny_model, ids, starts, mask, layers=layers, receivers=True)
    with torch.no_grad():
        h, _, qk = tiny_model.hidden_states(ids, attention_mask=mask, qk_layers=tuple(layers))
    got = attention_lean.rhythm_signals_from(tiny_model, h, qk, ids, starts, mask, layers=layers, receivers=True)
    for a, b in zip(got, expected):
        for key in SIGNALS + GROUPS:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True, msg=key)
    with torch.no_grad():
        h, _, qk = tiny_model.hidden_states(ids, attention_mask=mask, qk_layers=(1, 3))
    with pytest.raises(ValueError, match=r"qk lacks layers \[4\]"):
        attention_lean.rhythm_signals_from(tiny_model, h, qk, ids, starts, mask, layers=layers)


def test_padded_row_equals_the_row_alone(tiny_model, padded_batch):
    ids, mask, starts = padded_batch
    batch = attention_lean.rhythm_signals(tiny_model, ids, starts, mask)
    alone = attention_lean.rhythm_signals(tiny_model, ids[2:, 17:], [starts[2] - 17])[0]
    for key in ("waad", "fai", "entropy", "spans"):
        torch.testing.assert_close(batch[2][key], alone[key], rtol=1e-5, atol=1e-5, equal_nan=True, msg=key)


def test_empty_and_one_token_responses(tiny_model):
    ids = torch.randint(0, 300, (2, 12))
    out = attention_lean.rhythm_signals(tiny_model, ids, [12, 11])
    assert out[0]["waad"].shape == out[0]["fai"].shape == out[0]["entropy"].shape == (0,)
    assert out[0]["local_heads"].shape == (0, 2) and torch.isnan(out[0]["spans"]).all()
    assert out[1]["waad"].shape == (1,) and torch.isnan(out[1]["fai"]).all()  # T(s) empty: undefined
    explicit = attention_lean.rhythm_signals(tiny_model, ids, [12, 11], method="explicit")
    torch.testing.assert_close(out[1]["waad"], explicit[1]["waad"], rtol=1e-5, atol=1e-5)


def test_rhythm_signals_bad_input(tiny_model, padded_batch):
    ids, mask, starts = padded_batch
    with pytest.raises(ValueError, match=r"starts\[1\]=5 is outside the sequence: expected 6 <= starts\[1\] <= 48"):
        attention_lean.rhythm_signals(tiny_model, ids, [20, 5, 40], mask)
    with pytest.raises(ValueError, match=r"starts\[0\]=49 is outside"):
        attention_lean.rhythm_signals(tiny_model, ids, [49, 30, 40], mask)
    with pytest.raises(ValueError, match="one entry per row of input_ids"):
        attention_lean.rhythm_signals(tiny_model, ids, [20, 30], mask)
    with pytest.raises(ValueError, match="left padding only"):
        attention_lean.rhythm_signals(tiny_model, ids, starts, mask.flip(-1))
    with pytest.raises(ValueError, match="heads must be 'targeted' or 'all'"):
        attention_lean.rhythm_signals(tiny_model, ids, starts, mask, heads="some")
    with pytest.raises(ValueError, match="method must be 'lean' or 'explicit'"):
        attention_lean.rhythm_signals(tiny_model, ids, starts, mask, method="fast")
    with pytest.raises(ValueError, match=r"layers must be a non-empty list of indices in \[0, 6\)"):
        attention_lean.rhythm_signals(tiny_model, ids, starts, mask, layers=[7])


# -----------------------------------------------------------------------------
# Pictures


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.text, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_plot_and_html_files(tiny_model, tmp_path):
    torch.manual_seed(2)
    ids = torch.randint(0, 300, (40,))
    start = 15
    signals = attention_lean.rhythm_signals(tiny_model, ids[None], [start], receivers=True)[0]
    maps = plots.aggregated_maps(tiny_model, ids, start, region="all", max_positions=30)
    assert maps["local"].shape == (30, 30) and maps["offset"] == 10
    with torch.no_grad():
        _, attn = tiny_model(ids[None], attn_layers=tuple(signals["layers"]))
    expected = torch.stack([attn[layer][0, head] for layer, head in signals["global_heads"].tolist()]).mean(0)
    torch.testing.assert_close(maps["global"], expected[10:, 10:], rtol=1e-5, atol=1e-6)
    tokens = [f"w{i}" for i in range(25)]
    tokens[3] = "<b>&\n"
    png = tmp_path / "rhythm.png"
    plots.plot_rhythm(png, signals, tokens, maps, title="tiny")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = tmp_path / "rhythm.html"
    plots.render_html(page, tokens, signals)
    text = page.read_text()
    parser = _Collect()
    parser.feed(text)
    assert "&lt;b&gt;&amp;" in text and "<b>&" not in text
    assert "w24" in "".join(parser.text) and parser.tags.count("span") >= 3 * 25
    with pytest.raises(ValueError, match="tokens has 3 entries but the response has 25 tokens"):
        plots.render_html(page, tokens[:3], signals)


def test_eq18_and_eq19_by_hand():
    """locally_dominated (Eq. 18), coupled_gamma (Eq. 19) and amplify (Eq. 15/17) on a case worked by
    hand: Delta = [5, 4, 0, 5, 4, NaN], T_loc = {0, 3} (tau_Delta 5), tau_waad = lower median = 1;
    anchor 2 (WAAD 1, Delta 5 at 0 in its window) is dominated with intro 0; anchor 5 (WAAD 2) is not."""
    w = torch.tensor([0.0, 5, 1, 1, 6, 2])
    delta = am.waad_deltas(w)
    t_loc = am.top_q(delta, 0.4)
    assert t_loc.tolist() == [True, False, False, True, False, False]
    assert am.amplify(t_loc, 1.5).tolist() == [1.5, 1, 1, 1.5, 1, 1]
    t_glob = torch.tensor([False, False, True, False, False, True])
    dominated, intro = am.locally_dominated(w, delta, t_glob, t_loc, k=3)
    assert dominated.tolist() == [False, False, True, False, False, False]
    assert intro.tolist() == [True, False, False, False, False, False]
    gamma = am.coupled_gamma(t_glob, dominated, intro, gamma_amp=1.5, alpha=0.5)
    assert gamma.tolist() == [1.25, 1, 1.25, 1, 1, 1.5]

"""Section 4 of the paper: attention metrics (head span, WAAD, FAI, receiver heads), the Table-2
coupling statistics and the Section 5 credit factors gamma (pictures of them: plots.py).

Read it top to bottom:
  1. project defaults (every decision the paper leaves open, written here once),
  2. the paper's equations as plain functions of explicit attention maps (H, N, N) or (N, N):
     head_span (Eq. 7), group_heads (Eq. 8), waad (Eq. 9), fai (Eq. 10), receiver heads,
  3. credit assignment: waad_deltas (Eq. 14), top_q and amplify (Eq. 15-17), locally_dominated
     (Eq. 18), coupled_gamma (Eq. 19), and credit_gamma, which every strategy goes through,
  4. peaks and the Table-2 coupling statistics,
  5. explicit_signals: all of it from one model's explicit maps, the reference that
     attention_lean.py (the tiled path GRPO runs, no N x N map per head) is tested against.

One sequence = prompt followed by response; the response starts at index `start` and runs to the
end. R = N - start is the response length; every token-level metric has one entry per response token.

Project defaults (PAPER.md "Project default" lines, plus the decisions taken in this file):
  - Undefined scores are NaN and take part in no selection. FAI_s is NaN where its future set T(s)
    is empty (the last H_lo response tokens; this replaces PAPER.md's earlier "FAI_s = 0" default,
    whose placeholder zeros always won a bottom-q selection), and so is receiver FAI. Delta of the
    last response token is NaN (it has no successor). WAAD and entropy are defined on every token,
    so the entropy and random strategies select among all R tokens.
  - TopQ selects ceil(q * R_def) of the R_def tokens whose score is defined (with a 1e-9 float
    tolerance, so ceil(0.4 * 5) = 2), highest scores first, ties toward the earlier position;
    bottom=True takes the lowest, ties again toward the earlier position.
  - Delta_t = |WAAD_t - WAAD_{t+1}| (Eq. 14).
  - Coupled credit: tau_waad = lower median of the response's WAAD (torch.median); tau_Delta = the
    smallest Delta inside T_loc; the window t-k..t-1 is clipped to the response (the first response
    token is never locally dominated) and ignores undefined Deltas; intro(t) = the position of the
    largest Delta in that window, ties to the latest position; the three terms of Eq. 19 add up and
    I(D) is a set. With bottom=True both T_loc and T_glob are bottom-q selections (and tau_Delta is
    the smallest Delta of that bottom T_loc).
  - Token entropy is that of softmax(logits / temperature): GRPO passes its sampling temperature,
    so the entropy strategy ranks by the distribution the tokens were drawn from; the default 1.0
    (the analysis) is the model's own, untempered distribution.
  - Head groups (Eq. 8): each group has max(1, round_half_up(frac * H)) heads (at most H); heads
    are sorted by span with a stable sort, so equal spans keep the lower head index first. In
    rhythm_signals the groups are formed per sequence over all (layer, head) pairs of the chosen
    layers pooled together.
  - Layers: five evenly spaced layers (rounded half up) inside a band: "middle" =
    floor(L/3)..floor(2L/3) (the paper's), "bottom" = 0..floor(L/3), "top" = floor(2L/3)..L-1,
    "all" = 0..L-1; every layer of the band when it has five or fewer.
  - Receiver heads (Bogdan et al., "Thought Anchors"): the vertical score of response token s is
    the mean attention it receives from the response rows t >= s + RECEIVER_BAND (the nearby band
    t - s < RECEIVER_BAND is ignored, as that paper ignores neighbouring sentences); a head's score
    is the excess kurtosis of those vertical scores over the response tokens that have any such
    row (undefined, ranked last, when the scores are flat to 1e-6 relative); the top_k heads
    (default: as many as a head group) are the receiver heads. Ties keep the lower index first.
  - Peaks (Table 2): x_t > x_{t-1} and x_t >= x_{t+1}, with a missing or undefined (NaN) neighbour
    counting as -inf, and x_t >= the ceil(0.2 * R_def)-th largest defined value of that sequence; a
    NaN entry is never a peak. "Right after" a WAAD peak w = a position p with 1 <= p - w <= 3
    ("at" = p == w).
  - Coupling statistics are pooled over tokens of all responses (each peak / token counts once).
    The FAI baselines use the same eligible tokens as the observed values: the share of global-FAI
    peaks is over the tokens whose global and receiver FAI are both defined, and the shuffled FAI
    peaks are drawn among the tokens whose global FAI is defined, averaged over NUM_SHUFFLES seeded
    draws.
"""


import math
import operator

import torch

import checks

# -----------------------------------------------------------------------------
# Project defaults

WAAD_WINDOW = 10  # W of Eq. 9
FAI_H_LO = 10  # H_lo of Eq. 10 (RL default)
FAI_H_HI = 100  # H_hi of Eq. 10 (RL default; None = to the end of the response, as in the analysis)
HEAD_GROUP_FRAC = 0.3  # share of heads in H_loc and in H_glob (Eq. 8)
NUM_ATTN_LAYERS = 5  # "five evenly spaced layers"
CREDIT_Q = 0.4  # q of TopQ
GAMMA_AMP = 1.5
COUPLE_K = 3  # k of Eq. 18
COUPLE_ALPHA = 0.5  # alpha of Eq. 19
RECEIVER_BAND = 4  # receiver heads ignore attention from the next RECEIVER_BAND - 1 tokens and self
PEAK_TOP_FRAC = 0.2  # a peak's value is in the top 20% of its sequence
PEAK_AFTER_K = 3  # "right after" = 1..3 positions later
NUM_SHUFFLES = 100  # draws of the shuffled baseline of the third coupling statistic
FLAT_REL_TOL = 1e-6  # vertical scores agreeing to this relative spread have no kurtosis
FLOAT_TOL = 1e-9  # slack for ceil(q * R) and round(frac * H) against float error

STRATEGIES = ("none", "random", "entropy", "local", "global", "coupled")
LAYER_CHOICES = ("middle", "all", "top", "bottom")


def _ceil_frac(q, n):
    """ceil(q * n), robust to float error (ceil(0.7 * 10) is 7, not 8)."""
    return min(n, max(0, math.ceil(q * n - FLOAT_TOL)))


def group_size(num_heads, frac=HEAD_GROUP_FRAC):
    """Heads per group (Eq. 8): max(1, round_half_up(frac * H)), at most H."""
    checks.fraction(frac, "frac", low_open=True)
    return min(num_heads, max(1, math.floor(frac * num_heads + 0.5 + FLOAT_TOL)))


# -----------------------------------------------------------------------------
# The paper's equations on explicit attention maps


def _offsets(n, device=None):
    """(t - s) for every query t and key s: (N, N) long."""
    pos = torch.arange(n, device=device)
    return pos[:, None] - pos[None, :]


def head_span(attn, start):
    """Eq. 7: mean attention distance of each head over the response rows. attn (H, N, N) -> (H,)."""
    if not torch.is_tensor(attn) or attn.dim() != 3:
        raise ValueError("attn must be a stack of attention maps (H, N, N)")
    checks.attention_maps(attn, start, "attn")
    n = attn.size(-1)
    if start == n:
        raise ValueError("head_span needs at least one response token (start == N leaves none)")
    return _span_maps(attn, operator.index(start))


def _span_maps(maps, start):
    dist = _offsets(maps.size(-1), maps.device).clamp(min=0)[start:].float()  # (R, N)
    return (maps[:, start:].float() * dist).sum(-1).mean(-1)


def group_heads(spans, frac=HEAD_GROUP_FRAC):
    """Eq. 8: (local-focused heads, global-focused heads) as index tensors.

    local = the group_size(H, frac) lowest spans, lowest first; global = as many highest spans,
    highest first. Stable sorts: equal spans keep the lower index first.
    """
    if not torch.is_tensor(spans) or spans.dim() != 1 or spans.numel() == 0:
        raise ValueError("spans must be a non-empty 1-D tensor with one span per head")
    if not bool(torch.isfinite(spans).all()):
        raise ValueError("spans must be finite")
    n = group_size(spans.numel(), frac)
    local = torch.sort(spans, stable=True).indices[:n]
    global_ = torch.sort(spans, descending=True, stable=True).indices[:n]
    return local, global_


def waad(a_loc, start, window=WAAD_WINDOW):
    """Eq. 9: WAAD_t = sum_s Abar_loc[t, s] * min(t - s, W) for response rows t. (N, N) -> (R,)."""
    checks.horizons(window, 0, None)
    if not torch.is_tensor(a_loc) or a_loc.dim() != 2:
        raise ValueError("a_loc must be one aggregated map (N, N)")
    checks.attention_maps(a_loc, start, "a_loc")
    return _waad_maps(a_loc[None], operator.index(start), window)[0]


def _waad_maps(maps, start, window):
    """Eq. 9 for each map of maps (H, N, N) -> (H, R)."""
    dist = _offsets(maps.size(-1), maps.device).clamp(0, window)[start:].float()  # (R, N)
    return (maps[:, start:].float() * dist).sum(-1)


def fai_counts(n, start, h_lo, h_hi, device=None):
    """|T(s)| of Eq. 10 for each response token s: (R,) long."""
    s = torch.arange(start, n, device=device)
    last = torch.full_like(s, n - 1) if h_hi is None else (s + h_hi).clamp(max=n - 1)
    return (last - (s + h_lo) + 1).clamp(min=0)


def _fai_maps(maps, start, h_lo, h_hi):
    """Eq. 10 for each map of maps (H, N, N) -> (H, R), NaN where T(s) is empty."""
    n = maps.size(-1)
    off = _offsets(n, maps.device)
    keep = (off >= h_lo) & (torch.arange(n, device=maps.device) >= start)[None, :]  # (t, s)
    if h_hi is not None:
        keep &= off <= h_hi
    sums = (maps.float() * keep).sum(-2)[:, start:]  # column sums over the rows of T(s)
    counts = fai_counts(n, start, h_lo, h_hi, maps.device)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))


def fai(a_glob, start, h_lo=FAI_H_LO, h_hi=FAI_H_HI):
    """Eq. 10: FAI_s = mean of Abar_glob[t, s] over t in T(s) = [s + H_lo, s + H_hi] (clipped to the
    response); h_hi=None runs to the end of the response; NaN (undefined) where T(s) is empty.
    (N, N) -> (R,)."""
    checks.horizons(1, h_lo, h_hi)
    if not torch.is_tensor(a_glob) or a_glob.dim() != 2:
        raise ValueError("a_glob must be one aggregated map (N, N)")
    checks.attention_maps(a_glob, start, "a_glob")
    return _fai_maps(a_glob[None], operator.index(start), h_lo, h_hi)[0]


def _entropy_of_logits(logits, temperature=1.0):
    """Shannon entropy (nats) of softmax(logits / temperature) along the last dim, in fp32."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


def token_entropy(logits, start, temperature=1.0):
    """Entropy of the distribution each response token was drawn from, softmax(logits / temperature)
    (temperature 1.0: the model's own, untempered distribution). (N, V) -> (R,).

    Response token i (position start + i) was sampled from logits row start + i - 1, so start >= 1.
    """
    if not torch.is_tensor(logits) or logits.dim() != 2:
        raise ValueError("logits must be (N, V)")
    checks.position(start, logits.size(0), minimum=1)
    checks.temperature(temperature)
    return _entropy_of_logits(logits[operator.index(start) - 1:-1], temperature)


def excess_kurtosis(x, dim=-1):
    """Population excess kurtosis m4 / m2^2 - 3 along dim; NaN where the values are flat."""
    x = x.float()
    mean = x.mean(dim, keepdim=True)
    c = x - mean
    m2 = c.pow(2).mean(dim)
    m4 = c.pow(4).mean(dim)
    flat = m2 <= (FLAT_REL_TOL * mean.squeeze(dim).abs()) ** 2
    return torch.where(flat, torch.full_like(m2, float("nan")), m4 / m2.pow(2) - 3)


def rank_receivers(kurt, top_k):
    """Indices of the top_k highest kurtoses (NaN last, ties toward the lower index)."""
    key = torch.where(torch.isnan(kurt), torch.full_like(kurt, float("-inf")), kurt)
    return torch.sort(key, descending=True, stable=True).indices[:top_k]


def vertical_scores(attn, start, band=RECEIVER_BAND):
    """Thought-Anchors vertical scores: mean attention each response token s receives from the rows
    t >= s + band. attn (H, N, N) -> (H, R') for the R' = max(0, N - band - start) tokens that have
    any such row."""
    if not torch.is_tensor(attn) or attn.dim() != 3:
        raise ValueError("attn must be a stack of attention maps (H, N, N)")
    if not isinstance(band, int) or band < 0:
        raise ValueError(f"band must be an int >= 0, got {band!r}")
    checks.attention_maps(attn, start, "attn")
    return _vertical_maps(attn, operator.index(start), band)


def _vertical_maps(maps, start, band):
    n = maps.size(-1)
    return _fai_maps(maps, start, band, None)[:, : max(0, n - band - start)]


def receiver_heads(attn, start, top_k=None, band=RECEIVER_BAND):
    """Receiver heads (Bogdan et al.): heads ranked by the kurtosis of their vertical scores.

    attn (H, N, N) -> (top_k head indices, highest kurtosis first; kurtosis (H,)).
    top_k defaults to group_size(H), the size of a head group, so receiver-FAI and global-FAI
    average over the same number of heads.
    """
    kurt = excess_kurtosis(vertical_scores(attn, start, band))
    top_k = group_size(attn.size(0)) if top_k is None else top_k
    if not isinstance(top_k, int) or not 1 <= top_k <= attn.size(0):
        raise ValueError(f"top_k must be an int in [1, {attn.size(0)}], got {top_k!r}")
    return rank_receivers(kurt, top_k), kurt


# -----------------------------------------------------------------------------
# Credit assignment (Section 5)


def top_q(scores, q=CREDIT_Q, bottom=False):
    """TopQ, the selection of Eq. 15 (T_loc, by Delta) and Eq. 16 (T_glob, by FAI): bool mask (R,) of
    the ceil(q * R_def) highest of the R_def defined scores (lowest with bottom=True); ties toward the
    earlier position. A NaN score (undefined) is never selected."""
    scores = checks.scores(scores, "scores", allow_nan=True)
    checks.fraction(q, "q")
    chosen = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    defined = torch.nonzero(~torch.isnan(scores)).flatten()  # ascending, so the stable sort keeps ties early
    order = defined[torch.sort(scores[defined], descending=not bottom, stable=True).indices]
    chosen[order[: _ceil_frac(q, defined.numel())]] = True
    return chosen


def waad_deltas(waad_scores):
    """Eq. 14: Delta_t = |WAAD_t - WAAD_{t+1}|; NaN (undefined) for the last response token.
    (R,) -> (R,)."""
    w = checks.scores(waad_scores, "waad")
    delta = torch.full_like(w, float("nan"))
    delta[:-1] = (w[:-1] - w[1:]).abs()
    return delta


def amplify(selected, gamma_amp=GAMMA_AMP):
    """Eq. 15 and Eq. 17: gamma_t = 1 + (gamma_amp - 1) [t in T] for a selection T, a bool mask (R,)."""
    return 1 + (gamma_amp - 1) * selected.float()


def locally_dominated(waad_scores, delta, t_glob, t_loc, k=COUPLE_K):
    """Eq. 18: the anchors of T_glob that are locally dominated (D) and their intro tokens I(D), as
    bool masks (R,). waad_scores, delta (R,) fp32 (delta from waad_deltas, NaN last); t_glob, t_loc
    from top_q.

    t is in D when t is in T_glob, WAAD_t <= tau_waad (the lower median of the response's WAAD) and
    the largest Delta in the window t-k..t-1 (clipped to the response, undefined Deltas left out) is
    >= tau_Delta (the smallest Delta in T_loc); intro(t) is the position of that largest Delta
    (ties: the latest).
    """
    R = waad_scores.numel()
    dominated = torch.zeros_like(t_glob)
    intro = torch.zeros_like(t_glob)
    if R == 0 or not bool(t_loc.any()):
        return dominated, intro
    tau_waad = torch.median(waad_scores)  # lower median
    tau_delta = delta[t_loc].min()
    known = torch.nan_to_num(delta, nan=float("-inf"))  # an undefined Delta never wins a window
    padded = torch.cat([torch.full((k,), float("-inf"), device=delta.device), known])  # (k + R,)
    windows = padded.unfold(0, k, 1)[:R]  # (R, k): windows[t] = Delta[t-k .. t-1]
    latest_first = windows.flip(-1)  # argmax picks the first maximum: flipping makes it the latest
    best = latest_first.max(-1)
    dominated = t_glob & (waad_scores <= tau_waad) & (best.values >= tau_delta)
    intro_pos = torch.arange(R, device=delta.device) - 1 - best.indices  # (R,)
    intro[intro_pos[dominated]] = True
    return dominated, intro


def coupled_selection(waad_scores, fai_scores, q=CREDIT_Q, k=COUPLE_K, bottom=False):
    """The token sets of Eq. 15-18 as bool masks (R,): t_loc (TopQ by Delta), t_glob (TopQ by FAI),
    dominated (D) and intro (I(D)) (locally_dominated). Tokens whose FAI or Delta is NaN are in
    neither T_glob nor T_loc.
    """
    w = checks.scores(waad_scores, "waad")
    f = checks.scores(fai_scores, "fai", allow_nan=True)
    if w.numel() != f.numel():
        raise ValueError(f"waad and fai must have the same length, got {w.numel()} and {f.numel()}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    delta = waad_deltas(w)
    t_loc = top_q(delta, q, bottom)
    t_glob = top_q(f, q, bottom)
    dominated, intro = locally_dominated(w, delta, t_glob, t_loc, k)
    return dict(t_loc=t_loc, t_glob=t_glob, dominated=dominated, intro=intro)


def coupled_gamma(t_glob, dominated, intro, gamma_amp=GAMMA_AMP, alpha=COUPLE_ALPHA):
    """Eq. 19: gamma_t = 1 + (gamma_amp-1)[t in T_glob minus D] + (1-alpha)(gamma_amp-1)[t in D]
    + alpha(gamma_amp-1)[t in I(D)]; the three terms add up (a token may be an anchor and an intro)."""
    bonus = gamma_amp - 1
    gamma = amplify(t_glob & ~dominated, gamma_amp)
    gamma += (1 - alpha) * bonus * dominated.float()
    gamma += alpha * bonus * intro.float()
    return gamma


def credit_gamma(strategy, waad=None, fai=None, entropy=None, q=CREDIT_Q, gamma_amp=GAMMA_AMP, k=COUPLE_K,
                 alpha=COUPLE_ALPHA, bottom=False, generator=None):
    """Per-token advantage scale gamma (R,) of Section 5 (detached, fp32).

    none: 1 everywhere (plain GRPO); random: a random ceil(q * R) tokens get gamma_amp (bottom is
    ignored; generator seeds it); entropy: TopQ by token entropy; local: Eq. 14-15, TopQ by Delta;
    global: Eq. 16-17, TopQ by FAI; coupled: Eq. 18-19 (see coupled_selection). fai may hold NaN
    where it is undefined (as rhythm_signals returns it); such tokens, and the last token for
    Delta, are never selected, and q is a share of the tokens that have the score. random and
    entropy are defined on every token.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown credit strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    checks.fraction(q, "q")
    checks.fraction(alpha, "alpha")
    given = {name: x for name, x in (("waad", waad), ("fai", fai), ("entropy", entropy)) if x is not None}
    given = {name: checks.scores(x.detach(), name, allow_nan=name == "fai") for name, x in given.items()}
    if len({x.numel() for x in given.values()}) > 1:
        sizes = ", ".join(f"{name}={x.numel()}" for name, x in given.items())
        raise ValueError(f"waad, fai and entropy must have one entry per response token; got lengths {sizes}")
    needs = {"none": (), "random": (), "entropy": ("entropy",), "local": ("waad",), "global": ("fai",),
             "coupled": ("waad", "fai")}[strategy]
    missing = [name for name in needs if name not in given]
    if missing or not given:
        what = ", ".join(missing) if missing else "one of waad, fai, entropy (to know the response length)"
        raise ValueError(f"credit_gamma({strategy!r}) needs {what}")
    R = next(iter(given.values())).numel()
    device = next(iter(given.values())).device
    if strategy == "none":
        return torch.ones(R, device=device)
    if strategy == "random":
        rng_device = generator.device if generator is not None else "cpu"
        chosen = torch.zeros(R, dtype=torch.bool, device=device)
        chosen[torch.randperm(R, generator=generator, device=rng_device)[: _ceil_frac(q, R)].to(device)] = True
        return amplify(chosen, gamma_amp)
    if strategy == "entropy":
        return amplify(top_q(given["entropy"], q, bottom), gamma_amp)
    if strategy == "local":
        return amplify(top_q(waad_deltas(given["waad"]), q, bottom), gamma_amp)
    if strategy == "global":
        return amplify(top_q(given["fai"], q, bottom), gamma_amp)
    sel = coupled_selection(given["waad"], given["fai"], q, k, bottom)
    return coupled_gamma(sel["t_glob"], sel["dominated"], sel["intro"], gamma_amp, alpha)


# -----------------------------------------------------------------------------
# Peaks and the Table-2 coupling statistics


def find_peaks(x, top_frac=PEAK_TOP_FRAC):
    """Peak positions (long) of a 1-D signal: x_t > x_{t-1} and x_t >= x_{t+1} (a missing or NaN
    neighbour is -inf) and x_t at least the ceil(top_frac * R_def)-th largest of the R_def defined
    values. A NaN entry (undefined) is never a peak."""
    x = checks.scores(x, "x", allow_nan=True)
    checks.fraction(top_frac, "top_frac", low_open=True)
    defined = x[~torch.isnan(x)]
    if defined.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    x = torch.nan_to_num(x, nan=float("-inf"))
    edge = torch.full((1,), float("-inf"), device=x.device)
    left, right = torch.cat([edge, x[:-1]]), torch.cat([x[1:], edge])
    threshold = torch.sort(defined, descending=True).values[_ceil_frac(top_frac, defined.numel()) - 1]
    return torch.nonzero((x > left) & (x >= right) & (x >= threshold)).flatten()


def _near_after(peaks, R, k):
    """bool (R,): positions at or within 1..k after one of peaks."""
    near = torch.zeros(R, dtype=torch.bool)
    for j in range(k + 1):
        near[(peaks + j)[peaks + j < R]] = True
    return near


def _stat(observed, random, count):
    lift = (observed - random) / random if random != 0 and not math.isnan(random) else float("nan")
    return dict(random=random, observed=observed, lift=lift, count=count)


def coupling_stats(records, k=PEAK_AFTER_K, top_frac=PEAK_TOP_FRAC, num_shuffles=NUM_SHUFFLES, generator=None,
                   seed=0):
    """The three Table-2 statistics over a list of responses, pooled over tokens.

    records: one dict per response with 1-D tensors of equal length: "waad", "fai_global" (or
    "fai"), "fai_receiver", "entropy". Returns {name: {"random", "observed", "lift", "count"}}:
      entropy_at_waad_peaks: mean entropy over all WAAD peaks of all responses vs the mean
        entropy over all response tokens (count = number of WAAD peaks);
      receiver_peaks_in_global: share of receiver-FAI peaks that are also global-FAI peaks vs the
        share of global-FAI peaks among the tokens whose global and receiver FAI are both defined
        (count = number of receiver-FAI peaks);
      fai_peaks_after_waad: share of global-FAI peaks at or 1..k after a WAAD peak vs the same share
        with each response's FAI peak positions drawn uniformly without replacement among its
        tokens whose global FAI is defined, averaged over num_shuffles draws from generator
        (default: torch.Generator seeded with seed).
    FAI values may be NaN where undefined (empty T(s), as rhythm_signals returns them); waad and
    entropy must be finite.
    lift = (observed - random) / random (NaN when random is 0 or undefined).
    """
    if not isinstance(records, (list, tuple)) or not records:
        raise ValueError("coupling_stats needs a non-empty list of per-response dicts")
    if not isinstance(k, int) or k < 0 or not isinstance(num_shuffles, int) or num_shuffles < 1:
        raise ValueError(f"need an int k >= 0 and an int num_shuffles >= 1, got k={k!r}, num_shuffles={num_shuffles!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    ent_at_peaks, ent_all = [], []
    recv_peaks = recv_in_glob = glob_peaks = tokens = 0
    fai_peaks = fai_hits = 0
    shuffled_hits = torch.zeros(num_shuffles)
    for i, rec in enumerate(records):
        fai_global = rec.get("fai_global", rec.get("fai"))
        missing = [name for name, x in (("waad", rec.get("waad")), ("fai_global", fai_global),
                                        ("fai_receiver", rec.get("fai_receiver")),
                                        ("entropy", rec.get("entropy"))) if x is None]
        if missing:
            raise ValueError(f"record {i} lacks {', '.join(missing)}")
        w, fg, fr, ent = (checks.scores(x.detach().cpu(), name, allow_nan=name.startswith("fai")) for name, x in (
            ("waad", rec["waad"]), ("fai_global", fai_global), ("fai_receiver", rec["fai_receiver"]),
            ("entropy", rec["entropy"])))
        R = w.numel()
        if not fg.numel() == fr.numel() == ent.numel() == R:
            raise ValueError(f"record {i}: waad, fai_global, fai_receiver and entropy must have equal lengths")
        wp, gp, rp = find_peaks(w, top_frac), find_peaks(fg, top_frac), find_peaks(fr, top_frac)
        ent_at_peaks.append(ent[wp])
        ent_all.append(ent)
        recv_peaks += rp.numel()
        recv_in_glob += int(torch.isin(rp, gp).sum())
        both = ~torch.isnan(fg) & ~torch.isnan(fr)  # where a token can be a peak of either FAI
        glob_peaks += int(both[gp].sum())
        tokens += int(both.sum())
        near = _near_after(wp, R, k)
        fai_peaks += gp.numel()
        fai_hits += int(near[gp].sum())
        eligible = torch.nonzero(~torch.isnan(fg)).flatten()
        for d in range(num_shuffles):
            drawn = eligible[torch.randperm(eligible.numel(), generator=generator)[: gp.numel()]]
            shuffled_hits[d] += near[drawn].sum()
    nan = float("nan")
    ent_at_peaks, ent_all = torch.cat(ent_at_peaks), torch.cat(ent_all)
    return dict(
        entropy_at_waad_peaks=_stat(float(ent_at_peaks.mean()) if ent_at_peaks.numel() else nan,
                                    float(ent_all.mean()) if ent_all.numel() else nan, ent_at_peaks.numel()),
        receiver_peaks_in_global=_stat(recv_in_glob / recv_peaks if recv_peaks else nan,
                                       glob_peaks / tokens if tokens else nan, recv_peaks),
        fai_peaks_after_waad=_stat(fai_hits / fai_peaks if fai_peaks else nan,
                                   float(shuffled_hits.mean()) / fai_peaks if fai_peaks else nan,
                                   fai_peaks),
    )


# -----------------------------------------------------------------------------
# Metrics from a model: explicit (reference) and memory-lean (tiled) paths


def default_layers(num_layers, choice="middle", count=NUM_ATTN_LAYERS):
    """count evenly spaced layer indices inside a band of the stack (all of the band if it is smaller).

    middle = floor(L/3)..floor(2L/3) (the paper's), bottom = 0..floor(L/3), top = floor(2L/3)..L-1,
    all = 0..L-1; positions rounded half up. choice may also be explicit indices (the layer
    ablation), returned as a list as they are.
    """
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
    if isinstance(choice, (tuple, list)):
        return list(choice)
    bands = dict(middle=(num_layers // 3, 2 * num_layers // 3), all=(0, num_layers - 1),
                 bottom=(0, num_layers // 3), top=(2 * num_layers // 3, num_layers - 1))
    if choice not in bands:
        raise ValueError(f"unknown layer choice {choice!r}; expected one of {', '.join(LAYER_CHOICES)}")
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an int >= 1, got {count!r}")
    lo, hi = bands[choice]
    if hi - lo + 1 <= count:
        return list(range(lo, hi + 1))
    if count == 1:
        return [(lo + hi + 1) // 2]
    return [lo + (2 * i * (hi - lo) + count - 1) // (2 * (count - 1)) for i in range(count)]


def head_pairs(flat, heads_per_layer, layers):
    """Pooled head indices (..., n) -> (layer, head) pairs (..., n, 2) long, on the CPU."""
    flat = flat.cpu()
    layer_idx = torch.tensor(layers, dtype=torch.long)[flat // heads_per_layer]
    return torch.stack([layer_idx, flat % heads_per_layer], dim=-1)


def empty_signals(layers, num_pairs, device, receivers):
    """The signals of a row whose response is empty (start == T): no span, no groups."""
    empty, none = torch.zeros(0, device=device), torch.zeros(0, 2, dtype=torch.long)
    out = dict(waad=empty, fai=empty, entropy=empty, spans=torch.full((num_pairs,), float("nan"), device=device),
               local_heads=none, global_heads=none, layers=list(layers))
    if receivers:
        out.update(fai_receiver=empty, receiver_heads=none,
                   receiver_kurtosis=torch.full((num_pairs,), float("nan"), device=device))
    return out


def explicit_signals(model, input_ids, starts, attention_mask, layers, heads, window, h_lo, h_hi, frac,
                     receivers, receiver_band, receiver_top_k, temperature):
    """The reference of attention_lean.rhythm_signals (method="explicit"), which checks the
    arguments: per row, the model's explicit maps of the chosen layers pooled (L*H, T, T), then
    Eq. 7 -> Eq. 8 -> Eq. 9 on the mean local map and Eq. 10 on the mean global map."""
    logits, attn = model(input_ids, attn_layers=tuple(layers), attention_mask=attention_mask)
    T = input_ids.size(1)
    H = model.config.num_attention_heads
    results = []
    for b, start in enumerate(starts):
        if start == T:
            results.append(empty_signals(layers, H * len(layers), input_ids.device, receivers))
            continue
        maps = torch.cat([attn[layer][b] for layer in layers])  # (L*H, T, T), pooled (layer, head) pairs
        checks.attention_maps(maps, start, "the model's attention maps")  # at the tolerance of the model's dtype
        maps = maps.float()
        spans = _span_maps(maps, start)
        local, global_ = group_heads(spans, frac)
        a_loc = maps[local].mean(0) if heads == "targeted" else maps.mean(0)
        a_glob = maps[global_].mean(0) if heads == "targeted" else maps.mean(0)
        out = dict(waad=_waad_maps(a_loc[None], start, window)[0],
                   fai=_fai_maps(a_glob[None], start, h_lo, h_hi)[0],
                   entropy=token_entropy(logits[b].float(), start, temperature), spans=spans,
                   local_heads=head_pairs(local, H, layers), global_heads=head_pairs(global_, H, layers),
                   layers=list(layers))
        if receivers:
            kurt = excess_kurtosis(_vertical_maps(maps, start, receiver_band))
            top = rank_receivers(kurt, receiver_top_k or group_size(kurt.numel(), frac))
            out.update(fai_receiver=_fai_maps(maps[top].mean(0, keepdim=True), start, h_lo, h_hi)[0],
                       receiver_heads=head_pairs(top, H, layers), receiver_kurtosis=kurt)
        results.append(out)
    return results
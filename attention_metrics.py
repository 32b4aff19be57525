"""Section 4 of the paper: attention metrics (head span, WAAD, FAI, receiver heads), the Table-2
coupling statistics and the Section 5 credit factors gamma (pictures of them: plots.py).

Read it top to bottom:
  1. project defaults (every decision the paper leaves open, in one place),
  2. the paper's equations as plain functions of explicit attention maps (H, N, N) or (N, N),
  3. credit assignment (credit_gamma, Eq. 14-19),
  4. peaks and the Table-2 coupling statistics,
  5. rhythm_signals(): the metrics straight from a model, either through explicit maps
     (method="explicit", the reference) or the memory-lean tiled path (method="lean", default)
     that never holds an (N, N) map per head; rhythm_signals_from() is the lean path from a
     forward the caller already ran,

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

# Memory of the lean path: one attention tile (batch rows x pooled heads x query rows x keys, fp32;
# at least one query row of one batch row) and one logits chunk.
TILE_BYTES = 32 * 2**20
LOGIT_CHUNK_BYTES = 32 * 2**20

STRATEGIES = ("none", "random", "entropy", "local", "global", "coupled")
LAYER_CHOICES = ("middle", "all", "top", "bottom")

# -----------------------------------------------------------------------------
# Input checks


def _check_start(start, n, name="start", minimum=0):
    if isinstance(start, bool) or not hasattr(start, "__index__"):
        raise ValueError(f"{name} must be an int, got {type(start).__name__}")
    if not minimum <= operator.index(start) <= n:
        raise ValueError(f"{name}={start} is outside the sequence: expected {minimum} <= {name} <= {n}")


def _check_maps(attn, start, name):
    """attn (..., N, N) must be causal and row-stochastic; start in [0, N]."""
    if not torch.is_tensor(attn) or attn.dim() < 2 or attn.size(-1) != attn.size(-2):
        shape = tuple(attn.shape) if torch.is_tensor(attn) else type(attn).__name__
        raise ValueError(f"{name} must be a square attention map (..., N, N), got {shape}")
    _check_start(start, attn.size(-1))
    a = attn.detach().float()
    tol = 1e-4 if attn.dtype in (torch.float32, torch.float64) else 2e-2
    if not bool(torch.isfinite(a).all()) or bool((a < -tol).any()):
        raise ValueError(f"{name} must hold finite, non-negative attention probabilities")
    if a.numel() and float(a.triu(1).abs().max()) > tol:
        raise ValueError(f"{name} is not causal: a query attends to a later key (nonzero above the diagonal)")
    if a.numel() and float((a.sum(-1) - 1).abs().max()) > tol:
        raise ValueError(f"{name} is not row-stochastic: its rows must sum to 1")


def _check_window(window, h_lo, h_hi):
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if not isinstance(h_lo, int) or h_lo < 0:
        raise ValueError(f"h_lo must be an int >= 0, got {h_lo!r}")
    if h_hi is not None and (not isinstance(h_hi, int) or h_hi < h_lo):
        raise ValueError(f"h_hi must be None or an int >= h_lo ({h_lo}), got {h_hi!r}")


def _check_scores(x, name, allow_nan=False):
    """A 1-D float score per response token; with allow_nan, NaN marks a token without a score."""
    if not torch.is_tensor(x) or x.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor with one score per response token")
    ok = torch.isfinite(x)
    if allow_nan:
        ok |= torch.isnan(x)
    if not bool(ok.all()):
        raise ValueError(f"{name} must be finite (no inf{'' if allow_nan else ' or NaN'})")
    return x.float()


def _check_frac(value, name, low_open=False):
    if not isinstance(value, (int, float)) or not (0 < value <= 1 if low_open else 0 <= value <= 1):
        raise ValueError(f"{name} must be a number in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")


def _ceil_frac(q, n):
    """ceil(q * n), robust to float error (ceil(0.7 * 10) is 7, not 8)."""
    return min(n, max(0, math.ceil(q * n - FLOAT_TOL)))


def group_size(num_heads, frac=HEAD_GROUP_FRAC):
    """Heads per group (Eq. 8): max(1, round_half_up(frac * H)), at most H."""
    _check_frac(frac, "frac", low_open=True)
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
    _check_maps(attn, start, "attn")
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
    _check_window(window, 0, None)
    if not torch.is_tensor(a_loc) or a_loc.dim() != 2:
        raise ValueError("a_loc must be one aggregated map (N, N)")
    _check_maps(a_loc, start, "a_loc")
    return _waad_maps(a_loc[None], operator.index(start), window)[0]


def _waad_maps(maps, start, window):
    """Eq. 9 for each map of maps (H, N, N) -> (H, R)."""
    dist = _offsets(maps.size(-1), maps.device).clamp(0, window)[start:].float()  # (R, N)
    return (maps[:, start:].float() * dist).sum(-1)


def _fai_counts(n, start, h_lo, h_hi, device=None):
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
    counts = _fai_counts(n, start, h_lo, h_hi, maps.device)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))


def fai(a_glob, start, h_lo=FAI_H_LO, h_hi=FAI_H_HI):
    """Eq. 10: FAI_s = mean of Abar_glob[t, s] over t in T(s) = [s + H_lo, s + H_hi] (clipped to the
    response); h_hi=None runs to the end of the response; NaN (undefined) where T(s) is empty.
    (N, N) -> (R,)."""
    _check_window(1, h_lo, h_hi)
    if not torch.is_tensor(a_glob) or a_glob.dim() != 2:
        raise ValueError("a_glob must be one aggregated map (N, N)")
    _check_maps(a_glob, start, "a_glob")
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
    _check_start(start, logits.size(0), minimum=1)
    _check_temperature(temperature)
    return _entropy_of_logits(logits[operator.index(start) - 1:-1], temperature)


def _check_temperature(temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")


def excess_kurtosis(x, dim=-1):
    """Population excess kurtosis m4 / m2^2 - 3 along dim; NaN where the values are flat."""
    x = x.float()
    mean = x.mean(dim, keepdim=True)
    c = x - mean
    m2 = c.pow(2).mean(dim)
    m4 = c.pow(4).mean(dim)
    flat = m2 <= (FLAT_REL_TOL * mean.squeeze(dim).abs()) ** 2
    return torch.where(flat, torch.full_like(m2, float("nan")), m4 / m2.pow(2) - 3)


def _rank_receivers(kurt, top_k):
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
    _check_maps(attn, start, "attn")
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
    return _rank_receivers(kurt, top_k), kurt


# -----------------------------------------------------------------------------
# Credit assignment (Section 5)


def top_q(scores, q=CREDIT_Q, bottom=False):
    """TopQ: bool mask (R,) of the ceil(q * R_def) highest of the R_def defined scores (lowest with
    bottom=True); ties toward the earlier position. A NaN score (undefined) is never selected."""
    scores = _check_scores(scores, "scores", allow_nan=True)
    _check_frac(q, "q")
    chosen = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    defined = torch.nonzero(~torch.isnan(scores)).flatten()  # ascending, so the stable sort keeps ties early
    order = defined[torch.sort(scores[defined], descending=not bottom, stable=True).indices]
    chosen[order[: _ceil_frac(q, defined.numel())]] = True
    return chosen


def waad_deltas(waad_scores):
    """Eq. 14: Delta_t = |WAAD_t - WAAD_{t+1}|; NaN (undefined) for the last response token.
    (R,) -> (R,)."""
    w = _check_scores(waad_scores, "waad")
    delta = torch.full_like(w, float("nan"))
    delta[:-1] = (w[:-1] - w[1:]).abs()
    return delta


def coupled_selection(waad_scores, fai_scores, q=CREDIT_Q, k=COUPLE_K, bottom=False):
    """The token sets of Eq. 15-19 as bool masks (R,): t_loc, t_glob, dominated (D), intro (I(D)).

    An anchor t is locally dominated when WAAD_t <= tau_waad and the largest Delta in the window
    t-k..t-1 (clipped to the response, undefined Deltas left out) is >= tau_Delta; its intro token
    is the position of that largest Delta (ties: the latest). Tokens whose FAI or Delta is NaN are
    in neither T_glob nor T_loc.
    """
    w = _check_scores(waad_scores, "waad")
    f = _check_scores(fai_scores, "fai", allow_nan=True)
    if w.numel() != f.numel():
        raise ValueError(f"waad and fai must have the same length, got {w.numel()} and {f.numel()}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    R = w.numel()
    delta = waad_deltas(w)
    t_loc = top_q(delta, q, bottom)
    t_glob = top_q(f, q, bottom)
    dominated = torch.zeros_like(t_glob)
    intro = torch.zeros_like(t_glob)
    if R == 0 or not bool(t_loc.any()):
        return dict(t_loc=t_loc, t_glob=t_glob, dominated=dominated, intro=intro)
    tau_waad = torch.median(w)  # lower median
    tau_delta = delta[t_loc].min()
    known = torch.nan_to_num(delta, nan=float("-inf"))  # an undefined Delta never wins a window
    padded = torch.cat([torch.full((k,), float("-inf"), device=w.device), known])  # (k + R,)
    windows = padded.unfold(0, k, 1)[:R]  # (R, k): windows[t] = Delta[t-k .. t-1]
    latest_first = windows.flip(-1)  # argmax picks the first maximum: flipping makes it the latest
    best = latest_first.max(-1)
    dominated = t_glob & (w <= tau_waad) & (best.values >= tau_delta)
    intro_pos = torch.arange(R, device=w.device) - 1 - best.indices  # (R,)
    intro[intro_pos[dominated]] = True
    return dict(t_loc=t_loc, t_glob=t_glob, dominated=dominated, intro=intro)


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
    _check_frac(q, "q")
    _check_frac(alpha, "alpha")
    given = {name: x for name, x in (("waad", waad), ("fai", fai), ("entropy", entropy)) if x is not None}
    given = {name: _check_scores(x.detach(), name, allow_nan=name == "fai") for name, x in given.items()}
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
    bonus = gamma_amp - 1
    gamma = torch.ones(R, device=device)
    if strategy == "random":
        rng_device = generator.device if generator is not None else "cpu"
        chosen = torch.randperm(R, generator=generator, device=rng_device)[: _ceil_frac(q, R)].to(device)
        gamma[chosen] += bonus
    elif strategy == "entropy":
        gamma += bonus * top_q(given["entropy"], q, bottom).float()
    elif strategy == "local":
        gamma += bonus * top_q(waad_deltas(given["waad"]), q, bottom).float()
    elif strategy == "global":
        gamma += bonus * top_q(given["fai"], q, bottom).float()
    elif strategy == "coupled":
        sel = coupled_selection(given["waad"], given["fai"], q, k, bottom)
        gamma += bonus * (sel["t_glob"] & ~sel["dominated"]).float()
        gamma += (1 - alpha) * bonus * sel["dominated"].float()
        gamma += alpha * bonus * sel["intro"].float()
    return gamma


# -----------------------------------------------------------------------------
# Peaks and the Table-2 coupling statistics


def find_peaks(x, top_frac=PEAK_TOP_FRAC):
    """Peak positions (long) of a 1-D signal: x_t > x_{t-1} and x_t >= x_{t+1} (a missing or NaN
    neighbour is -inf) and x_t at least the ceil(top_frac * R_def)-th largest of the R_def defined
    values. A NaN entry (undefined) is never a peak."""
    x = _check_scores(x, "x", allow_nan=True)
    _check_frac(top_frac, "top_frac", low_open=True)
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
        w, fg, fr, ent = (_check_scores(x.detach().cpu(), name, allow_nan=name.startswith("fai")) for name, x in (
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
    all = 0..L-1; positions rounded half up.
    """
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
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


def _check_batch(input_ids, starts, attention_mask):
    """Validate a left-padded batch (every response starts after its row's padding); returns starts
    as an int list."""
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a (B, T) tensor of token ids")
    B, T = input_ids.shape
    starts = starts.tolist() if torch.is_tensor(starts) else list(starts)
    if len(starts) != B:
        raise ValueError(f"starts must have one entry per row of input_ids ({B}), got {len(starts)}")
    if attention_mask is None:
        pads = [0] * B
    else:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {(B, T)}")
        m = attention_mask.long()
        if bool((m[:, 1:] < m[:, :-1]).any()) or bool(((m != 0) & (m != 1)).any()):
            raise ValueError("attention_mask must be 0/1 with left padding only (0s, then 1s, in each row)")
        pads = (T - m.sum(-1)).tolist()
    try:
        starts = [operator.index(s) for s in starts]
    except TypeError:
        raise ValueError(f"starts must hold integer positions, got {starts!r}") from None
    for b, (pad, start) in enumerate(zip(pads, starts)):
        _check_start(start, T, f"starts[{b}]", minimum=pad + 1)
    return starts


def _pairs(flat, heads_per_layer, layers):
    """Pooled head indices (..., n) -> (layer, head) pairs (..., n, 2) long, on the CPU."""
    flat = flat.cpu()
    layer_idx = torch.tensor(layers, dtype=torch.long)[flat // heads_per_layer]
    return torch.stack([layer_idx, flat % heads_per_layer], dim=-1)


def _band_plan(first, n, offsets, weights, min_key):
    """Where the entries P[t, t - d], d in offsets, of the query rows t = first..n-1 sit, computed
    once per batch so a tile only gathers and scatters. In the left-padded layout every row ends at
    column n - 1 and a response row gives its padding keys probability exactly 0, so the plan does
    not depend on the row.

    Returns (gather index (M, K) into a row of keys, weight (M, K) = weights[d] where the key
    s = t - d is >= min_key and 0 elsewhere, column s - first (M, K) for scattering per key).
    """
    t = torch.arange(first, n, device=offsets.device)[:, None]
    s = t - offsets[None, :]  # (M, K) key positions
    return s.clamp(min=0), weights[None, :] * (s >= min_key), (s - first).clamp(min=0)


def _subtract_plan(first, n, offsets):
    """A plan that removes the rows t = s + d, d in offsets, from full column sums."""
    return _band_plan(first, n, offsets, -torch.ones(offsets.numel(), device=offsets.device), first)


def _band_values(probs, plan, r0):
    """Weighted band entries (b, P, m, K) of the tile probs (b, P, m, S) holding query rows first + r0.."""
    index, weight, _ = plan
    b, P, m, _ = probs.shape
    return probs.gather(-1, index[r0:r0 + m].expand(b, P, -1, -1)) * weight[r0:r0 + m]


def _scatter_band(acc, probs, plan, r0):
    """acc (b, P, M) += the weighted band entries of the tile, summed per key column."""
    b, P, m, _ = probs.shape
    cols = plan[2][r0:r0 + m].reshape(-1).expand(b, P, -1)
    acc.scatter_add_(-1, cols, _band_values(probs, plan, r0).reshape(b, P, -1))


def _stack_layers(qk, layers, first):
    """q and k of the chosen layers as two fp32 tensors, q already scaled by D**-0.5 and cut to the
    query rows first..T-1: q (B, L, H, T - first, D), k (B, L, Hkv, T, D). Empties qk as it goes,
    so at most one layer is held twice."""
    q0, k0 = qk[layers[0]]
    B, H, T, D = q0.shape
    q = torch.empty(B, len(layers), H, T - first, D, dtype=torch.float32, device=q0.device)
    k = torch.empty(B, len(layers), k0.size(1), T, D, dtype=torch.float32, device=q0.device)
    for i, layer in enumerate(layers):
        q_layer, k_layer = qk.pop(layer)
        q[:, i] = q_layer[:, :, first:]
        k[:, i] = k_layer
    return q.mul_(D ** -0.5), k


def _lean_tiles(q, k, key_valid, first, window, h_lo, h_hi, band):
    """Per-pair statistics of a chunk of b rows of a left-padded batch, from q and k of all chosen
    layers at once: q (b, L, H, M, D) fp32 scaled by D**-0.5 holds the query rows first..T-1 (every
    response of the chunk lies inside them), k (b, L, Hkv, T, D) fp32, key_valid (b, T) bool
    (False = left padding).

    Query rows are processed in tiles (b, P = L*H, m, T) of about TILE_BYTES. Returns, per pair
    and per position first..T-1 (b, P, M), with M = T - first:
      span: sum_s P[t, s] (t - s) of query row t (Eq. 7 before the mean over response rows);
      waad: Eq. 9 of query row t;
      fai: Eq. 10 of key column s, counting only rows t in T(s) (all of them at or after s, so
        inside the response of any row whose response contains s);
      vertical (if band is not None): the receiver vertical score of key column s.
    Rows and columns before a row's start are left for the caller to drop. Every quantity is
    linear in the map, so group means of these per-pair values equal the values of the group-mean map.
    """
    b, L, H, M, D = q.shape
    Hkv, T = k.size(2), k.size(3)
    P = L * H
    dev = q.device
    # query head h uses key head h // (H // Hkv): fold the heads sharing a key head into the rows
    q = q.reshape(b, L, Hkv, H // Hkv, M, D)
    kT = k.transpose(-1, -2)  # (b, L, Hkv, D, T)
    pad_end = T - int(key_valid.sum(-1).min())  # keys from pad_end on are tokens in every row
    pos = torch.arange(T, device=dev)
    posf = pos.float()
    # Eq. 9 from a band only, as rows sum to 1: WAAD_t = W - sum_{d<W} P[t, t-d] (W - d)
    w_off = torch.arange(window, device=dev)
    waad_plan = _band_plan(first, T, w_off, (window - w_off).float(), 0)
    # Eq. 10: gather the rows t = s + d of T(s) (d in inside), or, when fewer, take full column
    # sums and remove the rows outside it (short sequences, or h_hi=None, where T(s) is most of a column)
    near, far = min(h_lo, T), T if h_hi is None else min(h_hi + 1, T)  # T(s) = rows s + near .. s + far - 1
    inside = torch.arange(near, far, device=dev)
    outside = torch.cat([torch.arange(near, device=dev), torch.arange(far, T, device=dev)])
    fai_by_columns = outside.numel() < inside.numel()
    if fai_by_columns:
        fai_plan = _subtract_plan(first, T, outside)
    else:
        fai_plan = _band_plan(first, T, inside, torch.ones(inside.numel(), device=dev), first)
    if band is not None:  # the vertical score of s: every row t >= s + band
        recv_plan = _subtract_plan(first, T, torch.arange(band, device=dev))
        recv_sum = torch.zeros(b, P, M, device=dev)
    span = torch.zeros(b, P, M, device=dev)
    waad_h = torch.zeros(b, P, M, device=dev)
    fai_sum = torch.zeros(b, P, M, device=dev)
    rows = min(M, max(1, TILE_BYTES // (4 * b * P * T)))
    for r0 in range(0, M, rows):
        m = min(rows, M - r0)
        t0, t1 = first + r0, first + r0 + m
        tile_q = q[..., r0:r0 + m, :].reshape(b, L, Hkv, -1, D)  # (b, L, Hkv, G*m, D)
        scores = (tile_q @ kT[..., :t1]).reshape(b, P, m, t1)  # (b, P, m, t1)
        # the model's rule: query t sees key s iff s <= t and (s is a token or s == t); before the
        # tile's diagonal block only padding columns are hidden
        before = min(t0, pad_end)
        scores[..., :before].masked_fill_(~key_valid[:, None, None, :before], float("-inf"))
        t, s = pos[t0:t1, None], pos[None, t0:t1]
        allowed = (key_valid[:, None, t0:t1] & (s <= t)) | (s == t)  # (b, m, m)
        scores[..., t0:].masked_fill_(~allowed[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        del scores
        # Eq. 7: sum_s P[t,s] (t - s) = t - P[t] . positions
        span[..., r0:r0 + m] = posf[t0:t1] - probs @ posf[:t1]
        waad_h[..., r0:r0 + m] = window - _band_values(probs, waad_plan, r0).sum(-1)
        if fai_by_columns or band is not None:
            colsum = probs[..., first:].sum(2)  # (b, P, t1 - first): every row of the tile, per key
        if fai_by_columns:
            fai_sum[..., :t1 - first] += colsum
        _scatter_band(fai_sum, probs, fai_plan, r0)
        if band is not None:
            recv_sum[..., :t1 - first] += colsum
            _scatter_band(recv_sum, probs, recv_plan, r0)
    counts = _fai_counts(T, first, h_lo, h_hi, dev)  # (M,): |T(s)| depends on s and T only
    out = dict(span=span, waad=waad_h,
               fai=torch.where(counts > 0, fai_sum / counts.clamp(min=1), torch.full_like(fai_sum, float("nan"))))
    if band is not None:
        out["vertical"] = recv_sum / _fai_counts(T, first, band, None, dev).clamp(min=1)
    return out


def _entropy_lean(logits, temperature=1.0):
    """Entropy of softmax(logits / temperature) (m, V) -> (m,) in four passes, overwriting logits:
    H = log Z - sum_v e_v z_v / Z with z = logits / temperature - max, e = exp(z), Z = sum e."""
    z = logits.float()
    if temperature != 1:
        z /= temperature
    z -= z.amax(-1, keepdim=True)
    e = z.exp()
    Z = e.sum(-1)
    return Z.log() - (e[:, None, :] @ z[:, :, None])[:, 0, 0] / Z


def _response_entropy(model, h, starts, temperature):
    """Entropy of the distribution each response token was drawn from, for every row of the batch:
    token t comes from lm_head(h[b, t - 1]). h (B, T, C) -> list of (R_b,).

    All response positions of the batch go through lm_head together, in chunks of about
    LOGIT_CHUNK_BYTES of logits.
    """
    B, T, _ = h.shape
    pos = torch.arange(T, device=h.device)
    first = torch.tensor(starts, device=h.device)[:, None] - 1
    rows = h[(pos >= first) & (pos < T - 1)]  # (sum R_b, C), row by row
    chunk = max(1, LOGIT_CHUNK_BYTES // (4 * model.config.vocab_size))
    parts = [_entropy_lean(model.lm_head(rows[i:i + chunk]), temperature) for i in range(0, rows.size(0), chunk)]
    entropy = torch.cat(parts) if parts else torch.zeros(0, device=h.device)
    return entropy.split([T - start for start in starts])


def _empty_result(layers, num_pairs, device, receivers):
    """The dict of a row whose response is empty (start == T): no span, no groups."""
    empty, none = torch.zeros(0, device=device), torch.zeros(0, 2, dtype=torch.long)
    out = dict(waad=empty, fai=empty, entropy=empty, spans=torch.full((num_pairs,), float("nan"), device=device),
               local_heads=none, global_heads=none, layers=list(layers))
    if receivers:
        out.update(fai_receiver=empty, receiver_heads=none,
                   receiver_kurtosis=torch.full((num_pairs,), float("nan"), device=device))
    return out


def _group_mean(per_pair, picked):
    """Mean over the picked pairs (b, n) of per_pair (b, P, M) -> (b, M); picked None = all pairs."""
    if picked is None:
        return per_pair.mean(1)
    return per_pair.gather(1, picked[..., None].expand(-1, -1, per_pair.size(-1))).mean(1)


def _lean_signals(model, h, qk, input_ids, starts, attention_mask, layers, heads, window, h_lo, h_hi, frac,
                  receivers, receiver_band, receiver_top_k, temperature):
    """The lean path from the outputs of model.hidden_states (h (B, T, C), qk of the layers; qk is emptied)."""
    B, T = input_ids.shape
    H = model.config.num_attention_heads
    P = H * len(layers)
    dev = input_ids.device
    key_valid = torch.ones(B, T, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
    if min(starts) == T:
        return [_empty_result(layers, P, dev, receivers) for _ in starts]
    entropy = _response_entropy(model, h, starts, temperature)
    n = group_size(P, frac)
    targeted = heads == "targeted"
    t_min = min(starts)
    q_all, k_all = _stack_layers(qk, layers, t_min)  # (B, L, H, T - t_min, D), (B, L, Hkv, T, D)
    results = []
    # rows of the batch per chunk: one query row of every pair of a chunk fits in a tile
    per_chunk = max(1, TILE_BYTES // (4 * P * T))
    for b0 in range(0, B, per_chunk):
        chunk = starts[b0:b0 + per_chunk]
        if min(chunk) == T:
            results += [_empty_result(layers, P, dev, receivers) for _ in chunk]
            continue
        first = min(chunk)  # only query rows (and key columns) from the earliest response start on
        b1 = b0 + len(chunk)
        stats = _lean_tiles(q_all[b0:b1, :, :, first - t_min:], k_all[b0:b1], key_valid[b0:b1], first,
                            window, h_lo, h_hi, receiver_band if receivers else None)
        starts_c = torch.tensor(chunk, device=dev)
        response = torch.arange(first, T, device=dev) >= starts_c[:, None]  # (b, M) response rows of each row
        spans = (stats["span"] * response[:, None]).sum(-1) / (T - starts_c)[:, None]  # (b, P), NaN if empty
        live = starts_c < T
        if not bool(torch.isfinite(spans[live]).all()):
            raise ValueError("head spans must be finite: the model's attention produced NaN or inf")
        local = torch.sort(spans, dim=-1, stable=True).indices[:, :n]  # (b, n), lowest span first
        global_ = torch.sort(spans, dim=-1, descending=True, stable=True).indices[:, :n]  # highest first
        waad_rows = _group_mean(stats["waad"], local if targeted else None)  # (b, M)
        fai_rows = _group_mean(stats["fai"], global_ if targeted else None)  # (b, M)
        local_pairs, global_pairs = _pairs(local, H, layers), _pairs(global_, H, layers)  # (b, n, 2)
        for i, start in enumerate(chunk):
            if start == T:
                results.append(_empty_result(layers, P, dev, receivers))
                continue
            c0 = start - first  # the row's first response column
            out = dict(waad=waad_rows[i, c0:], fai=fai_rows[i, c0:], entropy=entropy[b0 + i], spans=spans[i],
                       local_heads=local_pairs[i], global_heads=global_pairs[i], layers=list(layers))
            if receivers:  # per row: the vertical scores of rows have different lengths
                kurt = excess_kurtosis(stats["vertical"][i, :, c0:c0 + max(0, T - start - receiver_band)])
                top = _rank_receivers(kurt, receiver_top_k or n)
                out.update(fai_receiver=stats["fai"][i, top, c0:].mean(0), receiver_heads=_pairs(top, H, layers),
                           receiver_kurtosis=kurt)
            results.append(out)
    return results


def _explicit_signals(model, input_ids, starts, attention_mask, layers, heads, window, h_lo, h_hi, frac,
                      receivers, receiver_band, receiver_top_k, temperature):
    logits, attn = model(input_ids, attn_layers=tuple(layers), attention_mask=attention_mask)
    T = input_ids.size(1)
    H = model.config.num_attention_heads
    results = []
    for b, start in enumerate(starts):
        if start == T:
            results.append(_empty_result(layers, H * len(layers), input_ids.device, receivers))
            continue
        maps = torch.cat([attn[layer][b] for layer in layers])  # (L*H, T, T), pooled (layer, head) pairs
        _check_maps(maps, start, "the model's attention maps")  # at the tolerance of the model's dtype
        maps = maps.float()
        spans = _span_maps(maps, start)
        local, global_ = group_heads(spans, frac)
        a_loc = maps[local].mean(0) if heads == "targeted" else maps.mean(0)
        a_glob = maps[global_].mean(0) if heads == "targeted" else maps.mean(0)
        out = dict(waad=_waad_maps(a_loc[None], start, window)[0],
                   fai=_fai_maps(a_glob[None], start, h_lo, h_hi)[0],
                   entropy=token_entropy(logits[b].float(), start, temperature), spans=spans,
                   local_heads=_pairs(local, H, layers), global_heads=_pairs(global_, H, layers),
                   layers=list(layers))
        if receivers:
            kurt = excess_kurtosis(_vertical_maps(maps, start, receiver_band))
            top = _rank_receivers(kurt, receiver_top_k or group_size(kurt.numel(), frac))
            out.update(fai_receiver=_fai_maps(maps[top].mean(0, keepdim=True), start, h_lo, h_hi)[0],
                       receiver_heads=_pairs(top, H, layers), receiver_kurtosis=kurt)
        results.append(out)
    return results


def rhythm_signals(model, input_ids, starts, attention_mask=None, layers=None, heads="targeted",
                   window=WAAD_WINDOW, h_lo=FAI_H_LO, h_hi=FAI_H_HI, method="lean", frac=HEAD_GROUP_FRAC,
                   receivers=False, receiver_band=RECEIVER_BAND, receiver_top_k=None, temperature=1.0):
    """WAAD, FAI and entropy of every response in a left-padded batch, from one forward pass.

    input_ids (B, T); starts[b] = index (padded coordinates) of row b's first response token, the
    response runs to the end of the row; attention_mask (B, T), 1 = token, 0 = left padding.
    layers: indices, or None for default_layers(L) (five of the middle third). heads: "targeted"
    (WAAD over H_loc, FAI over H_glob; groups formed per sequence over all (layer, head) pairs of
    the chosen layers pooled) or "all" (every head of the chosen layers). method: "lean" (tiles of
    batch rows x query rows computed from q and k, all chosen layers at once, never an (N, N) map
    per head) or "explicit" (maps from the model, the reference). receivers=True adds
    receiver-head FAI (costs one more column sum per tile). temperature: the entropy is that of
    softmax(logits / temperature), the distribution sampled at that temperature (1.0, the default:
    the model's own, untempered distribution).

    Returns a list (one per row) of dicts, tensors detached and fp32 on the input's device:
      waad, fai, entropy: (R,) with R = T - starts[b]; fai is NaN where T(s) is empty (the last
        h_lo tokens: no score, so no selection takes them), waad and entropy are finite;
      spans: (L*H,) head spans (Eq. 7) of the pooled pairs, pair p = (layers[p // H], p % H);
      local_heads, global_heads: (n, 2) long CPU tensors of the (layer, head) pairs of H_loc (lowest
        span first) and H_glob (highest span first); layers: the layer indices used (a list);
      with receivers=True also fai_receiver (R,) (NaN like fai), receiver_heads (n, 2),
        receiver_kurtosis (L*H,).
    A row with an empty response (start == T) gets empty signals, NaN spans and empty groups.
    """
    if method not in ("lean", "explicit"):
        raise ValueError(f"method must be 'lean' or 'explicit', got {method!r}")
    layers, starts = _check_signal_args(model, input_ids, starts, attention_mask, layers, heads, window, h_lo, h_hi,
                                        frac, receiver_band, receiver_top_k)
    _check_temperature(temperature)
    args = (input_ids, starts, attention_mask, layers, heads, window, h_lo, h_hi, frac, receivers, receiver_band,
            receiver_top_k, temperature)
    with torch.no_grad():
        if method == "explicit":
            return _explicit_signals(model, *args)
        h, _, qk = model.hidden_states(input_ids, attention_mask=attention_mask, qk_layers=tuple(layers))
        return _lean_signals(model, h, qk, *args)


def rhythm_signals_from(model, h, qk, input_ids, starts, attention_mask=None, layers=None, heads="targeted",
                        window=WAAD_WINDOW, h_lo=FAI_H_LO, h_hi=FAI_H_HI, frac=HEAD_GROUP_FRAC, receivers=False,
                        receiver_band=RECEIVER_BAND, receiver_top_k=None, temperature=1.0):
    """rhythm_signals(method="lean") from a forward the caller has already run, so one forward can
    serve both the signals and something else: GRPO takes its old log-probs from the same h.

    h, _, qk = model.hidden_states(input_ids, attention_mask=attention_mask, qk_layers=layers) on the
    same batch, with layers as passed here (None: default_layers(L)); h is (B, T, C) and qk
    {layer: (q (B, H, T, D), k (B, Hkv, T, D))}. qk is emptied as it is read, so the batch's q and k
    are held at most once more, one layer at a time. Everything else and the result are as in
    rhythm_signals, and equal to it on the same batch.
    """
    layers, starts = _check_signal_args(model, input_ids, starts, attention_mask, layers, heads, window, h_lo, h_hi,
                                        frac, receiver_band, receiver_top_k)
    missing = [layer for layer in layers if layer not in qk]
    if missing:
        raise ValueError(f"qk lacks layers {missing}: run model.hidden_states(..., qk_layers={tuple(layers)})")
    if h.shape[:2] != input_ids.shape:
        raise ValueError(f"h must be (B, T, C) with (B, T) = {tuple(input_ids.shape)}, got {tuple(h.shape)}")
    _check_temperature(temperature)
    with torch.no_grad():
        return _lean_signals(model, h, qk, input_ids, starts, attention_mask, layers, heads, window, h_lo, h_hi,
                             frac, receivers, receiver_band, receiver_top_k, temperature)


def _check_signal_args(model, input_ids, starts, attention_mask, layers, heads, window, h_lo, h_hi, frac,
                       receiver_band, receiver_top_k):
    """Validate the arguments of rhythm_signals; returns (sorted layer list, starts as an int list)."""
    if heads not in ("targeted", "all"):
        raise ValueError(f"heads must be 'targeted' or 'all', got {heads!r}")
    _check_window(window, h_lo, h_hi)
    if not isinstance(receiver_band, int) or receiver_band < 0:
        raise ValueError(f"receiver_band must be an int >= 0, got {receiver_band!r}")
    group_size(1, frac)  # validates frac
    num_layers = model.config.num_hidden_layers
    layers = default_layers(num_layers) if layers is None else sorted(set(int(layer) for layer in layers))
    if not layers or not all(0 <= layer < num_layers for layer in layers):
        raise ValueError(f"layers must be a non-empty list of indices in [0, {num_layers}), got {layers}")
    num_pairs = len(layers) * model.config.num_attention_heads
    if receiver_top_k is not None and (not isinstance(receiver_top_k, int) or not 1 <= receiver_top_k <= num_pairs):
        raise ValueError(f"receiver_top_k must be None or an int in [1, {num_pairs}], got {receiver_top_k!r}")
    return layers, _check_batch(input_ids, starts, attention_mask)

"""The attention signals GRPO runs on: WAAD, FAI and entropy of every response of a batch, from
one forward pass, without the N x N attention map of any head.

attention_metrics.py defines each metric on explicit maps, one equation per function. Here the
same numbers come from the q and k that model.hidden_states hands back, in tiles of query rows:
- a tile's softmax is taken over its rows only, so at most TILE_BYTES of probabilities exist at
  a time, for all chosen layers and heads at once;
- Eq. 7 (span) is sum_s P[t, s] (t - s) = t - P[t] . positions: attention applied to the positions;
- Eq. 9 (WAAD) needs only the band of the W keys before each query, since rows sum to 1;
- Eq. 10 (FAI) adds each key column's entries in the rows of T(s), a band again;
- every quantity is linear in the map, so the group means of these per-head values equal the
  values of the group-mean maps (Eq. 8) that attention_metrics.explicit_signals builds.
tests/test_attention_metrics.py holds the two paths equal on padded batches.

Read it top to bottom: rhythm_signals and rhythm_signals_from (the entry points, which check
their arguments), then the lean path: per chunk of rows, the tiles, then head groups and means.
"""

import operator

import torch

import checks
from attention_metrics import (FAI_H_HI, FAI_H_LO, HEAD_GROUP_FRAC, RECEIVER_BAND, WAAD_WINDOW, default_layers,
                               empty_signals, excess_kurtosis, explicit_signals, fai_counts, group_size, head_pairs,
                               rank_receivers)

# Memory of the lean path: one attention tile (batch rows x pooled heads x query rows x keys, fp32;
# at least one query row of one batch row) and one logits chunk.
TILE_BYTES = 32 * 2**20
LOGIT_CHUNK_BYTES = 32 * 2**20


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
    checks.temperature(temperature)
    args = (input_ids, starts, attention_mask, layers, heads, window, h_lo, h_hi, frac, receivers, receiver_band,
            receiver_top_k, temperature)
    with torch.no_grad():
        if method == "explicit":
            return explicit_signals(model, *args)
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
    checks.temperature(temperature)
    with torch.no_grad():
        return _lean_signals(model, h, qk, input_ids, starts, attention_mask, layers, heads, window, h_lo, h_hi,
                             frac, receivers, receiver_band, receiver_top_k, temperature)


def _check_signal_args(model, input_ids, starts, attention_mask, layers, heads, window, h_lo, h_hi, frac,
                       receiver_band, receiver_top_k):
    """Validate the arguments of rhythm_signals; returns (sorted layer list, starts as an int list)."""
    if heads not in ("targeted", "all"):
        raise ValueError(f"heads must be 'targeted' or 'all', got {heads!r}")
    checks.horizons(window, h_lo, h_hi)
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
        checks.position(start, T, f"starts[{b}]", minimum=pad + 1)
    return starts


def _lean_signals(model, h, qk, input_ids, starts, attention_mask, layers, heads, window, h_lo, h_hi, frac,
                  receivers, receiver_band, receiver_top_k, temperature):
    """The lean path from the outputs of model.hidden_states (h (B, T, C), qk of the layers; qk is emptied)."""
    B, T = input_ids.shape
    H = model.config.num_attention_heads
    P = H * len(layers)
    dev = input_ids.device
    key_valid = torch.ones(B, T, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
    if min(starts) == T:
        return [empty_signals(layers, P, dev, receivers) for _ in starts]
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
            results += [empty_signals(layers, P, dev, receivers) for _ in chunk]
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
        local_pairs, global_pairs = head_pairs(local, H, layers), head_pairs(global_, H, layers)  # (b, n, 2)
        for i, start in enumerate(chunk):
            if start == T:
                results.append(empty_signals(layers, P, dev, receivers))
                continue
            c0 = start - first  # the row's first response column
            out = dict(waad=waad_rows[i, c0:], fai=fai_rows[i, c0:], entropy=entropy[b0 + i], spans=spans[i],
                       local_heads=local_pairs[i], global_heads=global_pairs[i], layers=list(layers))
            if receivers:  # per row: the vertical scores of rows have different lengths
                kurt = excess_kurtosis(stats["vertical"][i, :, c0:c0 + max(0, T - start - receiver_band)])
                top = rank_receivers(kurt, receiver_top_k or n)
                out.update(fai_receiver=stats["fai"][i, top, c0:].mean(0), receiver_heads=head_pairs(top, H, layers),
                           receiver_kurtosis=kurt)
            results.append(out)
    return results


def _group_mean(per_pair, picked):
    """Mean over the picked pairs (b, n) of per_pair (b, P, M) -> (b, M); picked None = all pairs."""
    if picked is None:
        return per_pair.mean(1)
    return per_pair.gather(1, picked[..., None].expand(-1, -1, per_pair.size(-1))).mean(1)


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
    counts = fai_counts(T, first, h_lo, h_hi, dev)  # (M,): |T(s)| depends on s and T only
    out = dict(span=span, waad=waad_h,
               fai=torch.where(counts > 0, fai_sum / counts.clamp(min=1), torch.full_like(fai_sum, float("nan"))))
    if band is not None:
        out["vertical"] = recv_sum / fai_counts(T, first, band, None, dev).clamp(min=1)
    return out


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

"""Pictures: a run's curves, the attention rhythm of a response (Figure 2 as PNG, and an HTML
token view), and compare's accuracy curves. The mathematics they draw is in attention_metrics.py.
"""

import html
from pathlib import Path

import torch

import checks
from attention_lean import TILE_BYTES, rhythm_signals
from attention_metrics import CREDIT_Q, HEAD_GROUP_FRAC, coupled_selection, credit_gamma, default_layers
from batching import build_batch

MAX_PLOT_POSITIONS = 512  # aggregated maps for pictures cover at most the last 512 positions
MAX_TICK_LABELS = 80  # token text on the x axis only up to this many response tokens


# -----------------------------------------------------------------------------
# The rhythm of one response


def aggregated_maps(model, input_ids, start, layers=None, region="response", max_positions=MAX_PLOT_POSITIONS,
                    frac=HEAD_GROUP_FRAC):
    """Abar_loc and Abar_glob (Eq. 8) of one unpadded sequence, for pictures, cropped to at most the
    last max_positions positions of the region ("response" or "all" = prompt + response).

    Rows are computed in tiles from q and k, so only the (P, P) crops are ever held. Returns
    dict(local=(P, P), global=(P, P), offset=first position shown, start=start).
    """
    if region not in ("response", "all"):
        raise ValueError(f"region must be 'response' or 'all', got {region!r}")
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    if ids.size(0) != 1:
        raise ValueError("aggregated_maps takes one sequence")
    signals = rhythm_signals(model, ids, [start], layers=layers, frac=frac)[0]
    if start == ids.size(1):
        raise ValueError("aggregated_maps needs a non-empty response")
    T = ids.size(1)
    offset = max(start if region == "response" else 0, T - max_positions)
    with torch.no_grad():
        _, _, qk = model.hidden_states(ids, qk_layers=tuple(signals["layers"]))
        out = {}
        for name, pairs in (("local", signals["local_heads"]), ("global", signals["global_heads"])):
            total = torch.zeros(T - offset, T - offset, device=ids.device)
            for layer, head in pairs.tolist():
                q, k = qk[layer]
                kv = head // (q.size(1) // k.size(1))
                total += _crop_map(q[0, head], k[0, kv], offset)
            out[name] = total / len(pairs)
    return {"local": out["local"], "global": out["global"], "offset": offset, "start": start}


def _crop_map(q, k, offset):
    """Rows and columns offset.. of one head's map from q (n, D) and k (n, D), in row tiles."""
    n, D = q.shape
    rows = max(1, TILE_BYTES // (4 * n))
    out = []
    for t0 in range(offset, n, rows):
        t1 = min(n, t0 + rows)
        scores = (q[t0:t1].float() @ k[:t1].float().T) * D ** -0.5  # (m, t1)
        scores[:, t0:].masked_fill_(torch.ones(t1 - t0, t1 - t0, dtype=torch.bool, device=q.device).triu(1),
                                    float("-inf"))
        out.append(torch.softmax(scores, dim=-1)[:, offset:])
    return torch.cat([torch.nn.functional.pad(o, (0, n - offset - o.size(1))) for o in out])


def _signal_arrays(signals):
    for name in ("waad", "fai", "entropy"):
        if name not in signals:
            raise ValueError(f"signals lacks {name!r}: pass one dict of rhythm_signals()")
    return {name: checks.scores(x.detach().cpu(), name, allow_nan=name.startswith("fai"))  # NaN: no T(s)
            for name, x in signals.items() if name in ("waad", "fai", "entropy", "fai_receiver")}


def plot_rhythm(path, signals, tokens=None, maps=None, q=CREDIT_Q, title=None):
    """Write a PNG like the paper's Figure 2.

    signals: one dict of rhythm_signals() (waad, fai, entropy, optional fai_receiver); tokens: the
    response token strings (shown on the x axis when there are at most MAX_TICK_LABELS); maps: an
    aggregated_maps() dict (the two aggregated maps are drawn on top when given). Preplan tokens
    (T_loc, TopQ by Delta) and anchor tokens (T_glob, TopQ by FAI) are marked.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    s = _signal_arrays(signals)
    R = s["waad"].numel()
    if tokens is not None and len(tokens) != R:
        raise ValueError(f"tokens has {len(tokens)} entries but the response has {R} tokens")
    sel = coupled_selection(s["waad"], s["fai"], q)
    rows = 3 + (maps is not None) * 2
    fig = plt.figure(figsize=(max(10, min(16, 0.18 * R)), 2.2 * rows + 1))
    grid = fig.add_gridspec(rows, 2)
    if maps is not None:
        for col, (name, key) in enumerate((("local-focused heads", "local"), ("global-focused heads", "global"))):
            ax = fig.add_subplot(grid[0:2, col])
            a = maps[key].detach().float().cpu()
            lo = maps["offset"]
            extent = (lo - 0.5, lo + a.size(0) - 0.5, lo + a.size(0) - 0.5, lo - 0.5)
            ax.imshow(a.clamp(min=0).numpy(), cmap="viridis", norm=PowerNorm(0.4, vmin=0, vmax=float(a.max())),
                      extent=extent)
            if maps["start"] > lo:
                ax.axhline(maps["start"] - 0.5, color="w", lw=0.6)
                ax.axvline(maps["start"] - 0.5, color="w", lw=0.6)
            ax.set_title(f"Abar over {name}")
            ax.set_xlabel("key position")
            ax.set_ylabel("query position")
    x = torch.arange(R).numpy()
    panels = [("WAAD", [("WAAD", s["waad"], "tab:blue")], "t_loc", "preplan (T_loc)", "tab:red"),
              ("FAI", [("FAI (global heads)", s["fai"], "tab:green")]
               + ([("FAI (receiver heads)", s["fai_receiver"], "tab:olive")] if "fai_receiver" in s else []),
               "t_glob", "anchor (T_glob)", "tab:purple"),
              ("entropy", [("entropy", s["entropy"], "tab:gray")], None, None, None)]
    first = None
    for i, (ylabel, curves, mark, mark_name, colour) in enumerate(panels):
        ax = fig.add_subplot(grid[rows - 3 + i, :], sharex=first)
        first = first or ax
        for label, y, c in curves:
            ax.plot(x, y.numpy(), color=c, lw=1, label=label)
        if mark and R:
            chosen = torch.nonzero(sel[mark]).flatten().numpy()
            ax.scatter(chosen, curves[0][1][chosen].numpy(), color=colour, s=14, zorder=3, label=mark_name)
        ax.set_ylabel(ylabel)
        ax.legend(loc="upper right", fontsize=7)
        if tokens is not None and 0 < R <= MAX_TICK_LABELS and i == 2:
            ax.set_xticks(x)
            ax.set_xticklabels([t.replace("\n", "\\n") for t in tokens], rotation=90, fontsize=7)
        elif i < 2:
            ax.tick_params(labelbottom=False)
    ax.set_xlabel("response token")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_HTML_SCRIPT = """<script>
function show(name) {
  for (const row of document.querySelectorAll('.row')) row.style.display = row.id === name ? '' : 'none';
}
</script>"""


def render_html(path, tokens, signals, gamma=None, q=CREDIT_Q, title="preplan-and-anchor rhythm"):
    """Write a self-contained HTML page: the response with each token shaded by WAAD, FAI or gamma
    (buttons switch rows; all rows show without JavaScript), preplan tokens (T_loc) underlined and
    anchor tokens (T_glob) boxed. gamma defaults to the coupled credit of signals."""
    s = _signal_arrays(signals)
    R = s["waad"].numel()
    if len(tokens) != R:
        raise ValueError(f"tokens has {len(tokens)} entries but the response has {R} tokens")
    if gamma is None:
        gamma = credit_gamma("coupled", s["waad"], s["fai"], q=q)
    gamma = checks.scores(gamma.detach().cpu(), "gamma")
    if gamma.numel() != R:
        raise ValueError(f"gamma has {gamma.numel()} entries but the response has {R} tokens")
    sel = coupled_selection(s["waad"], s["fai"], q)
    rows = []
    for name, values, rgb in (("WAAD", s["waad"], "31,119,180"), ("FAI", s["fai"], "44,160,44"),
                              ("gamma", gamma, "214,39,40")):
        defined = values[~torch.isnan(values)]
        lo, hi = (float(defined.min()), float(defined.max())) if defined.numel() else (0.0, 0.0)
        spans = []
        for i, tok in enumerate(tokens):
            v = float(values[i])
            shade = (v - lo) / (hi - lo) if hi > lo and v == v else 0.0  # v != v: NaN, a token without a score
            classes = " ".join(c for c, on in (("pre", bool(sel["t_loc"][i])), ("anc", bool(sel["t_glob"][i]))) if on)
            spans.append(f'<span class="{classes}" style="background:rgba({rgb},{0.08 + 0.8 * shade:.3f})" '
                         f'title="{name}={v:.4g}">{html.escape(tok)}</span>')
        rows.append(f'<div class="row" id="{name}"><h3>{name}</h3><p>{"".join(spans)}</p></div>')
    buttons = " ".join(f'<button onclick="show(\'{n}\')">{n}</button>' for n in ("WAAD", "FAI", "gamma"))
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; }}
p {{ font-family: monospace; white-space: pre-wrap; line-height: 1.9; }}
.pre {{ text-decoration: underline 2px red; }}
.anc {{ outline: 1.5px solid purple; }}
</style>{_HTML_SCRIPT}</head><body>
<h2>{html.escape(title)}</h2>
<p style="font-family:sans-serif">{buttons} &nbsp; <span class="pre">preplan (T_loc)</span>
<span class="anc">anchor (T_glob)</span></p>
{"".join(rows)}
</body></html>
"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)


# -----------------------------------------------------------------------------
# Pictures of a run



def plot_curves(records: list[dict], path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [("reward_mean", "rollout reward"), ("accuracy", "accuracy"),
              ("response_length", "response length (tokens)"), ("amplified_frac", "share of tokens amplified")]
    for ax, (key, label) in zip(axes.flat, panels):
        ax.plot([r["step"] for r in train], [r[key] for r in train], label="rollouts", color="tab:blue")
        if key == "accuracy" and evals:
            ax.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-", color="tab:red",
                    label="held-out (greedy)")
            ax.legend()
        ax.set_title(label)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def token_strings(tokenizer, ids):
    return [tokenizer.decode([i]) for i in ids]


def draw_rhythm(model, tokenizer, trainer, examples, out: Path, rl, h_hi=None, prefix="rhythm"):
    """PNG (Figure 2 style) and HTML token view of the greedy response to each example, with the
    layers and credit strategy of rl (the run's rl.RLConfig); trainer: its rl.GRPO."""
    prompts = [trainer.encode_prompt(ex) for ex in examples]
    responses = model.generate(prompts, rl.max_new_tokens, stop_ids=trainer.stop_ids)
    written = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        if len(response) < 2:
            continue
        batch = build_batch([prompt], [response], trainer.pad_id)
        batch = {key: value.to(model.device) for key, value in batch.items()}
        start = int(batch["starts"][0])
        # the run's own layers (a band name resolved against this model's depth) and strategy
        layers = default_layers(model.config.num_hidden_layers, rl.credit_layers)
        signals = rhythm_signals(model, batch["input_ids"], batch["starts"], batch["attention_mask"], layers=layers,
                                 heads=rl.credit_heads, window=rl.window, h_lo=rl.h_lo,
                                 h_hi=h_hi if h_hi is not None else rl.h_hi, receivers=True)[0]
        gamma = credit_gamma(rl.strategy, waad=signals["waad"], fai=signals["fai"], entropy=signals["entropy"],
                             q=rl.q, gamma_amp=rl.gamma_amp, k=rl.k, alpha=rl.alpha, bottom=rl.bottom,
                             generator=torch.Generator().manual_seed(rl.seed + i)).cpu()
        maps = aggregated_maps(model, batch["input_ids"], start, layers=layers)
        tokens = token_strings(tokenizer, response)
        title = f"{examples[i].prompt.strip()[-60:]!r}"
        plot_rhythm(out / f"{prefix}_{i}.png", signals, tokens=tokens, maps=maps, q=rl.q, title=title)
        render_html(out / f"{prefix}_{i}.html", tokens, signals, gamma=gamma, q=rl.q, title=title)
        written.append(f"{prefix}_{i}")
    return written


def plot_compare(report: dict, path: Path):
    """compare.png. Left: each strategy's held-out accuracy (EMA of best, as in the paper), the mean
    over seeds as a line and the min-max over seeds as a band (compare.summarize's curves). Right: the
    paired difference from the baseline on the same seed at every evaluation, which the seeds' spread
    on the left hides."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_delta) = plt.subplots(1, 2, figsize=(12, 4.5))
    n_seeds = len(report["seeds"])
    for i, (name, entry) in enumerate(report["strategies"].items()):
        curve = entry["curve"]
        ax.plot(curve["steps"], curve["mean"], color=f"C{i}", label=f"{name} (mean of {n_seeds} seeds)")
        ax.fill_between(curve["steps"], curve["low"], curve["high"], color=f"C{i}", alpha=0.2)
        if "delta_curve" in entry:
            delta = entry["delta_curve"]
            ax_delta.plot(delta["steps"], delta["mean"], color=f"C{i}", marker="o", label=f"{name} - {report['baseline']}")
            ax_delta.fill_between(delta["steps"], delta["low"], delta["high"], color=f"C{i}", alpha=0.2)
    ax.set_xlabel("GRPO step")
    ax.set_title("held-out accuracy, EMA of best (band: min-max over seeds)", fontsize=10)
    ax.set_ylabel("accuracy, %")
    ax.grid(alpha=0.3)
    ax.legend()
    ax_delta.axhline(0, color="black", lw=0.8)
    ax_delta.axhspan(-2 * report["binomial_se"], 2 * report["binomial_se"], color="grey", alpha=0.15,
                     label="±2 binomial SE of one evaluation")
    ax_delta.set_xlabel("GRPO step")
    ax_delta.set_title(f"minus {report['baseline']} on the same seed, not smoothed (band: min-max)", fontsize=10)
    ax_delta.set_ylabel("paired difference, points")
    ax_delta.grid(alpha=0.3)
    ax_delta.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

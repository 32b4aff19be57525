"""Statistics and report of a paired comparison of credit strategies (`python train.py compare`;
train.compare runs the runs, this module only reads their results).

Runs are paired by seed: every strategy of a seed starts from the same warm-up and sees the same
prompts, so the per-seed difference "strategy final - baseline final" cancels the seed's luck.
The interval is the 95% Student t-interval over seeds: mean ± t_{0.975, n-1} * sd / sqrt(n).
scipy is not a dependency, so the t quantile comes from bisection on the t CDF, written with the
regularized incomplete beta function (continued fraction, modified Lentz method).
The evaluation's own noise is the binomial standard error of one held-out accuracy, at the mean
final accuracy of all runs: two runs whose finals differ by less than about 2 of those are not
told apart by one evaluation.

compare.json: {"baseline", "seeds", "eval_problems", "binomial_se", "interval", "strategies": {name:
{"per_seed": [{"seed", "before", "final", "best"}] in percent, "curve": {"steps", "mean", "low",
"high"} (EMA of best, min-max over seeds), and for every strategy but the baseline "delta": {"mean",
"ci_low", "ci_high", "wins", "seeds", "per_seed"} of final minus the baseline's final, in points, and
"delta_curve": {"steps", "mean", "low", "high"}, the paired difference at every evaluation}}}.
"""

import math

CONFIDENCE = 0.95
EMA_A = 0.3  # PAPER.md (end): the paper's curve smoothing constant is not given; project default


def ema_of_best(values, a=EMA_A):
    """The paper's curve smoothing: EMA_t = a * max(x_t, EMA_{t-1}) + (1 - a) * EMA_{t-1}."""
    smoothed = []
    for x in values:
        smoothed.append(x if not smoothed else a * max(x, smoothed[-1]) + (1 - a) * smoothed[-1])
    return smoothed


def _beta_continued_fraction(x, a, b, iterations=300, eps=1e-15):
    """The continued fraction of I_x(a, b) (modified Lentz); converges fast for x < (a+1)/(a+b+2)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, iterations + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return result


def regularized_beta(x, a, b):
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_continued_fraction(x, a, b) / a
    return 1.0 - front * _beta_continued_fraction(1.0 - x, b, a) / b


def t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * regularized_beta(df / (df + t * t), df / 2, 0.5)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p, df):
    """The t with t_cdf(t, df) = p (0.5 < p < 1), by bisection."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1; got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def paired_delta(differences, confidence=CONFIDENCE):
    """Mean, t-interval and wins of per-seed differences (points); with one seed the interval is undefined (None)."""
    n = len(differences)
    if n == 0:
        raise ValueError("paired_delta needs at least one per-seed difference")
    mean = sum(differences) / n
    low = high = sd = None
    if n > 1:
        sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
        half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
        low, high = mean - half, mean + half
    return {"mean": mean, "ci_low": low, "ci_high": high, "sd": sd, "wins": sum(d > 0 for d in differences),
            "seeds": n, "per_seed": list(differences)}


def binomial_se(p, n_eval):
    """Standard error of one held-out accuracy p over n_eval problems, in points: 100 * sqrt(p(1-p)/n)."""
    return 100 * math.sqrt(p * (1 - p) / n_eval)


def _band(steps: list, curves: list) -> dict:
    """One curve per seed, all at the same steps -> their mean and min-max at each step."""
    at_step = list(zip(*curves))
    return {"steps": steps, "mean": [sum(v) / len(v) for v in at_step],
            "low": [min(v) for v in at_step], "high": [max(v) for v in at_step]}


def _paired_curve(runs: dict, baseline_runs: dict, seeds: list, name: str) -> dict:
    """Held-out accuracy minus the baseline's on the same seed at every evaluation (raw, not smoothed:
    the EMA of best would hide a drop), in points: mean and min-max over seeds."""
    steps = baseline_runs[seeds[0]]["steps"]
    for s in seeds:
        if runs[s]["steps"] != steps or baseline_runs[s]["steps"] != steps:
            raise ValueError(f"strategy {name}, seed {s}: evaluated at other steps than the baseline's {steps}")
    return _band(steps, [[100 * (a - b) for a, b in zip(runs[s]["accuracy"], baseline_runs[s]["accuracy"])]
                         for s in seeds])


def summarize(results: dict, baseline: str, eval_problems: int) -> dict:
    """The comparison as compare.json holds it.

    results: {strategy: {seed: {"before", "final", "best": accuracy in [0, 1], "steps": [...],
    "accuracy": [...] (the held-out curve)}}}, every strategy with the same seeds.
    """
    seeds = sorted(results[baseline])
    strategies = {}
    for name, runs in results.items():
        if sorted(runs) != seeds:
            raise ValueError(f"strategy {name} has seeds {sorted(runs)}, the baseline {seeds}: runs are paired by seed")
        curves = [[100 * v for v in ema_of_best(runs[s]["accuracy"])] for s in seeds]
        entry = {"per_seed": [{"seed": s, "before": 100 * runs[s]["before"], "final": 100 * runs[s]["final"],
                               "best": 100 * runs[s]["best"]} for s in seeds],
                 "curve": _band(runs[seeds[0]]["steps"], curves)}
        if name != baseline:
            entry["delta"] = paired_delta([100 * (runs[s]["final"] - results[baseline][s]["final"]) for s in seeds])
            entry["delta_curve"] = _paired_curve(runs, results[baseline], seeds, name)
        strategies[name] = entry
    finals = [run["final"] for runs in results.values() for run in runs.values()]
    return {"baseline": baseline, "seeds": seeds, "eval_problems": eval_problems,
            "binomial_se": binomial_se(sum(finals) / len(finals), eval_problems),
            "interval": f"{CONFIDENCE:.0%} Student t-interval over seeds of the paired differences",
            "strategies": strategies}


def _number(x, digits=1):
    return "n/a" if x is None else f"{x:+.{digits}f}" if digits < 0 else f"{x:.{digits}f}"


def markdown(report: dict) -> str:
    """compare.md: one row per strategy, then the per-seed finals."""
    seeds, base = report["seeds"], report["baseline"]
    lines = [f"Held-out accuracy (%), {len(seeds)} seeds ({', '.join(map(str, seeds))}), "
             f"{report['eval_problems']} problems per evaluation; baseline: {base}.",
             f"Delta = final minus the baseline's final on the same seed, in points; interval: {report['interval']}. "
             f"Binomial standard error of one evaluation: {report['binomial_se']:.1f} points.", "",
             "| strategy | after warm-up | final (mean ± sd) | best | delta vs baseline | 95% CI | seeds won |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in report["strategies"].items():
        finals = [r["final"] for r in entry["per_seed"]]
        mean = sum(finals) / len(finals)
        sd = math.sqrt(sum((f - mean) ** 2 for f in finals) / (len(finals) - 1)) if len(finals) > 1 else None
        before = sum(r["before"] for r in entry["per_seed"]) / len(finals)
        best = sum(r["best"] for r in entry["per_seed"]) / len(finals)
        delta = entry.get("delta")
        cells = [name, f"{before:.1f}", f"{mean:.1f} ± {_number(sd)}", f"{best:.1f}",
                 "baseline" if delta is None else f"{delta['mean']:+.1f}",
                 "" if delta is None else
                 ("n/a (one seed)" if delta["ci_low"] is None else f"[{delta['ci_low']:+.1f}, {delta['ci_high']:+.1f}]"),
                 "" if delta is None else f"{delta['wins']} of {delta['seeds']}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| strategy | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for name, entry in report["strategies"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r['final']:.1f}" for r in entry["per_seed"]) + " |")
    return "\n".join(lines) + "\n"

"""Statistics of a paired comparison of credit strategies (issue 12, section 1; the runner is unfinished).

Runs are paired by seed: every strategy of a seed starts from the same warm-up and sees the same
prompts, so the per-seed difference "strategy final - baseline final" cancels the seed's luck.
The interval is the 95% Student t-interval over seeds: mean ± t_{0.975, n-1} * sd / sqrt(n).
scipy is not a dependency, so the t quantile comes from bisection on the t CDF, written with the
regularized incomplete beta function (continued fraction, modified Lentz method).
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

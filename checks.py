"""Input checks, one style for the whole project: a bad input is one line that names it and says
what was expected.

Two kinds of input meet a check, each once, where it enters:
- a knob (a field of RLConfig or RunConfig) is checked when the config is built, so the same rule
  serves Python and the command line. It fails with a ConfigError that names the field;
  cli.flag_error turns it into the flag the user typed (`--q 2: q must be in (0, 1]`).
- a tensor or a number given straight to a function of the paper (waad, top_q, policy_loss, ...)
  is checked by that function, because a user may call it directly; functions that only the
  project calls with checked inputs check nothing.
"""

import math
import operator

import torch


class ConfigError(ValueError):
    """A config knob out of its range: names the field, the value and what is allowed.

    str() reads "q must be in (0, 1], got 2"; the command line shows the flag instead
    (cli.flag_error: "--q 2: q must be in (0, 1]").
    """

    def __init__(self, field: str, value, allowed: str):
        self.field, self.value, self.rule = field, value, f"{field} {allowed}"
        super().__init__(f"{self.rule}, got {value!r}")


# -----------------------------------------------------------------------------
# Knobs (ConfigError)


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def require(ok: bool, field: str, value, allowed: str):
    if not ok:
        raise ConfigError(field, value, allowed)


def int_at_least(field, value, low, why=""):
    require(is_int(value) and value >= low, field, value, f"must be >= {low} {why}".rstrip())


def number(field, value, low=None, high=None, low_open=False, high_open=False, why=""):
    """A finite number in the interval given by low/high (open ends when *_open)."""
    ok = is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if low is not None and high is not None:
        allowed = f"must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        allowed = f"must be {'>' if low_open else '>='} {low}"
    else:
        allowed = "must be a finite number"
    require(ok, field, value, f"{allowed} {why}".rstrip())


def choice(field, value, allowed):
    require(value in allowed, field, value, f"must be one of {', '.join(map(str, allowed))}")


# -----------------------------------------------------------------------------
# Arguments of the paper's functions (ValueError)


def known(name, value, allowed):
    """A string argument that selects a rule (sign, norm, ...) must name one."""
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")


def position(start, n, name="start", minimum=0):
    """An int position in [minimum, n]."""
    if isinstance(start, bool) or not hasattr(start, "__index__"):
        raise ValueError(f"{name} must be an int, got {type(start).__name__}")
    if not minimum <= operator.index(start) <= n:
        raise ValueError(f"{name}={start} is outside the sequence: expected {minimum} <= {name} <= {n}")


def attention_maps(attn, start, name):
    """attn (..., N, N) must be causal and row-stochastic (at the tolerance of its dtype); start in [0, N]."""
    if not torch.is_tensor(attn) or attn.dim() < 2 or attn.size(-1) != attn.size(-2):
        shape = tuple(attn.shape) if torch.is_tensor(attn) else type(attn).__name__
        raise ValueError(f"{name} must be a square attention map (..., N, N), got {shape}")
    position(start, attn.size(-1))
    a = attn.detach().float()
    tol = 1e-4 if attn.dtype in (torch.float32, torch.float64) else 2e-2
    if not bool(torch.isfinite(a).all()) or bool((a < -tol).any()):
        raise ValueError(f"{name} must hold finite, non-negative attention probabilities")
    if a.numel() and float(a.triu(1).abs().max()) > tol:
        raise ValueError(f"{name} is not causal: a query attends to a later key (nonzero above the diagonal)")
    if a.numel() and float((a.sum(-1) - 1).abs().max()) > tol:
        raise ValueError(f"{name} is not row-stochastic: its rows must sum to 1")


def horizons(window, h_lo, h_hi):
    """W of WAAD (>= 1) and the FAI horizon h_lo <= h_hi (h_hi None: to the end)."""
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if not isinstance(h_lo, int) or h_lo < 0:
        raise ValueError(f"h_lo must be an int >= 0, got {h_lo!r}")
    if h_hi is not None and (not isinstance(h_hi, int) or h_hi < h_lo):
        raise ValueError(f"h_hi must be None or an int >= h_lo ({h_lo}), got {h_hi!r}")


def scores(x, name, allow_nan=False):
    """A 1-D float score per response token; with allow_nan, NaN marks a token without a score.
    Returns it as fp32."""
    if not torch.is_tensor(x) or x.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor with one score per response token")
    ok = torch.isfinite(x)
    if allow_nan:
        ok |= torch.isnan(x)
    if not bool(ok.all()):
        raise ValueError(f"{name} must be finite (no inf{'' if allow_nan else ' or NaN'})")
    return x.float()


def fraction(value, name, low_open=False):
    if not isinstance(value, (int, float)) or not (0 < value <= 1 if low_open else 0 <= value <= 1):
        raise ValueError(f"{name} must be a number in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")


def temperature(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"temperature must be a number > 0, got {value!r}")

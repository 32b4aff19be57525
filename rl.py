"""GRPO with attention-based credit assignment (paper Section 5, Eq. 6 and Eq. 12-19).

One batch, start to finish, is `GRPO.step(examples)`:

1. rollout   each prompt is sampled G times with the model's KV-cache `generate`;
             the task scores every response (reward) and checks it (correct).
2. advantage `group_advantages`: (r - group mean) / (group std + eps), Eq. 6, one per response.
3. credit    the no-grad forward over prompt + response that gives the old log-probs (which
             GRPO needs anyway) also gives WAAD/FAI/entropy (`attention_metrics.rhythm_signals_from`
             on its hidden states and q/k), and `credit_gamma` turns them into one gamma per
             response token. Strategies "none" and "random" need no signals and run no forward here.
4. update    (old log-probs are computed here instead when credit ran no forward), then the
             rollout batch is split into micro-batches and each micro-batch is one AdamW step on
             `policy_loss`, the clipped surrogate of Eq. 12 with A~_t = gamma_t * A (Eq. 13); with
             grad_accum K, a micro-batch's gradient is summed over K forward/backward chunks.

The paper's comparisons (GRPO, random / entropy / local / global / coupled credit, bottom-q,
signs, layers, heads) are all `RLConfig` fields; nothing else changes between them.

Project defaults (the paper is silent on these; they are decided here, in one place):
- Group std is the unbiased sample std (divide by G - 1), as torch.std, TRL and verl do, so
  advantages match the common GRPO implementations. A group whose rewards are all equal gets
  advantage exactly 0.
- The rollout batch is counted in responses: `rollout_batch_size` = prompts x G (ROLL's config
  files count prompts; the paper does not say which its 512 counts). The paper's 512 / 32 gives 16
  optimizer steps per rollout batch; each micro-batch of micro_batch_size responses is one
  optimizer step, with the old log-probs fixed for the whole rollout batch. Memory is set apart by
  grad_accum: a micro-batch runs as grad_accum equal chunks whose losses are scaled by their share
  of it (responses for norm="sequence", tokens for norm="token"), so the summed gradient is
  exactly the whole micro-batch's; the credit forward runs on chunks of the same size.
- Old log-probs are recomputed by a no-grad forward of the current policy before any update
  (old_logp="recompute", as verl and TRL do: generate's KV-cache numerics differ; the mean gap
  is the metric `logp_gen_gap`). With signal-based credit (lean path) that forward is the credit
  forward, run on the rollout's own micro-batches, so the first micro-step starts at ratio 1 up
  to float noise of other padding (~1e-6); otherwise (none / random / explicit credit) the
  update runs it on its own micro-batches with its own code, and the ratio starts at exactly 1.
  old_logp="generate" takes the sampler's own log-probs instead and skips that forward (15% of
  a CPU testbed step). It is the same policy at the same weights; in fp32 the two differ by about
  1e-6 per token. logp_gen_gap then compares them on the first micro-batch, whose training forward
  still runs at the sampler's weights. Every strategy takes its old log-probs the same way.
- Log-probs are taken under softmax(logits / temperature), the distribution that was sampled
  (temperature 1.0 in the paper, where this is plain softmax); so is the entropy that the entropy
  credit strategy ranks by and the entropy bonus.
- gamma_norm="mean" (not in the paper; off by default) divides each response's gamma by its mean
  over the response's tokens after credit_gamma and before the sign rule, so a strategy changes
  which tokens weigh more, never the response's total weight.
- The response includes the stop token when one was emitted (the policy learns to stop); the
  text given to the reward does not include it.
- `norm="sequence"` is the paper's 1/|o| then mean over responses; `norm="token"` is the mean
  over all response tokens of the micro-batch (DAPO / TRL default).
- KL to the reference policy uses the k3 estimator exp(ref - logp) - (ref - logp) - 1, with
  coefficient 0 by default (the paper uses no KL and no entropy term).
- AdamW weight decay 0.0 and gradient clipping at norm 1.0 (the paper does not state these).
- Evaluation decodes with its own fixed seed, so evaluating between steps leaves the training
  random stream untouched.
- Every response samples from its own generator, seeded with the step's seed + the response's
  index in the rollout batch (random credit likewise), so what a response samples does not depend
  on which responses share its generate call, nor on the number of processes.

Several processes (torchrun; see distributed.py). `step` gets the same prompts on every rank and
each rank rolls out a contiguous block of whole groups (group statistics never cross ranks),
scores them and computes their credit. The ranks then exchange these compact rollouts, so each
knows the whole batch, shuffle it with the same seed as one process would, and split every
micro-batch of micro_batch_size responses into equal parts, one per rank (each rank's part into its
grad_accum chunks); DDP / FSDP average the gradients. So N processes take the optimizer steps one
process takes on the same data, up to floating-point summation order. Metrics are of the whole
batch, identical on every rank.
"""

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

from attention_metrics import (LAYER_CHOICES, STRATEGIES, credit_gamma, default_layers, rhythm_signals,
                               rhythm_signals_from)
from distributed import (all_gather_objects, all_reduce_sum, gathered, is_distributed, local_value, rank,
                         replica_spread, shard_range, world_size, wrap)
from sft import lr_at

NORMS = ("sequence", "token")
GAMMA_NORMS = ("none", "mean")
OLD_LOGPS = ("recompute", "generate")
SIGNS = ("both", "positive", "negative")


@dataclass
class RLConfig:
    """Every knob of a GRPO run. Defaults fit a small CPU run; the paper's values are noted."""

    # rollout
    group_size: int = 4              # G responses per prompt
    rollout_batch_size: int = 16     # responses per step (prompts x G); paper: 512
    micro_batch_size: int = 8        # responses per optimizer step; paper: 32
    grad_accum: int = 1              # forward/backward chunks per optimizer step (memory, not optimization)
    ppo_epochs: int = 1              # passes over the rollout batch with old log-probs fixed
    old_logp: str = "recompute"      # old log-probs: "recompute" (no-grad forward) or "generate" (the sampler's)
    max_new_tokens: int = 64         # paper: 1024 (8192 for math)
    temperature: float = 1.0         # paper: 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_ids: tuple = ()             # extra stop tokens; the tokenizer's eos is always one
    # loss (Eq. 12)
    clip_eps: float = 0.2
    clip_eps_high: float | None = None   # None: symmetric clipping; DAPO uses 0.28
    norm: str = "sequence"           # "sequence" (paper, 1/|o|) or "token"
    adv_eps: float = 1e-6
    kl_coef: float = 0.0             # paper: no KL
    entropy_coef: float = 0.0        # paper: no entropy bonus
    # credit (Eq. 14-19)
    strategy: str = "none"           # none | random | entropy | local | global | coupled
    sign: str = "both"               # both (paper's revision) | positive | negative (Table 7a)
    q: float = 0.4
    gamma_amp: float = 1.5
    k: int = 3
    alpha: float = 0.5
    bottom: bool = False             # bottom-q ablation
    gamma_norm: str = "none"         # "none" (paper) or "mean": each response's gamma rescaled to mean 1
    credit_layers: str | tuple = "middle"   # five layers of a band: middle (paper) | all | top | bottom,
    #                                           or explicit layer indices (layer ablation)
    credit_heads: str = "targeted"   # "targeted" head groups, or "all" heads (ablation)
    credit_method: str = "lean"      # rhythm_signals path: "lean" (tiled, no N x N maps) or "explicit"
    window: int = 10                 # W of WAAD, Eq. 9
    h_lo: int = 10                   # FAI horizon, Eq. 10
    h_hi: int = 100
    # optimizer
    lr: float = 1e-6                 # paper: 1e-6
    lr_warmup_steps: int = 0         # lr over a run's GRPO steps (GRPO.set_lr_for_step): linear warm-up,
    min_lr_ratio: float = 1.0        # then cosine decay to min_lr_ratio * lr; 1.0 = constant (paper)
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    # reproducibility / evaluation
    seed: int = 0
    eval_seed: int = 1234
    eval_batch_size: int = 64
    generation_batch_size: int | None = None   # rows per generate call; None: all at once

    def __post_init__(self):
        """Every knob checked here, so a bad value fails before any work, from Python or the CLI
        (which names the flag: cli.flag_error). Each error is a ConfigError naming the field."""
        _int_at_least("group_size", self.group_size, 2, "(GRPO compares responses within a group)")
        _int_at_least("rollout_batch_size", self.rollout_batch_size, 1)
        _require(self.rollout_batch_size % self.group_size == 0, "rollout_batch_size", self.rollout_batch_size,
                 f"counts responses and must be a multiple of group_size ({self.group_size})")
        _int_at_least("micro_batch_size", self.micro_batch_size, 1)
        _require(self.rollout_batch_size % self.micro_batch_size == 0, "micro_batch_size", self.micro_batch_size,
                 f"must divide rollout_batch_size ({self.rollout_batch_size})")
        _int_at_least("grad_accum", self.grad_accum, 1)
        _require(self.micro_batch_size % self.grad_accum == 0, "grad_accum", self.grad_accum,
                 f"must divide micro_batch_size ({self.micro_batch_size}): each optimizer step runs that many "
                 f"equal chunks")
        _int_at_least("ppo_epochs", self.ppo_epochs, 1)
        _choice("old_logp", self.old_logp, OLD_LOGPS)
        _int_at_least("max_new_tokens", self.max_new_tokens, 1)
        _number("temperature", self.temperature, low=0, low_open=True,
                why="(GRPO samples; greedy groups have no spread)")
        _number("top_p", self.top_p, low=0, high=1, low_open=True)
        _int_at_least("top_k", self.top_k, 0, "(0 = no top-k)")
        _require(isinstance(self.stop_ids, tuple) and all(_is_int(i) and i >= 0 for i in self.stop_ids),
                 "stop_ids", self.stop_ids, "must be a tuple of token ids >= 0")
        _number("clip_eps", self.clip_eps, low=0, high=1, low_open=True, high_open=True)
        if self.clip_eps_high is not None:
            _number("clip_eps_high", self.clip_eps_high, low=0, low_open=True, why="(or None: = clip_eps)")
        _choice("norm", self.norm, NORMS)
        _choice("gamma_norm", self.gamma_norm, GAMMA_NORMS)
        _number("adv_eps", self.adv_eps, low=0)
        _number("kl_coef", self.kl_coef, low=0)
        _number("entropy_coef", self.entropy_coef, low=0)
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("sign", self.sign, SIGNS)
        _number("q", self.q, low=0, high=1, low_open=True)
        _number("gamma_amp", self.gamma_amp, low=0, low_open=True)
        _int_at_least("k", self.k, 1)
        _number("alpha", self.alpha, low=0, high=1)
        _require(isinstance(self.bottom, bool), "bottom", self.bottom, "must be True or False")
        if isinstance(self.credit_layers, str):
            _choice("credit_layers", self.credit_layers, LAYER_CHOICES)
        else:
            layers = self.credit_layers
            _require(isinstance(layers, tuple) and len(layers) > 0 and all(_is_int(i) and i >= 0 for i in layers)
                     and len(set(layers)) == len(layers), "credit_layers", layers,
                     f"must be one of {', '.join(LAYER_CHOICES)} or a tuple of distinct layer indices >= 0")
        _choice("credit_heads", self.credit_heads, ("targeted", "all"))
        _choice("credit_method", self.credit_method, ("lean", "explicit"))
        _int_at_least("window", self.window, 1)
        _int_at_least("h_lo", self.h_lo, 1)
        if self.h_hi is not None:
            _int_at_least("h_hi", self.h_hi, self.h_lo, "(h_lo), or None (to the end of the response)")
        _number("lr", self.lr, low=0, low_open=True)
        _int_at_least("lr_warmup_steps", self.lr_warmup_steps, 0)
        _number("min_lr_ratio", self.min_lr_ratio, low=0, high=1)
        _require(isinstance(self.betas, tuple) and len(self.betas) == 2
                 and all(_is_number(b) and 0 <= b < 1 for b in self.betas), "betas", self.betas,
                 "must be two numbers in [0, 1)")
        _number("weight_decay", self.weight_decay, low=0)
        _number("adam_eps", self.adam_eps, low=0, low_open=True)
        _number("max_grad_norm", self.max_grad_norm, low=0, low_open=True)
        # Python's random.Random(-s) draws what Random(s) does, so a negative seed would alias a positive one
        _int_at_least("seed", self.seed, 0)
        _int_at_least("eval_seed", self.eval_seed, 0)
        _int_at_least("eval_batch_size", self.eval_batch_size, 1)
        if self.generation_batch_size is not None:
            _int_at_least("generation_batch_size", self.generation_batch_size, 1, "(or None: all at once)")

    @property
    def prompts_per_step(self) -> int:
        return self.rollout_batch_size // self.group_size


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")


class ConfigError(ValueError):
    """A config knob out of its range: names the field, the value and what is allowed.

    str() reads "q must be in (0, 1], got 2"; the command line shows the flag instead
    (cli.flag_error: "--q 2: q must be in (0, 1]").
    """

    def __init__(self, field: str, value, allowed: str):
        self.field, self.value, self.rule = field, value, f"{field} {allowed}"
        super().__init__(f"{self.rule}, got {value!r}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _require(ok: bool, field: str, value, allowed: str):
    if not ok:
        raise ConfigError(field, value, allowed)


def _int_at_least(field, value, low, why=""):
    _require(_is_int(value) and value >= low, field, value, f"must be >= {low} {why}".rstrip())


def _number(field, value, low=None, high=None, low_open=False, high_open=False, why=""):
    """A finite number in the interval given by low/high (open ends when *_open)."""
    ok = _is_number(value)
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
    _require(ok, field, value, f"{allowed} {why}".rstrip())


def _choice(field, value, allowed):
    _require(value in allowed, field, value, f"must be one of {', '.join(map(str, allowed))}")


def check_world_size(config: RLConfig, world_size: int):
    """The batch sizes must split evenly over world_size processes: whole groups per rank for the
    rollout, equal parts of every micro-batch for the update, each in grad_accum equal chunks."""
    if config.rollout_batch_size % (world_size * config.group_size):
        raise ValueError(f"rollout_batch_size ({config.rollout_batch_size}) must be a multiple of processes x "
                         f"group_size ({world_size} x {config.group_size} = {world_size * config.group_size}), "
                         f"so that every process rolls out whole groups")
    if config.micro_batch_size % world_size:
        raise ValueError(f"micro_batch_size ({config.micro_batch_size}) must be a multiple of the number of "
                         f"processes ({world_size}): each optimizer step splits its micro-batch evenly over them")
    per_rank = config.micro_batch_size // world_size
    if per_rank % config.grad_accum:
        raise ValueError(f"grad_accum ({config.grad_accum}) must divide each process's share of the micro-batch "
                         f"(micro_batch_size / processes = {config.micro_batch_size} / {world_size} = {per_rank})")


# -----------------------------------------------------------------------------
# pure parts: advantages, sign rule, loss

def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantage, Eq. 6: A_i = (r_i - mean(r_group)) / (std(r_group) + eps).

    rewards: (B,) with the G responses of one prompt consecutive, B = prompts x G.
    std is the unbiased sample std (divide by G - 1), as torch.std / TRL / verl. A group whose
    rewards are all equal carries no learning signal and gets advantage exactly 0.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"group_size {group_size} does not divide the number of rewards {rewards.numel()}")
    r = rewards.float().view(-1, group_size)  # (P, G)
    adv = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + eps)
    flat = (r.max(dim=1, keepdim=True).values == r.min(dim=1, keepdim=True).values)
    return adv.masked_fill(flat, 0.0).view(-1)


def apply_sign(gamma: torch.Tensor, advantages: torch.Tensor, sign: str) -> torch.Tensor:
    """Where the credit gamma applies (Table 7a): gamma is replaced by 1 elsewhere.

    "both": every response (paper's revision); "positive": responses with A > 0;
    "negative": responses with A < 0. gamma (B, T), advantages (B,).
    """
    _check_choice("sign", sign, SIGNS)
    if sign == "both":
        return gamma
    keep = advantages > 0 if sign == "positive" else advantages < 0  # (B,)
    return torch.where(keep[:, None], gamma, torch.ones_like(gamma))


def normalize_gamma(gamma: torch.Tensor, gamma_norm: str) -> torch.Tensor:
    """gamma (R,) of one response under gamma_norm: "none" leaves it (the paper), "mean" divides it
    by its mean over the response's tokens, so the tokens' total weight stays R whatever the
    strategy (gamma >= 1, so the mean is >= 1). An empty response is returned as it is."""
    _check_choice("gamma_norm", gamma_norm, GAMMA_NORMS)
    if gamma_norm == "none" or gamma.numel() == 0:
        return gamma
    return gamma / gamma.mean()


def _reduce(x: torch.Tensor, mask: torch.Tensor, norm: str) -> torch.Tensor:
    """Masked mean of a (B, T) per-token quantity; "sequence": per response then over responses."""
    if norm == "sequence":
        per_seq = (x * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (B,)
        return per_seq.mean()
    return (x * mask).sum() / mask.sum().clamp(min=1)


def policy_loss(logp, old_logp, advantages, gamma, mask, clip_eps=0.2, clip_eps_high=None,
                norm="sequence", sign="both", ref_logp=None, kl_coef=0.0, entropy=None, entropy_coef=0.0):
    """Clipped surrogate of Eq. 12 with the shaped advantage A~_t = gamma_t * A (Eq. 13).

    logp, old_logp, gamma, mask: (B, T) over response tokens (mask 1 = real token);
    advantages: (B,) one per response; ref_logp, entropy: optional (B, T).
    per token: -min(rho * A~, clip(rho, 1 - eps, 1 + eps_high) * A~) + kl_coef * k3 - entropy_coef * H,
    rho = exp(logp - old_logp). norm="sequence": mean over each response's tokens, then over the
    B responses (the gradient w.r.t. logp at rho = 1 is -gamma * A / |o| / B);
    norm="token": mean over all real tokens of the batch.
    Returns (loss, diagnostics) with diagnostics clip_frac, approx_kl (k3 of old vs new),
    ratio_mean (token means, detached floats) and kl_ref when ref_logp is given.
    """
    _check_choice("norm", norm, NORMS)
    _check_choice("sign", sign, SIGNS)
    shape = logp.shape
    if logp.dim() != 2:
        raise ValueError(f"logp must be (B, T), got shape {tuple(shape)}")
    for name, t in (("old_logp", old_logp), ("gamma", gamma), ("mask", mask), ("ref_logp", ref_logp),
                    ("entropy", entropy)):
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} must have the shape of logp {tuple(shape)}, got {tuple(t.shape)}")
    if advantages.shape != shape[:1]:
        raise ValueError(f"advantages must be (B,) = ({shape[0]},), got {tuple(advantages.shape)}")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    mask = mask.to(logp.dtype)

    shaped = apply_sign(gamma, advantages, sign) * advantages[:, None]  # (B, T), Eq. 13
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    surr = ratio * shaped
    surr_clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high) * shaped
    per_token = -torch.minimum(surr, surr_clipped)
    if ref_logp is not None and kl_coef:
        per_token = per_token + kl_coef * _k3(ref_logp - logp)
    if entropy is not None and entropy_coef:
        per_token = per_token - entropy_coef * entropy
    loss = _reduce(per_token, mask, norm)

    with torch.no_grad():
        clipped = ((ratio > 1.0 + eps_high) & (shaped > 0)) | ((ratio < 1.0 - clip_eps) & (shaped < 0))
        diag = {
            "clip_frac": _reduce(clipped.to(mask.dtype), mask, "token").item(),
            "approx_kl": _reduce(_k3(-log_ratio), mask, "token").item(),
            "ratio_mean": _reduce(ratio, mask, "token").item(),
        }
        if ref_logp is not None:
            diag["kl_ref"] = _reduce(_k3(ref_logp - logp), mask, "token").item()
    return loss, diag


def _k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """k3 KL estimator of KL(p || q) from log(q / p) sampled under p: e^x - x - 1 >= 0."""
    return torch.exp(log_ratio) - log_ratio - 1.0


# -----------------------------------------------------------------------------
# batch tensors

def right_align(rows: list, width: int, fill: float, dtype=torch.float32) -> torch.Tensor:
    """Stack variable-length rows into (B, width), each row flush right (left padded with fill)."""
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for b, row in enumerate(rows):
        if len(row):
            out[b, width - len(row):] = torch.as_tensor(row, dtype=dtype)
    return out


def build_batch(prompts: list, responses: list, pad_id: int) -> dict:
    """Left-padded prompt + response batch.

    Row b is [pad ... pad, prompt_b, response_b], so every row ends with its response and the
    last n_resp = max |response| columns hold all response tokens. Returns
      input_ids (B, T) long, attention_mask (B, T) long (1 = token, 0 = left padding),
      starts (B,) long: column of the first response token of each row,
      response_mask (B, n_resp) float: 1 on the response tokens in the last n_resp columns.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (the first response token is predicted from it)")
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    T = max(len(s) for s in seqs)
    n_resp = max(max(len(r) for r in responses), 1)
    input_ids = right_align(seqs, T, pad_id, torch.long)
    attention_mask = right_align([[1] * len(s) for s in seqs], T, 0, torch.long)
    starts = torch.tensor([T - len(r) for r in responses], dtype=torch.long)
    response_mask = right_align([[1.0] * len(r) for r in responses], n_resp, 0.0)
    return dict(input_ids=input_ids, attention_mask=attention_mask, starts=starts, response_mask=response_mask)


def token_logprobs(model, input_ids, attention_mask, n_resp: int, temperature: float = 1.0,
                   with_entropy: bool = False):
    """Log-probs of the last n_resp tokens of each row, under softmax(logits / temperature).

    The logits at position t predict token t + 1, so the response columns T-n_resp .. T-1 are
    scored by the hidden states at T-n_resp-1 .. T-2. Only those positions (and the last, dropped)
    go through the LM head, and log-softmax is taken as gather - logsumexp, so no (B, T, V) copy
    is made. model is called through forward, so it may be a DDP or FSDP wrapper.
    Returns logp (B, n_resp) and, with with_entropy, the policy entropy (B, n_resp) (else None).
    """
    T = input_ids.shape[1]
    if n_resp >= T:
        raise ValueError(f"n_resp ({n_resp}) must be smaller than the sequence length ({T})")
    logits, _ = model(input_ids, attention_mask=attention_mask, logits_to_keep=n_resp + 1)  # (B, n_resp + 1, V)
    return logprobs_of(logits, input_ids, temperature, with_entropy)


def logprobs_of(logits, input_ids, temperature: float = 1.0, with_entropy: bool = False):
    """token_logprobs from the logits (B, n_resp + 1, V) of the last n_resp + 1 positions, e.g.
    lm_head of the last hidden states of a forward the caller ran for something else."""
    T, n_resp = input_ids.shape[1], logits.shape[1] - 1
    logits = logits[:, :-1].float()  # (B, n_resp, V)
    if temperature not in (0, 1):
        logits = logits / temperature
    targets = input_ids[:, T - n_resp:]  # (B, n_resp)
    lse = torch.logsumexp(logits, dim=-1)  # (B, n_resp)
    logp = logits.gather(-1, targets[..., None]).squeeze(-1) - lse
    entropy = None
    if with_entropy:
        entropy = lse - (F.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, entropy


# -----------------------------------------------------------------------------
# the trainer

@dataclass
class Rollout:
    """One rollout batch: B = prompts x G responses, groups consecutive."""
    examples: list                 # (B,) the example each response answers
    prompt_ids: list               # (B,) token lists
    response_ids: list             # (B,) token lists, stop token included when emitted
    gen_logp: list                 # (B,) generate-time log-probs
    rewards: torch.Tensor          # (B,)
    correct: torch.Tensor          # (B,) float 0/1
    truncated: torch.Tensor        # (B,) float 0/1: no stop token within max_new_tokens
    advantages: torch.Tensor = None    # (B,)
    gammas: list = field(default_factory=list)   # (B,) tensors (R_b,), detached
    old_logp: list = field(default_factory=list)  # (B,) tensors (R_b,) when credit computed them, else empty


def merge_rollouts(parts: list) -> Rollout:
    """One Rollout from consecutive blocks of it (the ranks' parts, in rank order)."""
    if len(parts) == 1:
        return parts[0]
    merged = {}
    for f in fields(Rollout):
        values = [getattr(part, f.name) for part in parts]
        merged[f.name] = torch.cat(values) if isinstance(values[0], torch.Tensor) else [x for v in values for x in v]
    return Rollout(**merged)


class GRPO:
    """GRPO trainer with attention-based credit (see the module docstring for the loop).

    `step(examples)` takes config.prompts_per_step examples (the caller decides the data order)
    and returns a dict of float metrics. `state_dict()` / `load_state_dict()` carry the trainer's
    random state and the optimizer state as a flat dict of tensors (safetensors-friendly); the
    model weights are saved separately by the caller.

    In a process group (torchrun), every rank builds the same model and calls every method with
    the same arguments; `parallel` ("ddp" or "fsdp", see distributed.py) wraps the model before
    the optimizer is built (FSDP shards it in place). self.model stays the Transformer (for
    generate and the credit pass); self.policy is the wrapper whose forward the update runs.
    """

    def __init__(self, model, tokenizer, task, config: RLConfig, parallel: str | None = None):
        self.model, self.tokenizer, self.task, self.config = model, tokenizer, task, config
        self.rank, self.world = rank(), world_size()
        check_world_size(config, self.world)
        if parallel is not None and not is_distributed():
            raise ValueError(f"parallel={parallel!r} needs a process group (start under torchrun)")
        self.parallel = parallel or ("ddp" if is_distributed() else None)
        self.pad_id = _first_not_none(getattr(tokenizer, "pad_id", None), getattr(tokenizer, "eos_id", None), 0)
        eos = getattr(tokenizer, "eos_id", None)
        self.stop_ids = tuple(dict.fromkeys(([eos] if eos is not None else []) + list(config.stop_ids)))
        self.ref_model = None
        if config.kl_coef:  # a whole frozen copy on every rank, taken before FSDP shards the model
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.policy = wrap(model, self.parallel)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas),
                                           weight_decay=config.weight_decay, eps=config.adam_eps)
        self.rng = torch.Generator().manual_seed(config.seed)
        self.steps = 0

    # ---- rollout ----

    def encode_prompt(self, example) -> list:
        ids = self.tokenizer.encode(example.prompt, allow_special=True)
        if not ids:
            raise ValueError(f"prompt encodes to no tokens: {example.prompt!r}")
        return ids

    def _generate(self, prompts: list, temperature: float, seeds: list):
        """Sample one response per prompt, row i from its own generator seeded with seeds[i], in
        chunks of generation_batch_size rows. Under FSDP the caller holds the model gathered."""
        cfg = self.config
        chunk = cfg.generation_batch_size or len(prompts)
        tokens, logps = [], []
        self.model.eval()
        with torch.no_grad():
            for i in range(0, len(prompts), chunk):
                t, lp = self.model.generate(prompts[i:i + chunk], cfg.max_new_tokens, temperature=temperature,
                                            top_p=cfg.top_p, top_k=cfg.top_k, stop_ids=self.stop_ids,
                                            seed=seeds[i:i + chunk] if temperature > 0 else None,
                                            return_logprobs=True)
                tokens += t
                logps += lp
        return tokens, logps

    def _response_text(self, tokens: list) -> str:
        if tokens and tokens[-1] in self.stop_ids:
            tokens = tokens[:-1]
        return self.tokenizer.decode(tokens)

    def rollout(self, examples: list, seed: int, first: int = 0) -> Rollout:
        """Sample G responses per example, score them (reward, correct) and compute advantages.

        first: index in the step's rollout batch of the first response here (a rank's block);
        response i samples with seed + first + i.
        """
        G = self.config.group_size
        group_examples = [ex for ex in examples for _ in range(G)]
        prompt_ids = [ids for ids in (self.encode_prompt(ex) for ex in examples) for _ in range(G)]
        seeds = [seed + first + i for i in range(len(prompt_ids))]
        response_ids, gen_logp = self._generate(prompt_ids, self.config.temperature, seeds)
        texts = [self._response_text(r) for r in response_ids]
        rewards = torch.tensor([float(self.task.reward(t, ex)) for t, ex in zip(texts, group_examples)])
        correct = torch.tensor([float(bool(self.task.correct(t, ex))) for t, ex in zip(texts, group_examples)])
        truncated = torch.tensor([float(not (r and r[-1] in self.stop_ids)) for r in response_ids])
        roll = Rollout(group_examples, prompt_ids, response_ids, gen_logp, rewards, correct, truncated)
        roll.advantages = group_advantages(rewards, G, self.config.adv_eps)
        return roll

    # ---- credit ----

    def credit(self, roll: Rollout, seed: int, first: int = 0) -> float:
        """Fill roll.gammas, one detached (R_b,) tensor per response (Eq. 14-19 via credit_gamma, then
        normalize_gamma), and, for signal strategies on the lean path with old_logp="recompute",
        roll.old_logp from the same forward, run on chunks of micro_batch_size / grad_accum responses.

        Random credit draws response i's tokens with a generator seeded seed + first + i.
        Under FSDP the caller holds the model gathered (self.model's hidden_states then runs on
        whole weights, outside the wrapper's forward). Returns the seconds spent on the old
        log-probs' share: the forward and the LM head (0.0 when no forward ran).
        """
        cfg = self.config
        lengths = [len(r) for r in roll.response_ids]
        if cfg.strategy == "none":
            roll.gammas = [torch.ones(n) for n in lengths]
            return 0.0
        kw = dict(q=cfg.q, gamma_amp=cfg.gamma_amp, k=cfg.k, alpha=cfg.alpha, bottom=cfg.bottom)
        if cfg.strategy == "random":
            roll.gammas = [normalize_gamma(credit_gamma("random", waad=torch.zeros(n), **kw,
                                                        generator=torch.Generator().manual_seed(seed + first + i)),
                                           cfg.gamma_norm)
                           for i, n in enumerate(lengths)]
            return 0.0
        layers = cfg.credit_layers
        if isinstance(layers, str):
            layers = default_layers(self.model.config.num_hidden_layers, layers)
        # the entropy of the distribution that was sampled: softmax(logits / temperature)
        signal_kw = dict(layers=layers, heads=cfg.credit_heads, window=cfg.window, h_lo=cfg.h_lo, h_hi=cfg.h_hi,
                         temperature=cfg.temperature)
        gammas, old_logp, old_logp_time = [], [], 0.0
        self.model.eval()
        with torch.no_grad():
            for rows in _chunks(range(len(lengths)), cfg.micro_batch_size // cfg.grad_accum):
                batch = self._batch(roll, rows)
                ids, mask = batch["input_ids"], batch["attention_mask"]
                if cfg.credit_method == "explicit":  # the reference path runs its own forward
                    signals = rhythm_signals(self.model, ids, batch["starts"], mask, method="explicit", **signal_kw)
                else:
                    t0 = time.perf_counter()
                    h, _, qk = self.model.hidden_states(ids, attention_mask=mask, qk_layers=tuple(layers))
                    if cfg.old_logp == "recompute":  # the same forward gives the old log-probs
                        n_resp = batch["response_mask"].shape[1]
                        logp, _ = logprobs_of(self.model.lm_head(h[:, -(n_resp + 1):]), ids, cfg.temperature)
                        old_logp += [logp[i, n_resp - lengths[b]:].cpu() for i, b in enumerate(rows)]
                        old_logp_time += time.perf_counter() - t0
                    signals = rhythm_signals_from(self.model, h, qk, ids, batch["starts"], mask, **signal_kw)
                for s in signals:
                    gamma = credit_gamma(cfg.strategy, waad=s["waad"], fai=s["fai"], entropy=s["entropy"], **kw)
                    gammas.append(normalize_gamma(gamma, cfg.gamma_norm).detach().float().cpu())
        roll.gammas, roll.old_logp = gammas, old_logp  # old_logp empty unless this forward gave them
        return old_logp_time

    # ---- update ----

    def _batch(self, roll: Rollout, rows: list, with_update_fields: bool = False) -> dict:
        """build_batch over the given responses, plus (for the update) their gammas, generate-time
        log-probs, advantages and old log-probs (when credit computed them), all on the model's device."""
        batch = build_batch([roll.prompt_ids[b] for b in rows], [roll.response_ids[b] for b in rows], self.pad_id)
        if with_update_fields:
            n_resp = batch["response_mask"].shape[1]
            batch["gamma"] = right_align([roll.gammas[b].tolist() for b in rows], n_resp, 1.0)
            batch["gen_logp"] = right_align([roll.gen_logp[b] for b in rows], n_resp, 0.0)
            batch["advantages"] = roll.advantages[rows]
            if roll.old_logp:
                batch["old_logp"] = right_align([roll.old_logp[b] for b in rows], n_resp, 0.0)
        return {key: value.to(self.model.device) for key, value in batch.items()}

    def _logprobs(self, model, batch, with_entropy=False):
        return token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"].shape[1],
                              self.config.temperature, with_entropy)

    def update(self, roll: Rollout, seed: int) -> dict:
        """Micro-batched clipped-surrogate updates with old log-probs fixed (one AdamW step each).

        roll is the whole rollout batch. Each micro-batch of micro_batch_size responses (seeded
        shuffle) is split into world_size equal parts and this rank's part into grad_accum equal
        chunks, each one forward/backward; the wrapper averages the gradients over ranks. Every
        chunk's loss is scaled by its share of the micro-batch, so the gradient summed over chunks
        and averaged over ranks is exactly that of the micro-batch's loss: with norm="sequence" its
        share of the rank's responses (the mean of per-response means), with norm="token"
        world_size x its tokens / the micro-batch's tokens (the micro-batch's token mean). Then one
        gradient clip and one AdamW step; the gradients are freed at the end. Logged loss and
        token-mean diagnostics are those of the whole micro-batch. Old log-probs: with
        old_logp="generate" the sampler's; else the rollout's when credit computed them, else a
        forward here on the same chunks, timed as time_old_logp.
        """
        cfg = self.config
        order = torch.randperm(len(roll.response_ids), generator=torch.Generator().manual_seed(seed)).tolist()
        part = cfg.micro_batch_size // self.world
        size = part // cfg.grad_accum
        mine = [rows[self.rank * part:(self.rank + 1) * part] for rows in _chunks(order, cfg.micro_batch_size)]
        micro = [[self._batch(roll, chunk, with_update_fields=True) for chunk in _chunks(rows, size)] for rows in mine]
        chunks = [batch for batches in micro for batch in batches]
        self.policy.train()
        t0 = time.perf_counter()
        with torch.no_grad(), gathered(self.model):
            for batch in chunks:
                if cfg.old_logp == "generate":
                    batch["old_logp"] = batch["gen_logp"]
                elif "old_logp" not in batch:
                    batch["old_logp"], _ = self._logprobs(self.model, batch)
            old_logp_time = time.perf_counter() - t0
            for batch in chunks:
                batch["ref_logp"] = self._logprobs(self.ref_model, batch)[0] if self.ref_model is not None else None
        tokens = torch.stack([sum(b["response_mask"].sum() for b in batches) for batches in micro])  # (n_micro,)
        all_tokens = all_reduce_sum(tokens)  # (n_micro,) whole micro-batches
        # generate-time log-probs against a forward at the same weights: the recomputed old log-probs,
        # or (old_logp="generate") the first micro-batch's training forward, taken below
        gap = sum(_gap(b["old_logp"], b) for b in chunks) if cfg.old_logp == "recompute" else 0.0
        stats = {"time_old_logp": old_logp_time}

        logs, grad_norms = [], []
        for epoch in range(cfg.ppo_epochs):
            for m, (batches, n, n_all) in enumerate(zip(micro, tokens, all_tokens)):
                self.optimizer.zero_grad(set_to_none=True)
                log = {"loss": 0.0, "tokens": n.item()}
                for i, batch in enumerate(batches):
                    n_chunk = batch["response_mask"].sum()
                    share = self.world * n_chunk / n_all if cfg.norm == "token" else len(batch["advantages"]) / part
                    with self._grad_sync(last=i == len(batches) - 1):
                        loss, diag, logp = self._chunk_loss(batch)
                        loss = loss * share
                        loss.backward()
                    if cfg.old_logp == "generate" and epoch == 0 and m == 0:
                        gap = gap + _gap(logp.detach(), batch)
                    log["loss"] += loss.item()
                    for key, value in diag.items():  # token means -> token sums, summed over chunks
                        log[key] = log.get(key, 0.0) + value * n_chunk.item()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                grad_norms.append(local_value(grad_norm).item())  # of the averaged gradient: same on all ranks
                logs.append(log)
        # the gradients would otherwise sit through the next step's generation (4 B per parameter)
        self.optimizer.zero_grad(set_to_none=True)
        gap_tokens = all_tokens.sum() if cfg.old_logp == "recompute" else all_tokens[0]
        stats["logp_gen_gap"] = (all_reduce_sum(torch.as_tensor(gap, dtype=torch.float32)) / gap_tokens).item()
        stats.update(_whole_batch_logs(logs, self.world))
        stats["grad_norm"] = sum(grad_norms) / len(grad_norms)
        return stats

    def _chunk_loss(self, batch: dict):
        """policy_loss (Eq. 12-13) of one chunk under the config, from a forward of the policy."""
        cfg = self.config
        logp, entropy = self._logprobs(self.policy, batch, with_entropy=cfg.entropy_coef > 0)
        loss, diag = policy_loss(logp, batch["old_logp"], batch["advantages"], batch["gamma"], batch["response_mask"],
                                 cfg.clip_eps, cfg.clip_eps_high, cfg.norm, cfg.sign, batch["ref_logp"], cfg.kl_coef,
                                 entropy, cfg.entropy_coef)
        return loss, diag, logp

    def _grad_sync(self, last: bool):
        """DDP all-reduces the accumulated gradient once, in the last chunk's backward. FSDP
        reduce-scatters every chunk, which keeps the gradient sharded (the memory the chunks save)."""
        if self.parallel == "ddp" and not last:
            return self.policy.no_sync()
        return contextlib.nullcontext()

    # ---- one step ----

    def set_lr_for_step(self, step: int, total_steps: int) -> float:
        """Set and return the lr of GRPO step `step` (0-based) of a run of total_steps: config.lr
        with linear warm-up over lr_warmup_steps, then cosine decay to min_lr_ratio * lr (sft.lr_at,
        the warm-up's schedule); constant with the defaults, as in the paper."""
        cfg = self.config
        lr = lr_at(step, total_steps, cfg.lr, cfg.lr_warmup_steps, cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step(self, examples: list) -> dict:
        """One rollout batch -> one round of updates. Returns float metrics for the logger.

        Metrics: reward_mean, reward_std, accuracy, response_length, truncated_frac, zero_adv_frac
        (share of groups with equal rewards), gamma_mean, amplified_frac (share of response
        tokens with gamma > 1 after the sign rule), loss, grad_norm, clip_frac, approx_kl,
        ratio_mean, logp_gen_gap, kl_ref (when kl_coef > 0), step; with DDP, replica_spread
        (distributed.replica_spread: 0.0 when the replicas agree); and the times below.
        examples: all of the step's prompts, the same on every rank; the times are this rank's.

        Time accounting (the four parts add up to time_step): time_generate = sampling and scoring;
        time_old_logp = the no-grad forward and LM head for the old log-probs, which GRPO needs with
        or without credit (with signal credit it is the credit forward; else it runs in update);
        time_credit = only what credit adds on top of that forward: the signals from its hidden
        states and q/k, and credit_gamma (with credit_method="explicit" also its own forward);
        time_update = the rest of update (exchange, reference log-probs, optimizer steps).
        """
        cfg = self.config
        if len(examples) != cfg.prompts_per_step:
            raise ValueError(f"step() needs rollout_batch_size / group_size = {cfg.prompts_per_step} examples, "
                             f"got {len(examples)}")
        gen_seed, credit_seed, order_seed = torch.randint(0, 2 ** 62, (3,), generator=self.rng).tolist()
        lo, hi = shard_range(len(examples), self.rank, self.world)  # whole groups: this rank's prompts
        first = lo * cfg.group_size
        t0 = time.perf_counter()
        with gathered(self.model):
            local = self.rollout(examples[lo:hi], gen_seed, first)
            t1 = time.perf_counter()
            credit_old_logp = self.credit(local, credit_seed, first)
        t2 = time.perf_counter()
        roll = merge_rollouts(all_gather_objects(local))
        stats = self.update(roll, order_seed)
        if self.parallel == "ddp":
            stats["replica_spread"] = replica_spread(self.model)
        t3 = time.perf_counter()
        self.steps += 1

        gamma = torch.cat([apply_sign(g[None], a[None], cfg.sign)[0] for g, a in zip(roll.gammas, roll.advantages)])
        groups = roll.rewards.view(-1, cfg.group_size)
        metrics = {
            "step": float(self.steps),
            "reward_mean": roll.rewards.mean().item(),
            "reward_std": roll.rewards.std().item(),
            "accuracy": roll.correct.mean().item(),
            "response_length": float(sum(len(r) for r in roll.response_ids)) / len(roll.response_ids),
            "truncated_frac": roll.truncated.mean().item(),
            "zero_adv_frac": (groups.max(1).values == groups.min(1).values).float().mean().item(),
            "gamma_mean": gamma.mean().item() if gamma.numel() else 1.0,
            "amplified_frac": (gamma > 1).float().mean().item() if gamma.numel() else 0.0,
            **stats,
            "time_generate": t1 - t0,
            "time_credit": t2 - t1 - credit_old_logp,
            "time_old_logp": credit_old_logp + stats["time_old_logp"],
            "time_update": t3 - t2 - stats["time_old_logp"],
            "time_step": t3 - t0,
        }
        return metrics

    # ---- evaluation ----

    def evaluate(self, examples: list, greedy: bool = True, k: int = 1) -> dict:
        """Held-out accuracy as the paper reports it.

        greedy=True: one greedy decode per problem, accuracy = pass@1 (k must be 1).
        greedy=False: k samples per problem at config.temperature; accuracy = pass@1 of the first
        sample, avg_at_k = mean accuracy over all k samples (AIME's avg@16).
        Uses config.eval_seed, not the training random stream (sample j of the list of
        problems x k draws with eval_seed + j). In a process group each rank decodes a contiguous
        block of the problems and the results are gathered, so every rank returns the same dict.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if greedy and k != 1:
            raise ValueError("greedy decoding gives k identical samples; use greedy=False for avg@k")
        if not examples:
            raise ValueError("evaluate() needs at least one example")
        lo, hi = shard_range(len(examples), self.rank, self.world)
        mine = [ex for ex in examples[lo:hi] for _ in range(k)]
        prompts = [self.encode_prompt(ex) for ex in mine]
        seeds = [self.config.eval_seed + lo * k + j for j in range(len(prompts))]
        responses, size = [], self.config.eval_batch_size
        with gathered(self.model):
            for i in range(0, len(prompts), size):
                tokens, _ = self._generate(prompts[i:i + size], 0.0 if greedy else self.config.temperature,
                                           seeds[i:i + size])
                responses += tokens
        scored = [(float(bool(self.task.correct(self._response_text(r), ex))), len(r))
                  for r, ex in zip(responses, mine)]
        scored = [row for part in all_gather_objects(scored) for row in part]
        correct = torch.tensor([c for c, _ in scored]).view(len(examples), k)  # (P, k)
        return {
            "accuracy": correct[:, 0].mean().item(),
            "avg_at_k": correct.mean().item(),
            "k": float(k),
            "response_length": float(sum(n for _, n in scored)) / len(scored),
        }

    # ---- checkpointing ----

    def state_dict(self) -> dict:
        """Trainer state as a flat dict of tensors: RNG, step count, AdamW moments and lr.

        The moments are whole (never sharded) and keyed by parameter name, "optim.<name>.exp_avg",
        so they load into any number of processes under either wrapper. In a process group this is
        a collective and only rank 0 gets the moments. They may share memory with the live
        optimizer state: save them before the next step.
        """
        out = {"rng": self.rng.get_state(), "steps": torch.tensor(self.steps, dtype=torch.long)}
        sd = {}
        if self.optimizer.state:  # before the first update there are no moments (and asking torch for
            # them would initialise them with a zero-gradient AdamW step, which counts as a step)
            sd = get_optimizer_state_dict(self.model, self.optimizer,
                                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        for name, state in sd.get("state", {}).items():
            for key, value in state.items():
                out[f"optim.{name}.{key}"] = torch.as_tensor(value).contiguous()
        for g, group in enumerate(self.optimizer.param_groups):
            out[f"optim.group{g}.lr"] = torch.tensor(float(group["lr"]), dtype=torch.float64)
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned (e.g. read back with safetensors.torch.load_file).

        In a process group every rank calls this; only rank 0's moments are read (they are
        broadcast and sharded as the wrapper needs), so other ranks may pass the state without them.
        """
        self.rng.set_state(state["rng"])
        self.steps = int(state["steps"])
        moments = {}
        for key, value in state.items():
            if not key.startswith("optim."):
                continue
            name, slot = key.removeprefix("optim.").rsplit(".", 1)  # e.g. "layers.0.mlp.up_proj.weight", "exp_avg"
            if name.startswith("group") and slot == "lr":
                self.optimizer.param_groups[int(name[5:])]["lr"] = float(value)
            else:
                moments.setdefault(name, {})[slot] = value
        if self.steps == 0:  # saved before the first update: AdamW has no moments yet
            return
        names = {p: name for name, p in self.model.named_parameters()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[p] for p in g["params"]]}
                  for g in self.optimizer.param_groups]
        full = {"state": moments, "param_groups": groups}
        if is_distributed():
            set_optimizer_state_dict(self.model, self.optimizer, full if self.rank == 0 else {},
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        else:
            set_optimizer_state_dict(self.model, self.optimizer, full)


def _gap(logp: torch.Tensor, batch: dict) -> torch.Tensor:
    """Summed |logp - generate-time log-prob| over a chunk's response tokens (logp_gen_gap's numerator)."""
    return ((logp - batch["gen_logp"]).abs() * batch["response_mask"]).sum()


def _chunks(seq, size: int) -> list:
    seq = list(seq)
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def _first_not_none(*values) -> Any:
    return next(v for v in values if v is not None)


def _whole_batch_logs(logs: list, world: int) -> dict:
    """Per-step logs of this rank -> means over the steps of the whole micro-batches' values.

    Each log holds the rank's loss, its token-mean diagnostics times its token count, and that
    count; summed over ranks, loss / world is the micro-batch's loss (what the averaged gradient
    is the gradient of) and diagnostic / tokens its token mean.
    """
    keys = list(logs[0])
    total = all_reduce_sum(torch.tensor([[log[key] for key in keys] for log in logs], dtype=torch.float64))
    per_step = {key: total[:, i] for i, key in enumerate(keys)}  # (n_steps,) each
    tokens = per_step.pop("tokens").clamp(min=1)
    out = {"loss": (per_step.pop("loss") / world).mean().item()}
    out.update({key: (value / tokens).mean().item() for key, value in per_step.items()})
    return out

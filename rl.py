"""GRPO with attention-based credit assignment (paper Section 5, Eq. 6 and Eq. 12-19).

One batch, start to finish, is `GRPO.step(examples)`:
1. rollout    each prompt is sampled G times (model.generate); the task scores each response.
2. advantage  group_advantages, Eq. 6: (r - group mean) / (group std + eps), one per response.
3. credit     one no-grad forward over prompt + response gives the old log-probs and q/k of the
              chosen layers; attention_lean.rhythm_signals_from turns them into WAAD/FAI/entropy,
              attention_metrics.credit_gamma into one gamma per token ("none"/"random": no forward).
4. update     micro-batches of the rollout batch, each one AdamW step on policy_loss: the clipped
              surrogate of Eq. 12 with A~_t = gamma_t * A (Eq. 13).
The paper's comparisons (strategies, bottom-q, signs, layers, heads) are all RLConfig fields.

Defaults: those of the metrics and the credit (W, H_lo, H_hi, q, gamma_amp, k, alpha, ...) are
written once, at the top of attention_metrics.py. GRPO's own, where the paper is silent:
- Group std is the unbiased sample std (G - 1), as torch.std, TRL and verl; a group whose rewards
  are all equal gets advantage exactly 0.
- rollout_batch_size counts responses (prompts x G; the paper's 512 / 32 = 16 optimizer steps a
  batch). grad_accum splits a micro-batch into chunks whose losses add up to the same gradient.
- Old log-probs come from a no-grad forward before any update (old_logp="recompute", as verl and
  TRL; with signal credit it is the credit forward), or from the sampler ("generate": no forward,
  about 1e-6 a token apart in fp32; logp_gen_gap measures it).
- Log-probs and entropies are those of softmax(logits / temperature), the distribution sampled.
- gamma_norm="mean" (not in the paper) rescales each response's gamma to mean 1.
- A response keeps its stop token (the policy learns to stop); the reward's text does not.
- norm="sequence" is the paper's 1/|o| then the mean over responses; "token" the token mean (DAPO).
- No KL and no entropy term unless asked (k3 estimator); AdamW weight decay 0, grad clip at 1.0.
- Response i of a batch samples with its own generator (step seed + i), so what it samples does not
  depend on its neighbours or on the number of processes; evaluation has its own fixed seed.
Under torchrun every phase is split as distributed.py describes, and N processes take the optimizer
steps one process takes, up to floating-point summation order.
"""

import copy
import math
import time
from dataclasses import dataclass, field, fields

import torch

import checks
from attention_lean import rhythm_signals, rhythm_signals_from
from attention_metrics import (COUPLE_ALPHA, COUPLE_K, CREDIT_Q, FAI_H_HI, FAI_H_LO, GAMMA_AMP, LAYER_CHOICES,
                               STRATEGIES, WAAD_WINDOW, credit_gamma, default_layers)
from batching import build_batch, logprobs_of, right_align, token_logprobs
from checkpoint import restore_trainer_state, trainer_state
from distributed import (all_gather_objects, all_reduce_sum, check_world_size, chunks, gathered, grad_sync,
                         is_distributed, local_value, my_chunks, rank, replica_spread, shard_range, whole_batch_means,
                         world_size, wrap)

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
    q: float = CREDIT_Q
    gamma_amp: float = GAMMA_AMP
    k: int = COUPLE_K
    alpha: float = COUPLE_ALPHA
    bottom: bool = False             # bottom-q ablation
    gamma_norm: str = "none"         # "none" (paper) or "mean": each response's gamma rescaled to mean 1
    credit_layers: str | tuple = "middle"   # five layers of a band: middle (paper) | all | top | bottom,
    #                                           or explicit layer indices (layer ablation)
    credit_heads: str = "targeted"   # "targeted" head groups, or "all" heads (ablation)
    credit_method: str = "lean"      # rhythm_signals path: "lean" (tiled, no N x N maps) or "explicit"
    window: int = WAAD_WINDOW        # W of WAAD, Eq. 9
    h_lo: int = FAI_H_LO             # FAI horizon, Eq. 10
    h_hi: int = FAI_H_HI
    # optimizer
    lr: float = 1e-6                 # paper: 1e-6
    lr_warmup_steps: int = 0         # lr over a run's GRPO steps (lr_at): linear warm-up,
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
        (which names the flag: cli.flag_error). Each error is a checks.ConfigError naming the field."""
        at_least, number, choice, require = checks.int_at_least, checks.number, checks.choice, checks.require
        at_least("group_size", self.group_size, 2, "(GRPO compares responses within a group)")
        for name in ("rollout_batch_size", "micro_batch_size", "grad_accum", "ppo_epochs", "max_new_tokens",
                     "k", "window", "h_lo", "eval_batch_size"):
            at_least(name, getattr(self, name), 1)
        # Python's random.Random(-s) draws what Random(s) does, so a negative seed would alias a positive one
        for name in ("lr_warmup_steps", "seed", "eval_seed"):
            at_least(name, getattr(self, name), 0)
        require(self.rollout_batch_size % self.group_size == 0, "rollout_batch_size", self.rollout_batch_size,
                f"counts responses and must be a multiple of group_size ({self.group_size})")
        require(self.rollout_batch_size % self.micro_batch_size == 0, "micro_batch_size", self.micro_batch_size,
                f"must divide rollout_batch_size ({self.rollout_batch_size})")
        require(self.micro_batch_size % self.grad_accum == 0, "grad_accum", self.grad_accum,
                f"must divide micro_batch_size ({self.micro_batch_size}): each optimizer step runs that many "
                f"equal chunks")
        for name, allowed in (("old_logp", OLD_LOGPS), ("norm", NORMS), ("gamma_norm", GAMMA_NORMS),
                              ("strategy", STRATEGIES), ("sign", SIGNS), ("credit_heads", ("targeted", "all")),
                              ("credit_method", ("lean", "explicit"))):
            choice(name, getattr(self, name), allowed)
        number("temperature", self.temperature, low=0, low_open=True,
               why="(GRPO samples; greedy groups have no spread)")
        number("top_p", self.top_p, low=0, high=1, low_open=True)
        at_least("top_k", self.top_k, 0, "(0 = no top-k)")
        require(isinstance(self.stop_ids, tuple) and all(checks.is_int(i) and i >= 0 for i in self.stop_ids),
                "stop_ids", self.stop_ids, "must be a tuple of token ids >= 0")
        number("clip_eps", self.clip_eps, low=0, high=1, low_open=True, high_open=True)
        if self.clip_eps_high is not None:
            number("clip_eps_high", self.clip_eps_high, low=0, low_open=True, why="(or None: = clip_eps)")
        for name in ("adv_eps", "kl_coef", "entropy_coef", "weight_decay"):
            number(name, getattr(self, name), low=0)
        for name in ("lr", "adam_eps", "max_grad_norm"):
            number(name, getattr(self, name), low=0, low_open=True)
        number("q", self.q, low=0, high=1, low_open=True)
        number("gamma_amp", self.gamma_amp, low=0, low_open=True)
        number("alpha", self.alpha, low=0, high=1)
        number("min_lr_ratio", self.min_lr_ratio, low=0, high=1)
        require(isinstance(self.bottom, bool), "bottom", self.bottom, "must be True or False")
        layers = self.credit_layers
        if isinstance(layers, str):
            choice("credit_layers", layers, LAYER_CHOICES)
        else:
            require(isinstance(layers, tuple) and len(layers) > 0 and all(checks.is_int(i) and i >= 0 for i in layers)
                    and len(set(layers)) == len(layers), "credit_layers", layers,
                    f"must be one of {', '.join(LAYER_CHOICES)} or a tuple of distinct layer indices >= 0")
        if self.h_hi is not None:
            at_least("h_hi", self.h_hi, self.h_lo, "(h_lo), or None (to the end of the response)")
        require(isinstance(self.betas, tuple) and len(self.betas) == 2
                and all(checks.is_number(b) and 0 <= b < 1 for b in self.betas), "betas", self.betas,
                "must be two numbers in [0, 1)")
        if self.generation_batch_size is not None:
            at_least("generation_batch_size", self.generation_batch_size, 1, "(or None: all at once)")

    @property
    def prompts_per_step(self) -> int:
        return self.rollout_batch_size // self.group_size


# -----------------------------------------------------------------------------
# The pure parts: advantages, the sign rule, the loss, the lr schedule

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
    checks.known("sign", sign, SIGNS)
    if sign == "both":
        return gamma
    keep = advantages > 0 if sign == "positive" else advantages < 0  # (B,)
    return torch.where(keep[:, None], gamma, torch.ones_like(gamma))


def normalize_gamma(gamma: torch.Tensor, gamma_norm: str) -> torch.Tensor:
    """gamma (R,) of one response under gamma_norm: "none" leaves it (the paper), "mean" divides it
    by its mean over the response's tokens, so the tokens' total weight stays R whatever the
    strategy (gamma >= 1, so the mean is >= 1). An empty response is returned as it is."""
    checks.known("gamma_norm", gamma_norm, GAMMA_NORMS)
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
    checks.known("norm", norm, NORMS)  # sign: apply_sign checks it
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


def lr_at(step: int, steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """The lr of step `step` (0-based) of `steps`: linear warm-up to lr over warmup_steps, then cosine
    decay to min_lr_ratio * lr at the last step (constant with min_lr_ratio 1, as in the paper).
    GRPO and the supervised warm-up (sft.py) both follow it."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps - 1)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# -----------------------------------------------------------------------------
# The trainer

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


def generate_responses(model, prompts: list, cfg: RLConfig, temperature: float, seeds: list, stop_ids: tuple):
    """Sample one response per prompt, row i from its own generator seeded with seeds[i], in chunks of
    generation_batch_size rows; (tokens, log-probs) lists. Under FSDP the caller holds the model gathered."""
    chunk = cfg.generation_batch_size or len(prompts)
    tokens, logps = [], []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(prompts), chunk):
            t, lp = model.generate(prompts[i:i + chunk], cfg.max_new_tokens, temperature=temperature, top_p=cfg.top_p,
                                   top_k=cfg.top_k, stop_ids=stop_ids, return_logprobs=True,
                                   seed=seeds[i:i + chunk] if temperature > 0 else None)
            tokens += t
            logps += lp
    return tokens, logps


def update_batch(roll: Rollout, rows: list, pad_id: int, device, with_update_fields: bool = False) -> dict:
    """build_batch over the given responses, plus (for the update) their gammas, generate-time
    log-probs, advantages and old log-probs (when credit computed them), all on device."""
    batch = build_batch([roll.prompt_ids[b] for b in rows], [roll.response_ids[b] for b in rows], pad_id)
    if with_update_fields:
        n_resp = batch["response_mask"].shape[1]
        batch["gamma"] = right_align([roll.gammas[b].tolist() for b in rows], n_resp, 1.0)
        batch["gen_logp"] = right_align([roll.gen_logp[b] for b in rows], n_resp, 0.0)
        batch["advantages"] = roll.advantages[rows]
        if roll.old_logp:
            batch["old_logp"] = right_align([roll.old_logp[b] for b in rows], n_resp, 0.0)
    return {key: value.to(device) for key, value in batch.items()}


def rollout_metrics(roll: Rollout, sign: str, group_size: int) -> dict:
    """What a step's rollout batch shows: rewards, accuracy, lengths, and how much credit amplified."""
    gamma = torch.cat([apply_sign(g[None], a[None], sign)[0] for g, a in zip(roll.gammas, roll.advantages)])
    groups = roll.rewards.view(-1, group_size)
    return {
        "reward_mean": roll.rewards.mean().item(),
        "reward_std": roll.rewards.std().item(),
        "accuracy": roll.correct.mean().item(),
        "response_length": float(sum(len(r) for r in roll.response_ids)) / len(roll.response_ids),
        "truncated_frac": roll.truncated.mean().item(),
        "zero_adv_frac": (groups.max(1).values == groups.min(1).values).float().mean().item(),
        "gamma_mean": gamma.mean().item() if gamma.numel() else 1.0,
        "amplified_frac": (gamma > 1).float().mean().item() if gamma.numel() else 0.0,
    }


class GRPO:
    """GRPO with attention-based credit: step(examples) = rollout -> credit -> update -> metrics.

    Under torchrun every rank builds the same model and calls every method with the same arguments;
    `parallel` ("ddp" or "fsdp") wraps the model before the optimizer is built. self.model stays the
    Transformer (generate, the credit pass); self.policy is the wrapper whose forward the update runs.
    """

    def __init__(self, model, tokenizer, task, config: RLConfig, parallel: str | None = None):
        self.model, self.tokenizer, self.task, self.config = model, tokenizer, task, config
        self.rank, self.world = rank(), world_size()
        check_world_size(config, self.world)
        if parallel is not None and not is_distributed():
            raise ValueError(f"parallel={parallel!r} needs a process group (start under torchrun)")
        self.parallel = parallel or ("ddp" if is_distributed() else None)
        eos = getattr(tokenizer, "eos_id", None)
        self.pad_id = next(i for i in (getattr(tokenizer, "pad_id", None), eos, 0) if i is not None)
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

    # ---- 1. rollout and 2. advantages ----

    def rollout(self, examples: list, seed: int, first: int = 0) -> Rollout:
        """Sample G responses per example, score them (reward, correct) and compute advantages.
        first: index in the step's rollout batch of the first response here (a rank's block);
        response i samples with seed + first + i."""
        G = self.config.group_size
        group_examples = [ex for ex in examples for _ in range(G)]
        prompt_ids = [ids for ids in (self.encode_prompt(ex) for ex in examples) for _ in range(G)]
        seeds = [seed + first + i for i in range(len(prompt_ids))]
        response_ids, gen_logp = generate_responses(self.model, prompt_ids, self.config, self.config.temperature,
                                                     seeds, self.stop_ids)
        texts = [self.response_text(r) for r in response_ids]
        rewards = torch.tensor([float(self.task.reward(t, ex)) for t, ex in zip(texts, group_examples)])
        correct = torch.tensor([float(bool(self.task.correct(t, ex))) for t, ex in zip(texts, group_examples)])
        truncated = torch.tensor([float(not (r and r[-1] in self.stop_ids)) for r in response_ids])
        roll = Rollout(group_examples, prompt_ids, response_ids, gen_logp, rewards, correct, truncated)
        roll.advantages = group_advantages(rewards, G, self.config.adv_eps)
        return roll

    def encode_prompt(self, example) -> list:
        ids = self.tokenizer.encode(example.prompt, allow_special=True)
        if not ids:
            raise ValueError(f"prompt encodes to no tokens: {example.prompt!r}")
        return ids

    def response_text(self, tokens: list) -> str:
        if tokens and tokens[-1] in self.stop_ids:
            tokens = tokens[:-1]
        return self.tokenizer.decode(tokens)

    # ---- 3. credit ----

    def credit(self, roll: Rollout, seed: int, first: int = 0) -> float:
        """Fill roll.gammas (credit_gamma, Eq. 14-19, then normalize_gamma; random: response i seeded
        seed + first + i) and, on the lean path with old_logp="recompute", roll.old_logp from the same
        forward, run on chunks of micro_batch_size / grad_accum responses. Returns the seconds of the
        old log-probs' share of that forward (0.0 when none ran)."""
        cfg = self.config
        lengths = [len(r) for r in roll.response_ids]
        kw = dict(q=cfg.q, gamma_amp=cfg.gamma_amp, k=cfg.k, alpha=cfg.alpha, bottom=cfg.bottom)
        if cfg.strategy == "none":
            roll.gammas = [torch.ones(n) for n in lengths]
            return 0.0
        if cfg.strategy == "random":
            roll.gammas = [normalize_gamma(credit_gamma("random", waad=torch.zeros(n), **kw,
                                                        generator=torch.Generator().manual_seed(seed + first + i)),
                                           cfg.gamma_norm)
                           for i, n in enumerate(lengths)]
            return 0.0
        layers = default_layers(self.model.config.num_hidden_layers, cfg.credit_layers)
        # the entropy of the distribution that was sampled: softmax(logits / temperature)
        signal_kw = dict(layers=layers, heads=cfg.credit_heads, window=cfg.window, h_lo=cfg.h_lo, h_hi=cfg.h_hi,
                         temperature=cfg.temperature)
        gammas, old_logp, old_logp_time = [], [], 0.0
        self.model.eval()
        with torch.no_grad():
            for rows in chunks(range(len(lengths)), cfg.micro_batch_size // cfg.grad_accum):
                batch = update_batch(roll, rows, self.pad_id, self.model.device)
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

    # ---- 4. update ----

    def update(self, roll: Rollout, seed: int) -> dict:
        """One AdamW step per micro-batch of micro_batch_size responses (a seeded shuffle of the
        rollout batch), old log-probs fixed. distributed.my_chunks gives this rank its part of each
        micro-batch in grad_accum chunks, each loss scaled by its share (_accumulate_gradient), so
        the summed, rank-averaged gradient is exactly the micro-batch's. Logs whole micro-batches."""
        cfg = self.config
        order = torch.randperm(len(roll.response_ids), generator=torch.Generator().manual_seed(seed)).tolist()
        micro = [[update_batch(roll, rows, self.pad_id, self.model.device, True) for rows in chunk_rows]
                 for chunk_rows in my_chunks(order, cfg.micro_batch_size, cfg.grad_accum)]
        batches = [batch for chunk_batches in micro for batch in chunk_batches]
        self.policy.train()
        stats = {"time_old_logp": self._old_logprobs(batches)}
        tokens = torch.stack([sum(b["response_mask"].sum() for b in chunk_batches) for chunk_batches in micro])
        all_tokens = all_reduce_sum(tokens)  # (n_micro,) tokens of whole micro-batches
        # generate-time log-probs against a forward at the same weights: the recomputed old log-probs,
        # or (old_logp="generate") the first micro-batch's training forward, taken below
        gap = sum(_gap(b["old_logp"], b) for b in batches) if cfg.old_logp == "recompute" else 0.0
        logs, grad_norms = [], []
        for epoch in range(cfg.ppo_epochs):
            for m, (chunk_batches, n, n_all) in enumerate(zip(micro, tokens, all_tokens)):
                self.optimizer.zero_grad(set_to_none=True)
                log, logp = self._accumulate_gradient(chunk_batches, n_all)
                log["tokens"] = n.item()
                if cfg.old_logp == "generate" and epoch == 0 and m == 0:
                    gap = gap + sum(_gap(lp, b) for lp, b in zip(logp, chunk_batches))
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                grad_norms.append(local_value(grad_norm).item())  # of the averaged gradient: same on all ranks
                logs.append(log)
        # the gradients would otherwise sit through the next step's generation (4 B per parameter)
        self.optimizer.zero_grad(set_to_none=True)
        gap_tokens = all_tokens.sum() if cfg.old_logp == "recompute" else all_tokens[0]
        stats["logp_gen_gap"] = (all_reduce_sum(torch.as_tensor(gap, dtype=torch.float32)) / gap_tokens).item()
        stats.update(whole_batch_means(logs, self.world))
        stats["grad_norm"] = sum(grad_norms) / len(grad_norms)
        return stats

    def _old_logprobs(self, batches: list) -> float:
        """Old (and reference) log-probs of every chunk: the sampler's (old_logp="generate"), the credit
        forward's, or a no-grad forward here, whose seconds it returns (time_old_logp)."""
        cfg = self.config
        t0 = time.perf_counter()
        with torch.no_grad(), gathered(self.model):
            for batch in batches:
                if cfg.old_logp == "generate":
                    batch["old_logp"] = batch["gen_logp"]
                elif "old_logp" not in batch:
                    batch["old_logp"], _ = self._logprobs(self.model, batch)
            seconds = time.perf_counter() - t0
            for batch in batches:
                batch["ref_logp"] = self._logprobs(self.ref_model, batch)[0] if self.ref_model is not None else None
        return seconds

    def _accumulate_gradient(self, chunk_batches: list, n_all: torch.Tensor) -> tuple[dict, list]:
        """Forward/backward of this rank's chunks of one micro-batch, each loss scaled by its share of
        it: its responses for norm="sequence", world_size x its tokens / n_all (the micro-batch's
        tokens on all ranks) for "token". Returns the log (loss, diagnostics' token sums) and log-probs."""
        cfg = self.config
        log, logps = {"loss": 0.0}, []
        for i, batch in enumerate(chunk_batches):
            n_chunk = batch["response_mask"].sum()
            share = (self.world * n_chunk / n_all if cfg.norm == "token"
                     else len(batch["advantages"]) / (cfg.micro_batch_size // self.world))
            with grad_sync(self.policy, self.parallel, last=i == len(chunk_batches) - 1):
                logp, entropy = self._logprobs(self.policy, batch, with_entropy=cfg.entropy_coef > 0)
                loss, diag = policy_loss(logp, batch["old_logp"], batch["advantages"], batch["gamma"],
                                         batch["response_mask"], cfg.clip_eps, cfg.clip_eps_high, cfg.norm, cfg.sign,
                                         batch["ref_logp"], cfg.kl_coef, entropy, cfg.entropy_coef)
                loss = loss * share
                loss.backward()
            logps.append(logp.detach())
            log["loss"] += loss.item()
            for key, value in diag.items():  # token means -> token sums, summed over chunks
                log[key] = log.get(key, 0.0) + value * n_chunk.item()
        return log, logps

    def _logprobs(self, model, batch, with_entropy=False):
        return token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"].shape[1],
                              self.config.temperature, with_entropy)

    # ---- one step ----

    def set_lr_for_step(self, step: int, total_steps: int) -> float:
        """Set and return the lr of GRPO step `step` (0-based) of a run of total_steps (lr_at)."""
        cfg = self.config
        lr = lr_at(step, total_steps, cfg.lr, cfg.lr_warmup_steps, cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step(self, examples: list) -> dict:
        """One rollout batch (all of the step's prompts, the same on every rank) -> one round of
        updates -> float metrics: rollout_metrics, update's (loss, grad_norm, clip_frac, approx_kl,
        ratio_mean, logp_gen_gap, kl_ref), replica_spread under DDP, and four times that add up to
        time_step: time_generate, time_old_logp (with or without credit), time_credit (what credit
        adds to that forward) and time_update."""
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

        return {
            "step": float(self.steps),
            **rollout_metrics(roll, cfg.sign, cfg.group_size),
            **stats,
            "time_generate": t1 - t0,
            "time_credit": t2 - t1 - credit_old_logp,
            "time_old_logp": credit_old_logp + stats["time_old_logp"],
            "time_update": t3 - t2 - stats["time_old_logp"],
            "time_step": t3 - t0,
        }

    # ---- state (checkpoint.py) ----

    def state_dict(self) -> dict:
        """RNG, step count, AdamW moments and lr as a flat dict of tensors (checkpoint.trainer_state)."""
        return trainer_state(self.model, self.optimizer, self.rng, self.steps)

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned (checkpoint.restore_trainer_state)."""
        self.steps = restore_trainer_state(state, self.model, self.optimizer, self.rng)


def _gap(logp: torch.Tensor, batch: dict) -> torch.Tensor:
    """Summed |logp - generate-time log-prob| over a chunk's response tokens (logp_gen_gap's numerator)."""
    return ((logp - batch["gen_logp"]).abs() * batch["response_mask"]).sum()


def evaluate(trainer: GRPO, examples: list, greedy: bool = True, k: int = 1) -> dict:
    """Held-out accuracy of the trainer's model as the paper reports it.

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
    lo, hi = shard_range(len(examples), trainer.rank, trainer.world)
    mine = [ex for ex in examples[lo:hi] for _ in range(k)]
    prompts = [trainer.encode_prompt(ex) for ex in mine]
    seeds = [trainer.config.eval_seed + lo * k + j for j in range(len(prompts))]
    responses, size = [], trainer.config.eval_batch_size
    with gathered(trainer.model):
        for i in range(0, len(prompts), size):
            tokens, _ = generate_responses(trainer.model, prompts[i:i + size], trainer.config,
                                           0.0 if greedy else trainer.config.temperature, seeds[i:i + size],
                                           trainer.stop_ids)
            responses += tokens
    scored = [(float(bool(trainer.task.correct(trainer.response_text(r), ex))), len(r))
              for r, ex in zip(responses, mine)]
    scored = [row for part in all_gather_objects(scored) for row in part]
    correct = torch.tensor([c for c, _ in scored]).view(len(examples), k)  # (P, k)
    return {
        "accuracy": correct[:, 0].mean().item(),
        "avg_at_k": correct.mean().item(),
        "k": float(k),
        "response_length": float(sum(n for _, n in scored)) / len(scored),
    }

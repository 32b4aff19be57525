"""Attention credit inside TRL: AttentionCreditGRPOTrainer, a trl.GRPOTrainer whose advantages
are the paper's A~_t = gamma_t * A (Eq. 13) per completion token.

TRL generates (with its own sampler or vLLM) and scores a batch, and computes one advantage per
completion (Eq. 6). This subclass then runs one no-grad forward of the policy over prompt +
completion, takes WAAD / FAI / entropy from the q and k of the chosen layers (integrations.hf,
the lean path of attention_lean.py) and credit_gamma's gamma per token, and hands TRL's loss the
(B, T) advantages gamma x A, which its loss takes as they are (trl >= 1.0 unsqueezes only a 1-D
advantage). gamma comes from the training model, so TRL's generation backend does not matter.

    from integrations.trl_credit import AttentionCreditGRPOTrainer
    trainer = AttentionCreditGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...),
                                         train_dataset=..., credit="coupled")

Tested with trl 1.16.0 (requirements-dev.txt); see docs/trl.md for a whole Countdown script.
The knobs and their defaults are rl.RLConfig's (checked there, before TRL builds anything);
gamma_mean and amplified_frac join TRL's logged metrics.
"""

import torch

try:
    from trl import GRPOTrainer
except ImportError:
    raise ImportError("AttentionCreditGRPOTrainer needs TRL: pip install 'trl>=1.16,<1.17' "
                      "(the version it is tested with)") from None

import checks
from attention_lean import rhythm_signals
from attention_metrics import (COUPLE_ALPHA, COUPLE_K, CREDIT_Q, FAI_H_HI, FAI_H_LO, GAMMA_AMP, WAAD_WINDOW, credit_gamma,
                               default_layers)
from batching import build_batch
from distributed import chunks
from integrations.hf import HFCausalLM
from rl import RLConfig, apply_sign


class AttentionCreditGRPOTrainer(GRPOTrainer):
    """trl.GRPOTrainer with the paper's per-token credit: every argument of GRPOTrainer, plus the
    credit strategy (none, random, entropy, local, global, coupled) and its knobs. credit_batch_size:
    completions per credit forward (memory)."""

    def __init__(self, *args, credit="coupled", q=CREDIT_Q, gamma_amp=GAMMA_AMP, k=COUPLE_K, alpha=COUPLE_ALPHA,
                 bottom=False, sign="both", layers="middle", heads="targeted", window=WAAD_WINDOW, h_lo=FAI_H_LO,
                 h_hi=FAI_H_HI, credit_batch_size=8, credit_seed=0, **kwargs):
        layers = layers if isinstance(layers, str) else tuple(layers)
        self.credit = RLConfig(strategy=credit, q=q, gamma_amp=gamma_amp, k=k, alpha=alpha, bottom=bottom, sign=sign,
                               credit_layers=layers, credit_heads=heads, window=window, h_lo=h_lo, h_hi=h_hi)
        checks.int_at_least("credit_batch_size", credit_batch_size, 1)
        checks.int_at_least("credit_seed", credit_seed, 0)
        self.credit_batch_size = credit_batch_size
        self.credit_rng = torch.Generator().manual_seed(credit_seed)  # random credit only
        super().__init__(*args, **kwargs)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        advantages, mask = output["advantages"], output["completion_mask"].bool()
        gamma = apply_sign(self.credit_gammas(output), advantages, self.credit.sign)  # (B, T)
        counts = torch.stack([gamma[mask].sum(), (gamma[mask] > 1).sum().float(), mask.sum().float()])
        total, amplified, tokens = self.accelerator.gather(counts[None]).sum(0).tolist()
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["gamma_mean"].append(total / tokens if tokens else 1.0)
        self._metrics[mode]["amplified_frac"].append(amplified / tokens if tokens else 0.0)
        output["advantages"] = gamma * advantages[:, None]  # Eq. 13, per token
        return output

    @torch.no_grad()
    def credit_gammas(self, output) -> torch.Tensor:
        """gamma (B, T) for the completions of one generation batch (1 on padding): credit_gamma of
        the signals of each prompt + completion, from one no-grad forward of the policy per
        credit_batch_size completions."""
        cfg = self.credit
        lengths = output["completion_mask"].sum(1).tolist()
        gamma = torch.ones(output["completion_mask"].shape, device=output["completion_mask"].device)
        if cfg.strategy == "none":
            return gamma
        knobs = dict(q=cfg.q, gamma_amp=cfg.gamma_amp, k=cfg.k, alpha=cfg.alpha, bottom=cfg.bottom)
        if cfg.strategy == "random":
            for row, n in enumerate(lengths):
                gamma[row, :n] = credit_gamma("random", waad=torch.zeros(n), generator=self.credit_rng, **knobs)
            return gamma
        model = HFCausalLM(self.accelerator.unwrap_model(self.model))
        layers = default_layers(model.config.num_hidden_layers, cfg.credit_layers)
        prompts = [ids[m.bool()].tolist() for ids, m in zip(output["prompt_ids"], output["prompt_mask"])]
        completions = [ids[:n].tolist() for ids, n in zip(output["completion_ids"], lengths)]
        pad_id = next(i for i in (self.processing_class.pad_token_id, self.processing_class.eos_token_id, 0)
                      if i is not None)
        for rows in chunks(range(len(lengths)), self.credit_batch_size):
            batch = build_batch([prompts[r] for r in rows], [completions[r] for r in rows], pad_id)
            batch = {key: value.to(model.device) for key, value in batch.items()}
            signals = rhythm_signals(model, batch["input_ids"], batch["starts"], batch["attention_mask"],
                                     layers=layers, heads=cfg.credit_heads, window=cfg.window, h_lo=cfg.h_lo,
                                     h_hi=cfg.h_hi, temperature=self.temperature)
            for row, s in zip(rows, signals):
                gamma[row, :lengths[row]] = credit_gamma(cfg.strategy, waad=s["waad"], fai=s["fai"],
                                                         entropy=s["entropy"], **knobs)
        return gamma

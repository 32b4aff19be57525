"""Batches of responses: a left-padded prompt + response layout, and the log-probs of the response
tokens under a model. GRPO (rl.py), the pictures (plots.py) and the analysis (analyze.py) share them.

Every row is [pad ... pad, prompt, response], so all rows end together and the last n_resp columns
hold every response token: the logits of those columns (and the one before) are all a loss needs.
"""

import torch
import torch.nn.functional as F


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

"""Supervised warm-up: teach a model trained from scratch the answer format before RL.

A randomly initialised model almost never writes a well-formed Countdown answer, so GRPO would see
groups of all-zero rewards and learn nothing. `warmup()` first trains it on procedurally generated
worked solutions (`task.worked_solution`), with the loss on the response tokens only: the model
learns to answer prompts, not to write them. The goal is a model that is competent but imperfect,
so that RL has wrong answers to turn into right ones.

One step, start to finish:
1. draw batch_size training examples and a fresh worked solution for each (the solver's rng varies
   which of several solutions is shown);
2. `build_sft_batch`: prompt ids + response ids + eos per row, right padded; the targets hold -100
   (ignored) on prompt and padding positions, so only response tokens and the eos are learned;
3. `sft_loss`: next-token cross-entropy of the model's logits against those targets;
4. one AdamW step, lr from `lr_at`.

Project defaults (decided here, in one place):
- Prompt and response are encoded as GRPO sees them (`allow_special=True`, so task markup such as
  `<think>` is one token when the tokenizer has it) and separately, so the prompt/response token
  boundary is the one RL samples from.
- The eos is a training target: the model learns to stop, which RL rollouts rely on.
- Rows are right padded: a causal model never lets a real token see the padding after it, so no
  attention mask is needed; padding only has to be left out of the loss.
- Loss = mean over all response tokens of the batch (each token weighs the same).
- lr: linear warm-up over `warmup_steps`, then cosine decay to `min_lr_ratio` * lr; AdamW with
  weight decay 0.0 and gradient clipping at norm 1.0.
"""

import random

import torch
import torch.nn.functional as F
from tqdm import tqdm

from rl import lr_at

IGNORE = -100  # target id that cross_entropy skips (prompt and padding positions)


def encode_pair(tokenizer, prompt: str, response: str) -> tuple:
    """(prompt ids, response ids + eos): the two parts of one training row."""
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no eos_id: the warm-up teaches the model to stop with it")
    prompt_ids = tokenizer.encode(prompt, allow_special=True)
    if not prompt_ids:
        raise ValueError(f"prompt encodes to no tokens: {prompt!r}")
    return prompt_ids, tokenizer.encode(response, allow_special=True) + [tokenizer.eos_id]


def build_sft_batch(pairs: list, pad_id: int) -> tuple:
    """Right-padded (input_ids, targets), both (B, T) long, from [(prompt ids, response ids)].

    targets[b, t] is the token the model should predict at position t (input_ids[b, t + 1]) when
    that token belongs to the response, else IGNORE; the last column is always IGNORE.
    """
    if not pairs:
        raise ValueError("build_sft_batch needs at least one (prompt, response) pair")
    T = max(len(p) + len(r) for p, r in pairs)
    input_ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    targets = torch.full((len(pairs), T), IGNORE, dtype=torch.long)
    for b, (prompt, response) in enumerate(pairs):
        if not prompt or not response:
            raise ValueError(f"row {b}: prompt and response must both be non-empty")
        n_p, n = len(prompt), len(prompt) + len(response)
        input_ids[b, :n] = torch.tensor(prompt + response)
        targets[b, n_p - 1:n - 1] = torch.tensor(response)  # position t predicts token t + 1
    return input_ids, targets


def sft_loss(model, input_ids, targets):
    """Mean cross-entropy over the non-IGNORE targets; input_ids, targets (B, T)."""
    logits, _ = model(input_ids)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


def sample_pairs(tokenizer, task, batch_size: int, rng: random.Random) -> list:
    """batch_size (prompt ids, response ids) pairs: random training examples, fresh worked solutions."""
    examples = rng.choices(task.train, k=batch_size)
    return [encode_pair(tokenizer, ex.prompt, task.worked_solution(ex, rng)) for ex in examples]


def warmup(model, tokenizer, task, steps: int, batch_size: int, lr: float, seed: int = 0,
           warmup_steps: int = 20, min_lr_ratio: float = 0.1, weight_decay: float = 0.0,
           max_grad_norm: float = 1.0, progress: bool = True, stop=None) -> list:
    """Supervised warm-up on worked solutions of task.train (see the module docstring).

    Trains model in place for `steps` AdamW steps of `batch_size` rows and returns the per-step
    losses (floats). Deterministic for a seed given the model's initial weights. stop: a function
    asked before each step; when it returns True the warm-up ends there (a signal, train.py).
    """
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"warmup needs steps >= 1, batch_size >= 1 and lr > 0; got {steps}, {batch_size}, {lr}")
    if not task.train:
        raise ValueError(f"task {task.name!r} has no training examples to warm up on")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="sft warm-up", disable=not progress)
    for step in bar:
        if stop is not None and stop():
            break
        input_ids, targets = build_sft_batch(sample_pairs(tokenizer, task, batch_size, rng), pad_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup_steps, min_lr_ratio)
        loss = sft_loss(model, input_ids.to(model.device), targets.to(model.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses

"""Qwen3 at its real sizes, and the bf16 dtype path a GPU takes, run on the CPU.

The fast tests (default run) check the dtype rules on tiny models: the generation KV cache is kept in
the compute dtype, the final model/ comes back in the dtype of the checkpoint it started from, and
--autocast bf16 runs on a CPU. The slow test builds a random Qwen3-0.6B-Base with make_qwen3.py and
runs the paper's path on it end to end (`python -m pytest -m slow -k real_shapes`).
"""

import pytest
import torch

from conftest import make_hf_model
from model import KVCache, Transformer

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def load_ours(tmp_path, **overrides):
    hf = make_hf_model(**overrides)
    hf.save_pretrained(tmp_path / "ckpt")
    return Transformer.from_pretrained(tmp_path / "ckpt").eval()


def cache_dtypes(monkeypatch):
    """Record the dtype of every KVCache generate() allocates."""
    seen = []
    real_init = KVCache.__init__

    def spy(self, config, batch_size, max_len, dtype, device):
        seen.append(dtype)
        real_init(self, config, batch_size, max_len, dtype, device)
    monkeypatch.setattr(KVCache, "__init__", spy)
    return seen


def test_kv_cache_in_compute_dtype(tmp_path, monkeypatch):
    """Under bf16 autocast the cache is bf16 and the samples and log-probs are those of an fp32 cache:
    SDPA under autocast rounds k and v to bf16 before it reads them, so storing them rounded loses nothing."""
    model = load_ours(tmp_path)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    seen = cache_dtypes(monkeypatch)
    model.generate(prompts, 4)
    with torch.autocast(**BF16):
        tokens, logprobs = model.generate(prompts, 16, temperature=1.0, seed=3, return_logprobs=True)
        greedy = model.generate(prompts, 16)
    assert seen == [torch.float32, torch.bfloat16, torch.bfloat16]

    monkeypatch.setattr(Transformer, "compute_dtype", property(lambda self: self.dtype))  # the old fp32 cache
    with torch.autocast(**BF16):
        tokens32, logprobs32 = model.generate(prompts, 16, temperature=1.0, seed=3, return_logprobs=True)
        greedy32 = model.generate(prompts, 16)
    assert seen[-1] == torch.float32
    assert tokens == tokens32 and greedy == greedy32
    assert logprobs == logprobs32

"""Shared fixtures: tiny random Qwen3 checkpoints built with transformers, the independent reference."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
            rope_theta=10000.0, tie_word_embeddings=True)


def tiny_config(**overrides):
    """The keyword arguments of a tiny Qwen3 config (shared by our Qwen3Config and transformers')."""
    return {**TINY, **overrides}


class StubTokenizer:
    """Text is space-separated token ids (the last id of the tiny vocabulary is the stop token)."""
    eos_id, pad_id = TINY["vocab_size"] - 1, 0

    def encode(self, text, allow_special=False):
        return [int(x) for x in text.split()]

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def make_hf_model(seed=0, **overrides):
    """A random transformers Qwen3ForCausalLM (eager attention) whose norms are not all ones."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen3Config(**tiny_config(**overrides), attn_implementation="eager")
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Save a random transformers Qwen3 to a directory; returns (hf_model, path)."""
    model = make_hf_model()
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run faster on one thread: splitting their small matmuls costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes; excluded from the default run")

"""bench.py in its smallest configuration, so the benchmark cannot rot, and its two formulas
(FLOPs of a prefill, peak memory of an op) against hand-computed answers."""

import re

import pytest

import bench
from model import Qwen3Config, Transformer


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.md"
    settings = bench.replace(bench.MODES["tiny"], threads=1)
    text = bench.run_bench(settings, out, command="pytest", log=lambda *_: None)
    return text, out


def test_tiny_run_writes_every_row(tiny_report):
    text, out = tiny_report
    assert out.read_text().strip() == text.strip()
    tiny = bench.MODES["tiny"]
    B, N = tiny.prefill
    for row in (f"prefill {B}x{N}: time", f"prefill {B}x{N}: peak memory", "One GRPO step", "Roofline",
                "credit share", "torch.matmul measured in the same run"):
        assert row in text
    for batch in tiny.gen_batches:
        assert f"generate B={batch}, {tiny.new_tokens} new tokens: tokens/s" in text
        assert f"generate B={batch}: peak memory" in text
    for n in tiny.metric_lengths:
        assert re.search(rf"^\| {n} \|", text, re.MULTILINE)


def test_tiny_run_agrees_with_transformers(tiny_report):
    """Greedy generation equals transformers' token for token, and the lean metrics equal the
    ones computed from transformers' explicit attention maps."""
    text, _ = tiny_report
    assert text.count("✓ identical") == len(bench.MODES["tiny"].gen_batches)
    metric_rows = [line for line in text.splitlines() if re.match(r"^\| \d+ \|", line)]
    assert len(metric_rows) == len(bench.MODES["tiny"].metric_lengths)
    for line in metric_rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[-2]) < 1e-4  # max abs difference of WAAD, FAI and entropy
        assert cells[-1] == "✓"  # same head groups


def test_prefill_flops_by_hand():
    config = Qwen3Config(vocab_size=10, hidden_size=4, intermediate_size=6, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=2)
    model = Transformer(config)
    per_layer = 4 * 2 * 2 + 4 * 1 * 2 * 2 + 2 * 2 * 4 + 3 * 4 * 6  # q, k and v, o, gate up and down
    matmul_params = 2 * per_layer + 10 * 4  # plus the (tied) LM head, not the embedding lookup
    assert bench.matmul_params(model) == matmul_params
    attention = 2 * 5 * 7 * 7 * 2 * 2 * 2  # 2 B N^2 head_dim heads layers (causal half of 4 N^2 d)
    assert bench.prefill_flops(model, 5, 7) == 2 * matmul_params * 5 * 7 + attention


def test_peak_memory_counts_the_logits():
    """A prefill's peak holds at least its (B, N, V) fp32 logits, and not much more for a tiny model."""
    settings = bench.replace(bench.MODES["tiny"], threads=1)
    n = 512
    logits = n * bench.SHAPES["tiny"]["vocab_size"] * 4
    peak = bench.peak_memory("prefill", "ours", settings, batch=1, n=n)
    assert logits <= peak <= logits + 16 * 2**20


def test_first_difference():
    assert bench.first_difference([[1, 2], [3, 4]], [[1, 2], [3, 4]]) is None
    assert bench.first_difference([[1, 2], [3, 4]], [[1, 2], [3, 5]]) == (1, 1)
    assert bench.first_difference([[1, 2]], [[1]]) == (0, 1)

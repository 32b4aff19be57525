"""bench.py in its smallest configuration, so the benchmark cannot rot, and its two formulas
(FLOPs of a prefill, peak memory of an op) against hand-computed answers."""

import re

import pytest
import torch

from tools import bench
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


def test_gpu_check_runs_shrunk_on_cpu(tmp_path):
    """bench.py --gpu-check --device cpu: the same code as on a GPU, shrunk; its phase table has every
    phase of both steps, each with a time, a measured peak and the README's prediction, and the
    first step's update holds at least the gradients and AdamW moments it predicts (12 B/parameter)."""
    from tools import phases

    out = tmp_path / "gpu_check.md"
    text = bench.gpu_check("cpu", out, command="pytest", log=lambda *_: None)
    assert out.read_text() == text and "## Phases of the paper's GRPO step" in text
    rows = [line for line in text.splitlines() if re.match(r"^\| [012] \| ", line)]
    assert [tuple(c.strip() for c in r.strip("|").split("|")[:2]) for r in rows] == [
        ("0", "weights"), *[(str(s), p) for s in (1, 2) for p in ("generation", "credit", "update")]]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert cells[3].endswith(" s") and cells[4].endswith("iB") and cells[5].endswith("iB")
    model = Transformer(Qwen3Config(**{**bench.SHAPES["tiny"], "vocab_size": 262}))
    assert phases.predict("update", model.config, model.num_parameters(), dict(rows=1, tokens=8, response=4), 4,
                          True) >= 12 * model.num_parameters()


def test_phase_predictions_by_hand():
    """phases.predict's formulas on a small config, computed by hand: h 8, hq 2 x 4, hkv 1 x 4, i 16, 3 layers."""
    from tools import phases

    config = Qwen3Config(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    shape = dict(rows=2, tokens=10, response=6)
    assert phases.predict("weights", config, 1000, {}, 4, True) == 4000
    assert phases.predict("weights", config, 1000, dict(mapped=2000), 4, True) == 6000
    kv = 2 * 3 * 1 * 4 * 2 * 2 * 10
    assert phases.predict("generation", config, 1000, shape, 2, True) == 2000 + kv  # + the bf16 weight copy
    assert phases.predict("generation", config, 1000, shape, 4, True) == 2 * kv
    logits_bf16, logits_fp32 = 10 * 2 * 7 * 100, 8 * 2 * 7 * 100
    assert phases.predict("credit", config, 1000, shape, 2, True) == logits_bf16
    per_row = 8 + 8 * 2 + 4 * 1  # fp32 norm scales, logsumexp per head
    act_bf16 = (26 * 8 + 10 * 8 + 10 * 4 + 8 * 16 + per_row) * 20 * 3
    act_fp32 = (24 * 8 + 16 * 8 + 16 * 4 + 16 * 16 + per_row) * 20 * 3
    assert phases.predict("update", config, 1000, shape, 2, True) == 12_000 + act_bf16 + logits_bf16
    assert phases.predict("update", config, 1000, shape, 4, False) == 4_000 + act_fp32 + logits_fp32


@pytest.mark.parametrize("autocast", [True, False], ids=["bf16", "fp32"])
def test_activation_formula_counts_what_autograd_keeps(autocast):
    """phases.activation_bytes against torch's own count: the bytes of every tensor autograd saves
    for the backward (saved-tensor hooks, each storage once), for layers of two shapes (GQA and
    not), less what grows with neither the depth nor the length (weights and their bf16 casts,
    embedding, final norm)."""
    from tools import phases

    def saved_bytes(config, tokens):
        model = Transformer(config)
        storages = {}

        def keep(t):
            storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            return t

        ids = torch.randint(0, config.vocab_size, (1, tokens))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
                torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model(ids, logits_to_keep=1)
        return sum(storages.values())

    element_bytes = 2 if autocast else 4
    for heads, kv_heads, head_dim, hidden, intermediate in ((4, 2, 40, 96, 352), (6, 6, 16, 64, 200)):
        kw = dict(vocab_size=300, hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, head_dim=head_dim, tie_word_embeddings=True)
        # differences over the depth and the length leave what each layer keeps per token
        per_token = [saved_bytes(Qwen3Config(num_hidden_layers=n, **kw), 60)
                     - saved_bytes(Qwen3Config(num_hidden_layers=n, **kw), 30) for n in (1, 3)]
        measured = (per_token[1] - per_token[0]) / 2
        predicted = phases.activation_bytes(Qwen3Config(num_hidden_layers=1, **kw), 30, element_bytes)
        assert abs(measured - predicted) <= 0.005 * predicted, (heads, kv_heads, measured, predicted)
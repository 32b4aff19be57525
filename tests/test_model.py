"""model.py against transformers' Qwen3ForCausalLM on tiny random checkpoints (all offline)."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from conftest import make_hf_model, tiny_config
from model import KVCache, Qwen3Config, Transformer, positions_from_mask, sample_next

# tied and untied head, GQA and plain multi-head, head_dim != hidden_size / num_attention_heads
SHAPES = [
    dict(),
    dict(tie_word_embeddings=False),
    dict(num_key_value_heads=4),
    dict(num_attention_heads=8, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False),
]


def load_ours(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "ckpt")
    return Transformer.from_pretrained(tmp_path / "ckpt").eval()


@pytest.mark.parametrize("overrides", SHAPES, ids=["tied", "untied", "mha", "wide-heads"])
def test_logits_and_attention_match_transformers(overrides, tmp_path):
    hf = make_hf_model(**overrides)
    ours = load_ours(hf, tmp_path)
    ids = torch.randint(0, 300, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids, output_attentions=True)
        logits, attn = ours(ids, attn_layers=(0, 3, 5))
        plain_logits, none = ours(ids)
    assert (logits - ref.logits).abs().max() <= 1e-4
    assert (plain_logits - ref.logits).abs().max() <= 1e-4  # the SDPA path
    assert none == {}
    assert sorted(attn) == [0, 3, 5]
    for layer, probs in attn.items():
        assert probs.shape == (2, ours.config.num_attention_heads, 37, 37)
        assert (probs - ref.attentions[layer]).abs().max() <= 1e-5


def test_left_padded_batch_rows_equal_rows_alone(tmp_path):
    ours = load_ours(make_hf_model(), tmp_path)
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), 1
    with torch.no_grad():
        batch_logits, batch_attn = ours(ids, attn_layers=(2,), attention_mask=mask)
        for i, r in enumerate(rows):
            alone_logits, alone_attn = ours(torch.tensor([r]), attn_layers=(2,))
            n = len(r)
            assert (batch_logits[i, T - n:] - alone_logits[0]).abs().max() <= 1e-5
            assert (batch_attn[2][i, :, T - n:, T - n:] - alone_attn[2][0]).abs().max() <= 1e-6
    assert positions_from_mask(mask)[1].tolist() == [0, 0, 0, 0, 0, 1, 2]


def test_kv_cache_token_by_token_equals_full_forward(tmp_path):
    ours = load_ours(make_hf_model(), tmp_path)
    ids = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _ = ours(ids)
        cache = KVCache(ours.config, 3, 24, torch.float32, "cpu")
        valid = torch.ones(3, 24, dtype=torch.bool)
        stepwise = [ours._decode(ids[:, :5], torch.arange(5).expand(3, 5), valid[:, :5], cache)]
        for t in range(5, 24):
            stepwise.append(ours._decode(ids[:, t:t + 1], torch.full((3, 1), t), valid[:, :t + 1], cache))
    assert (torch.stack(stepwise, 1) - full[:, 4:]).abs().max() <= 1e-5


def test_greedy_generate_matches_transformers(tmp_path):
    """The same greedy tokens, and the same log-prob at every step: the tiny random model's argmax
    barely reacts to positions (a decode step one position off still picks the same 40 tokens), but its
    log-probs do (measured: 2e-2 apart with every generated position off by one, 5e-7 when right)."""
    hf = make_hf_model()
    ours = load_ours(hf, tmp_path)
    prompt = [3, 141, 59, 26, 53, 58, 97]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, min_new_tokens=40,
                      pad_token_id=0, eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    assert ours.generate([prompt], max_new_tokens=40)[0] == ref.sequences[0, len(prompt):].tolist()
    tokens, logprobs = ours.generate([prompt], max_new_tokens=40, return_logprobs=True)
    new = ref.sequences[0, len(prompt):]
    assert tokens[0] == new.tolist()
    step_logits = torch.stack(ref.logits, 1)[0].float()  # (40, V): transformers' raw logits at each step
    expected = torch.log_softmax(step_logits, -1).gather(-1, new[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(logprobs[0]), expected, rtol=0, atol=1e-5)


def test_padded_batch_generation_equals_each_prompt_alone(tmp_path):
    ours = load_ours(make_hf_model(), tmp_path)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16]]
    batch = ours.generate(prompts, max_new_tokens=20)
    assert batch == [ours.generate([p], max_new_tokens=20)[0] for p in prompts]


def test_stop_ids_end_rows_independently(tmp_path):
    ours = load_ours(make_hf_model(), tmp_path)
    prompts = [[1, 2, 3], [40, 50, 60, 70]]
    free = ours.generate(prompts, max_new_tokens=12)
    stop = free[0][4]  # a token row 0 emits at step 5
    out = ours.generate(prompts, max_new_tokens=12, stop_ids=(stop,))
    assert out[0] == free[0][:free[0].index(stop) + 1]
    expected_row1 = free[1][:free[1].index(stop) + 1] if stop in free[1] else free[1]
    assert out[1] == expected_row1


def test_sampling_is_seeded_and_logprobs_match_forward(tmp_path):
    ours = load_ours(make_hf_model(), tmp_path)
    prompts = [[7, 8, 9], [1, 2, 3, 4, 5]]
    a, lp = ours.generate(prompts, max_new_tokens=10, temperature=1.0, seed=5, return_logprobs=True)
    b = ours.generate(prompts, max_new_tokens=10, temperature=1.0, seed=5)
    assert a == b
    for p, new, logprobs in zip(prompts, a, lp):
        seq = torch.tensor([p + new])
        with torch.no_grad():
            logits, _ = ours(seq)
        ref = torch.log_softmax(logits[0, len(p) - 1:-1], -1).gather(-1, seq[0, len(p):, None])[:, 0]
        assert torch.allclose(torch.tensor(logprobs), ref, atol=1e-5)


def test_top_k_one_is_greedy(tmp_path):
    ours = load_ours(make_hf_model(), tmp_path)
    prompts = [[7, 8, 9]]
    assert ours.generate(prompts, 10, temperature=1.0, top_k=1, seed=0) == ours.generate(prompts, 10)
    assert ours.generate(prompts, 10, temperature=1.0, top_p=1e-6, seed=0) == ours.generate(prompts, 10)


@pytest.mark.parametrize("shard_bytes", [5 * 2**30, 40_000], ids=["single-file", "sharded"])
def test_our_save_loads_in_transformers(shard_bytes, tmp_path):
    torch.manual_seed(0)
    ours = Transformer(Qwen3Config(**tiny_config(tie_word_embeddings=False))).eval()
    ours.save_pretrained(tmp_path / "ours", max_shard_bytes=shard_bytes)
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists() == (shard_bytes < 2**20)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)[0]).abs().max() <= 1e-5
    again = Transformer.from_pretrained(tmp_path / "ours")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_tied_checkpoint_has_no_lm_head_and_bf16_loads(tmp_path):
    ours = Transformer(Qwen3Config(**tiny_config())).to(torch.bfloat16)
    ours.save_pretrained(tmp_path / "bf16")
    stored = load_file(tmp_path / "bf16" / "model.safetensors")
    assert "lm_head.weight" not in stored and stored["model.embed_tokens.weight"].dtype == torch.bfloat16
    loaded = Transformer.from_pretrained(tmp_path / "bf16")
    assert loaded.dtype == torch.bfloat16 and loaded.lm_head.weight is loaded.embed_tokens.weight
    as_fp32 = Transformer.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert as_fp32.dtype == torch.float32


def test_interrupted_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    first = Transformer(Qwen3Config(**tiny_config()))
    first.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")
    second = Transformer(Qwen3Config(**tiny_config()))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("checkpoint.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(tmp_path / "ckpt")
    monkeypatch.undo()
    survivor = Transformer.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(survivor.embed_tokens.weight, first.embed_tokens.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging directory left behind
    second.save_pretrained(tmp_path / "ckpt")
    assert torch.equal(Transformer.from_pretrained(tmp_path / "ckpt").embed_tokens.weight,
                       second.embed_tokens.weight)
    assert (tmp_path / "ckpt" / "tokenizer.json").exists()  # files beside the weights are kept


def test_config_reads_rope_theta_old_and_new_style():
    base = dict(model_type="qwen3", **tiny_config())
    base.pop("rope_theta")
    old = Qwen3Config.from_dict({**base, "rope_theta": 1234.0})
    new = Qwen3Config.from_dict({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 4321.0}})
    assert (old.rope_theta, new.rope_theta) == (1234.0, 4321.0)
    assert Qwen3Config.from_dict(old.to_dict()) == old


# --- bad input: each message names the problem ---------------------------------------------


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Transformer.from_pretrained(tmp_path)


def test_missing_weights_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(Qwen3Config(**tiny_config()).to_dict()))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Transformer.from_pretrained(tmp_path)


def test_unknown_model_type_and_missing_field():
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        Qwen3Config.from_dict({"model_type": "llama", **tiny_config()})
    partial = {k: v for k, v in tiny_config().items() if k != "hidden_size"}
    with pytest.raises(ValueError, match="missing required field.*hidden_size"):
        Qwen3Config.from_dict({"model_type": "qwen3", **partial})
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        Qwen3Config.from_dict({"model_type": "qwen3", **tiny_config(), "rope_scaling": {"rope_type": "yarn"}})


def test_missing_and_misshaped_tensors_are_named(hf_checkpoint):
    _, path = hf_checkpoint
    tensors = load_file(path / "model.safetensors")
    tensors.pop("model.layers.2.mlp.up_proj.weight")
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 64)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        Transformer.from_pretrained(path)
    assert "missing tensor model.layers.2.mlp.up_proj.weight (expected shape (128, 64))" in str(err.value)
    assert ("model.layers.0.self_attn.q_proj.weight in model.safetensors has shape (3, 64), expected (64, 64)"
            in str(err.value))
    assert "\n" not in str(err.value)  # one line, as the command line prints it


def test_bad_prompts_are_rejected(tmp_path):
    ours = Transformer(Qwen3Config(**tiny_config(max_position_embeddings=32)))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        ours.generate([[1] * 30], max_new_tokens=5)
    with pytest.raises(ValueError, match="longer than max_position_embeddings"):
        ours(torch.zeros(1, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one prompt"):
        ours.generate([], max_new_tokens=5)
    with pytest.raises(ValueError, match="empty prompt"):
        ours.generate([[1, 2], []], max_new_tokens=5)
    with pytest.raises(ValueError, match="outside"):
        ours.generate([[1, 999]], max_new_tokens=5)


def test_per_row_seeds_make_samples_independent_of_the_batch(tmp_path):
    ours = load_ours(make_hf_model(), tmp_path)
    prompts = [[7, 8, 9], [1, 2, 3, 4, 5], [11, 12]]
    together = ours.generate(prompts, 12, temperature=1.0, seed=[10, 11, 12])
    apart = [ours.generate([p], 12, temperature=1.0, seed=[s])[0] for p, s in zip(prompts, [10, 11, 12])]
    assert together == apart
    with pytest.raises(ValueError, match="one seed per prompt"):
        ours.generate(prompts, 4, temperature=1.0, seed=[1, 2])


# logits of an 8-token vocabulary, out of order so that the sampler's sort matters. softmax(logits / T),
# sorted, has running sums 0.42 0.65 0.81 0.88 .. at T=1, 0.67 0.87 .. at T=0.5 and 0.26 0.46 0.62
# 0.73 0.83 0.91 .. at T=2: a nucleus of top_p 0.85 holds 4, 2 and 6 tokens (no sum within 0.02 of it).
SAMPLER_LOGITS = [0.3, -1.1, 2.0, -0.5, 1.0, -2.0, 1.4, 0.0]


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("truncation", [dict(top_k=3, top_p=1.0), dict(top_k=0, top_p=0.85)], ids=["top_k", "top_p"])
def test_sample_next_tempers_before_truncating(temperature, truncation):
    """sample_next at a temperature != 1 with top-k or top-p draws from the closed form: softmax(logits / T)
    restricted to its k largest entries, or to the nucleus of the tempered probabilities (the smallest
    set of the most likely tokens whose mass reaches top_p), renormalised; and returns each token's
    log-prob under the untruncated softmax(logits / T). N rows share the logits and take the uniforms
    u = (i + 1/2) / N, so the share of rows that draw a token is its probability to within 1 / N."""
    N = 20_000
    logits = torch.tensor(SAMPLER_LOGITS, dtype=torch.float64)
    tempered = torch.softmax(logits / temperature, -1)  # (V,)
    order = tempered.argsort(descending=True)
    if truncation["top_k"]:
        keep = order[:truncation["top_k"]]
    else:
        mass_before = torch.cat([torch.zeros(1, dtype=torch.float64), tempered[order].cumsum(0)[:-1]])
        keep = order[mass_before < truncation["top_p"]]  # add tokens until their mass reaches top_p
        assert len(keep) == {0.5: 2, 2.0: 6}[temperature]  # the untempered nucleus would hold 4
    expected = torch.zeros_like(tempered)
    expected[keep] = tempered[keep] / tempered[keep].sum()

    u = (torch.arange(N, dtype=torch.float64) + 0.5) / N
    tokens, logprobs = sample_next(logits.float().repeat(N, 1), temperature, u=u.float(), **truncation)
    freq = torch.bincount(tokens, minlength=len(SAMPLER_LOGITS)).double() / N
    assert freq[expected == 0].sum() == 0  # nothing outside the top-k / nucleus
    assert (freq - expected).abs().max() <= 2 / N, (freq.tolist(), expected.tolist())
    untempered = torch.softmax(logits, -1)  # what a sampler that skipped the temperature would draw from
    assert (expected - untempered).abs().max() > 0.05
    torch.testing.assert_close(logprobs.double(), torch.log_softmax(logits / temperature, -1)[tokens],
                               rtol=0, atol=1e-6)

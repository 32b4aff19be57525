"""The method in other people's code: the signals of any transformers causal LM (integrations.hf)
against this project's Qwen3 and against transformers' own eager maps; analyze on a Llama; and
AttentionCreditGRPOTrainer inside TRL against plain GRPOTrainer and against this project's gamma."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from attention_lean import rhythm_signals
from attention_metrics import credit_gamma, default_layers, explicit_signals
from batching import build_batch
from conftest import make_hf_model
from integrations.hf import hf_rhythm_signals
from model import Transformer, positions_from_mask
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SIGNALS = ("waad", "fai", "entropy", "spans", "fai_receiver", "receiver_kurtosis")
GROUPS = ("local_heads", "global_heads", "receiver_heads")


def padded_batch(vocab, seed=1):
    """Three rows of 40 tokens, two of them left padded, responses starting at different columns."""
    ids = torch.randint(0, vocab, (3, 40), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :12] = 0
    return ids, mask, [20, 15, 30]


def assert_same_signals(ours, theirs, atol):
    for a, b in zip(ours, theirs):
        for key in SIGNALS:
            rtol = 1e-3 if key == "receiver_kurtosis" else 1e-5  # a ratio of 4th moments of tiny scores
            torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, equal_nan=True, msg=key)
        for key in GROUPS:
            assert torch.equal(a[key], b[key]), key


def test_hf_signals_equal_our_qwen3_with_the_same_weights(tmp_path):
    hf = make_hf_model()
    hf.save_pretrained(tmp_path / "qwen3")
    ours = Transformer.from_pretrained(tmp_path / "qwen3").eval()
    ids, mask, starts = padded_batch(hf.config.vocab_size)
    for kwargs in (dict(), dict(layers=[0, 5], heads="all", h_hi=None)):
        expected = rhythm_signals(ours, ids, starts, mask, receivers=True, **kwargs)
        assert_same_signals(hf_rhythm_signals(hf, ids, mask, starts, receivers=True, **kwargs), expected, 1e-5)
    assert hf.config._attn_implementation == "eager"  # the capture is switched off again


class EagerMaps:
    """transformers' eager attention behind the call explicit_signals makes: (logits, {layer: maps}).
    A padding query row, which transformers spreads over every key, attends to itself here, as in this
    project's model, so that explicit_signals' check of the whole map passes; no metric reads those rows."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    def __call__(self, input_ids, attn_layers=(), attention_mask=None):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True,
                         position_ids=positions_from_mask(attention_mask))
        padding = (attention_mask == 0)[:, None, :, None]  # (B, 1, T, 1) query rows
        itself = torch.eye(input_ids.size(1))[None, None]
        return out.logits, {layer: torch.where(padding, itself, out.attentions[layer]) for layer in attn_layers}


def test_hf_signals_of_a_llama_equal_the_maps_of_its_eager_attention():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      attn_implementation="eager")
    llama = transformers.LlamaForCausalLM(config).eval()
    ids, mask, starts = padded_batch(300, seed=2)
    layers = default_layers(6)
    with torch.no_grad():
        reference = explicit_signals(EagerMaps(llama), ids, starts, mask, layers, "targeted", 10, 10, 100, 0.3, True,
                                     4, None, 1.0)
    assert_same_signals(hf_rhythm_signals(llama, ids, mask, starts, receivers=True), reference, 1e-5)


def tiny_llama(path):
    tokenizer = Tokenizer.byte_level()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, eos_token_id=tokenizer.eos_id,
                                      pad_token_id=tokenizer.pad_id)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_analyze_runs_on_a_llama(tmp_path):
    """`train.py analyze` on a causal LM that is not a Qwen3 writes the same tables and pictures, and
    its signals are those of integrations.hf on the same responses."""
    model_dir, out = tiny_llama(tmp_path / "llama"), tmp_path / "analysis"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "analyze", "--init", str(model_dir), "--num-prompts",
                           "3", "--max-new-tokens", "12", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("couplings.json", "perturbation.json", "rhythm.png", "rhythm.html", "responses.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_responses"] == 3 and summary["layers"] == [1, 2]
    record = json.loads((out / "responses.jsonl").read_text().splitlines()[0])
    tokenizer = Tokenizer.byte_level()
    batch = build_batch([tokenizer.encode(record["prompt"], allow_special=True)], [record["token_ids"]], 0)
    llama = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    signals = hf_rhythm_signals(llama, batch["input_ids"], batch["attention_mask"], batch["starts"], layers=[1, 2],
                                h_hi=None)[0]
    torch.testing.assert_close(torch.tensor(record["waad"]), signals["waad"], rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# TRL

def toy_reward(completions, **_):
    """A reward that differs between the completions of a random model: the share of odd code points."""
    return [sum(ord(c) % 2 for c in text) / max(len(text), 1) for text in completions]


def trl_run(tmp_path, trainer_class, **credit):
    """Two GRPO steps of a tiny random Qwen3 on Countdown prompts; returns the trainer."""
    trl = pytest.importorskip("trl", reason="TRL is installed by requirements-dev.txt")
    from examples.trl_countdown import countdown_dataset, tiny_qwen3

    model_dir = tmp_path / "model"
    if not model_dir.exists():
        tiny_qwen3(model_dir)
    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                          num_generations=4, max_completion_length=16, learning_rate=1e-3, beta=0.0, seed=0,
                          logging_steps=1, save_strategy="no", report_to="none", use_cpu=True)
    trainer = trainer_class(model=str(model_dir), reward_funcs=toy_reward, args=args,
                            train_dataset=countdown_dataset(16, seed=0), **credit)
    trainer.train()
    return trainer


def losses(trainer):
    return [(r["step"], r["loss"]) for r in trainer.state.log_history if "loss" in r]


def test_trl_plain_and_credit_none_run_the_same_two_steps(tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is installed by requirements-dev.txt")
    from integrations.trl_credit import AttentionCreditGRPOTrainer

    plain = trl_run(tmp_path, trl.GRPOTrainer)
    none = trl_run(tmp_path, AttentionCreditGRPOTrainer, credit="none")
    assert plain.state.global_step == none.state.global_step == 2
    assert [step for step, _ in losses(plain)] == [1, 2] and any(loss != 0 for _, loss in losses(plain))
    assert losses(none) == losses(plain)
    assert [r["gamma_mean"] for r in none.state.log_history if "gamma_mean" in r] == [1.0, 1.0]


def test_trl_loss_receives_gamma_times_a_of_this_projects_own_path(tmp_path, monkeypatch):
    """coupled: every row of the advantages TRL's loss receives is gamma_t * A, gamma from credit_gamma
    of this project's Qwen3 (lean path) on the same prompt + completion at the generating weights."""
    trl = pytest.importorskip("trl", reason="TRL is installed by requirements-dev.txt")
    from examples.trl_countdown import tiny_qwen3
    from integrations.trl_credit import AttentionCreditGRPOTrainer

    tiny_qwen3(tmp_path / "model")
    ours = Transformer.from_pretrained(tmp_path / "model").eval()  # the weights the first batch is generated with
    generated, received = [], []
    parent = trl.GRPOTrainer._generate_and_score_completions

    def record_generation(self, inputs):
        output = parent(self, inputs)
        if not generated:
            generated.append({key: value.clone() for key, value in output.items() if torch.is_tensor(value)})
        return output

    monkeypatch.setattr(trl.GRPOTrainer, "_generate_and_score_completions", record_generation)
    compute_loss = AttentionCreditGRPOTrainer._compute_loss

    def record_loss(self, model, inputs):
        received.append({key: value.clone() for key, value in inputs.items() if torch.is_tensor(value)})
        return compute_loss(self, model, inputs)

    monkeypatch.setattr(AttentionCreditGRPOTrainer, "_compute_loss", record_loss)
    trainer = trl_run(tmp_path, AttentionCreditGRPOTrainer, credit="coupled", window=3, h_lo=2, h_hi=8)
    first = generated[0]
    A, lengths = first["advantages"], first["completion_mask"].sum(1).tolist()
    assert A.abs().max() > 0 and min(lengths) >= 4
    expected = {}
    for row, n in enumerate(lengths):
        prompt = first["prompt_ids"][row][first["prompt_mask"][row].bool()].tolist()
        completion = first["completion_ids"][row][:n].tolist()
        batch = build_batch([prompt], [completion], 0)
        s = rhythm_signals(ours, batch["input_ids"], batch["starts"], layers=default_layers(2), window=3, h_lo=2,
                           h_hi=8)[0]
        gamma = credit_gamma("coupled", waad=s["waad"], fai=s["fai"], entropy=s["entropy"])
        expected[(tuple(prompt), tuple(completion))] = (gamma * A[row], n)
    matched, amplified = 0, 0
    for inputs in received:  # TRL shuffles and splits the batch; rows are matched by their tokens
        for row in range(inputs["advantages"].size(0)):
            prompt = inputs["prompt_ids"][row][inputs["prompt_mask"][row].bool()].tolist()
            n = int(inputs["completion_mask"][row].sum())
            key = (tuple(prompt), tuple(inputs["completion_ids"][row][:n].tolist()))
            if key in expected:
                want, _ = expected[key]
                torch.testing.assert_close(inputs["advantages"][row, :n], want, rtol=1e-5, atol=1e-6)
                matched += 1
                amplified += int((want.abs() > A.abs().min()).any())
    assert matched == len(lengths)  # every completion of the first batch reached the loss, shaped
    assert amplified > 0
    logged = [r for r in trainer.state.log_history if "gamma_mean" in r]
    assert logged and all(r["gamma_mean"] > 1 and 0 < r["amplified_frac"] < 1 for r in logged)


def test_the_project_imports_without_trl_and_the_trainer_says_what_to_install():
    blocked = "import sys; sys.modules['trl'] = None; "
    imports = subprocess.run([sys.executable, "-c", blocked + "import train, rl, analyze, compare, integrations.hf"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert imports.returncode == 0, imports.stderr
    trainer = subprocess.run([sys.executable, "-c", blocked + "import integrations.trl_credit"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert trainer.returncode == 1
    assert "ImportError: AttentionCreditGRPOTrainer needs TRL: pip install 'trl>=1.16,<1.17'" in trainer.stderr


def test_the_trl_page_example_runs_as_written(tmp_path):
    pytest.importorskip("trl", reason="TRL is installed by requirements-dev.txt")
    proc = subprocess.run([sys.executable, "-m", "examples.trl_countdown", "--tiny", "--out", str(tmp_path / "trl")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = [line for line in proc.stdout.splitlines() if line.startswith("{'step'")]
    assert len(steps) == 2 and all("'gamma_mean'" in line for line in steps)

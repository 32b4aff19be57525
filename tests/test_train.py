"""train.py end to end: the smoke run's files, resuming a killed run, and one-line errors."""

import json
import math
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

from model import Qwen3Config, Transformer
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def run_train(*args, check=True):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {args} failed:\n{proc.stderr[-3000:]}")
    return proc


def comparable(records):
    """Records without their wall-clock timings (time_generate, time_credit, ...)."""
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in records]


def read_records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "out"
    run_train("--smoke", "--out", out)
    return out


def test_smoke_run_writes_every_file(smoke_run):
    records = read_records(smoke_run / "metrics.jsonl")
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2, 4]
    for key in ("reward_mean", "accuracy", "response_length", "amplified_frac", "gamma_mean", "time_credit"):
        assert key in records[1]
    for png in ("curves.png", "rhythm_0.png"):
        assert (smoke_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<html" in (smoke_run / "rhythm_0.html").read_text().lower()
    config = json.loads((smoke_run / "run_config.json").read_text())
    assert config["rl"]["strategy"] == "coupled" and config["run"]["steps"] == 4
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert 0.0 <= summary["accuracy_after_rl"] <= 1.0


def test_smoke_run_lr_decays_as_configured(smoke_run):
    # the demo's GRPO lr: cosine from lr at the first step to min_lr_ratio * lr at the last (4 steps here)
    rl = json.loads((smoke_run / "run_config.json").read_text())["rl"]
    assert rl["lr_warmup_steps"] == 0 and rl["min_lr_ratio"] < 1.0
    ratio = rl["min_lr_ratio"]
    expected = [rl["lr"] * (ratio + (1 - ratio) * (1 + math.cos(math.pi * s / 3)) / 2) for s in range(4)]
    lrs = [r["lr"] for r in read_records(smoke_run / "metrics.jsonl") if r["kind"] == "train"]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[-1] == pytest.approx(ratio * rl["lr"])


def test_smoke_checkpoint_reloads_in_transformers_with_same_logits(smoke_run):
    ours = Transformer.from_pretrained(smoke_run / "model").eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(smoke_run / "model").eval()
    tokenizer = Tokenizer.from_pretrained(smoke_run / "model")
    ids = torch.tensor([tokenizer.encode("3 7 9 -> 30\n<think>")])
    with torch.no_grad():
        assert (ours(ids)[0] - theirs(ids).logits).abs().max() <= 1e-5


def test_killed_run_resumes_with_identical_metrics(smoke_run, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--smoke", "--out", str(out)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / "checkpoint" / "progress.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and json.loads(progress.read_text())["step"] >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed after its step-2 checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_train("--resume", out)
    assert comparable(read_records(out / "metrics.jsonl")) == comparable(read_records(smoke_run / "metrics.jsonl"))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    tokenizer = Tokenizer.byte_level()
    Transformer(Qwen3Config(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                            max_position_embeddings=256)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


BAD = ["not-a-checkpoint", "missing-data", "malformed-data", "micro-gt-batch", "group-size-1", "unwritable-out",
       "unknown-credit", "bad-q", "bad-lr", "bad-gamma", "bad-alpha", "bad-k", "bad-window", "bad-h-hi",
       "bad-temperature", "bad-clip", "bad-kl", "bad-steps", "layers-beyond-depth", "init-nonexistent",
       "compare-seeds-0", "compare-bad-credit", "analyze-num-prompts-0", "analyze-temperature",
       "analyze-layers-beyond", "init-truncated-weights", "init-config-not-json", "bad-grad-accum", "compare-jobs-0",
       "paper-preset-without-init", "rhythm-preset-with-init", "compare-bad-gamma-norm", "compare-empty-credit",
       "negative-seed", "compare-empty-gamma-norm", "shape-with-init", "sft-with-init", "bad-n-head",
       "bad-intermediate", "max-new-tokens-beyond-context", "max-new-tokens-beyond-prompt-room",
       "init-max-new-tokens-beyond-context", "compare-max-new-tokens-beyond-prompt-room"]


# The tiny checkpoint has 256 positions: the paper preset's 1,024 new tokens do not fit (a case of its
# own), so the cases that test another input of an --init run ask for responses that fit.
FITS = ("--max-new-tokens", "64")


@pytest.mark.parametrize("case", BAD)
def test_bad_input_fails_with_one_clear_line(case, tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"question": "1+1?", "answer": "#### 2"}\n{not json\n')
    blocker = tmp_path / "a-file"
    blocker.write_text("")

    def damaged_copy(part):
        copy = tmp_path / f"damaged-{part}"
        shutil.copytree(tiny_checkpoint, copy)
        if part == "weights":
            weights = copy / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:1000])
        else:
            (copy / "config.json").write_text('{"model_type": "qwen3",, }')
        return copy

    cases = {
        "not-a-checkpoint": (["--init", tmp_path], "no config.json"),
        "missing-data": (["--init", tiny_checkpoint, "--task", "gsm8k", "--data", tmp_path / "nope.jsonl", *FITS],
                         "nope.jsonl"),
        "malformed-data": (["--init", tiny_checkpoint, "--task", "gsm8k", "--data", bad_jsonl, *FITS], "line 2"),
        "micro-gt-batch": (["--smoke", "--rollout-batch", "16", "--micro-batch", "32"], "micro_batch_size"),
        "group-size-1": (["--smoke", "--group-size", "1"], "group_size must be >= 2"),
        "unwritable-out": (["--smoke", "--sft-steps", "1", "--out", blocker / "out"], "cannot write"),
        "unknown-credit": (["--smoke", "--credit", "loud"], "--credit loud: strategy must be one of"),
        "bad-q": (["--smoke", "--q", "2"], "--q 2: q must be in (0, 1]"),
        "bad-lr": (["--smoke", "--lr", "-1"], "--lr -1: lr must be > 0"),
        "bad-gamma": (["--smoke", "--gamma-amp", "-1"], "--gamma-amp -1: gamma_amp must be > 0"),
        "bad-alpha": (["--smoke", "--alpha", "1.5"], "--alpha 1.5: alpha must be in [0, 1]"),
        "bad-k": (["--smoke", "--k", "0"], "--k 0: k must be >= 1"),
        "bad-window": (["--smoke", "--window", "0"], "--window 0: window must be >= 1"),
        "bad-h-hi": (["--smoke", "--h-hi", "3"], "--h-hi 3: h_hi must be >= 10"),
        "bad-temperature": (["--smoke", "--temperature", "0"], "--temperature 0: temperature must be > 0"),
        "bad-clip": (["--smoke", "--clip-eps", "0"], "--clip-eps 0: clip_eps must be in (0, 1)"),
        "bad-kl": (["--smoke", "--kl-coef", "-1"], "--kl-coef -1: kl_coef must be >= 0"),
        "bad-steps": (["--smoke", "--steps", "0"], "--steps 0: steps must be >= 1"),
        "layers-beyond-depth": (["--smoke", "--layers", "0,7"], "the model has 2 layers"),
        "init-nonexistent": (["--init", "/nonexistent"], "no such directory /nonexistent (and it is not a hub id)"),
        "compare-seeds-0": (["compare", "--smoke", "--seeds", "0"], "--seeds 0"),
        "compare-bad-credit": (["compare", "--smoke", "--credit", "none,loud"],
                               "--credit loud: strategy must be one of none, random"),
        "compare-bad-gamma-norm": (["compare", "--smoke", "--credit", "none,coupled+max"],
                                   "--credit coupled+max: gamma_norm must be one of none, mean"),
        "analyze-num-prompts-0": (["analyze", "--init", tiny_checkpoint, "--num-prompts", "0"], "--num-prompts"),
        "analyze-temperature": (["analyze", "--init", tiny_checkpoint, "--temperature", "-1"], "--temperature"),
        "analyze-layers-beyond": (["analyze", "--init", tiny_checkpoint, "--layers", "5"], "the model has 2 layers"),
        "bad-grad-accum": (["--smoke", "--grad-accum", "0"], "--grad-accum 0: grad_accum must be >= 1"),
        "compare-empty-gamma-norm": (["compare", "--smoke", "--credit", "none,coupled+"],
                                     "--credit coupled+: gamma_norm must be one of none, mean"),
        "compare-empty-credit": (["compare", "--smoke", "--credit", "none,,coupled"],
                                 "--credit none,,coupled: expected strategy names separated by single commas"),
        "compare-jobs-0": (["compare", "--smoke", "--jobs", "0"], "--jobs 0"),
        "negative-seed": (["compare", "--smoke", "--seed", "-3"], "--seed -3: seed must be >= 0"),
        "shape-with-init": (["--init", tiny_checkpoint, "--n-layer", "3"],
                            "--n-layer is for a model trained from scratch"),
        "sft-with-init": (["--init", tiny_checkpoint, "--sft-lr", "1e-3"], "--sft-lr is for a model trained from scratch"),
        "bad-n-head": (["--smoke", "--n-head", "3"], "--n-head 3: n_head must be a multiple of n_kv_head (2)"),
        "bad-intermediate": (["--smoke", "--intermediate", "0"], "--intermediate 0: intermediate must be >= 1"),
        "paper-preset-without-init": (["--preset", "paper"], "--preset paper needs --init"),
        "max-new-tokens-beyond-context": (["--smoke", "--max-new-tokens", "100000000"],
                                          "--max-new-tokens 100000000: a prompt of at least one token"),
        "max-new-tokens-beyond-prompt-room": (["--smoke", "--max-new-tokens", "250"],
                                              "--max-new-tokens 250: the longest prompt"),
        "init-max-new-tokens-beyond-context": (["--init", tiny_checkpoint, "--max-new-tokens", "256"],
                                               "the model's 256 positions, so at most 255"),
        "compare-max-new-tokens-beyond-prompt-room": (["compare", "--smoke", "--max-new-tokens", "250"],
                                                      "--max-new-tokens 250: the longest prompt"),
        "rhythm-preset-with-init": (["--preset", "rhythm", "--init", tiny_checkpoint], "does not take --init"),
        "init-truncated-weights": (["--init", damaged_copy("weights"), *FITS], "model.safetensors is damaged"),
        "init-config-not-json": (["--init", damaged_copy("config")], "config.json is not valid JSON"),
    }
    assert set(cases) == set(BAD)  # a case written here but missing from BAD would never run
    args, expected = cases[case]
    if case != "unwritable-out":
        args = [*args, "--out", out]
    proc = run_train(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    # one error line and nothing else, no output folder: the run stopped at the boundary
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize("strategy, layers", [("none", "top"), ("global", (0,)), ("coupled", "middle")])
def test_draw_rhythm_draws_the_runs_layers_and_strategy(strategy, layers, tmp_path, monkeypatch):
    import attention_metrics as am
    import plots
    from rl import GRPO, RLConfig
    from tasks import make_task

    tokenizer = Tokenizer.byte_level()
    torch.manual_seed(0)
    model = Transformer(Qwen3Config(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                    max_position_embeddings=256)).eval()
    task = make_task("countdown", seed=0, num_numbers=3, n_train=4, n_test=2, prompt_style="compact")
    rl = RLConfig(strategy=strategy, credit_layers=layers, max_new_tokens=12, h_lo=2, h_hi=6)
    trainer = GRPO(model, tokenizer, task, rl)
    seen = []
    monkeypatch.setattr(plots, "plot_rhythm", lambda *a, **k: None)
    monkeypatch.setattr(plots, "render_html", lambda path, tokens, signals, gamma=None, **k:
                        seen.append((signals["layers"], gamma, signals)))
    plots.draw_rhythm(model, tokenizer, trainer, task.test[:1], tmp_path, rl)
    assert seen, "no response long enough to draw"
    drawn_layers, gamma, signals = seen[0]
    expected_layers = am.default_layers(6, layers) if isinstance(layers, str) else list(layers)
    assert drawn_layers == expected_layers
    if strategy == "none":
        assert torch.equal(gamma, torch.ones_like(gamma))
    else:
        reference = am.credit_gamma(strategy, waad=signals["waad"], fai=signals["fai"], q=rl.q, k=rl.k,
                                    alpha=rl.alpha, gamma_amp=rl.gamma_amp)
        assert torch.equal(gamma, reference.cpu())


def test_metrics_log_sends_the_jsonl_records_to_wandb_and_tensorboard(tmp_path, monkeypatch):
    import types

    import config
    import train

    calls = []
    fake_wandb = types.ModuleType("wandb")
    run_handle = types.SimpleNamespace(log=lambda data, step: calls.append(("wandb", data, step)),
                                       finish=lambda: calls.append(("wandb-finish",)))
    fake_wandb.init = lambda **kw: calls.append(("wandb-init", kw["project"])) or run_handle
    fake_tb = types.ModuleType("torch.utils.tensorboard")

    class Writer:
        def __init__(self, log_dir):
            calls.append(("tb-init", log_dir))

        def add_scalar(self, name, value, step):
            calls.append(("tb", name, value, step))

        def close(self):
            calls.append(("tb-close",))

    fake_tb.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake_tb)
    run = config.RunConfig(out=str(tmp_path), wandb="proj", tensorboard=True)
    log = train.MetricsLog(tmp_path / "metrics.jsonl", run, {"run": {}})
    records = [{"kind": "eval", "step": 0, "accuracy": 0.25}, {"kind": "train", "step": 1, "loss": 0.5, "lr": 1e-6}]
    for record in records:
        log(record)
    log.close()
    assert read_records(tmp_path / "metrics.jsonl") == records
    assert ("wandb-init", "proj") in calls and ("tb-init", str(tmp_path / "tensorboard")) in calls
    assert ("wandb", {"eval/accuracy": 0.25}, 0) in calls
    assert ("wandb", {"train/loss": 0.5, "train/lr": 1e-6}, 1) in calls
    assert ("tb", "train/loss", 0.5, 1) in calls and ("tb", "eval/accuracy", 0.25, 0) in calls
    assert calls[-2:] == [("wandb-finish",), ("tb-close",)]


@pytest.mark.parametrize("flags, package", [(["--wandb", "proj"], "wandb"), (["--tensorboard"], "tensorboard")])
def test_missing_logger_package_is_one_line(flags, package, tmp_path):
    import importlib.util

    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    out = tmp_path / "out"
    proc = run_train("--smoke", *flags, "--out", out, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and f"the {package} package is not installed" in lines[0]
    assert not out.exists()


def test_final_model_keeps_the_init_checkpoints_dtype(tmp_path):
    """A bf16 --init checkpoint comes back bf16 in model/ (not twice its size); checkpoint/ keeps
    the fp32 master weights that --resume needs."""
    from safetensors import safe_open
    init = tmp_path / "bf16"
    tokenizer = Tokenizer.byte_level()
    Transformer(Qwen3Config(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                            max_position_embeddings=1024)).to(torch.bfloat16).save_pretrained(init)
    tokenizer.save_pretrained(init)
    assert json.loads((init / "config.json").read_text())["torch_dtype"] == "bfloat16"
    out = tmp_path / "out"
    run_train("--init", init, "--device", "cpu", "--steps", "1", "--group-size", "2", "--rollout-batch", "4",
              "--micro-batch", "2", "--max-new-tokens", "8", "--eval-size", "4", "--out", out)

    def dtypes(directory):
        with safe_open(directory / "model.safetensors", framework="pt") as f:
            return {f.get_tensor(k).dtype for k in f.keys()}

    assert dtypes(out / "model") == {torch.bfloat16}
    assert json.loads((out / "model" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert dtypes(out / "checkpoint") == {torch.float32}


def resolved(*flags):
    import config
    from cli import Parser
    parser = Parser()
    config.add_run_flags(parser)
    config.add_rl_flags(parser)
    return config.resolve(parser.parse_args(list(flags)))


def test_rhythm_preset_is_the_documented_testbed():
    """--preset rhythm: Countdown (3 numbers) with the worked-search warm-up, responses long enough that
    FAI is defined on most tokens (max_new_tokens 128 > H_hi), the paper's H_lo/H_hi, a 2-layer model with
    a 900-step warm-up and 150 GRPO steps; flags still win (--n-layer 4 --steps 100 --sft-steps 600 is the
    preset of the first two reports)."""
    run, rl = resolved("--preset", "rhythm")
    assert (run.solution, run.num_numbers, run.init, run.sft_steps, run.sft_batch) == ("search", 3, None, 900, 64)
    assert (run.n_layer, run.n_embd, run.intermediate, run.steps, run.eval_every) == (2, 128, 512, 150, 50)
    assert (rl.max_new_tokens, rl.h_lo, rl.h_hi, rl.group_size, rl.rollout_batch_size) == (128, 10, 100, 8, 128)
    assert resolved("--preset", "rhythm", "--credit", "none", "--steps", "7")[1].strategy == "none"
    assert resolved("--preset", "rhythm", "--steps", "7")[0].steps == 7
    assert resolved("--preset", "rhythm", "--n-layer", "4")[0].n_layer == 4
    demo_run, demo_rl = resolved()
    assert (demo_run.solution, demo_rl.max_new_tokens) == ("direct", 64)


def test_rhythm_smoke_run_with_cpu_bf16_autocast(tmp_path):
    """The testbed runs end to end (shrunk by --smoke) with bf16 autocast on the CPU (--precision bf16,
    the GPU's dtype path), and its warm-up has taught the worked-search format: the drawn held-out
    response opens with a chain of steps ('<think>20-11=9, ...')."""
    import html
    import re
    out = tmp_path / "out"
    run_train("--preset", "rhythm", "--smoke", "--precision", "bf16", "--sft-steps", "150", "--out", out)
    config = json.loads((out / "run_config.json").read_text())
    assert config["run"]["solution"] == "search" and config["run"]["precision"] == "bf16"
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    row = (out / "rhythm_0.html").read_text().split('<div class="row"')[1]
    text = html.unescape("".join(re.findall(r"<span[^>]*>(.*?)</span>", row)))
    assert re.match(r"<think>\d+[-+*/]\d+=\d+", text), text

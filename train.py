"""The command line: train with attention-guided credit, compare strategies, analyze a model.

    python train.py                                   # CPU demo: tiny model, warm-up, GRPO, eval
    python train.py --smoke --out /tmp/smoke          # the same, shrunk to under a minute
    python train.py --init Qwen3-0.6B-Base-dir --task countdown --credit coupled   # the paper's setting
    python train.py --resume out                      # continue a killed run from its last checkpoint
    python train.py compare --credit none,coupled --seeds 3
    python train.py analyze [--init DIR]              # Section 4 on any model (default: out/model)
    torchrun --nproc_per_node=8 train.py --init DIR [--dist fsdp]   # the same run on 8 GPUs

A run writes to --out: metrics.jsonl (one line per step), curves.png, rhythm_*.png/.html (the
attention rhythm of a few held-out responses), model/ (the final checkpoint in the Hugging Face
layout, tokenizer included), checkpoint/ (the last resumable state) and run_config.json.
Under torchrun every rank runs the same loop on its share of each batch (rl.py, distributed.py);
rank 0 alone logs and writes, and the files are the same as one process writes.
"""

import argparse
import json
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path

# OpenMP threads that spin while they wait make a CPU run 20-30x slower as soon as another process
# shares the cores (a laptop, a second run); passive waiting costs little when the cores are free.
# Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from attention_metrics import aggregated_maps, credit_gamma, plot_rhythm, render_html, rhythm_signals
from distributed import (MODES, broadcast_parameters, full_state_dict, gathered, is_main, launched_rank,
                         launched_world_size, parallel_mode, setup, teardown)
from model import Qwen3Config, Transformer, atomic_directory, save_state_dict
from rl import GRPO, RLConfig, build_batch, check_world_size
from sft import warmup
from tasks import make_task
from tokenizer import Tokenizer


class UsageError(ValueError):
    """A bad flag or input: reported as one line, exit code 2."""


# -----------------------------------------------------------------------------
# Configuration: one dataclass for the run, rl.RLConfig for the GRPO knobs.


@dataclass
class RunConfig:
    out: str = "out"
    seed: int = 0
    device: str = "auto"             # auto = cuda when present
    init: str | None = None          # Qwen3 checkpoint dir or hub id; None = tiny model from scratch
    task: str = "countdown"          # countdown | gsm8k | math
    data: str | None = None          # JSONL for gsm8k / math
    num_numbers: int = 3
    max_number: int = 30
    max_target: int = 100
    prompt_style: str = "compact"
    n_train: int = 20_000
    n_test: int = 512
    steps: int = 300                 # GRPO steps
    eval_every: int = 40
    eval_size: int = 512             # held-out problems per evaluation
    checkpoint_every: int = 20
    rhythm_examples: int = 3         # held-out responses drawn as rhythm PNG + HTML
    # model from scratch (ignored with --init)
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_kv_head: int = 2
    head_dim: int = 32
    intermediate: int = 512
    context: int = 256
    # supervised warm-up (from scratch only)
    sft_steps: int = 300
    sft_batch: int = 64
    sft_lr: float = 3e-3


# The CPU demo (RunConfig's defaults): a 1M-parameter model, 300 warm-up steps, 300 GRPO steps of 16 prompts x 8,
# evaluated greedily on all 512 held-out problems.
# Two choices differ from the paper's RL setting because this model is tiny and scored greedily:
# rollouts at temperature 0.7 stay near the greedy answer that evaluation scores (at 1.0 a 1M model's
# samples are mostly slips it would not make greedily), and the lr decays (cosine to a tenth), so the
# policy settles at the end instead of drifting with the noise of 16 prompts per step.
DEMO = dict(run={}, rl=dict(group_size=8, rollout_batch_size=128, micro_batch_size=32, max_new_tokens=64, lr=5e-5,
                            min_lr_ratio=0.1, temperature=0.7, strategy="coupled", eval_batch_size=256))
SMOKE = dict(run=dict(steps=4, eval_every=2, checkpoint_every=2, eval_size=16, n_train=400, n_test=32, sft_steps=30,
                      n_layer=2, n_embd=64, n_head=4, n_kv_head=2, head_dim=16, intermediate=128, rhythm_examples=1),
             rl=dict(group_size=4, rollout_batch_size=16, micro_batch_size=8, max_new_tokens=24))
# The paper's setting (PAPER.md Section 4) scaled to one GPU: the paper's 16 optimizer steps per rollout
# batch (here 128 responses / micro-batch 8; the paper's 512 / 32), lr, temperature and response length.
# Micro-batch and rollout batch are a quarter of the paper's (counting its 512 as responses; ROLL counts prompts).
PAPER = dict(run=dict(num_numbers=4, max_number=99, max_target=100, prompt_style="tinyzero", steps=300,
                      eval_every=20, eval_size=512, checkpoint_every=20),
             rl=dict(group_size=8, rollout_batch_size=128, micro_batch_size=8, max_new_tokens=1024, lr=1e-6,
                     temperature=1.0, strategy="coupled", eval_batch_size=128))

# flag -> (section, field); everything else maps to the RunConfig field of the same name
RL_FLAGS = dict(credit="strategy", bottom="bottom", q="q", gamma_amp="gamma_amp", alpha="alpha", k="k",
                window="window", h_lo="h_lo", h_hi="h_hi", layers="credit_layers", heads="credit_heads",
                sign="sign", group_size="group_size", rollout_batch="rollout_batch_size",
                micro_batch="micro_batch_size", ppo_epochs="ppo_epochs", lr="lr", max_new_tokens="max_new_tokens",
                temperature="temperature", clip_eps="clip_eps", kl_coef="kl_coef", norm="norm",
                lr_warmup_steps="lr_warmup_steps", min_lr_ratio="min_lr_ratio", grad_accum="grad_accum",
                gamma_norm="gamma_norm")


def parse_layers(text):
    if text in ("middle", "all", "top", "bottom"):
        return text
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes middle|all|top|bottom or a list like 9,11,13; got {text!r}")


def add_run_flags(p):
    p.add_argument("--out", help="output folder (default out/)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--init", help="Qwen3 checkpoint directory (or hub id with huggingface_hub installed)")
    p.add_argument("--task", choices=["countdown", "gsm8k", "math"])
    p.add_argument("--data", help="JSONL file (or folder with train.jsonl/test.jsonl) for gsm8k / math")
    p.add_argument("--num-numbers", dest="num_numbers", type=int, choices=[3, 4])
    p.add_argument("--steps", type=int, help="GRPO steps")
    p.add_argument("--eval-every", dest="eval_every", type=int)
    p.add_argument("--eval-size", dest="eval_size", type=int)
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int)
    p.add_argument("--sft-steps", dest="sft_steps", type=int, help="warm-up steps (model from scratch only)")
    p.add_argument("--smoke", action="store_true", help="shrunken default run (under a minute)")


def add_rl_flags(p, credit_type=str):
    p.add_argument("--credit", type=credit_type, help="none|random|entropy|local|global|coupled")
    p.add_argument("--bottom", action="store_true", default=None, help="select the bottom q (ablation)")
    p.add_argument("--q", type=float)
    p.add_argument("--gamma-amp", dest="gamma_amp", type=float)
    p.add_argument("--alpha", type=float)
    p.add_argument("--k", type=int)
    p.add_argument("--window", type=int, help="W of WAAD")
    p.add_argument("--h-lo", dest="h_lo", type=int)
    p.add_argument("--h-hi", dest="h_hi", type=int)
    p.add_argument("--layers", type=parse_layers, help="middle|all|top|bottom|comma list")
    p.add_argument("--heads", choices=["targeted", "all"])
    p.add_argument("--sign", choices=["both", "positive", "negative"])
    p.add_argument("--group-size", dest="group_size", type=int)
    p.add_argument("--rollout-batch", dest="rollout_batch", type=int, help="responses per step (prompts x G)")
    p.add_argument("--prompts-per-step", dest="prompts_per_step", type=int,
                   help="prompts per step: sets --rollout-batch to N x group size")
    p.add_argument("--micro-batch", dest="micro_batch", type=int, help="responses per gradient step")
    p.add_argument("--grad-accum", dest="grad_accum", type=int,
                   help="forward/backward chunks per gradient step (memory; the step is the same)")
    p.add_argument("--ppo-epochs", dest="ppo_epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-warmup-steps", dest="lr_warmup_steps", type=int, help="linear lr warm-up (GRPO steps)")
    p.add_argument("--min-lr-ratio", dest="min_lr_ratio", type=float,
                   help="cosine lr decay to this fraction of --lr at the last step; 1 = constant (paper)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--clip-eps", dest="clip_eps", type=float)
    p.add_argument("--kl-coef", dest="kl_coef", type=float)
    p.add_argument("--norm", choices=["sequence", "token"])
    p.add_argument("--gamma-norm", dest="gamma_norm", choices=["none", "mean"],
                   help="mean: rescale each response's credit gamma to mean 1 (not in the paper)")


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def resolve(args) -> tuple[RunConfig, RLConfig]:
    """Preset (demo, smoke or paper) + the flags given = the full config of the run."""
    preset = PAPER if args.init else DEMO
    run_values = dict(preset["run"])
    rl_values = dict(preset["rl"])
    if args.smoke:
        run_values.update(SMOKE["run"])
        rl_values.update(SMOKE["rl"])
    given = {k: v for k, v in vars(args).items() if v is not None}
    if "prompts_per_step" in given and "rollout_batch" in given:
        raise UsageError("give --rollout-batch (responses) or --prompts-per-step (prompts), not both")
    for flag, field in RL_FLAGS.items():
        if flag in given:
            rl_values[field] = given.pop(flag)
    if "prompts_per_step" in given:
        prompts = given.pop("prompts_per_step")
        if prompts < 1:
            raise UsageError(f"--prompts-per-step must be >= 1, got {prompts}")
        rl_values["rollout_batch_size"] = prompts * rl_values["group_size"]
    run_names = {f.name for f in fields(RunConfig)}
    run_values.update({k: v for k, v in given.items() if k in run_names})
    if run_values.get("task", "countdown") != "countdown" and args.init is None:
        raise UsageError("--task gsm8k/math needs --init <Qwen3 checkpoint>: the tiny demo model is for countdown")
    run = RunConfig(**run_values)
    rl_values["seed"] = run.seed
    try:
        rl = RLConfig(**rl_values)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for name in ("steps", "eval_every", "eval_size", "checkpoint_every"):
        if getattr(run, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(run, name)}")
    return run, rl


def config_json(run: RunConfig, rl: RLConfig) -> dict:
    return {"run": asdict(run), "rl": asdict(rl)}


def config_from_json(d: dict) -> tuple[RunConfig, RLConfig]:
    rl = dict(d["rl"])
    for name in ("betas", "stop_ids"):
        rl[name] = tuple(rl[name])
    if isinstance(rl["credit_layers"], list):
        rl["credit_layers"] = tuple(rl["credit_layers"])
    return RunConfig(**d["run"]), RLConfig(**rl)


# -----------------------------------------------------------------------------
# Building blocks of a run


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available")
    return torch.device(name)


def precision(device: torch.device):
    """bf16 autocast on GPU (fp32 master weights, so lr 1e-6 updates are not rounded away); fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def checkpoint_dir(init: str) -> Path:
    """A local directory, or a hub id downloaded with huggingface_hub when that package is installed."""
    path = Path(init)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UsageError(f"--init {init}: no such directory (install huggingface_hub to download hub ids)") from None
    patterns = ["*.json", "*.safetensors", "vocab.json", "merges.txt"]
    return Path(snapshot_download(init, allow_patterns=patterns))


def load_task(run: RunConfig):
    if run.task == "countdown":
        return make_task("countdown", seed=run.seed, num_numbers=run.num_numbers, max_number=run.max_number,
                         max_target=run.max_target, prompt_style=run.prompt_style, n_train=run.n_train,
                         n_test=run.n_test)
    if run.task in ("gsm8k", "math") and run.data is None:
        try:
            import datasets  # noqa: F401  (only to say whether the hub path is possible)
        except ImportError:
            raise UsageError(f"--task {run.task} needs --data file.jsonl (or the `datasets` package and network)")
    return make_task(run.task, data=run.data, seed=run.seed)


def scratch_model(run: RunConfig, tokenizer: Tokenizer) -> Transformer:
    config = Qwen3Config(vocab_size=tokenizer.vocab_size, hidden_size=run.n_embd, intermediate_size=run.intermediate,
                         num_hidden_layers=run.n_layer, num_attention_heads=run.n_head, num_key_value_heads=run.n_kv_head,
                         head_dim=run.head_dim, max_position_embeddings=run.context, rope_theta=10_000.0,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    torch.manual_seed(run.seed)
    return Transformer(config)


@lru_cache(maxsize=2)
def epoch_order(n_examples: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n_examples))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    return tuple(order)


def data_order(n_examples: int, step: int, per_step: int, seed: int) -> list[int]:
    """Indices of the training examples of GRPO step `step` (0-based): a fresh seeded shuffle per
    epoch, so a resumed run sees exactly the data an uninterrupted run would."""
    positions = range(step * per_step, (step + 1) * per_step)
    return [epoch_order(n_examples, seed, p // n_examples)[p % n_examples] for p in positions]


def append_jsonl(path: Path, record: dict):
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def save_checkpoint(out: Path, model, tokenizer, trainer: GRPO, progress: dict):
    """out/checkpoint: weights (HF layout), tokenizer, trainer state and progress, swapped in whole.

    Every rank calls it (the weights and AdamW state are gathered whole to rank 0); rank 0 writes.
    """
    weights, state = full_state_dict(model), trainer.state_dict()
    if not is_main():
        return
    with atomic_directory(out / "checkpoint") as staging:
        save_state_dict(staging, weights, model.config)
        tokenizer.save_pretrained(staging)
        save_file(state, staging / "trainer_state.safetensors")
        (staging / "progress.json").write_text(json.dumps(progress, indent=2))


def load_trainer_state(path: Path, with_moments: bool) -> dict:
    """trainer_state.safetensors; ranks other than 0 skip the AdamW moments (rank 0 broadcasts them)."""
    with safe_open(path, framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()
                if with_moments or not key.startswith("optim.") or key.endswith(".lr")}


def save_model(path: Path, model, tokenizer):
    """The final model in the Hugging Face layout; a collective like save_checkpoint."""
    weights = full_state_dict(model)
    if is_main():
        save_state_dict(path, weights, model.config)
        tokenizer.save_pretrained(path)


# -----------------------------------------------------------------------------
# Pictures of a run


def plot_curves(records: list[dict], path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [("reward_mean", "rollout reward"), ("accuracy", "accuracy"),
              ("response_length", "response length (tokens)"), ("amplified_frac", "share of tokens amplified")]
    for ax, (key, label) in zip(axes.flat, panels):
        ax.plot([r["step"] for r in train], [r[key] for r in train], label="rollouts", color="tab:blue")
        if key == "accuracy" and evals:
            ax.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-", color="tab:red",
                    label="held-out (greedy)")
            ax.legend()
        ax.set_title(label)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def token_strings(tokenizer, ids):
    return [tokenizer.decode([i]) for i in ids]


def draw_rhythm(model, tokenizer, trainer: GRPO, examples, out: Path, rl: RLConfig, h_hi=None, prefix="rhythm"):
    """PNG (Figure 2 style) and HTML token view of the greedy response to each example."""
    prompts = [trainer.encode_prompt(ex) for ex in examples]
    responses = model.generate(prompts, rl.max_new_tokens, stop_ids=trainer.stop_ids)
    written = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        if len(response) < 2:
            continue
        batch = build_batch([prompt], [response], trainer.pad_id)
        batch = {key: value.to(model.device) for key, value in batch.items()}
        start = int(batch["starts"][0])
        layers = rl.credit_layers if not isinstance(rl.credit_layers, str) else None
        signals = rhythm_signals(model, batch["input_ids"], batch["starts"], batch["attention_mask"], layers=layers,
                                 window=rl.window, h_lo=rl.h_lo, h_hi=h_hi if h_hi is not None else rl.h_hi,
                                 receivers=True)[0]
        gamma = credit_gamma("coupled", waad=signals["waad"], fai=signals["fai"], q=rl.q, gamma_amp=rl.gamma_amp,
                             k=rl.k, alpha=rl.alpha)
        maps = aggregated_maps(model, batch["input_ids"], start, layers=layers)
        tokens = token_strings(tokenizer, response)
        title = f"{examples[i].prompt.strip()[-60:]!r}"
        plot_rhythm(out / f"{prefix}_{i}.png", signals, tokens=tokens, maps=maps, q=rl.q, title=title)
        render_html(out / f"{prefix}_{i}.html", tokens, signals, gamma=gamma, q=rl.q, title=title)
        written.append(f"{prefix}_{i}")
    return written


# -----------------------------------------------------------------------------
# One training run


def ensure_writable(out: Path):
    """Create --out and prove it takes a file, so a bad folder fails before any work."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror})") from None


def prepare_out(out: Path, resume: bool):
    ensure_writable(out)
    if not resume:
        (out / "metrics.jsonl").unlink(missing_ok=True)  # a new run starts a new log


def train(run: RunConfig, rl: RLConfig, resume: bool = False, warm_start: Path | None = None,
          quiet: bool = False, parallel: str | None = None) -> dict:
    """Warm-up (from scratch) or load (--init), then GRPO with periodic eval and checkpoints.

    parallel: None, "ddp" or "fsdp" (distributed.parallel_mode) when started by torchrun; every
    rank runs this function and rank 0 alone prints and writes files.
    Returns a summary: held-out accuracy before and after RL, best accuracy, wall time.
    """
    t_start = time.time()
    out = Path(run.out)
    try:
        check_world_size(rl, launched_world_size())
    except ValueError as e:
        raise UsageError(str(e)) from None
    device = setup(pick_device(run.device))
    main_rank = is_main()
    quiet = quiet or not main_rank
    torch.manual_seed(run.seed)
    task = load_task(run)
    ckpt = out / "checkpoint"
    progress = {}
    if resume:
        progress = json.loads((ckpt / "progress.json").read_text())
        model = Transformer.from_pretrained(ckpt, device=device)
        tokenizer = Tokenizer.from_pretrained(ckpt)
    elif run.init:
        source = checkpoint_dir(run.init)
        model = Transformer.from_pretrained(source, dtype=torch.float32, device=device)
        tokenizer = Tokenizer.from_pretrained(source)
    else:
        tokenizer = Tokenizer.byte_level()
        model = scratch_model(run, tokenizer).to(device)
    eval_examples = task.test[:run.eval_size]
    metrics_file = out / "metrics.jsonl"
    if main_rank:
        prepare_out(out, resume)
        (out / "run_config.json").write_text(json.dumps(config_json(run, rl), indent=2))
    if not resume and run.init is None:
        # weights made in this run: rank 0 makes them (warm-up or the compare warm-start), the others copy
        if main_rank and warm_start is not None and (warm_start / "config.json").exists():
            model.load_state_dict(Transformer.from_pretrained(warm_start, device=device).state_dict())
        elif main_rank:
            losses = warmup(model, tokenizer, task, run.sft_steps, run.sft_batch, run.sft_lr, seed=run.seed,
                            progress=not quiet)
            progress["warmup_final_loss"] = sum(losses[-10:]) / len(losses[-10:])
            if warm_start is not None:
                model.save_pretrained(warm_start)
                tokenizer.save_pretrained(warm_start)
        broadcast_parameters(model)
    trainer = GRPO(model, tokenizer, task, rl, parallel=parallel)

    if resume:
        trainer.load_state_dict(load_trainer_state(ckpt / "trainer_state.safetensors", with_moments=main_rank))
        if main_rank:
            kept = [r for r in read_jsonl_records(metrics_file) if r["step"] <= progress["step"]]
            metrics_file.write_text("".join(json.dumps(r) + "\n" for r in kept))
    else:
        with precision(device):
            before = trainer.evaluate(eval_examples)
        progress.update(step=0, accuracy_before_rl=before["accuracy"], best_accuracy=before["accuracy"])
        if main_rank:
            append_jsonl(metrics_file, {"kind": "eval", "step": 0, **before})
        if not quiet:
            print(f"held-out accuracy before RL: {before['accuracy']:.3f} ({len(eval_examples)} problems)")
        save_checkpoint(out, model, tokenizer, trainer, progress)

    bar = tqdm(range(progress["step"], run.steps), desc=f"GRPO ({rl.strategy})", disable=quiet,
               initial=progress["step"], total=run.steps)
    for step in bar:
        batch = [task.train[i] for i in data_order(len(task.train), step, rl.prompts_per_step, run.seed)]
        lr = trainer.set_lr_for_step(step, run.steps)
        with precision(device):
            metrics = trainer.step(batch)
        if main_rank:
            append_jsonl(metrics_file, {"kind": "train", **metrics, "lr": lr, "step": step + 1})
        bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}", acc=f"{metrics['accuracy']:.2f}")
        progress["step"] = step + 1
        if (step + 1) % run.eval_every == 0 or step + 1 == run.steps:
            with precision(device):
                result = trainer.evaluate(eval_examples)
            if main_rank:
                append_jsonl(metrics_file, {"kind": "eval", "step": step + 1, **result})
            progress["best_accuracy"] = max(progress["best_accuracy"], result["accuracy"])
            progress["accuracy_after_rl"] = result["accuracy"]
        if (step + 1) % run.checkpoint_every == 0 or step + 1 == run.steps:
            save_checkpoint(out, model, tokenizer, trainer, progress)

    save_model(out / "model", model, tokenizer)
    with precision(device), gathered(model):
        if main_rank:
            plot_curves(read_jsonl_records(metrics_file), out / "curves.png",
                        f"GRPO + {rl.strategy} credit, seed {run.seed}")
            draw_rhythm(model, tokenizer, trainer, task.test[:run.rhythm_examples], out, rl)
    summary = {"accuracy_before_rl": progress["accuracy_before_rl"],
               "accuracy_after_rl": progress.get("accuracy_after_rl", progress["accuracy_before_rl"]),
               "best_accuracy": progress["best_accuracy"], "steps": run.steps, "credit": rl.strategy,
               "seed": run.seed, "wall_seconds": round(time.time() - t_start, 1)}
    if main_rank:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if not quiet:
        print(f"held-out accuracy: {summary['accuracy_before_rl']:.3f} after warm-up -> "
              f"{summary['accuracy_after_rl']:.3f} after {run.steps} GRPO steps "
              f"(best {summary['best_accuracy']:.3f}); files in {out}/")
    return summary


# -----------------------------------------------------------------------------
# compare: several credit strategies x seeds, identical data


def ema_of_best(values, a=0.3):
    """The paper's curve smoothing: EMA_t = a * max(x_t, EMA_{t-1}) + (1 - a) * EMA_{t-1}."""
    smoothed = []
    for x in values:
        smoothed.append(x if not smoothed else a * max(x, smoothed[-1]) + (1 - a) * smoothed[-1])
    return smoothed


def compare(run: RunConfig, rl: RLConfig, credits: list[str], seeds: int, parallel: str | None = None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(run.out)
    results = {c: [] for c in credits}
    curves = {c: [] for c in credits}
    for seed in range(run.seed, run.seed + seeds):
        warm = root / f"warmup-seed{seed}" if run.init is None else None
        for credit in credits:
            sub = replace(run, out=str(root / f"{credit}-seed{seed}"), seed=seed)
            summary = train(sub, replace(rl, strategy=credit, seed=seed), warm_start=warm, quiet=True,
                            parallel=parallel)
            if not is_main():
                continue
            results[credit].append(summary)
            evals = [r for r in read_jsonl_records(Path(sub.out) / "metrics.jsonl") if r["kind"] == "eval"]
            curves[credit].append(([r["step"] for r in evals], [r["accuracy"] for r in evals]))
            print(f"  {credit:8s} seed {seed}: {summary['accuracy_before_rl']:.3f} -> "
                  f"{summary['accuracy_after_rl']:.3f} (best {summary['best_accuracy']:.3f})")
    if not is_main():
        return None
    rows = []
    for credit in credits:
        final = torch.tensor([s["accuracy_after_rl"] for s in results[credit]]) * 100
        best = torch.tensor([s["best_accuracy"] for s in results[credit]]) * 100
        before = torch.tensor([s["accuracy_before_rl"] for s in results[credit]]) * 100
        spread = (lambda t: t.std().item() if t.numel() > 1 else 0.0)
        rows.append(dict(credit=credit, before=before.mean().item(), final=final.mean().item(),
                         final_std=spread(final), best=best.mean().item(), best_std=spread(best), seeds=seeds))
    lines = ["| credit | warm-up acc | final acc | best acc | seeds |", "|---|---|---|---|---|"]
    lines += [f"| {r['credit']} | {r['before']:.1f} | {r['final']:.1f} ± {r['final_std']:.1f} | "
              f"{r['best']:.1f} ± {r['best_std']:.1f} | {r['seeds']} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    (root / "compare.md").write_text(table + "\n")
    (root / "compare.json").write_text(json.dumps(rows, indent=2))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, credit in enumerate(credits):
        for j, (steps, accs) in enumerate(curves[credit]):
            ax.plot(steps, [100 * v for v in ema_of_best(accs)], color=f"C{i}", alpha=0.8,
                    label=credit if j == 0 else None)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("held-out accuracy % (EMA of best, as in the paper)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(root / "compare.png", dpi=110)
    plt.close(fig)
    return rows


# -----------------------------------------------------------------------------
# Entry point


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("compare", "analyze") else "train"
    if command == "analyze":
        from analyze import main as analyze_main
        return analyze_main(argv)
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_flags(parser)
    add_rl_flags(parser, credit_type=str)
    parser.add_argument("--resume", metavar="OUT_DIR",
                        help="continue the run in OUT_DIR from its last checkpoint (with --steps: up to that many "
                             "steps; any number of processes, either --dist)")
    parser.add_argument("--dist", choices=MODES,
                        help="under torchrun: ddp (replicas, the default) or fsdp (sharded model and AdamW state)")
    if command == "compare":
        parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        parallel = parallel_mode(args.dist)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.resume:
        return resume_run(Path(args.resume), parallel, args.steps)
    if command == "compare":
        credits = args.credit.split(",") if args.credit else ["none", "coupled"]
        args.credit = credits[0]
        run, rl = resolve(args)
        for credit in credits:
            replace(rl, strategy=credit)  # validates each name before any run starts
        return compare(run, rl, credits, args.seeds, parallel)
    run, rl = resolve(args)
    return train(run, rl, parallel=parallel)


def resume_run(out: Path, parallel: str | None = None, steps: int | None = None):
    """Continue the run in out; steps (optional) moves its end, e.g. to extend a finished run (a
    decaying lr, min_lr_ratio < 1, then follows its schedule over the new number of steps)."""
    config_file, ckpt = out / "run_config.json", out / "checkpoint" / "progress.json"
    if not config_file.is_file() or not ckpt.is_file():
        raise UsageError(f"--resume {out}: no run_config.json and checkpoint/progress.json there to resume from")
    run, rl = config_from_json(json.loads(config_file.read_text()))
    run = replace(run, out=str(out), steps=run.steps if steps is None else steps)
    done = json.loads(ckpt.read_text())["step"]
    if run.steps <= done:
        raise UsageError(f"--resume {out}: the checkpoint is at step {done} of {run.steps}; "
                         f"give --steps > {done} to train further")
    return train(run, rl, resume=True, parallel=parallel)


if __name__ == "__main__":
    try:
        main()
    except (UsageError, ValueError, FileNotFoundError) as error:
        if launched_rank() == 0:  # under torchrun every rank fails alike; one message is enough
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    teardown()

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
import signal
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
from safetensors.torch import save_file
from tqdm import tqdm

from distributed import (MODES, all_reduce_sum, broadcast_parameters, full_state_dict, gathered, is_main,
                         launched_rank, launched_world_size, parallel_mode, setup, teardown)
from model import (DamagedFile, Qwen3Config, Transformer, atomic_directory, newest_sound_directory, open_safetensors,
                   read_json, save_state_dict, write_state_dict)
from plots import draw_rhythm, plot_compare, plot_curves
from rl import GRPO, RLConfig, _choice, _int_at_least, _number, _require, check_world_size
from sft import warmup
from tasks import SOLUTION_STYLES, make_task
from compare import markdown, summarize
from tokenizer import Tokenizer
from cli import (Parser, UsageError, check_layers, check_writable, checkpoint_dir, ensure_writable, flag_error,  # noqa: F401
                 model_depth, parse_layers, pick_device)


# -----------------------------------------------------------------------------
# Configuration: one dataclass for the run, rl.RLConfig for the GRPO knobs.


TASKS = ("countdown", "gsm8k", "math")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class RunConfig:
    out: str = "out"
    seed: int = 0
    device: str = "auto"             # auto = cuda when present
    precision: str = "auto"          # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32; see precision()
    init: str | None = None          # Qwen3 checkpoint dir or hub id; None = tiny model from scratch
    task: str = "countdown"          # countdown | gsm8k | math
    data: str | None = None          # JSONL for gsm8k / math
    num_numbers: int = 3
    max_number: int = 30
    max_target: int = 100
    prompt_style: str = "compact"
    solution: str = "direct"         # warm-up worked solutions: direct | search (tasks.SOLUTION_STYLES)
    n_train: int = 20_000
    n_test: int = 512
    steps: int = 300                 # GRPO steps
    eval_every: int = 40
    eval_size: int = 512             # held-out problems per evaluation
    checkpoint_every: int = 20
    rhythm_examples: int = 3         # held-out responses drawn as rhythm PNG + HTML
    wandb: str | None = None         # Weights & Biases project (WANDB_MODE=offline works without network)
    tensorboard: bool = False        # torch's SummaryWriter, event files under --out/tensorboard
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

    def __post_init__(self):
        """The run's knobs, checked like RLConfig's (rl.ConfigError names the field)."""
        _choice("task", self.task, TASKS)
        _choice("num_numbers", self.num_numbers, (3, 4))
        _choice("solution", self.solution, tuple(SOLUTION_STYLES))
        _choice("precision", self.precision, PRECISIONS)
        for name in ("steps", "eval_every", "eval_size", "checkpoint_every", "n_train", "n_test", "max_number",
                     "max_target", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "intermediate",
                     "context", "sft_batch"):
            _int_at_least(name, getattr(self, name), 1)
        for name in ("rhythm_examples", "sft_steps", "seed"):
            _int_at_least(name, getattr(self, name), 0)
        _number("sft_lr", self.sft_lr, low=0, low_open=True)
        _require(self.n_head % self.n_kv_head == 0, "n_head", self.n_head,
                 f"must be a multiple of n_kv_head ({self.n_kv_head})")
        _require(self.head_dim % 2 == 0, "head_dim", self.head_dim, "must be even (rotary embeddings)")


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

# The rhythm testbed (--preset rhythm): a CPU setting where token-level credit has something to select.
# Countdown with three numbers up to 30 and a worked search (tasks.countdown_search_solution): up to four
# near-miss chains of two steps, each checked against the target and rejected ('... =47 no;'), before the
# chain that reaches it and the answer: about 85 tokens a response (the demo's are about 30), in which
# the first step of each chain, the verdicts and the answer decide the reward. H_lo/H_hi stay at the
# paper's 10/100: a response is about as long as H_hi, so FAI is defined on all but the last 10 tokens.
# The demo's model at 2 layers instead of 4 (0.53M parameters: half the compute of a step), its lr and
# temperature; a warm-up of 900 x 64 (500 left plain GRPO shortening the search instead of learning;
# 600 left some seeds' warm-ups too weak to gain 10 points) and 150 GRPO steps of 16 prompts x 8, so
# that plain GRPO gains 10 points or more and a 3-strategy x 5-seed comparison fits in 90 minutes on
# 2 cores with --jobs 3 (the 4-layer model needed 200 steps for that gain and 2 h 25 min for that
# comparison); old log-probs from the sampler
# (old_logp="generate": in fp32 they equal a forward's to 1e-6), which saves that forward, 15% of a
# step. Tuned on --credit none only, on seeds 1000-1008, which no reported comparison uses (README
# "Does it help?").
RHYTHM = dict(run=dict(solution="search", n_layer=2, steps=150, eval_every=50, checkpoint_every=50, sft_steps=900,
                       sft_batch=64),
              rl=dict(group_size=8, rollout_batch_size=128, micro_batch_size=32, max_new_tokens=128, lr=5e-5,
                      min_lr_ratio=0.1, temperature=0.7, strategy="coupled", eval_batch_size=256,
                      old_logp="generate"))
PRESETS = dict(demo=DEMO, rhythm=RHYTHM, paper=PAPER)

# flag -> (section, field); everything else maps to the RunConfig field of the same name
RL_FLAGS = dict(credit="strategy", bottom="bottom", q="q", gamma_amp="gamma_amp", alpha="alpha", k="k",
                window="window", h_lo="h_lo", h_hi="h_hi", layers="credit_layers", heads="credit_heads",
                sign="sign", group_size="group_size", rollout_batch="rollout_batch_size",
                micro_batch="micro_batch_size", ppo_epochs="ppo_epochs", old_logp="old_logp", lr="lr",
                max_new_tokens="max_new_tokens",
                temperature="temperature", clip_eps="clip_eps", kl_coef="kl_coef", norm="norm",
                lr_warmup_steps="lr_warmup_steps", min_lr_ratio="min_lr_ratio", grad_accum="grad_accum",
                gamma_norm="gamma_norm")
FIELD_FLAGS = {field: flag for flag, field in RL_FLAGS.items()}  # a config error names the flag
# the shape of a model from scratch (RunConfig fields of the same names)
SCRATCH_SHAPE_FLAGS = dict(n_layer="decoder layers", n_embd="hidden size", n_head="query heads",
                           n_kv_head="key/value heads", head_dim="width of a head", intermediate="MLP width")
SCRATCH_ONLY = ("sft_steps", "sft_batch", "sft_lr", *SCRATCH_SHAPE_FLAGS)


def add_run_flags(p):
    p.add_argument("--out", help="output folder (default out/)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="auto: bf16 autocast on GPU, fp32 on CPU; bf16 also runs the GPU's dtype path on a CPU")
    p.add_argument("--init", help="Qwen3 checkpoint directory (or hub id with huggingface_hub installed)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="demo (default from scratch), rhythm (the long-response testbed, from scratch) or "
                        "paper (default with --init)")
    p.add_argument("--solution", choices=sorted(SOLUTION_STYLES), help="warm-up worked solutions (countdown)")
    p.add_argument("--task", choices=TASKS)
    p.add_argument("--data", help="JSONL file (or folder with train.jsonl/test.jsonl) for gsm8k / math")
    p.add_argument("--num-numbers", dest="num_numbers", type=int, choices=[3, 4])
    p.add_argument("--steps", type=int, help="GRPO steps")
    p.add_argument("--eval-every", dest="eval_every", type=int)
    p.add_argument("--eval-size", dest="eval_size", type=int)
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int)
    p.add_argument("--sft-steps", dest="sft_steps", type=int, help="warm-up steps (model from scratch only)")
    p.add_argument("--sft-batch", dest="sft_batch", type=int, help="warm-up examples per step (from scratch only)")
    p.add_argument("--sft-lr", dest="sft_lr", type=float, help="warm-up peak lr (from scratch only)")
    for flag, what in SCRATCH_SHAPE_FLAGS.items():
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=int, help=f"{what} (model from scratch only)")
    p.add_argument("--smoke", action="store_true", help="shrunken default run (under a minute)")
    p.add_argument("--wandb", metavar="PROJECT", help="also log every metrics.jsonl record to Weights & Biases")
    p.add_argument("--tensorboard", action="store_true", default=None,
                   help="also log every metrics.jsonl record to TensorBoard (under --out/tensorboard)")


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
    p.add_argument("--old-logp", dest="old_logp", choices=["recompute", "generate"],
                   help="old log-probs: a no-grad forward (default) or the sampler's own (no forward)")
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


def resolve(args) -> tuple[RunConfig, RLConfig]:
    """Preset (demo, rhythm or paper; shrunk by --smoke) + the flags given = the full config of the run."""
    name = args.preset or ("paper" if args.init else "demo")
    if name == "paper" and not args.init:
        raise UsageError("--preset paper needs --init <Qwen3 checkpoint>")
    if name != "paper" and args.init:
        raise UsageError(f"--preset {name} trains a tiny model from scratch; it does not take --init")
    scratch_only = [field for field in SCRATCH_ONLY if getattr(args, field, None) is not None]
    if args.init and scratch_only:
        raise UsageError(f"--{scratch_only[0].replace('_', '-')} is for a model trained from scratch; "
                         f"--init loads one whose shape and training are set")
    preset = PRESETS[name]
    run_values = dict(preset["run"])
    rl_values = dict(preset["rl"])
    if args.smoke:
        run_values.update(SMOKE["run"])
        rl_values.update(SMOKE["rl"])
    given = {k: v for k, v in vars(args).items() if v is not None and k != "preset"}
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
    try:
        run = RunConfig(**run_values)
        rl = RLConfig(**rl_values, seed=run.seed)
    except ValueError as e:
        raise flag_error(e, FIELD_FLAGS) from None
    return run, rl


def preflight(run: RunConfig, rl: RLConfig):
    """The checks that need more than the flags (the device, the checkpoint's depth for --layers,
    the data file, the output folder), all before any model is built or --out is touched."""
    pick_device(run.device)
    try:
        check_world_size(rl, launched_world_size())
    except ValueError as e:
        raise UsageError(str(e)) from None
    depth = model_depth(checkpoint_dir(run.init)) if run.init else run.n_layer
    check_layers(rl.credit_layers, depth)
    if run.data is not None and not Path(run.data).exists():
        raise UsageError(f"--data {run.data}: no such file or folder")
    check_writable(Path(run.out))
    check_loggers(run)


def check_loggers(run: RunConfig):
    """--wandb / --tensorboard are optional: a missing package is one line before any work."""
    import importlib.util

    if run.wandb and importlib.util.find_spec("wandb") is None:
        raise UsageError(f"--wandb {run.wandb}: the wandb package is not installed (pip install wandb)")
    if run.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--tensorboard: the tensorboard package is not installed (pip install tensorboard)")


class MetricsLog:
    """metrics.jsonl, plus the same records to Weights & Biases and TensorBoard when asked for.

    Each record's numbers go to those tools as "<kind>/<name>" at its step (kind: train or eval).
    """

    def __init__(self, path: Path, run: RunConfig, config: dict):
        self.path, self.wandb, self.writer = path, None, None
        if run.wandb:
            import wandb
            self.wandb = wandb.init(project=run.wandb, config=config, dir=run.out, resume="allow")
        if run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(Path(run.out) / "tensorboard"))

    def __call__(self, record: dict):
        append_jsonl(self.path, record)
        scalars = {f"{record['kind']}/{k}": v for k, v in record.items()
                   if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        step = int(record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
        if self.writer is not None:
            self.writer.close()


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


def precision(device: torch.device, mode: str = "auto"):
    """The compute dtype of a run's forward passes: bf16 autocast over fp32 master weights (so lr 1e-6
    updates are not rounded away), or plain fp32. auto = bf16 on a GPU, fp32 on a CPU. bf16 on a CPU
    runs the dtype path a GPU takes (autocast, bf16 KV cache), to check it where no GPU is; it is no
    faster there."""
    if autocast_dtype(device, mode) is not None:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def autocast_dtype(device: torch.device, mode: str = "auto"):
    """torch.bfloat16 when precision(device, mode) autocasts, else None (fp32)."""
    return torch.bfloat16 if mode == "bf16" or (mode == "auto" and device.type == "cuda") else None


def load_task(run: RunConfig):
    if run.task == "countdown":
        return make_task("countdown", seed=run.seed, num_numbers=run.num_numbers, max_number=run.max_number,
                         max_target=run.max_target, prompt_style=run.prompt_style, n_train=run.n_train,
                         n_test=run.n_test, solution_style=run.solution)
    if run.task == "math" and run.data is None:  # tasks.make_task would train on MATH-500's test split
        raise UsageError("--task math needs --data with a training set (e.g. DAPO-Math-17K as JSONL): "
                         "MATH-500 is an evaluation set (use it with `train.py analyze`)")
    if run.task == "gsm8k" and run.data is None:
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


CHECKPOINT_FILES = ("config.json", "tokenizer.json", "trainer_state.safetensors", "progress.json")
STOP_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # exit codes as a shell reports a signal's death


def save_checkpoint(out: Path, model, tokenizer, trainer: GRPO, progress: dict):
    """out/checkpoint: weights (HF layout), tokenizer, trainer state and progress, swapped in whole.

    The previous checkpoint stays beside it as checkpoint.prev, so a checkpoint damaged later (a
    full disk, a copy cut short) still leaves one to resume from (find_checkpoint).
    Every rank calls it (the weights and AdamW state are gathered whole to rank 0); rank 0 writes.
    """
    weights, state = full_state_dict(model), trainer.state_dict()
    if not is_main():
        return
    with atomic_directory(out / "checkpoint", keep_previous=True) as staging:
        write_state_dict(staging, weights, model.config)
        tokenizer.save_pretrained(staging)
        save_file(state, staging / "trainer_state.safetensors")
        (staging / "progress.json").write_text(json.dumps(progress, indent=2))


def find_checkpoint(out: Path, quiet: bool = False) -> Path:
    """The newest checkpoint of the run in out that verifies (checkpoint/, or the copy a crash
    during its swap left: checkpoint.tmp sealed, or checkpoint.prev); says which, and why newer
    ones were passed over. DamagedFile when none verifies."""
    ckpt, passed_over = newest_sound_directory(out / "checkpoint", required=CHECKPOINT_FILES)
    if not quiet:
        for reason in passed_over:
            print(f"resume: skipping a checkpoint: {reason}", file=sys.stderr)
        print(f"resume: from {ckpt} (step {read_progress(ckpt)['step']})", file=sys.stderr)
    return ckpt


def read_progress(ckpt: Path) -> dict:
    progress = read_json(ckpt / "progress.json")
    if not isinstance(progress, dict) or not isinstance(progress.get("step"), int):
        raise DamagedFile(f"{ckpt / 'progress.json'} is damaged: no integer 'step'")
    return progress


def load_trainer_state(path: Path, with_moments: bool) -> dict:
    """trainer_state.safetensors; ranks other than 0 skip the AdamW moments (rank 0 broadcasts them)."""
    with open_safetensors(path) as f:
        return {key: f.get_tensor(key) for key in f.keys()
                if with_moments or not key.startswith("optim.") or key.endswith(".lr")}


def check_trainer_state(state: dict, model, path: Path):
    """DamagedFile unless the trainer state fits the model: its RNG and step count, and AdamW
    moments of each named parameter's shape in fp32 (a wrong one would load silently or fail deep
    inside torch)."""
    for key in ("rng", "steps"):
        if key not in state:
            raise DamagedFile(f"{path} is damaged: it holds no {key!r}")
    params = dict(model.named_parameters())
    for key, tensor in state.items():
        if not key.startswith("optim.") or key.endswith(".lr"):
            continue
        name, slot = key.removeprefix("optim.").rsplit(".", 1)
        if name not in params:
            raise DamagedFile(f"{path} is damaged: {key} belongs to no parameter of the model")
        if slot in ("exp_avg", "exp_avg_sq") and (tuple(tensor.shape) != tuple(params[name].shape)
                                                  or tensor.dtype != torch.float32):
            raise DamagedFile(f"{path} is damaged: {key} is {tensor.dtype} {tuple(tensor.shape)}, the parameter "
                              f"needs float32 {tuple(params[name].shape)}")


class StopRequest:
    """SIGINT / SIGTERM during training: finish the current step, checkpoint, then exit.

    Under torchrun every rank may get the signal at a different step, so the ranks agree (a sum
    over ranks) before they stop together."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __enter__(self):
        for signum in STOP_SIGNALS:
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def agreed(self) -> bool:
        return all_reduce_sum(torch.tensor([float(self.signum is not None)])).item() > 0


def checkpoint_dtype(path: Path) -> str:
    """The dtype a Hugging Face checkpoint was saved in (config.json torch_dtype, or dtype in newer
    transformers); float32 when it names none or no floating-point dtype."""
    config = read_json(path / "config.json")
    name = config.get("torch_dtype") or config.get("dtype") if isinstance(config, dict) else None
    dtype = getattr(torch, str(name), None)
    return name if isinstance(dtype, torch.dtype) and dtype.is_floating_point else "float32"


def save_model(path: Path, model, tokenizer, dtype: str = "float32"):
    """The final model in the Hugging Face layout, in dtype (the --init checkpoint's own: a bf16
    Qwen3 comes back bf16, not twice its size; checkpoint/ keeps the fp32 master weights).
    A collective like save_checkpoint."""
    weights = {name: t.to(getattr(torch, dtype)) if t.is_floating_point() else t
               for name, t in full_state_dict(model).items()}
    if is_main():
        save_state_dict(path, weights, model.config)
        tokenizer.save_pretrained(path)


# -----------------------------------------------------------------------------
# One training run


def prepare_out(out: Path, resume: bool):
    ensure_writable(out)
    if not resume:
        (out / "metrics.jsonl").unlink(missing_ok=True)  # a new run starts a new log


def train(run: RunConfig, rl: RLConfig, resume: Path | None = None, warm_start: Path | None = None,
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
    progress = {}
    if resume:
        ckpt = resume
        progress = read_progress(ckpt)
        model = Transformer.from_pretrained(ckpt, device=device)
        tokenizer = Tokenizer.from_pretrained(ckpt)
    elif run.init:
        source = checkpoint_dir(run.init)
        progress["model_dtype"] = checkpoint_dtype(source)
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
        log = MetricsLog(metrics_file, run, config_json(run, rl))
    if not resume and run.init is None:
        # weights made in this run: rank 0 makes them (warm-up or the compare warm-start), the others copy
        if main_rank and saved_warmup(warm_start) is not None:
            model.load_state_dict(Transformer.from_pretrained(warm_start, device=device).state_dict())
        elif main_rank:
            losses = warmup(model, tokenizer, task, run.sft_steps, run.sft_batch, run.sft_lr, seed=run.seed,
                            progress=not quiet)
            progress["warmup_final_loss"] = sum(losses[-10:]) / len(losses[-10:])
            if warm_start is not None:
                save_warmup(warm_start, run, model, tokenizer)
        broadcast_parameters(model)
    trainer = GRPO(model, tokenizer, task, rl, parallel=parallel)

    if resume:
        state = load_trainer_state(ckpt / "trainer_state.safetensors", with_moments=main_rank)
        check_trainer_state(state, model, ckpt / "trainer_state.safetensors")
        trainer.load_state_dict(state)
        if main_rank:
            kept = [r for r in read_jsonl_records(metrics_file) if r["step"] <= progress["step"]]
            metrics_file.write_text("".join(json.dumps(r) + "\n" for r in kept))
    else:
        with precision(device, run.precision):
            before = trainer.evaluate(eval_examples)
        progress.update(step=0, accuracy_before_rl=before["accuracy"], best_accuracy=before["accuracy"])
        if main_rank:
            log({"kind": "eval", "step": 0, **before})
        if not quiet:
            print(f"held-out accuracy before RL: {before['accuracy']:.3f} ({len(eval_examples)} problems)")
        save_checkpoint(out, model, tokenizer, trainer, progress)

    bar = tqdm(range(progress["step"], run.steps), desc=f"GRPO ({rl.strategy})", disable=quiet,
               initial=progress["step"], total=run.steps)
    with StopRequest() as stop:
        for step in bar:
            batch = [task.train[i] for i in data_order(len(task.train), step, rl.prompts_per_step, run.seed)]
            lr = trainer.set_lr_for_step(step, run.steps)
            with precision(device, run.precision):
                metrics = trainer.step(batch)
            if main_rank:
                log({"kind": "train", **metrics, "lr": lr, "step": step + 1})
            bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}", acc=f"{metrics['accuracy']:.2f}")
            progress["step"] = step + 1
            if (step + 1) % run.eval_every == 0 or step + 1 == run.steps:
                with precision(device, run.precision):
                    result = trainer.evaluate(eval_examples)
                if main_rank:
                    log({"kind": "eval", "step": step + 1, **result})
                progress["best_accuracy"] = max(progress["best_accuracy"], result["accuracy"])
                progress["accuracy_after_rl"] = result["accuracy"]
            stopping = stop.agreed() and step + 1 < run.steps  # on the last step, just finish
            if (step + 1) % run.checkpoint_every == 0 or step + 1 == run.steps or stopping:
                save_checkpoint(out, model, tokenizer, trainer, progress)
            if stopping:
                bar.close()
                if main_rank:
                    log.close()
                    print(f"stopped by a signal after step {step + 1} of {run.steps}; checkpoint saved. "
                          f"Continue with: python train.py --resume {out}", file=sys.stderr)
                teardown()
                sys.exit(STOP_SIGNALS.get(stop.signum, STOP_SIGNALS[signal.SIGTERM]))

    save_model(out / "model", model, tokenizer, progress.get("model_dtype", "float32"))
    with precision(device, run.precision), gathered(model):
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
        log.close()
    if not quiet:
        print(f"held-out accuracy: {summary['accuracy_before_rl']:.3f} after warm-up -> "
              f"{summary['accuracy_after_rl']:.3f} after {run.steps} GRPO steps "
              f"(best {summary['best_accuracy']:.3f}); files in {out}/")
    return summary


# -----------------------------------------------------------------------------
# compare: several credit strategies x seeds, identical data


# What a scratch run's warm-up depends on: the seed, the task's data, the model's shape and the SFT schedule.
WARMUP_FIELDS = ("seed", "task", "data", "num_numbers", "max_number", "max_target", "prompt_style", "solution",
                 "n_train", "n_test", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "intermediate",
                 "context", "sft_steps", "sft_batch", "sft_lr")
WARMUP_RECORD = "warmup.json"  # written last, so a warm-up folder without it is unfinished


def warmup_settings(run: RunConfig) -> dict:
    return json.loads(json.dumps({name: getattr(run, name) for name in WARMUP_FIELDS}))  # as read back


def save_warmup(path: Path, run: RunConfig, model, tokenizer):
    """A finished warm-up: the model and tokenizer, then warmup.json (its settings), renamed into place."""
    save_model(path, model, tokenizer)
    staging = path / (WARMUP_RECORD + ".tmp")
    staging.write_text(json.dumps(warmup_settings(run), indent=2))
    os.replace(staging, path / WARMUP_RECORD)


def saved_warmup(path: Path | None) -> dict | None:
    """The settings of the finished warm-up in path, or None when there is none to reuse."""
    try:
        record = read_json(path / WARMUP_RECORD) if path is not None and (path / "config.json").is_file() else None
    except (DamagedFile, OSError):
        return None
    return record if isinstance(record, dict) else None


def check_saved_warmups(folders: dict, run: RunConfig) -> set:
    """The seeds ({seed: folder}) whose finished warm-up compare reuses: only one made with this run's
    settings; one made with others (another --sft-steps or model shape, say) is one line before any work."""
    reusable = set()
    for seed, folder in folders.items():
        saved, wanted = saved_warmup(folder), warmup_settings(replace(run, seed=seed))
        if saved == wanted:
            reusable.add(seed)
        elif saved is not None:
            differ = [name for name in WARMUP_FIELDS if saved.get(name) != wanted[name]]
            was = ", ".join(f"{name}={saved.get(name)}" for name in differ)
            now = ", ".join(f"{name}={wanted[name]}" for name in differ)
            raise UsageError(f"--out {folder.parent}: {folder.name}/ was made with {was}, this comparison asks for "
                             f"{now}; give another --out or delete {folder.name}/")
    return reusable


def warm_start_model(run: RunConfig, path: Path):
    """The supervised warm-up of a scratch run (the one train() would do for run.seed), saved to path."""
    torch.manual_seed(run.seed)
    task = load_task(run)
    tokenizer = Tokenizer.byte_level()
    model = scratch_model(run, tokenizer)
    warmup(model, tokenizer, task, run.sft_steps, run.sft_batch, run.sft_lr, seed=run.seed, progress=False)
    save_warmup(path, run, model, tokenizer)


def finished(run: RunConfig, rl: RLConfig) -> bool:
    """A run folder that holds a finished run of exactly this configuration (compare skips it)."""
    out = Path(run.out)
    try:
        return (out / "summary.json").is_file() and read_json(out / "run_config.json") == json.loads(json.dumps(config_json(run, rl)))
    except (DamagedFile, OSError):
        return False


def compare_job(job: dict) -> str:
    """One job of compare, in its own process: a warm-up or a whole run (resumed when a checkpoint
    of it exists). CPU threads and the GPU are the job's share, set before any work."""
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    if job["gpu"] is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(job["gpu"])
    run, rl = job["run"], job["rl"]
    if rl is None:
        warm_start_model(run, Path(run.out))
        return run.out
    if finished(run, rl):
        return run.out
    out = Path(run.out)
    try:
        resume = find_checkpoint(out, quiet=True) if (out / "run_config.json").is_file() else None
    except DamagedFile:
        resume = None
    train(run, rl, resume=resume, warm_start=job["warm"], quiet=True)
    return run.out


def run_jobs(warmups: dict, runs: list, workers: int, gpus: int = 0, work=None):
    """Run work (compare_job) over the warm-ups ({seed: job}) and the runs ([(seed, job)]), `workers`
    at a time in fresh processes (or here when 1), with one bar. A seed's runs join the queue the
    moment its warm-up is saved, so no worker waits for the slowest warm-up (the 5-seed testbed
    comparison spent 29 minutes on warm-ups before any run could start). With gpus, worker slot i
    owns GPU i % gpus: two jobs share a GPU only when there are more workers than GPUs."""
    work = work or compare_job
    bar = tqdm(total=len(warmups) + len(runs), desc="warm-ups and runs")
    if workers == 1:
        for job in [*warmups.values(), *(job for _, job in runs)]:
            work(job)
            bar.update()
        return
    import multiprocessing
    import queue as queues
    finished_jobs = queues.SimpleQueue()  # (worker slot, error or None), put by the pool's result thread
    todo = [(seed, job) for seed, job in warmups.items()]  # (seed of the warm-up or None, job)
    todo += [(None, job) for seed, job in runs if seed not in warmups]
    running = {}  # worker slot -> seed of the warm-up it runs, or None
    with multiprocessing.get_context("spawn").Pool(workers, maxtasksperchild=1) as pool:  # exit: terminate
        while todo or running:
            for slot in sorted(set(range(workers)) - set(running))[:len(todo)]:
                running[slot], job = todo.pop(0)
                pool.apply_async(work, (dict(job, gpu=slot % gpus if gpus else None),),
                                 callback=lambda _, slot=slot: finished_jobs.put((slot, None)),
                                 error_callback=lambda err, slot=slot: finished_jobs.put((slot, err)))
            slot, error = finished_jobs.get()
            if error is not None:
                raise error  # a failed job ends the comparison; the with block stops the others
            bar.update()
            warmup_of = running.pop(slot)
            todo += [(None, job) for seed, job in runs if warmup_of is not None and seed == warmup_of]


def credit_variant(rl: RLConfig, label: str) -> RLConfig:
    """rl with the strategy a compare label names: 'coupled', or 'coupled+mean' for the same strategy
    with --gamma-norm mean (each response's gamma rescaled to mean 1), so one comparison can report
    the normalised runs beside the unnormalised ones. ConfigError (a ValueError) for a bad name."""
    strategy, plus, gamma_norm = label.partition("+")
    return replace(rl, strategy=strategy, gamma_norm=gamma_norm if plus else rl.gamma_norm)


def compare(run: RunConfig, rl: RLConfig, credits: list[str], seeds: int, jobs: int = 1,
            parallel: str | None = None) -> dict:
    """Every strategy in credits on seeds run.seed .. run.seed + seeds - 1, paired by seed.

    Paired: the strategies of a seed start from one warm-up (scratch models: warmup-seed<S>/, made
    once; a later command reuses it only with the same warm-up settings, check_saved_warmups) and see
    the same prompts in the same order (data_order depends on the seed only) and the same evaluation
    problems. credits[0] is the baseline; a label may add a gamma normalisation
    ('coupled+mean', credit_variant). Each run writes DIR/<label>-seed<S>/;
    a rerun of the same command skips finished runs and resumes the others from their checkpoints.
    jobs: runs side by side, each in its own process; on CPU each gets cores // jobs threads, with
    several GPUs each worker slot owns one (run_jobs). Writes compare.json, compare.md and compare.png.
    """
    root = Path(run.out)
    seed_list = list(range(run.seed, run.seed + seeds))
    gpus = torch.cuda.device_count() if pick_device(run.device).type == "cuda" else 0
    threads = None if gpus else max(1, (os.cpu_count() or 1) // jobs)
    if jobs == 1 or parallel:
        threads = None  # in this process: keep its thread setting

    def job(sub_run, sub_rl, warm):
        return dict(run=sub_run, rl=sub_rl, warm=warm, threads=threads, gpu=None)  # run_jobs picks the GPU

    warm = {s: root / f"warmup-seed{s}" if run.init is None else None for s in seed_list}
    reusable = check_saved_warmups({s: folder for s, folder in warm.items() if folder is not None}, run)
    warmups = {s: job(replace(run, out=str(warm[s]), seed=s), None, None)
               for s in seed_list if warm[s] is not None and s not in reusable}
    if is_main():
        root.mkdir(parents=True, exist_ok=True)
    runs = [(credit, s, replace(run, out=str(root / f"{credit}-seed{s}"), seed=s),
             replace(credit_variant(rl, credit), seed=s)) for s in seed_list for credit in credits]
    run_jobs(warmups, [(s, job(sub_run, sub_rl, warm[s])) for _, s, sub_run, sub_rl in runs], jobs, gpus)
    if not is_main():
        return {}
    results = {credit: {} for credit in credits}
    for credit, s, sub_run, _ in runs:
        summary = read_json(Path(sub_run.out) / "summary.json")
        evals = [r for r in read_jsonl_records(Path(sub_run.out) / "metrics.jsonl") if r["kind"] == "eval"]
        results[credit][s] = dict(before=summary["accuracy_before_rl"], final=summary["accuracy_after_rl"],
                                  best=summary["best_accuracy"], steps=[r["step"] for r in evals],
                                  accuracy=[r["accuracy"] for r in evals])
    report = summarize(results, credits[0], len(load_task(run).test[:run.eval_size]))
    report["settings"] = config_json(run, rl)
    table = markdown(report)
    print(table)
    (root / "compare.md").write_text(table)
    (root / "compare.json").write_text(json.dumps(report, indent=2))
    plot_compare(report, root / "compare.png")
    return report


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
        parser.add_argument("--jobs", type=int, default=1,
                            help="runs side by side, each in its own process (CPU: the cores are split between them)")
    args = parser.parse_args(argv)
    try:
        parallel = parallel_mode(args.dist)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.resume:
        return resume_run(Path(args.resume), parallel, args.steps)
    if command == "compare":
        credits = args.credit.split(",") if args.credit else ["none", "coupled"]
        if not all(credits):
            raise UsageError(f"--credit {args.credit}: expected strategy names separated by single commas")
        args.credit = credits[0].partition("+")[0]
        run, rl = resolve(args)
        for credit in credits:
            try:
                credit_variant(rl, credit)  # validates each name before any run starts
            except ValueError as e:  # name the label typed, not the field it set
                raise UsageError(f"--credit {credit}: {getattr(e, 'rule', e)}") from None
        if args.seeds < 1:
            raise UsageError(f"--seeds {args.seeds}: seeds must be >= 1")
        if args.jobs < 1 or (args.jobs > 1 and parallel):
            raise UsageError(f"--jobs {args.jobs}: jobs must be >= 1, and 1 under torchrun")
        if len(set(credits)) != len(credits):
            raise UsageError(f"--credit {','.join(credits)}: each strategy once")
        preflight(run, rl)
        return compare(run, rl, credits, args.seeds, args.jobs, parallel)
    run, rl = resolve(args)
    preflight(run, rl)
    return train(run, rl, parallel=parallel)


def resume_run(out: Path, parallel: str | None = None, steps: int | None = None):
    """Continue the run in out; steps (optional) moves its end, e.g. to extend a finished run (a
    decaying lr, min_lr_ratio < 1, then follows its schedule over the new number of steps)."""
    config_file = out / "run_config.json"
    if not config_file.is_file() or not any(out.glob("checkpoint*")):
        raise UsageError(f"--resume {out}: no run_config.json and checkpoint/ there to resume from")
    run, rl = config_from_json(read_json(config_file))
    run = replace(run, out=str(out), steps=run.steps if steps is None else steps)
    ckpt = find_checkpoint(out, quiet=launched_rank() != 0)
    done = read_progress(ckpt)["step"]
    if run.steps <= done:
        raise UsageError(f"--resume {out}: the checkpoint is at step {done} of {run.steps}; "
                         f"give --steps > {done} to train further")
    return train(run, rl, resume=ckpt, parallel=parallel)


if __name__ == "__main__":
    try:
        main()
    except (UsageError, ValueError, FileNotFoundError) as error:
        if launched_rank() == 0:  # under torchrun every rank fails alike; one message is enough
            print(f"error: {error}", file=sys.stderr)
        else:  # torchrun stops the other ranks when one exits: let rank 0 say why first
            time.sleep(2)
        sys.exit(2)
    teardown()

"""A run's configuration: RunConfig (the run) beside rl.RLConfig (GRPO), the presets that fill
them (demo, rhythm, paper, --smoke), and the command-line flags that change them.

resolve() turns a preset and the flags given into the two configs; their __post_init__ checks
every knob (checks.py), and preflight() checks what needs more than the flags (the device, the
checkpoint's shape, the data file, the output folder), all before any work or any file.
The presets' comments say why each value differs from the paper's.
"""

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import checks
from cli import (UsageError, check_layers, check_writable, checkpoint_dir, flag_error, model_config_field, parse_layers,
                 pick_device)
from distributed import check_world_size, launched_world_size
from rl import GAMMA_NORMS, NORMS, OLD_LOGPS, SIGNS, RLConfig
from tasks import SOLUTION_STYLES


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
        """The run's knobs, checked like RLConfig's (checks.ConfigError names the field)."""
        checks.choice("task", self.task, TASKS)
        checks.choice("num_numbers", self.num_numbers, (3, 4))
        checks.choice("solution", self.solution, tuple(SOLUTION_STYLES))
        checks.choice("precision", self.precision, PRECISIONS)
        for name in ("steps", "eval_every", "eval_size", "checkpoint_every", "n_train", "n_test", "max_number",
                     "max_target", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "intermediate",
                     "context", "sft_batch"):
            checks.int_at_least(name, getattr(self, name), 1)
        for name in ("rhythm_examples", "sft_steps", "seed"):
            checks.int_at_least(name, getattr(self, name), 0)
        checks.number("sft_lr", self.sft_lr, low=0, low_open=True)
        checks.require(self.n_head % self.n_kv_head == 0, "n_head", self.n_head,
                         f"must be a multiple of n_kv_head ({self.n_kv_head})")
        checks.require(self.head_dim % 2 == 0, "head_dim", self.head_dim, "must be even (rotary embeddings)")


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
# step. Tuned on --credit none only, on seeds 1000-1008, which no reported comparison uses
# (docs/testbed.md).
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
    p.add_argument("--precision", metavar="|".join(PRECISIONS),
                   help="auto: bf16 autocast on GPU, fp32 on CPU; bf16 also runs the GPU's dtype path on a CPU")
    p.add_argument("--init", help="Qwen3 checkpoint directory (or hub id with huggingface_hub installed)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="demo (default from scratch), rhythm (the long-response testbed, from scratch) or "
                        "paper (default with --init)")
    p.add_argument("--solution", metavar="|".join(SOLUTION_STYLES), help="warm-up worked solutions (countdown)")
    p.add_argument("--task", metavar="|".join(TASKS))
    p.add_argument("--data", help="JSONL file (or folder with train.jsonl/test.jsonl) for gsm8k / math")
    p.add_argument("--num-numbers", dest="num_numbers", type=int, metavar="3|4")
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
    p.add_argument("--heads", metavar="targeted|all")
    p.add_argument("--sign", metavar="|".join(SIGNS))
    p.add_argument("--group-size", dest="group_size", type=int)
    p.add_argument("--rollout-batch", dest="rollout_batch", type=int, help="responses per step (prompts x G)")
    p.add_argument("--prompts-per-step", dest="prompts_per_step", type=int,
                   help="prompts per step: sets --rollout-batch to N x group size")
    p.add_argument("--micro-batch", dest="micro_batch", type=int, help="responses per gradient step")
    p.add_argument("--grad-accum", dest="grad_accum", type=int,
                   help="forward/backward chunks per gradient step (memory; the step is the same)")
    p.add_argument("--ppo-epochs", dest="ppo_epochs", type=int)
    p.add_argument("--old-logp", dest="old_logp", metavar="|".join(OLD_LOGPS),
                   help="old log-probs: a no-grad forward (default) or the sampler's own (no forward)")
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-warmup-steps", dest="lr_warmup_steps", type=int, help="linear lr warm-up (GRPO steps)")
    p.add_argument("--min-lr-ratio", dest="min_lr_ratio", type=float,
                   help="cosine lr decay to this fraction of --lr at the last step; 1 = constant (paper)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--clip-eps", dest="clip_eps", type=float)
    p.add_argument("--kl-coef", dest="kl_coef", type=float)
    p.add_argument("--norm", metavar="|".join(NORMS))
    p.add_argument("--gamma-norm", dest="gamma_norm", metavar="|".join(GAMMA_NORMS),
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
    try:
        run = RunConfig(**run_values)
        rl = RLConfig(**rl_values, seed=run.seed)
    except ValueError as e:
        raise flag_error(e, FIELD_FLAGS) from None
    if run.task != "countdown" and args.init is None:
        raise UsageError("--task gsm8k/math needs --init <Qwen3 checkpoint>: the tiny demo model is for countdown")
    return run, rl


def preflight(run: RunConfig, rl: RLConfig):
    """The checks that need more than the flags (the device, the checkpoint's depth for --layers and
    its positions for --max-new-tokens, the data file, the output folder), all before any model is
    built or --out is touched. (cli.check_room then fits the task's longest prompt.)"""
    pick_device(run.device)
    try:
        check_world_size(rl, launched_world_size())
    except ValueError as e:
        raise UsageError(str(e)) from None
    depth = model_config_field(checkpoint_dir(run.init), "num_hidden_layers") if run.init else run.n_layer
    check_layers(rl.credit_layers, depth)
    context = model_positions(run)
    if rl.max_new_tokens >= context:
        raise UsageError(f"--max-new-tokens {rl.max_new_tokens}: a prompt of at least one token and the response "
                         f"must fit the model's {context} positions, so at most {context - 1}")
    if run.data is not None and not Path(run.data).exists():
        raise UsageError(f"--data {run.data}: no such file or folder")
    check_writable(Path(run.out))
    check_loggers(run)


def model_positions(run: RunConfig) -> int:
    """The positions of the run's model: --init's max_position_embeddings (read from its config.json,
    before any weights), or --context for a model from scratch."""
    return model_config_field(checkpoint_dir(run.init), "max_position_embeddings") if run.init else run.context


def check_loggers(run: RunConfig):
    """--wandb / --tensorboard are optional: a missing package is one line before any work."""
    import importlib.util

    if run.wandb and importlib.util.find_spec("wandb") is None:
        raise UsageError(f"--wandb {run.wandb}: the wandb package is not installed (pip install wandb)")
    if run.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--tensorboard: the tensorboard package is not installed (pip install tensorboard)")


def config_json(run: RunConfig, rl: RLConfig) -> dict:
    return {"run": asdict(run), "rl": asdict(rl)}


def config_from_json(d: dict) -> tuple[RunConfig, RLConfig]:
    rl = dict(d["rl"])
    for name in ("betas", "stop_ids"):
        rl[name] = tuple(rl[name])
    if isinstance(rl["credit_layers"], list):
        rl["credit_layers"] = tuple(rl["credit_layers"])
    return RunConfig(**d["run"]), RLConfig(**rl)

"""The command line: train with attention-guided credit, compare strategies, analyze a model.

    python train.py                                   # CPU demo: tiny model, warm-up, GRPO, eval
    python train.py --smoke --out /tmp/smoke          # the same, shrunk to under a minute
    python train.py --init Qwen3-0.6B-Base-dir --task countdown --credit coupled   # the paper's setting
    python train.py --resume out                      # continue a killed run from its last checkpoint
    python train.py compare --credit none,coupled --seeds 3
    python train.py analyze [--init DIR]              # Section 4 on any model (default: out/model)
    torchrun --nproc_per_node=8 train.py --init DIR [--dist fsdp]   # the same run on 8 GPUs

One run, start to finish (train): check every flag (config.py), build or load the model, the
supervised warm-up (sft.py, scratch models only), the held-out evaluation before RL, then GRPO
steps (rl.GRPO.step) with an evaluation every eval_every steps and a checkpoint every
checkpoint_every, then the final model and its pictures. The run's settings and why they differ
from the paper's are written once, in config.py's presets.

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
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

# OpenMP threads that spin while they wait make a CPU run 20-30x slower as soon as another process
# shares the cores (a laptop, a second run); passive waiting costs little when the cores are free.
# Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from safetensors.torch import save_file
from tqdm import tqdm

import compare
from checkpoint import (DamagedFile, append_jsonl, atomic_directory, check_trainer_state, find_checkpoint,
                        load_trainer_state, read_json, read_jsonl_records, read_progress)
from cli import Parser, UsageError, check_room, checkpoint_dir, ensure_writable, pick_device
from config import (RunConfig, add_rl_flags, add_run_flags, config_from_json, config_json, model_positions, preflight,
                    resolve)
from distributed import (MODES, all_reduce_sum, broadcast_parameters, full_state_dict, gathered, is_main,
                         launched_rank, parallel_mode, setup, teardown)
from model import Qwen3Config, Transformer, save_state_dict, write_state_dict
from plots import draw_rhythm, plot_curves
from rl import GRPO, RLConfig, evaluate
from sft import warmup
from tasks import make_task
from tokenizer import Tokenizer


# -----------------------------------------------------------------------------
# Building blocks of a run


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


class StopRequest:
    """SIGINT / SIGTERM during a run: finish the current warm-up, evaluation or step, checkpoint
    (once there is something to resume), then exit with one line. A second signal exits at once.

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
        if self.signum is not None:  # asked twice: the user will not wait for the step to end
            print("stopped by a second signal; the last checkpoint (if any) is kept", file=sys.stderr)
            sys.exit(STOP_SIGNALS[signum])
        self.signum = signum

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def requested(self) -> bool:
        """This process got a signal (no collective: for the warm-up, which rank 0 runs alone)."""
        return self.signum is not None

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


def load_model(run: RunConfig, resume: Path | None, device) -> tuple:
    """(model, tokenizer, progress): the checkpoint's when resuming, --init's, or a new scratch model."""
    if resume:
        model = Transformer.from_pretrained(resume, device=device)
        return model, Tokenizer.from_pretrained(resume), read_progress(resume)
    if run.init:
        source = checkpoint_dir(run.init)
        model = Transformer.from_pretrained(source, dtype=torch.float32, device=device)
        return model, Tokenizer.from_pretrained(source), {"model_dtype": checkpoint_dtype(source)}
    tokenizer = Tokenizer.byte_level()
    return scratch_model(run, tokenizer).to(device), tokenizer, {}


def prompt_lengths(tokenizer, task):
    """Tokens of every prompt of the task, as the rollouts and evaluations encode them (cli.check_room)."""
    return [len(tokenizer.encode(ex.prompt, allow_special=True)) for ex in task.train + task.test]


def stop_now(stop: "StopRequest", log, message: str):
    """The end of a run stopped by a signal: one line on stderr, the signal's exit code."""
    if is_main():
        log.close()
        print(message, file=sys.stderr)
    teardown()
    sys.exit(STOP_SIGNALS.get(stop.signum, STOP_SIGNALS[signal.SIGTERM]))


def train(run: RunConfig, rl: RLConfig, resume: Path | None = None, warm_start: Path | None = None,
          quiet: bool = False, parallel: str | None = None) -> dict:
    """Warm-up (from scratch) or load (--init), then GRPO with periodic eval and checkpoints.

    parallel: None, "ddp" or "fsdp" (distributed.parallel_mode) when started by torchrun; every
    rank runs this function and rank 0 alone prints and writes files. A signal (Ctrl-C, SIGTERM)
    stops the run cleanly after the warm-up, an evaluation or a step: checkpoint, one line, exit.
    Returns a summary: held-out accuracy before and after RL, best accuracy, wall time.
    """
    t_start = time.time()
    out = Path(run.out)
    device = setup(pick_device(run.device))
    main_rank = is_main()
    quiet = quiet or not main_rank
    torch.manual_seed(run.seed)
    task = load_task(run)
    model, tokenizer, progress = load_model(run, resume, device)
    check_room(rl.max_new_tokens, prompt_lengths(tokenizer, task), model.config.max_position_embeddings)
    eval_examples = task.test[:run.eval_size]
    metrics_file = out / "metrics.jsonl"
    log = None
    with StopRequest() as stop:
        if main_rank:
            prepare_out(out, resume)
            (out / "run_config.json").write_text(json.dumps(config_json(run, rl), indent=2))
            log = MetricsLog(metrics_file, run, config_json(run, rl))
        if not resume and run.init is None:
            # weights made in this run: rank 0 makes them (warm-up or the compare warm-start), the others copy
            if main_rank and compare.saved_warmup(warm_start) is not None:
                model.load_state_dict(Transformer.from_pretrained(warm_start, device=device).state_dict())
            elif main_rank:
                losses = warmup(model, tokenizer, task, run.sft_steps, run.sft_batch, run.sft_lr, seed=run.seed,
                                progress=not quiet, stop=stop.requested)
                progress["warmup_final_loss"] = sum(losses[-10:]) / max(1, len(losses[-10:]))
                if warm_start is not None and not stop.requested():
                    save_warmup(warm_start, run, model, tokenizer)
            broadcast_parameters(model)
            if stop.agreed():
                stop_now(stop, log, "stopped by a signal during the warm-up; there is no checkpoint yet, so "
                                    "a new run starts over")
        trainer = GRPO(model, tokenizer, task, rl, parallel=parallel)
        if resume:
            state = load_trainer_state(resume / "trainer_state.safetensors", with_moments=main_rank)
            check_trainer_state(state, model, resume / "trainer_state.safetensors")
            trainer.load_state_dict(state)
            if main_rank:
                kept = [r for r in read_jsonl_records(metrics_file) if r["step"] <= progress["step"]]
                metrics_file.write_text("".join(json.dumps(r) + "\n" for r in kept))
        else:
            with precision(device, run.precision):
                before = evaluate(trainer, eval_examples)
            progress.update(step=0, accuracy_before_rl=before["accuracy"], best_accuracy=before["accuracy"])
            if main_rank:
                log({"kind": "eval", "step": 0, **before})
            if not quiet:
                print(f"held-out accuracy before RL: {before['accuracy']:.3f} ({len(eval_examples)} problems)")
            save_checkpoint(out, model, tokenizer, trainer, progress)
            if stop.agreed():
                stop_now(stop, log, f"stopped by a signal after the first evaluation; checkpoint saved. "
                                    f"Continue with: python train.py --resume {out}")
        grpo_loop(run, rl, trainer, task, eval_examples, progress, log, stop, quiet)

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


def grpo_loop(run: RunConfig, rl: RLConfig, trainer: GRPO, task, eval_examples, progress: dict, log,
              stop: "StopRequest", quiet: bool):
    """GRPO steps from progress["step"] to run.steps: a step, an evaluation every eval_every steps,
    a checkpoint every checkpoint_every steps, and the clean stop a signal asks for."""
    out, device = Path(run.out), trainer.model.device
    bar = tqdm(range(progress["step"], run.steps), desc=f"GRPO ({rl.strategy})", disable=quiet,
               initial=progress["step"], total=run.steps)
    for step in bar:
        batch = [task.train[i] for i in data_order(len(task.train), step, rl.prompts_per_step, run.seed)]
        lr = trainer.set_lr_for_step(step, run.steps)
        with precision(device, run.precision):
            metrics = trainer.step(batch)
        if is_main():
            log({"kind": "train", **metrics, "lr": lr, "step": step + 1})
        bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}", acc=f"{metrics['accuracy']:.2f}")
        progress["step"] = step + 1
        if (step + 1) % run.eval_every == 0 or step + 1 == run.steps:
            with precision(device, run.precision):
                result = evaluate(trainer, eval_examples)
            if is_main():
                log({"kind": "eval", "step": step + 1, **result})
            progress["best_accuracy"] = max(progress["best_accuracy"], result["accuracy"])
            progress["accuracy_after_rl"] = result["accuracy"]
        stopping = stop.agreed() and step + 1 < run.steps  # on the last step, just finish
        if (step + 1) % run.checkpoint_every == 0 or step + 1 == run.steps or stopping:
            save_checkpoint(out, trainer.model, trainer.tokenizer, trainer, progress)
        if stopping:
            bar.close()
            stop_now(stop, log, f"stopped by a signal after step {step + 1} of {run.steps}; checkpoint saved. "
                                f"Continue with: python train.py --resume {out}")


# -----------------------------------------------------------------------------
# compare's jobs: a warm-up, or one run (compare.py runs them)


def save_warmup(path: Path, run: RunConfig, model, tokenizer):
    """A finished warm-up: the model and tokenizer, then warmup.json (its settings), renamed into place."""
    save_model(path, model, tokenizer)
    staging = path / (compare.WARMUP_RECORD + ".tmp")
    staging.write_text(json.dumps(compare.warmup_settings(run), indent=2))
    os.replace(staging, path / compare.WARMUP_RECORD)


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
    """One job of compare (compare.run_jobs calls it), in its own process: a warm-up or a whole run
    (resumed when a checkpoint of it exists). CPU threads and the GPU are the job's share, set first."""
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
    parser.add_argument("--dist", metavar="|".join(MODES),
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
                compare.credit_variant(rl, credit)  # validates each name before any run starts
            except ValueError as e:  # name the label typed, not the field it set
                raise UsageError(f"--credit {credit}: {getattr(e, 'rule', e)}") from None
        if args.seeds < 1:
            raise UsageError(f"--seeds {args.seeds}: seeds must be >= 1")
        if args.jobs < 1 or (args.jobs > 1 and parallel):
            raise UsageError(f"--jobs {args.jobs}: jobs must be >= 1, and 1 under torchrun")
        if len(set(credits)) != len(credits):
            raise UsageError(f"--credit {','.join(credits)}: each strategy once")
        preflight(run, rl)
        task = load_task(run)
        tokenizer = Tokenizer.from_pretrained(checkpoint_dir(run.init)) if run.init else Tokenizer.byte_level()
        check_room(rl.max_new_tokens, prompt_lengths(tokenizer, task), model_positions(run))
        gpus = torch.cuda.device_count() if pick_device(run.device).type == "cuda" else 0
        return compare.compare(run, rl, credits, args.seeds, compare_job, config_json(run, rl),
                               len(task.test[:run.eval_size]), gpus, args.jobs, parallel)
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

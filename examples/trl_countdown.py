"""Countdown with the paper's attention credit inside TRL's GRPOTrainer (docs/trl.md).

    python -m examples.trl_countdown --tiny --out /tmp/trl               # CPU: a tiny random Qwen3, 2 steps
    python -m examples.trl_countdown --model Qwen/Qwen3-0.6B-Base --credit coupled --out runs/trl   # one GPU
    python -m examples.trl_countdown --model DIR --vllm --out runs/trl   # rollouts from vLLM (colocated)

The prompts and the reward are this project's (tasks.py: four numbers, TinyZero's prompt and its
scoring: 1.0 correct, 0.1 well-formed, 0 otherwise); GRPO, generation, logging and checkpoints are
TRL's. --credit none is plain GRPO, the baseline to compare against on the same --seed.
"""

import argparse
import sys
from pathlib import Path


def countdown_dataset(n: int, seed: int):
    """n Countdown problems as a datasets.Dataset: the prompt, and the numbers and target the reward reads."""
    from datasets import Dataset

    from tasks import make_countdown

    task = make_countdown(seed=seed, num_numbers=4, n_train=n, n_test=1, prompt_style="tinyzero")
    return Dataset.from_list([dict(prompt=ex.prompt, numbers=ex.answer["numbers"], target=ex.answer["target"])
                              for ex in task.train])


def countdown(completions, numbers, target, **_):
    """TRL reward function: TinyZero's Countdown score of each completion (tasks.countdown_reward)."""
    from tasks import countdown_reward

    return [countdown_reward(text, list(nums), int(goal)) for text, nums, goal in zip(completions, numbers, target)]


def tiny_qwen3(path: Path) -> str:
    """A random 2-layer Qwen3 with the project's byte-level tokenizer, saved in the Hugging Face layout."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tokenizer import Tokenizer

    tokenizer = Tokenizer.byte_level()
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    Qwen3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a causal LM directory or hub id (default with --tiny: a random tiny Qwen3)")
    p.add_argument("--tiny", action="store_true", help="a random tiny Qwen3 on the CPU, 2 steps, short completions")
    p.add_argument("--credit", default="coupled", help="none | random | entropy | local | global | coupled")
    p.add_argument("--out", required=True, help="TRL's output_dir")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vllm", action="store_true", help="generate with vLLM (colocated on the training GPU)")
    args = p.parse_args(argv)
    if not args.model and not args.tiny:
        p.error("give --model DIR (or a hub id), or --tiny")
    try:
        from trl import GRPOConfig

        from integrations.trl_credit import AttentionCreditGRPOTrainer
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    out = Path(args.out)
    model = args.model or tiny_qwen3(out / "tiny-model")
    if args.tiny:  # seconds on a CPU
        sizes = dict(max_steps=2, per_device_train_batch_size=4, num_generations=4, max_completion_length=16,
                     use_cpu=True)
    else:  # the paper's setting scaled to one GPU (docs/paper_recipe.md): 16 prompts x 8 per step
        sizes = dict(max_steps=args.steps, per_device_train_batch_size=16, gradient_accumulation_steps=8,
                     num_generations=8, max_completion_length=1024, bf16=True, gradient_checkpointing=True,
                     use_vllm=args.vllm, vllm_mode="colocate")
    config = GRPOConfig(output_dir=str(out), learning_rate=1e-6, temperature=1.0, beta=0.0, seed=args.seed,
                        logging_steps=1, save_strategy="no", report_to="none", **sizes)
    trainer = AttentionCreditGRPOTrainer(model=model, reward_funcs=countdown, args=config,
                                         train_dataset=countdown_dataset(64 if args.tiny else 20_000, args.seed),
                                         credit=args.credit)
    trainer.train()
    for record in trainer.state.log_history:
        if "loss" in record:
            print({k: record[k] for k in ("step", "loss", "reward", "gamma_mean", "amplified_frac") if k in record})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory and time of each phase of a GRPO step on a checkpoint, beside the formulas of
docs/performance.md ("Memory per step").

    python -m tools.phases --init DIR --device cpu --precision bf16 --prompts-per-step 2 --group-size 2 \\
        --micro-batch 2 --max-new-tokens 64          # a Qwen3 shape on a CPU, shrunk batch
    python -m tools.phases --init DIR --device cuda        # the paper preset: 128 responses x 1,024 new tokens

It takes train.py's flags (the paper preset applies, as with --init) and runs --steps steps (default
2) of GRPO.step split into its phases (--skip-update: all but the update, for a model whose AdamW
state does not fit), each measured as the peak memory above what was held when it
began (CPU: the resident set's high-water mark after resetting it through /proc/self/clear_refs;
GPU: torch.cuda.max_memory_allocated after reset_peak_memory_stats) and its wall time:
  weights     Transformer.from_pretrained in fp32, the master weights;
  generation  GRPO.rollout: sampling with the KV cache, scoring;
  credit      GRPO.credit: the no-grad forward that gives the old log-probs and the attention credit;
  update      GRPO.update: micro-batched forward/backward and AdamW steps.
The predicted column is that arithmetic for the same configuration and the batch as sampled
(`predict`), so a wrong formula shows as a ratio far from 1. Each step's phases are one table row
group; the first step also allocates the gradients and AdamW moments.
"""

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import replace

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import config  # noqa: E402
import train  # noqa: E402
from checkpoint import weight_files  # noqa: E402
from cli import Parser, UsageError, checkpoint_dir, pick_device  # noqa: E402
from distributed import all_gather_objects  # noqa: E402
from model import Transformer  # noqa: E402
from rl import GRPO, merge_rollouts  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

OPTIMIZER_BYTES = 12      # per parameter: the fp32 gradient and two AdamW moments (weights: 4 more)


def kv_cache_bytes(config, rows: int, tokens: int, element_bytes: int) -> int:
    """The generation KV cache: k and v for every layer, KV head and position."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element_bytes * rows * tokens


def activation_bytes(config, tokens: int, element_bytes: int) -> int:
    """What autograd keeps for the backward of one forward of model.py's blocks, counted tensor by
    tensor (tests/test_bench.py checks it against torch's saved-tensor hooks). Per token and layer,
    with h = hidden, hq = query heads x head_dim, hkv = KV heads x head_dim, i = intermediate:
      bf16 autocast (element_bytes 2): 26 h + 10 hq + 10 hkv + 8 i bytes. Each RMSNorm keeps its fp32
        input and normalized output (2 x 8 h); autocast casts the attention norm's output to bf16 once
        per projection (q, k, v: 6 h) and the MLP norm's twice (gate, up: 4 h); the q/k norms keep their
        fp32 input and bf16 normalized output (6 hq + 6 hkv); attention keeps bf16 q, k, v and its output
        (4 hq + 4 hkv); SwiGLU keeps gate, up, silu(gate) and their product (8 i).
      fp32 (element_bytes 4): 24 h + 16 hq + 16 hkv + 16 i (one shared input per projection group).
    Both keep 8 + 8 x heads + 4 x KV heads bytes more: each norm's fp32 scale per row, attention's
    logsumexp per head.
    Qwen3-0.6B in bf16: 82,088 B per token and layer, 80 per hidden unit: the 34 of GPT-style
    estimates (Korthikanti et al. 2022, which this project used before 2026-12-03) is 2.4x too low for
    Qwen3's SwiGLU, q/k norms and fp32 residual stream."""
    h, i = config.hidden_size, config.intermediate_size
    hq, hkv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    per_layer = 26 * h + 10 * hq + 10 * hkv + 8 * i if element_bytes == 2 else 24 * h + 16 * (hq + hkv + i)
    per_row = 8 + 8 * config.num_attention_heads + 4 * config.num_key_value_heads  # fp32 norm scales, logsumexp
    return (per_layer + per_row) * tokens * config.num_hidden_layers


def logit_bytes(element_bytes: int) -> int:
    """Bytes per response position and vocabulary entry at the LM head: the fp32 logits (log-softmax
    and the backward keep them), one fp32 temporary of logsumexp, and under bf16 autocast the bf16
    logits the head wrote."""
    return 4 + 4 + (element_bytes if element_bytes < 4 else 0)


def predict(phase: str, config, params: int, batch: dict, element_bytes: int, first_step: bool) -> int:
    """The formulas of docs/performance.md for one phase. batch: rows and padded tokens of the largest chunk the
    phase runs at once (generation: rows per generate call x prompt + max_new_tokens); for weights,
    `mapped`: the bytes of the checkpoint file loaded last, which a CPU's resident set counts while it
    is memory-mapped, beside all the fp32 weights (0 on a GPU).
    Under bf16 autocast, generation also makes a bf16 copy of every weight (2 B x parameters):
    autocast caches the cast of each parameter until the step's autocast region ends, so credit and
    update run with it held. The update frees its gradients at the end (GRPO.update), so every step
    allocates them again (4 B x parameters); the first also allocates the AdamW moments (8 more)."""
    if phase == "weights":
        return 4 * params + batch.get("mapped", 0)
    rows, tokens, response = batch["rows"], batch["tokens"], batch["response"]
    if phase == "generation":
        weight_copy = 2 * params if element_bytes == 2 else 0
        return weight_copy + kv_cache_bytes(config, rows, tokens, element_bytes)
    logits = logit_bytes(element_bytes) * rows * (response + 1) * config.vocab_size
    if phase == "credit":
        return logits
    return (OPTIMIZER_BYTES * params if first_step else 4 * params) + activation_bytes(
        config, rows * tokens, element_bytes) + logits


MMAP_THRESHOLD = 64 * 1024  # bytes: glibc serves larger allocations with mmap, so freed tensors leave the RSS


def return_freed_memory():
    """Make glibc give every freed allocation of MMAP_THRESHOLD bytes or more back to the kernel, so the
    resident set measures what is held now, not what the allocator kept from earlier phases."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (also turns off its dynamic growth)
    libc.mallopt(-1, MMAP_THRESHOLD)  # M_TRIM_THRESHOLD


def rss_kib(name: str) -> int:
    """A memory field of /proc/self/status in KiB: VmRSS (resident now) or VmHWM (its high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {name}")


class Meter:
    """Peak memory above the start and wall time of a block, on the CPU or one GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if not self.cuda:
            return_freed_memory()

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    @contextmanager
    def phase(self, record: dict):
        self._sync()
        if self.cuda:
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base = rss_kib("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
        start = time.perf_counter()
        yield
        self._sync()
        record["seconds"] = time.perf_counter() - start
        if self.cuda:
            record["peak"] = torch.cuda.max_memory_allocated() - base
        else:
            record["peak"] = (rss_kib("VmHWM") - base) * 1024


def chunk_shape(roll, rows: int) -> dict:
    """rows and padded length of the longest chunk of `rows` responses, in the order the phase runs."""
    lengths = [(len(p) + len(r), len(r)) for p, r in zip(roll.prompt_ids, roll.response_ids)]
    chunks = [lengths[i:i + rows] for i in range(0, len(lengths), rows)]
    tokens = max(max(n for n, _ in c) for c in chunks)
    return dict(rows=min(rows, len(lengths)), tokens=tokens, response=max(r for _, r in lengths))


def measure(argv: list) -> dict:
    """Run --steps GRPO steps (default 2) of the train.py configuration given by argv, phase by phase;
    --skip-update leaves out the update (a model whose AdamW state does not fit in memory)."""
    parser = Parser()
    config.add_run_flags(parser)
    config.add_rl_flags(parser)
    parser.add_argument("--skip-update", action="store_true",
                        help="measure weights, generation and credit only (the update needs 16 B per parameter)")
    args = parser.parse_args(argv)
    if not args.init:
        raise UsageError("tools.phases needs --init <Qwen3 checkpoint> (e.g. one written by tools.make_qwen3)")
    steps, skip_update = args.steps or 2, args.skip_update
    del args.skip_update
    run, rl = config.resolve(args)
    config.preflight(run, rl)
    device = pick_device(run.device)
    run = replace(run, n_train=rl.prompts_per_step * steps, n_test=1)
    torch.manual_seed(run.seed)
    meter = Meter(device)
    records = []
    weights = dict(phase="weights", step=0)
    with meter.phase(weights):
        model = Transformer.from_pretrained(checkpoint_dir(run.init), dtype=torch.float32, device=device)
    params = model.num_parameters()
    mapped = 0 if meter.cuda else weight_files(checkpoint_dir(run.init))[-1].stat().st_size  # loaded last
    weights["predicted"] = predict("weights", model.config, params, dict(mapped=mapped), 4, True)
    records.append(weights)
    trainer = GRPO(model, Tokenizer.from_pretrained(checkpoint_dir(run.init)), train.load_task(run), rl)
    element_bytes = 4 if train.autocast_dtype(device, run.precision) is None else 2
    chunk = rl.micro_batch_size // rl.grad_accum
    for step in range(steps):
        examples = trainer.task.train[step * rl.prompts_per_step:(step + 1) * rl.prompts_per_step]
        seeds = torch.randint(0, 2 ** 62, (3,), generator=trainer.rng).tolist()
        with train.precision(device, run.precision):
            generation, credit, update = (dict(phase=name, step=step + 1) for name in ("generation", "credit", "update"))
            with meter.phase(generation):
                roll = trainer.rollout(examples, seeds[0])
            with meter.phase(credit):
                trainer.credit(roll, seeds[1])
            roll = merge_rollouts(all_gather_objects(roll))
            if not skip_update:
                with meter.phase(update):
                    trainer.update(roll, seeds[2])
        rows = rl.generation_batch_size or len(roll.response_ids)
        prompt = max(len(p) for p in roll.prompt_ids)
        shapes = dict(generation=dict(rows=rows, tokens=prompt + rl.max_new_tokens, response=rl.max_new_tokens),
                      credit=chunk_shape(roll, chunk), update=chunk_shape(roll, chunk))
        for record in (generation, credit) if skip_update else (generation, credit, update):
            record["predicted"] = predict(record["phase"], model.config, params, shapes[record["phase"]],
                                          element_bytes, step == 0)
            record["shape"] = shapes[record["phase"]]
            records.append(record)
    return dict(records=records, params=params, config=model.config, run=run, rl=rl, device=device,
                element_bytes=element_bytes, dtype="bf16 autocast" if element_bytes == 2 else "fp32")


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


def table(result: dict) -> str:
    """Markdown: one row per phase and step, measured beside predicted."""
    c, rl = result["config"], result["rl"]
    lines = [f"Model: {result['params'] / 1e9:.3f} B parameters (hidden {c.hidden_size}, {c.num_hidden_layers} "
             f"layers, {c.num_key_value_heads} KV heads of {c.head_dim}, vocabulary {c.vocab_size}); device "
             f"{result['device']}, {result['dtype']}; {rl.rollout_batch_size} responses (group {rl.group_size}), "
             f"max_new_tokens {rl.max_new_tokens}, micro-batch {rl.micro_batch_size} in {rl.grad_accum} chunk(s), "
             f"credit {rl.strategy}.", "",
             "| step | phase | rows x tokens | time | peak memory above the start | predicted | measured / predicted |",
             "|---|---|---|---|---|---|---|"]
    for r in result["records"]:
        shape = r.get("shape")
        where = f"{shape['rows']} x {shape['tokens']}" if shape else "-"
        ratio = f"{r['peak'] / r['predicted']:.2f}" if r["predicted"] else "-"
        lines.append(f"| {r['step']} | {r['phase']} | {where} | {r['seconds']:.2f} s | {gib(r['peak'])} "
                     f"| {gib(r['predicted'])} | {ratio} |")
    lines += ["", "Predicted (phases.predict): weights 4 B x parameters (+ on a CPU the checkpoint file loaded last, "
              "memory-mapped while it loads); generation the KV cache 2 x layers x KV heads x head_dim x bytes x rows "
              "x (prompt + max_new_tokens), + under bf16 autocast its copy of every weight (2 B x parameters, held "
              f"to the end of the step); credit the response logits {logit_bytes(result['element_bytes'])} B x rows x "
              "(response + 1) x vocabulary of one chunk; update the same logits + the activations "
              "(phases.activation_bytes: per token and layer 26 h + 10 hq + 10 hkv + 8 i bytes in bf16) of one "
              f"chunk + {OPTIMIZER_BYTES} B x parameters in the first step (gradients, AdamW moments), 4 B later "
              "(the gradients, freed after each update)."]
    return "\n".join(lines)


def main(argv=None):
    print(table(measure(list(sys.argv[1:] if argv is None else argv))))


if __name__ == "__main__":
    try:
        main()
    except (UsageError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

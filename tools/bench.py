"""Speed and memory of this implementation measured side by side with transformers, in one run.

    python -m tools.bench                  # CPU: a ~40M-parameter Qwen3 in fp32; writes docs/bench.md
    python -m tools.bench --quick          # the same rows at smaller sizes, under 2 minutes
    python -m tools.bench --device cuda    # the real Qwen3-0.6B shape in bf16
    python -m tools.bench --tiny           # the smallest configuration (what tests/test_bench.py runs)
    python -m tools.bench --gpu-check --device cuda   # the prepared GPU check (under 8 min on one H200)

Every figure is a ratio against a reference measured in the same run, on the same model shape,
the same random weights (copied from our model into transformers' Qwen3ForCausalLM) and the
same inputs:
  1. prefill: one forward over B x N tokens, ours (SDPA) vs Qwen3ForCausalLM with sdpa attention;
  2. generation at batch 1, 8 and 32: 64-token prompts, a forced number of sampled new tokens
     (temperature 1, no top-k/top-p, no stop token), model.generate vs transformers'
     generate(use_cache=True, do_sample=True, top_k=0, top_p=1.0, min_new_tokens=max_new_tokens);
     greedy outputs of both are compared token by token;
  3. attention metrics: attention_lean.rhythm_signals(method="lean", default layers) vs a
     plain SDPA forward (model(ids), full logits) vs transformers eager with
     output_attentions=True, plus the largest difference between our metrics and the metrics
     computed from transformers' maps with attention_metrics' explicit functions;
  4. one GRPO step of train.py's default CPU configuration, split into generation, credit and update;
  5. a roofline line: the prefill's achieved FLOP/s against a large matmul in the same run.

Method (project defaults, stated once):
  - time: the median of `repeats` runs after one warm-up run, with min-max; ours and the
    reference alternate run by run, so a change in the machine's load hits both; torch's thread
    count unless --threads, and OMP_WAIT_POLICY=PASSIVE unless the environment sets it;
  - peak memory on CPU: each measurement runs in a fresh process (forked from a server that has
    only imported the libraries) that builds one model, runs the op once at a small size as
    warm-up, records its resident set size, resets the kernel's high-water mark
    (/proc/self/clear_refs) and runs the op; the figure is the high-water mark minus the resident
    set after setup. glibc is told to serve every allocation of 64 KiB or more with mmap, so freed
    tensors leave the resident set.
    On GPU: torch.cuda.max_memory_allocated minus the memory allocated after setup;
  - FLOPs of a prefill: 2 * (parameters of every matmul, the LM head included, the embedding
    lookup not) * B * N, plus the attention 4 * N^2 * head_dim per head and layer, halved for the
    causal mask: 2 * B * N^2 * head_dim * heads * layers.
"""

import argparse
import gc
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

# Idle OpenMP threads wait passively: spinning ones slow every parallel region many times over as
# soon as another process shares the cores (as train.py does). Set before torch starts its pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import Qwen3ForCausalLM  # noqa: E402

import attention_lean as lean  # noqa: E402
import attention_metrics as am  # noqa: E402
from model import Qwen3Config, Transformer, hf_name  # noqa: E402
from tools.phases import return_freed_memory, rss_kib  # noqa: E402

# -----------------------------------------------------------------------------
# Settings

SHAPES = {
    # ~40M parameters (16M of them the tied embedding): fits the 2-core CPU this was written on
    "cpu-40m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=8192),
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960),
    "tiny": dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
}


@dataclass
class Settings:
    """What one run measures."""

    shape: str = "cpu-40m"
    prefill: tuple = (4, 512)                 # (B, N)
    gen_batches: tuple = (1, 8, 32)
    prompt_len: int = 64
    new_tokens: int = 128
    metric_lengths: tuple = (1024, 2048, 4096)
    metric_start: int = 64                    # the first response token: a 64-token prompt
    rl_preset: tuple = ()                     # extra train.py flags (() = the DEMO preset)
    rl_steps: int = 3
    matmul_n: int = 2048
    repeats: int = 5
    threads: int | None = None                # torch threads (None: torch's default)
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    seed: int = 0
    targets: dict = field(default_factory=dict)


TARGETS = dict(gen_small=1.0, gen_large=1.3, prefill=1.0, metrics_time=1.3, metrics_mem=1.15, credit_share=0.05)
MODES = {
    "full": Settings(targets=TARGETS),
    # the targets are stated for the full sizes; quick and tiny check that every row still runs
    "quick": Settings(prefill=(1, 256), prompt_len=16, new_tokens=16, metric_lengths=(128, 256, 512), rl_steps=1,
                      matmul_n=1024, repeats=2),
    "tiny": Settings(shape="tiny", prefill=(2, 32), gen_batches=(1, 4), prompt_len=8, new_tokens=4,
                     metric_lengths=(48,), metric_start=8, rl_preset=("--smoke",), rl_steps=1, matmul_n=128,
                     repeats=1),
}
GPU = dict(shape="qwen3-0.6b", prefill=(8, 2048), dtype=torch.bfloat16, matmul_n=8192, device="cuda")
RL_PARTS = dict(generate="generation", old_logp="old log-probs forward", credit="attention credit",
                update="update", step="whole step")  # GRPO.step's time_<name> -> column

# -----------------------------------------------------------------------------
# The two models with the same weights


def build(name, settings: Settings):
    """Our Transformer ("ours") or transformers' Qwen3ForCausalLM ("hf_sdpa" / "hf_eager" attention),
    seeded random weights, on the settings' device and dtype. transformers gets a copy of our weights."""
    config = Qwen3Config(**SHAPES[settings.shape], rope_theta=1e6, tie_word_embeddings=True)
    torch.manual_seed(settings.seed)
    ours = Transformer(config).eval()
    if name == "ours":
        return ours.to(settings.device, settings.dtype)
    hf = Qwen3ForCausalLM(transformers.Qwen3Config.from_dict(
        config.to_dict(), attn_implementation=name.removeprefix("hf_"))).eval()
    hf.load_state_dict({hf_name(key): p for key, p in ours.state_dict().items()})
    return hf.to(settings.device, settings.dtype)


def random_ids(batch, length, settings: Settings, salt=1):
    generator = torch.Generator().manual_seed(settings.seed + salt)
    ids = torch.randint(0, SHAPES[settings.shape]["vocab_size"], (batch, length), generator=generator)
    return ids.to(settings.device)


def matmul_params(model: Transformer) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def prefill_flops(model: Transformer, batch, n) -> float:
    """FLOPs of one forward over batch x n tokens (formula in the module docstring)."""
    c = model.config
    attention = 2 * batch * n * n * c.head_dim * c.num_attention_heads * c.num_hidden_layers
    return 2 * matmul_params(model) * batch * n + attention


# -----------------------------------------------------------------------------
# The operations measured: op(kind, impl, model, settings, **params) -> a function of no arguments


def op_prefill(impl, model, settings, batch, n):
    ids = random_ids(batch, n, settings)
    if impl == "ours":
        return lambda: model(ids)[0]
    return lambda: model(input_ids=ids).logits


def op_generate(impl, model, settings, batch, new_tokens, greedy=False):
    ids = random_ids(batch, settings.prompt_len, settings, salt=2)
    temperature = 0.0 if greedy else 1.0
    if impl == "ours":
        prompts = ids.tolist()
        return lambda: model.generate(prompts, new_tokens, temperature=temperature, top_p=1.0, top_k=0,
                                      seed=settings.seed)
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    mask = torch.ones_like(ids)
    # no eos and min_new_tokens = max_new_tokens: every row runs the full length, as ours does
    return lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, use_cache=True, pad_token_id=0, **sampling)[
        :, settings.prompt_len:].tolist()


def op_metrics(impl, model, settings, n):
    """lean: our memory-lean metrics; plain: a plain (SDPA) forward of our model; hf_eager:
    transformers' forward with every layer's attention maps (what the paper's analysis reads)."""
    ids = random_ids(1, n, settings, salt=3)
    if impl == "lean":
        start = min(settings.metric_start, n // 2)
        return lambda: lean.rhythm_signals(model, ids, [start], method="lean")
    if impl == "plain":
        return lambda: model(ids)[0]
    return lambda: model(input_ids=ids, output_attentions=True)


OPS = dict(prefill=op_prefill, generate=op_generate, metrics=op_metrics)
MODEL_OF = dict(ours="ours", lean="ours", plain="ours", hf="hf_sdpa", hf_eager="hf_eager")  # impl -> build()


def make_op(kind, impl, model, settings, **params):
    """OPS[kind] for impl, run under torch.inference_mode (the same for every implementation)."""
    inner = OPS[kind](impl, model, settings, **params)

    def run():
        with torch.inference_mode():
            return inner()
    return run


# -----------------------------------------------------------------------------
# Measuring: time in this process, peak memory in fresh processes


def synchronize(settings):
    if settings.device.startswith("cuda"):
        torch.cuda.synchronize()


def clock(fn, settings):
    """(seconds, output) of one call."""
    synchronize(settings)
    t0 = time.perf_counter()
    out = fn()
    synchronize(settings)
    return time.perf_counter() - t0, out


@dataclass
class Stat:
    """Samples of one figure; reported as median (min-max)."""

    samples: list

    @property
    def median(self):
        return statistics.median(self.samples)

    def fmt(self, scale=1.0, unit="s", digits=3):
        lo, mid, hi = (scale * x for x in (min(self.samples), self.median, max(self.samples)))
        return f"{mid:.{digits}g} {unit} ({lo:.{digits}g}-{hi:.{digits}g})"

    def rate(self, amount, unit, digits=3):
        """amount per second of these samples of seconds: the slowest run gives the low end."""
        lo, mid, hi = (amount / x for x in (max(self.samples), self.median, min(self.samples)))
        return f"{mid:.{digits}g} {unit} ({lo:.{digits}g}-{hi:.{digits}g})"


def time_interleaved(fns: dict, settings: Settings, keep=()):
    """One warm-up run each, then `repeats` rounds running each once. Returns ({name: Stat of
    seconds}, {name: output of its last run} for the names in keep)."""
    for fn in fns.values():
        fn()
    times, kept = {name: [] for name in fns}, {}
    for _ in range(settings.repeats):
        for name, fn in fns.items():
            seconds, out = clock(fn, settings)
            times[name].append(seconds)
            if name in keep:
                kept[name] = out
            del out
    return {name: Stat(t) for name, t in times.items()}, kept


def warm_up_params(kind, params):
    """The op at a small size: runs every lazily loaded code path without the cost of the real size."""
    small = dict(prefill=dict(n=16), generate=dict(new_tokens=2), metrics=dict(n=32))[kind]
    return {**params, **{name: min(value, params[name]) for name, value in small.items()}}


def _peak_child(kind, impl, settings, params, conn):
    """Runs in a fresh process: build one model, warm up, then the op's peak memory in bytes."""
    try:
        if settings.threads:
            torch.set_num_threads(settings.threads)
        if not settings.device.startswith("cuda"):
            return_freed_memory()
        model = build(MODEL_OF[impl], settings)
        make_op(kind, impl, model, settings, **warm_up_params(kind, params))()
        fn = make_op(kind, impl, model, settings, **params)
        gc.collect()
        if settings.device.startswith("cuda"):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            conn.send(torch.cuda.max_memory_allocated() - base)
        else:
            base = rss_kib("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            fn()
            conn.send((rss_kib("VmHWM") - base) * 1024)
    except BaseException as e:  # the parent reports it
        conn.send(e)


_server = None


def process_context():
    """A forkserver that has imported this module (torch, transformers' Qwen3) once: children start fast."""
    global _server
    if _server is None:
        _server = multiprocessing.get_context("forkserver")
        _server.set_forkserver_preload(["bench"])
    return _server


def peak_memory(kind, impl, settings: Settings, **params) -> int:
    """Peak extra memory (bytes) of one op, measured in a fresh process."""
    ctx = process_context()
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_peak_child, args=(kind, impl, settings, params, send))
    child.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        result = RuntimeError(f"the memory child for {kind}/{impl} died (exit code {child.join() or child.exitcode})")
    child.join()
    if isinstance(result, BaseException):
        raise result
    return result


def mib(n_bytes):
    return f"{n_bytes / 2**20:.1f} MiB"


def ratio(a, b, suffix="x"):
    """a / b as text ("n/a" when b is 0: a tiny op can stay inside memory already resident)."""
    return f"{a / b:.2f}{suffix}" if b else "n/a"


# -----------------------------------------------------------------------------
# The five measurements; each returns table rows (dicts) for report()


def row(what, ours, ref, ratio_text, target=""):
    return dict(what=what, ours=ours, ref=ref, ratio=ratio_text, target=target)


def verdict(value, bound, at_least=True, unit="x"):
    ok = value >= bound if at_least else value <= bound
    return f"{'>=' if at_least else '<='} {bound:g}{unit} {'✓' if ok else '✗ MISSED'}"


def bench_prefill(settings, models, log):
    B, N = settings.prefill
    fns = {impl: make_op("prefill", impl, models[MODEL_OF[impl]], settings, batch=B, n=N) for impl in ("ours", "hf")}
    t, _ = time_interleaved(fns, settings)
    mem = {impl: peak_memory("prefill", impl, settings, batch=B, n=N) for impl in fns}
    speedup = t["hf"].median / t["ours"].median
    target = settings.targets.get("prefill")
    log(f"prefill {B}x{N}: ours {t['ours'].fmt()}, transformers {t['hf'].fmt()}")
    return [row(f"prefill {B}x{N}: time", t["ours"].fmt(), t["hf"].fmt(), f"{speedup:.2f}x",
                verdict(speedup, target) if target else ""),
            row(f"prefill {B}x{N}: peak memory", mib(mem["ours"]), mib(mem["hf"]),
                ratio(mem["ours"], mem["hf"]))], t["ours"]


def first_difference(a, b):
    """(row, position) of the first token where two lists of token lists differ, or None."""
    for r, (x, y) in enumerate(zip(a, b)):
        for p, (u, v) in enumerate(zip(x, y)):
            if u != v:
                return r, p
        if len(x) != len(y):
            return r, min(len(x), len(y))
    return None


def bench_generate(settings, models, log):
    rows = []
    n = settings.new_tokens
    for B in settings.gen_batches:
        fns = {impl: make_op("generate", impl, models[MODEL_OF[impl]], settings, batch=B, new_tokens=n)
               for impl in ("ours", "hf")}
        t, _ = time_interleaved(fns, settings)
        mem = {impl: peak_memory("generate", impl, settings, batch=B, new_tokens=n) for impl in fns}
        greedy = {impl: make_op("generate", impl, models[MODEL_OF[impl]], settings, batch=B, new_tokens=n,
                                greedy=True)() for impl in fns}
        diff = first_difference(greedy["ours"], greedy["hf"])
        same = "✓ identical" if diff is None else f"✗ row {diff[0]} differs from token {diff[1]}"
        tokens = B * n
        speedup = t["hf"].median / t["ours"].median
        bound = settings.targets.get("gen_small" if B == 1 else "gen_large")
        log(f"generate B={B}: ours {t['ours'].fmt()}, transformers {t['hf'].fmt()}, greedy {same}")
        rows += [row(f"generate B={B}, {n} new tokens: tokens/s", t["ours"].rate(tokens, "tok/s"),
                     t["hf"].rate(tokens, "tok/s"), f"{speedup:.2f}x", verdict(speedup, bound) if bound else ""),
                 row(f"generate B={B}: peak memory", mib(mem["ours"]), mib(mem["hf"]),
                     ratio(mem["ours"], mem["hf"])),
                 row(f"generate B={B}: greedy outputs", same, "", "")]
    return rows


def reference_metrics(hf_out, start, layers):
    """WAAD, FAI and entropy from transformers' maps with attention_metrics' explicit functions,
    the same layers and head groups as rhythm_signals (pooled (layer, head) pairs, pair p =
    (layers[p // H], p % H)). Maps are read one layer or head at a time: no (L*H, N, N) copy."""
    maps = [hf_out.attentions[l][0] for l in layers]  # each (H, N, N)
    H = maps[0].size(0)
    local, global_ = am.group_heads(torch.cat([am.head_span(m.float(), start) for m in maps]))

    def mean_map(pairs):  # the aggregated map Abar of Eq. 8
        return sum(maps[p // H][p % H].float() for p in pairs.tolist()) / len(pairs)

    return dict(waad=am.waad(mean_map(local), start), fai=am.fai(mean_map(global_), start),
                entropy=am.token_entropy(hf_out.logits[0].float(), start), local=local, global_=global_)


def metrics_difference(ours, hf_out, start):
    """max |ours - reference| over WAAD, FAI and entropy, and whether the head groups agree.
    ours: rhythm_signals' dict of the sequence; hf_out: transformers' output with its maps."""
    layers = ours["layers"]
    ref = reference_metrics(hf_out, start, layers)
    H = hf_out.attentions[0].size(1)
    layer_of = torch.tensor(layers)

    def pairs(pooled):  # pooled head indices -> (layer, head) pairs, as rhythm_signals reports them
        return torch.stack([layer_of[pooled.cpu() // H], pooled.cpu() % H], dim=-1)

    same_groups = all(torch.equal(ours[name].cpu(), pairs(ref[key]))
                      for name, key in (("local_heads", "local"), ("global_heads", "global_")))
    worst = max(float((ours[k].cpu() - ref[k].cpu()).abs().max()) for k in ("waad", "fai", "entropy"))
    return worst, same_groups


def bench_metrics(settings, models, log):
    rows = []
    impls = ("lean", "plain", "hf_eager")
    for n in settings.metric_lengths:
        fns = {impl: make_op("metrics", impl, models[MODEL_OF[impl]], settings, n=n) for impl in impls}
        t, last = time_interleaved(fns, settings, keep=("lean", "hf_eager"))
        worst, same_groups = metrics_difference(last["lean"][0], last["hf_eager"], min(settings.metric_start, n // 2))
        del last
        mem = {impl: peak_memory("metrics", impl, settings, n=n) for impl in impls}
        time_ratio = t["lean"].median / t["plain"].median
        mem_ratio = mem["lean"] / mem["plain"] if mem["plain"] else float("nan")
        largest = n == max(settings.metric_lengths)  # the targets are stated at the largest N
        log(f"metrics N={n}: lean {t['lean'].fmt()} {mib(mem['lean'])}, plain {t['plain'].fmt()} "
            f"{mib(mem['plain'])}, eager {t['hf_eager'].fmt()} {mib(mem['hf_eager'])}, max diff {worst:.2g}")
        rows.append(dict(n=n, t=t, mem=mem, worst=worst, same_groups=same_groups,
                         time_target=verdict(time_ratio, settings.targets["metrics_time"], at_least=False)
                         if largest and settings.targets else "",
                         mem_target=verdict(mem_ratio, settings.targets["metrics_mem"], at_least=False)
                         if largest and settings.targets else ""))
    return rows


def rl_setup(settings):
    """train.py's default run (DEMO preset; --smoke in tiny mode): model from scratch, no warm-up."""
    import config
    import train
    from cli import Parser
    from rl import GRPO
    from tokenizer import Tokenizer

    parser = Parser()
    config.add_run_flags(parser)
    config.add_rl_flags(parser)
    run, rl = config.resolve(parser.parse_args(["--device", settings.device, *settings.rl_preset]))
    # only the examples the steps use: a step's cost does not depend on the size of the training set
    run = replace(run, n_train=min(run.n_train, rl.prompts_per_step * (settings.rl_steps + 1)))
    tokenizer = Tokenizer.byte_level()
    task = train.load_task(run)
    model = train.scratch_model(run, tokenizer).to(settings.device)
    return GRPO(model, tokenizer, task, rl), task, rl, train.precision(torch.device(settings.device))


def bench_rl(settings, log):
    trainer, task, rl, precision = rl_setup(settings)
    per_step = rl.prompts_per_step
    steps = []
    with precision:
        for i in range(settings.rl_steps + 1):  # the first step is the warm-up
            steps.append(trainer.step(task.train[i * per_step:(i + 1) * per_step]))
    steps = steps[1:]
    # GRPO.step's parts add up to time_step; time_old_logp (the no-grad forward GRPO needs with or
    # without credit, shared with the credit signals) is reported when this rl.py splits it out
    names = [name for name in RL_PARTS if f"time_{name}" in steps[0]]
    parts = {name: Stat([s[f"time_{name}"] for s in steps]) for name in names}
    share = Stat([s["time_credit"] / s["time_step"] for s in steps])
    length = statistics.median(s["response_length"] for s in steps)
    log(f"RL step: {parts['step'].fmt()}, credit share {share.fmt(100, '%')}")
    what = (f"{rl.rollout_batch_size} responses (group {rl.group_size}), max_new_tokens {rl.max_new_tokens}, "
            f"mean response length {length:.0f}, micro-batch {rl.micro_batch_size}, credit {rl.strategy}")
    target = settings.targets.get("credit_share")
    return dict(what=what, parts=parts, share=share,
                target=verdict(share.median * 100, target * 100, at_least=False, unit="%") if target else "")


def bench_roofline(settings, prefill_time: Stat, model, log):
    n = settings.matmul_n
    a = torch.randn(n, n, device=settings.device, dtype=settings.dtype)
    b = torch.randn(n, n, device=settings.device, dtype=settings.dtype)
    t = time_interleaved({"matmul": lambda: a @ b}, replace(settings, repeats=max(3, settings.repeats)))[0]["matmul"]
    peak = 2 * n ** 3 / t.median
    flops = prefill_flops(model, *settings.prefill)
    achieved = flops / prefill_time.median
    log(f"roofline: matmul {peak / 1e9:.1f} GFLOP/s, prefill {achieved / 1e9:.1f} GFLOP/s")
    return dict(n=n, peak=peak, matmul=t, flops=flops, achieved=achieved)


# -----------------------------------------------------------------------------
# The report


def load_average():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine(settings):
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    cpu = f"{name}, {os.cpu_count()} logical CPUs"
    if settings.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(settings.device)} ({cpu})"
    return cpu


def report(settings, header, prefill, generate, metrics, rl, roof) -> str:
    model_shape = ", ".join(f"{k}={v}" for k, v in SHAPES[settings.shape].items())
    lines = [
        "# bench.py: this implementation vs transformers", "",
        f"- command: `{header['command']}`",
        f"- machine: {machine(settings)}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"torch threads: {torch.get_num_threads()} (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), "
        f"device {settings.device}, {str(settings.dtype).removeprefix('torch.')}",
        f"- load average (1, 5, 15 min) at start: {header['load_start']}; at end: {load_average()}",
        f"- model: {settings.shape} ({header['params'] / 1e6:.1f}M parameters: {model_shape}), random weights",
        f"- times: median of {settings.repeats} runs after a warm-up (min-max), ours and transformers alternating; "
        "peak memory: one fresh process per figure (method in bench.py's docstring)",
        "- ratios: speed = transformers' time / ours (above 1: ours is faster); memory = ours / transformers "
        "(below 1: ours needs less)",
        "", "| measurement | ours | transformers | ratio | target |", "|---|---|---|---|---|",
    ]
    lines += [f"| {r['what']} | {r['ours']} | {r['ref']} | {r['ratio']} | {r['target']} |" for r in prefill + generate]
    lines += ["", "Generation: sampling at temperature 1 with no top-k/top-p, no stop token; transformers runs "
              "generate(use_cache=True, do_sample=True, top_k=0, top_p=1.0, min_new_tokens=max_new_tokens, "
              "pad_token_id=0) with its default (dynamic) cache. Greedy check: temperature 0 vs do_sample=False.",
              "", "### Attention metrics (B = 1, response from position "
              f"{settings.metric_start}, default layers, targeted heads)", "",
              "| N | lean metrics: time | peak | SDPA forward: time | peak | transformers eager + maps: time | peak "
              "| lean / SDPA time | lean / SDPA peak | eager / SDPA time | eager / SDPA peak "
              "| max abs diff vs maps | same head groups |", "|" + "---|" * 13]
    for m in metrics:
        t, mem = m["t"], m["mem"]
        lines.append(
            f"| {m['n']} | {t['lean'].fmt()} | {mib(mem['lean'])} | {t['plain'].fmt()} | {mib(mem['plain'])} "
            f"| {t['hf_eager'].fmt()} | {mib(mem['hf_eager'])} "
            f"| {t['lean'].median / t['plain'].median:.2f}x {m['time_target']} "
            f"| {ratio(mem['lean'], mem['plain'])} {m['mem_target']} "
            f"| {t['hf_eager'].median / t['plain'].median:.2f}x | {ratio(mem['hf_eager'], mem['plain'])} "
            f"| {m['worst']:.2g} | {'✓' if m['same_groups'] else '✗'} |")
    lines += ["", "The SDPA forward is model(ids): it computes the full (N, V) logits; the lean path computes "
              "entropy from the hidden states in chunks. The eager time is the forward with "
              "output_attentions=True only; the reference metrics are then computed from its maps "
              "(attention_metrics.head_span/group_heads/waad/fai/token_entropy).", "",
              f"### One GRPO step (train.py {' '.join(settings.rl_preset) or 'DEMO preset'}, model from scratch, "
              "no warm-up)", "", rl["what"], "",
              "| " + " | ".join(RL_PARTS[name] for name in rl["parts"]) + " | credit share | target |",
              "|" + "---|" * (len(rl["parts"]) + 2),
              "| " + " | ".join(stat.fmt() for stat in rl["parts"].values())
              + f" | {rl['share'].fmt(100, '%')} | {rl['target']} |", "",
              "The paper reports a credit share of 2.0-3.3% on GPUs.", "", "### Roofline", "",
              f"- FLOPs of the prefill {settings.prefill[0]}x{settings.prefill[1]}: {roof['flops'] / 1e9:.1f} GFLOP "
              "= 2 * matmul parameters * B * N + 2 * B * N^2 * head_dim * heads * layers",
              f"- achieved by our prefill: {roof['achieved'] / 1e9:.1f} GFLOP/s = "
              f"{roof['achieved'] / roof['peak']:.0%} of a {roof['n']}x{roof['n']} "
              f"{str(settings.dtype).removeprefix('torch.')} torch.matmul measured in the same run: "
              f"{roof['peak'] / 1e9:.1f} GFLOP/s ({roof['matmul'].fmt(1e3, 'ms')} per matmul)", ""]
    return "\n".join(lines)


def run_bench(settings: Settings, out_path=None, command="python -m tools.bench", log=print) -> str:
    """Run every measurement, print the Markdown and write it to out_path (when given)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    header = dict(command=command, load_start=load_average())
    models = {impl: build(impl, settings) for impl in ("ours", "hf_sdpa", "hf_eager")}
    header["params"] = models["ours"].num_parameters()
    prefill_rows, prefill_time = bench_prefill(settings, models, log)
    generate_rows = bench_generate(settings, models, log)
    metrics_rows = bench_metrics(settings, models, log)
    del models["hf_sdpa"], models["hf_eager"]
    rl = bench_rl(settings, log)
    roof = bench_roofline(settings, prefill_time, models["ours"], log)
    text = report(settings, header, prefill_rows, generate_rows, metrics_rows, rl, roof)
    print(text)
    if out_path is not None:
        Path(out_path).write_text(text + "\n")
    return text


# bench.py --gpu-check: the GPU sizes the issue names, at 3 repeats to stay under 8 minutes on one H200
GPU_CHECK = dict(gen_batches=(1, 8, 32, 128), metric_lengths=(1024, 2048, 4096, 8192), repeats=3)
# ... and its CPU version (a test runs it): the tiny bench and 2 steps of 4 responses on a tiny checkpoint
CPU_CHECK_FLAGS = ("--prompts-per-step", "2", "--group-size", "2", "--micro-batch", "2", "--max-new-tokens", "16",
                   "--eval-size", "1")


def tiny_checkpoint(path: Path) -> Path:
    """A random checkpoint of the tiny shape with the byte-level tokenizer (the CPU check's model)."""
    from tokenizer import Tokenizer

    tokenizer = Tokenizer.byte_level()
    torch.manual_seed(0)
    Transformer(Qwen3Config(**{**SHAPES["tiny"], "vocab_size": tokenizer.vocab_size},
                            tie_word_embeddings=True)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def gpu_check(device: str, out_path=None, command="python -m tools.bench --gpu-check", log=print) -> str:
    """One command that settles the GPU questions: this benchmark at the GPU sizes (prefill, generation
    at batch 1/8/32/128, the metrics path at N = 1,024-8,192, all against transformers), then 2 steps
    of the paper preset (128 responses x 1,024 new tokens, bf16 autocast) on a random Qwen3-0.6B-Base
    (tools/make_qwen3.py) split into phases, each with its time and peak memory beside the
    prediction of docs/performance.md's formulas (tools/phases.py). With device "cpu" it runs the
    same code shrunk (the tiny bench; 2 steps of 4 responses on a tiny checkpoint), which is what the
    tests run."""
    import tempfile

    from tools import phases

    cuda = device.startswith("cuda")
    settings = replace(MODES["full"], **{**GPU, **GPU_CHECK, "device": device}) if cuda else \
        replace(MODES["tiny"], threads=1)
    bench_text = run_bench(settings, None, command, log)
    with tempfile.TemporaryDirectory() as tmp:
        if cuda:
            from tools.make_qwen3 import make_qwen3
            checkpoint, flags = make_qwen3("0.6B", Path(tmp) / "qwen3-0.6b"), ("--device", device)
        else:
            checkpoint, flags = tiny_checkpoint(Path(tmp) / "tiny"), ("--device", "cpu", *CPU_CHECK_FLAGS)
        result = phases.measure(["--init", str(checkpoint), "--out", str(Path(tmp) / "out"), *flags, "--steps", "2"])
    text = (bench_text + "\n## Phases of the paper's GRPO step (phases.py)\n\n"
            f"train.py flags: `--init <random Qwen3-{'0.6B-Base' if cuda else 'tiny'}> {' '.join(flags)}`\n\n"
            + phases.table(result) + "\n")
    print(text[len(bench_text):])
    if out_path is not None:
        Path(out_path).write_text(text)
    return text


def settings_for(args) -> Settings:
    settings = MODES["tiny" if args.tiny else "quick" if args.quick else "full"]
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: no CUDA device is available")
        gpu = dict(GPU, device=args.device)
        if args.tiny:
            gpu = dict(device=args.device, dtype=torch.bfloat16)
        elif args.quick:  # the real shape at the quick sizes
            gpu = dict(shape=GPU["shape"], device=args.device, dtype=torch.bfloat16)
        settings = replace(settings, **gpu)
    if args.repeats is not None:
        settings = replace(settings, repeats=args.repeats)
    if args.threads is not None:
        settings = replace(settings, threads=args.threads)
    return settings


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes, under 2 minutes on a CPU")
    size.add_argument("--tiny", action="store_true", help="the smallest configuration (unit test)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--repeats", type=int, help="timed runs per figure (after one warm-up)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice); on a CPU shared "
                        "with other busy processes 1 thread gives steadier figures")
    size.add_argument("--gpu-check", dest="gpu_check", action="store_true",
                      help="the prepared GPU check: this bench at GPU sizes, then the paper preset's phases on a "
                           "random Qwen3-0.6B (with --device cpu: shrunk)")
    parser.add_argument("--out", help="where to write the Markdown (default docs/bench.md; gpu_check.md with "
                                      "--gpu-check)")
    args = parser.parse_args(argv)
    for name in ("repeats", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    command = ("python -m tools.bench " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    if args.gpu_check:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: no CUDA device is available")
        gpu_check(args.device, args.out or "gpu_check.md", command)
        return
    run_bench(settings_for(args), args.out or "docs/bench.md", command)


if __name__ == "__main__":
    main()

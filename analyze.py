"""The paper's Section 4 on any model: `python train.py analyze [--init DIR] ...`.

    python train.py analyze                             # the demo model that `python train.py` wrote (out/model)
    python train.py analyze --init DIR --task gsm8k --data gsm8k_test.jsonl    # the paper's setting
    python train.py analyze --init DIR --prompts my_prompts.jsonl               # one {"prompt": ...} per line

DIR may hold any causal LM that transformers loads (Llama, Qwen2, Mistral, ...): a Qwen3 checkpoint
runs on the project's own model, any other through integrations.hf, with the same tables and pictures.

Start to finish:
1. prompts: the held-out problems of a task (Countdown by default, in the training prompt style of
   the run when DIR was written by train.py; GSM8K / math in the paper's analysis format with
   \\boxed{}), or raw prompts from a JSONL file;
2. responses: sampled at temperature 0.7 (seeded), scored by the task's reward when there is one;
3. metrics: one extra forward per batch gives WAAD, FAI (global and receiver heads, H_hi = end of
   the response, as the analysis section uses) and entropy (attention_lean.rhythm_signals);
4. couplings.json: the three Table-2 coupling statistics with their random baselines and lifts;
5. perturbation.json: the Table-1 perturbation test at high- and low-FAI positions (Eq. 11);
6. rhythm.png / rhythm.html: Figure 2 for the shortest correct response;
7. responses.jsonl: every response with its tokens, metrics, reward and perturbation details.

Project defaults (the paper is silent on these; they are decided here, in one place):
- Prompts: the first --num-prompts (70, as the paper's 70 problems) held-out problems. For a
  train.py run (run_config.json beside the model folder) the Countdown test set of that run is
  used, with its seed and prompt style; otherwise Countdown in the TinyZero style, seed 0.
- Perturbation positions (Table 1): among the response tokens whose FAI future set T(s) is
  non-empty (all but the last H_lo, whose FAI is undefined, NaN), the
  3 highest-FAI and the 3 lowest-FAI positions (stable sort: ties toward the earlier position;
  the two sets never overlap; a response with fewer than 2 such tokens is skipped).
- Alternatives: the k = 3 most likely next tokens other than the original one, the stop tokens
  (a forced stop would end the response and compare nothing) and ids the tokenizer cannot decode.
- Continuations: the forced token, then up to 64 greedy tokens (stop tokens are dropped before
  decoding). reference="response" (default) compares with the original response's own tokens from
  that position on, cut to the same length; reference="greedy" compares with the original token
  forced and continued greedily the same way, so the decoding rule is identical on both sides.
- Content words (Eq. 11): the lowercased maximal runs of letters and digits minus STOP_WORDS;
  the Jaccard overlap of two empty sets is 1 (nothing differs).
- Aggregation: each problem's high-FAI Jaccard is the mean over its high-FAI (position,
  alternative) pairs, likewise low-FAI; the reported means are over problems (each weighs the
  same), and a problem counts as "high-FAI deviates more" when its high-FAI mean is strictly lower.
- NaN statistics (e.g. no peaks at all) are written to JSON as null.
"""

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from attention_lean import rhythm_signals
from attention_metrics import FAI_H_LO, WAAD_WINDOW, coupling_stats, default_layers
from model import Transformer
from plots import aggregated_maps, plot_rhythm, render_html
from batching import build_batch
from tasks import make_task, read_jsonl
from tokenizer import Tokenizer
from checkpoint import read_json
from cli import (Parser, UsageError, check_layers, check_room, checkpoint_dir, ensure_writable, model_config_field, parse_layers,
                 pick_device)

# -----------------------------------------------------------------------------
# Project defaults

DEFAULT_MODEL = Path("out/model")  # what `python train.py` writes
DEFAULT_OUT = Path("out/analysis")
NUM_PROMPTS = 70  # the paper's 70 problems
TEMPERATURE = 0.7  # the paper's analysis sampling temperature
MAX_NEW_TOKENS = 512  # when neither the flag nor the run's config says
BATCH_SIZE = 16  # responses per generate call and per metrics forward
PERTURB_POSITIONS = 3  # high-FAI and low-FAI positions per response
PERTURB_ALTERNATIVES = 3  # k of "top-k next-token candidates"
PERTURB_TOKENS = 64  # greedy tokens after the forced one
PERTURB_BATCH = 64  # forced continuations per generate call
REFERENCES = ("response", "greedy")
STOP_WORDS = frozenset(
    "a an the and or but if then so of to in on at by for with from as is are was were be been being it its "
    "this that these those there here we i you he she they them our us me my your his her their what which "
    "who whom how when where why do does did has have had not no can will would should could may might "
    "let lets s t into out up down over than also just".split())

PAPER_COUPLINGS = {  # Table 2: 70 GSM8K problems, Qwen3-4B-Base, temperature 0.7
    "entropy_at_waad_peaks": dict(random=0.2386, observed=0.3608, lift=0.5197),
    "receiver_peaks_in_global": dict(random=0.2241, observed=0.6084, lift=1.7149),
    "fai_peaks_after_waad": dict(random=0.3687, observed=0.5253, lift=0.4247),
}
COUPLING_LABELS = {
    "entropy_at_waad_peaks": "mean entropy at WAAD peaks",
    "receiver_peaks_in_global": "receiver-FAI peaks that are global-FAI peaks",
    "fai_peaks_after_waad": "FAI peaks at/right after a WAAD peak",
}
PAPER_PERTURBATION = dict(jaccard_top=0.534, jaccard_bottom=0.631, top_lower_share=0.8714, problems=70)

# -----------------------------------------------------------------------------
# The perturbation test (Table 1, Eq. 11)

_WORD = re.compile(r"[^\W_]+")  # a maximal run of letters and digits (any script)


def content_words(text):
    """Eq. 11: the set of content words of a text, the lowercased alphanumeric words minus STOP_WORDS."""
    return {w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS}


def jaccard(a, b):
    """Eq. 11: |a & b| / |a | b| of two sets; 1.0 when both are empty (nothing differs)."""
    a, b = set(a), set(b)
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def select_positions(fai, num_positions=PERTURB_POSITIONS, tail=FAI_H_LO):
    """Table 1 positions of one response: (high-FAI positions, low-FAI positions), each ascending.

    Candidates are the response indices whose FAI is defined (not NaN: T(s) non-empty) before the
    last `tail` (H_lo: the same tokens, for FAI lists that mark them otherwise); the
    n = min(num_positions, candidates // 2) highest and, among the rest, the n lowest FAI values,
    ties toward the earlier position.
    """
    values = [float(x) for x in fai]
    candidates = [i for i in range(max(0, len(values) - tail)) if not math.isnan(values[i])]
    n = min(num_positions, len(candidates) // 2)
    by_high = sorted(candidates, key=lambda i: -values[i])  # Python's sort is stable
    top = by_high[:n]
    bottom = sorted(by_high[n:], key=lambda i: values[i])[:n]
    return sorted(top), sorted(bottom)


def _alternatives(logits, original, k, banned, decodable):
    """The k most likely token ids of logits (V,) other than original, banned ids and ids >= decodable."""
    scores = logits.float().clone()
    scores[decodable:] = float("-inf")
    scores[[original, *banned]] = float("-inf")
    top = torch.topk(scores, min(k, scores.numel()))
    return [i for i, v in zip(top.indices.tolist(), top.values.tolist()) if v > float("-inf")]


def _next_token_logits(model, prompts, responses, positions, pad_id):
    """Logits (V,) of the next token at each response position of each row, from one forward:
    positions[b] lists response indices i; row b's entry i predicts response token i."""
    batch = build_batch(prompts, responses, pad_id)
    ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
    with torch.no_grad():
        h, _, _ = model.hidden_states(ids, attention_mask=mask)  # (B, T, C)
        out = []
        for b, rows in enumerate(positions):
            start = int(batch["starts"][b])
            index = torch.tensor([start - 1 + i for i in rows], dtype=torch.long, device=model.device)
            out.append(model.lm_head(h[b, index]).float().cpu() if rows else torch.zeros(0))  # (n, V)
    return out


def _greedy_continuations(model, prefixes, limits, stop_ids, batch_rows, progress):
    """Greedy continuation of each prefix, at most limits[r] new tokens, in batches of rows that share
    a limit (so the result does not depend on which rows are batched together)."""
    out = [None] * len(prefixes)
    by_limit = {}
    for r, limit in enumerate(limits):
        by_limit.setdefault(limit, []).append(r)
    bar = tqdm(total=len(prefixes), desc="forced continuations", disable=not progress)
    for limit, rows in by_limit.items():
        for i in range(0, len(rows), batch_rows):
            chunk = rows[i:i + batch_rows]
            if limit < 1:
                new = [[] for _ in chunk]
            else:
                with torch.no_grad():
                    new = model.generate([prefixes[r] for r in chunk], limit, temperature=0.0, stop_ids=stop_ids)
            for r, tokens in zip(chunk, new):
                out[r] = tokens
            bar.update(len(chunk))
    bar.close()
    return out


def perturbation_batch(model, tokenizer, prompts, responses, fais, num_positions=PERTURB_POSITIONS,
                       k=PERTURB_ALTERNATIVES, max_tokens=PERTURB_TOKENS, tail=FAI_H_LO, reference="response",
                       stop_ids=None, batch_rows=PERTURB_BATCH, progress=False):
    """perturbation_test (Table 1) for many responses at once: the forced continuations of all of
    them go through model.generate together. Returns one result per response (see perturbation_test)."""
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    for name, value, low in (("num_positions", num_positions, 1), ("k", k, 1), ("max_tokens", max_tokens, 0),
                             ("tail", tail, 0), ("batch_rows", batch_rows, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not len(prompts) == len(responses) == len(fais):
        raise ValueError(f"need one prompt, response and fai per row, got {len(prompts)}, {len(responses)}, "
                         f"{len(fais)}")
    for b, (r, f) in enumerate(zip(responses, fais)):
        if len(r) != len(f):
            raise ValueError(f"row {b}: fai has {len(f)} entries but the response has {len(r)} tokens")
    stop_ids = tuple(stop_ids) if stop_ids is not None else tuple(i for i in (tokenizer.eos_id,) if i is not None)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    decodable = min(tokenizer.vocab_size, model.config.vocab_size)
    context = model.config.max_position_embeddings

    chosen = [select_positions(f, num_positions, tail) for f in fais]
    positions = [top + bottom for top, bottom in chosen]
    if not any(positions):
        return [None] * len(responses)
    logits = _next_token_logits(model, prompts, responses, positions, pad_id)

    # one entry per (row, position); one generate row per forced token (and per original with "greedy")
    results, prefixes, limits, slots = [], [], [], []
    for b, (prompt, response, fai) in enumerate(zip(prompts, responses, fais)):
        top, bottom = chosen[b]
        if not top:
            results.append(None)
            continue
        entries = []
        for j, i in enumerate(positions[b]):
            original = response[i]
            alts = _alternatives(logits[b][j], original, k, stop_ids, decodable)
            limit = min(max_tokens, context - (len(prompt) + i + 1))
            entry = dict(position=i, group="high" if i in top else "low", fai=float(fai[i]), original=original,
                         original_text=tokenizer.decode([original]), alternatives=[])
            forced = ([original] if reference == "greedy" else []) + alts
            for token in forced:
                slots.append((entry, token))
                prefixes.append(list(prompt) + list(response[:i]) + [token])
                limits.append(limit)
            entry["reference_ids"] = list(response[i:i + 1 + max(limit, 0)])
            entries.append(entry)
        results.append(dict(high_positions=top, low_positions=bottom, positions=entries))

    continuations = _greedy_continuations(model, prefixes, limits, stop_ids, batch_rows, progress)
    for (entry, token), new in zip(slots, continuations):
        ids = [token] + new
        if token == entry["original"]:  # only forced with reference="greedy": alternatives never equal it
            entry["reference_ids"] = ids
        else:
            entry["alternatives"].append(dict(token=token, token_text=tokenizer.decode([token]),
                                              continuation_ids=ids))
    for result in results:
        if result is not None:
            _score(result, tokenizer, stop_ids)
    return results


def _score(result, tokenizer, stop_ids):
    """Fill the Jaccard overlaps of one response's perturbation result (Eq. 11)."""
    def text(ids):
        return tokenizer.decode([i for i in ids if i not in stop_ids])

    means = {"high": [], "low": []}
    for entry in result["positions"]:
        entry["reference_text"] = text(entry["reference_ids"])
        reference = content_words(entry["reference_text"])
        for alt in entry["alternatives"]:
            alt["continuation"] = text(alt["continuation_ids"])
            alt["jaccard"] = jaccard(content_words(alt["continuation"]), reference)
            means[entry["group"]].append(alt["jaccard"])
    result["jaccard_high"] = sum(means["high"]) / len(means["high"]) if means["high"] else float("nan")
    result["jaccard_low"] = sum(means["low"]) / len(means["low"]) if means["low"] else float("nan")


def perturbation_test(model, tokenizer, prompt_ids, response_ids, fai, num_positions=PERTURB_POSITIONS,
                      k=PERTURB_ALTERNATIVES, max_tokens=PERTURB_TOKENS, tail=FAI_H_LO, reference="response",
                      stop_ids=None, batch_rows=PERTURB_BATCH):
    """Table 1 perturbation test of one response.

    At the num_positions highest-FAI and lowest-FAI positions (select_positions), force each of the
    k most likely next tokens other than the original one, continue greedily for up to max_tokens
    tokens, and compare each continuation with the reference continuation from that position (the
    original response's tokens, or with reference="greedy" the original token continued greedily)
    by the Jaccard overlap of their content-word sets (Eq. 11).

    prompt_ids, response_ids: token lists; fai: one FAI value per response token (H_hi = end of the
    response, as the analysis section uses). Returns None when the response has fewer than 2
    positions to perturb, else a dict with high_positions, low_positions, jaccard_high, jaccard_low
    (means over the (position, alternative) pairs) and positions: one dict per position with
    position, group ("high" / "low"), fai, original, reference_ids, reference_text and alternatives
    [{token, token_text, continuation_ids (starting with the forced token), continuation, jaccard}].
    """
    return perturbation_batch(model, tokenizer, [prompt_ids], [response_ids], [fai], num_positions, k, max_tokens,
                              tail, reference, stop_ids, batch_rows)[0]


def summarize_perturbation(results):
    """Table 1 numbers over problems: mean high-FAI and low-FAI Jaccard (each problem weighs the same)
    and the share of problems whose high-FAI Jaccard is strictly lower (deviates more)."""
    done = [r for r in results if r is not None]
    n = len(done)
    lower = sum(r["jaccard_high"] < r["jaccard_low"] for r in done)
    return dict(problems=n, skipped=len(results) - n,
                jaccard_high=sum(r["jaccard_high"] for r in done) / n if n else float("nan"),
                jaccard_low=sum(r["jaccard_low"] for r in done) / n if n else float("nan"),
                high_deviates_more=lower, ties=sum(r["jaccard_high"] == r["jaccard_low"] for r in done),
                high_deviates_more_share=lower / n if n else float("nan"))


# -----------------------------------------------------------------------------
# Inputs: model, run config, prompts


def resolve_model_dir(init):
    """The checkpoint directory of --init (default out/model), with a clear message when it is missing."""
    if init is None:
        if not (DEFAULT_MODEL / "config.json").is_file():
            raise FileNotFoundError(f"no model at {DEFAULT_MODEL}: run `python train.py` first (it trains the demo "
                                    "model and writes it there), or pass --init <checkpoint directory>")
        return DEFAULT_MODEL
    return checkpoint_dir(init)


def load_model(model_dir, dtype, device):
    """The project's Qwen3 for a qwen3 checkpoint; any other causal LM that transformers loads runs
    through integrations.hf (its attention's q and k captured by a registered attention function)."""
    config = read_json(model_dir / "config.json")
    if isinstance(config, dict) and config.get("model_type") == "qwen3":
        return Transformer.from_pretrained(model_dir, dtype=dtype, device=device).eval()
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise UsageError(f"--init {model_dir}: a {config.get('model_type')!r} model needs transformers "
                         "(pip install transformers)") from None
    from integrations.hf import HFCausalLM
    return HFCausalLM(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval())


def read_run_config(model_dir):
    """run_config.json of the train.py run the model came from (beside or inside the folder), or {}."""
    for candidate in (model_dir / "run_config.json", model_dir.parent / "run_config.json"):
        if candidate.is_file():
            try:
                config = json.loads(candidate.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{candidate}: not valid JSON ({e.msg})") from None
            return {"path": str(candidate), "run": config.get("run", {}), "rl": config.get("rl", {})}
    return {}


def load_prompts(args, run_config, num_prompts):
    """[(prompt text, task example or None)] and the task (None for --prompts)."""
    if args.prompts:
        rows = read_jsonl(args.prompts)
        prompts = []
        for where, row in rows[:num_prompts]:
            if not isinstance(row.get("prompt"), str) or not row["prompt"]:
                raise ValueError(f"{where}: expected a non-empty string field 'prompt'")
            prompts.append((row["prompt"], None))
        return prompts, None
    run = run_config.get("run", {})
    name = args.task or run.get("task", "countdown")
    if name == "countdown":
        if run.get("n_test", num_prompts) < num_prompts:  # later "test" instances may be in the run's train set
            print(f"note: the run held out only {run['n_test']} problems; analyzing those")
            num_prompts = run["n_test"]
        if args.data:
            raise ValueError("--data is for --task gsm8k / math; countdown problems are generated from the seed")
        task = make_task("countdown", seed=run.get("seed", 0), num_numbers=run.get("num_numbers", 4),
                         max_number=run.get("max_number", 99), max_target=run.get("max_target", 100),
                         prompt_style=args.prompt_style or run.get("prompt_style", "tinyzero"),
                         n_train=0, n_test=num_prompts)
    else:
        if args.prompt_style not in (None, "analysis"):
            raise ValueError(f"--prompt-style {args.prompt_style} is for countdown; {name} uses the analysis format")
        data = args.data or (run.get("data") if run.get("task") == name else None)
        task = make_task(name, data=data)
    return [(ex.prompt, ex) for ex in task.test[:num_prompts]], task


# -----------------------------------------------------------------------------
# The analysis


def generate_responses(model, prompt_ids, max_new_tokens, temperature, seed, stop_ids, batch_size):
    """One sampled response per prompt, batch_size prompts per generate call (seed + offset per call)."""
    responses = []
    with torch.no_grad():
        for i in tqdm(range(0, len(prompt_ids), batch_size), desc="responses"):
            responses += model.generate(prompt_ids[i:i + batch_size], max_new_tokens, temperature=temperature,
                                        stop_ids=stop_ids, seed=seed + i)
    return responses


def compute_signals(model, prompt_ids, responses, pad_id, layers, window, h_lo, batch_size):
    """rhythm_signals (receiver heads included, H_hi = end of response) of every response, batched."""
    signals = []
    for i in tqdm(range(0, len(prompt_ids), batch_size), desc="attention metrics"):
        batch = build_batch(prompt_ids[i:i + batch_size], responses[i:i + batch_size], pad_id)
        batch = {key: value.to(model.device) for key, value in batch.items()}
        out = rhythm_signals(model, batch["input_ids"], batch["starts"], batch["attention_mask"], layers=layers,
                             window=window, h_lo=h_lo, h_hi=None, receivers=True)
        signals += [{key: value.cpu() if torch.is_tensor(value) else value for key, value in s.items()} for s in out]
    return signals


def _figure_choice(responses, correct):
    """Index of the shortest correct response with >= 2 tokens, else the shortest one, and a note."""
    usable = [i for i, r in enumerate(responses) if len(r) >= 2]
    if not usable:
        return None, "no response has 2 or more tokens: no figure"
    right = [i for i in usable if correct[i]]
    if right:
        return min(right, key=lambda i: len(responses[i])), "shortest correct response"
    return min(usable, key=lambda i: len(responses[i])), "no correct response: shortest response shown instead"


def draw_figure(model, tokenizer, prompt, response, signals, layers, out, title):
    batch = build_batch([prompt], [response], 0)
    ids = batch["input_ids"].to(model.device)
    tokens = [tokenizer.decode([i]) for i in response]
    maps = aggregated_maps(model, ids, int(batch["starts"][0]), layers=layers)
    # control bytes have no glyph in matplotlib's fonts: the PNG shows them escaped
    labels = [t if t.isprintable() else t.encode("unicode_escape").decode("ascii") for t in tokens]
    plot_rhythm(out / "rhythm.png", signals, tokens=labels, maps=maps, title=title)
    render_html(out / "rhythm.html", tokens, signals, title=title)


def _clean(x):
    """JSON-safe: NaN and inf become None (strict JSON has no NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _write_json(path, data):
    path.write_text(json.dumps(_clean(data), indent=2) + "\n")


def _fmt(value, percent):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.2f}%" if percent else f"{value:.4f}"


def coupling_table(stats):
    """Table 2 next to the paper's numbers, as printable text."""
    lines = [f"{'Table 2 (couplings)':46s} {'random':>9s} {'observed':>9s} {'lift':>9s}   "
             f"{'paper: random':>13s} {'observed':>9s} {'lift':>9s}"]
    for name, label in COUPLING_LABELS.items():
        s, p = stats[name], PAPER_COUPLINGS[name]
        pct = name != "entropy_at_waad_peaks"
        lift = "n/a" if s["lift"] is None or math.isnan(s["lift"]) else f"{100 * s['lift']:+.2f}%"
        lines.append(f"{label:46s} {_fmt(s['random'], pct):>9s} {_fmt(s['observed'], pct):>9s} {lift:>9s}   "
                     f"{_fmt(p['random'], pct):>13s} {_fmt(p['observed'], pct):>9s} {100 * p['lift']:+8.2f}%")
    return "\n".join(lines)


def perturbation_table(summary):
    """Table 1 next to the paper's numbers, as printable text."""
    p = PAPER_PERTURBATION
    share = f"{_fmt(summary['high_deviates_more_share'], True)} ({summary['high_deviates_more']}/{summary['problems']})"
    paper_share = f"{100 * p['top_lower_share']:.2f}% ({p['problems']} problems)"
    rows = [("Table 1 (perturbation test)", "this model", "paper"),
            ("mean Jaccard, high-FAI positions", _fmt(summary["jaccard_high"], False), f"{p['jaccard_top']:.3f}"),
            ("mean Jaccard, low-FAI positions", _fmt(summary["jaccard_low"], False), f"{p['jaccard_bottom']:.3f}"),
            ("high-FAI deviates more", share, paper_share)]
    return "\n".join(f"{a:40s} {b:>18s} {c:>22s}" for a, b, c in rows)


def build_parser():
    p = Parser(prog="python train.py analyze", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", help=f"Qwen3 checkpoint directory (default {DEFAULT_MODEL}, from `python train.py`)")
    p.add_argument("--out", help="output folder (default <model dir>/../analysis for a train.py run, "
                                 "else out/analysis)")
    p.add_argument("--task", choices=["countdown", "gsm8k", "math"],
                   help="problems to analyze (default: the run's task, else countdown)")
    p.add_argument("--data", help="JSONL for --task gsm8k / math (question + answer, or problem + answer)")
    p.add_argument("--prompts", help="JSONL with a 'prompt' field per line, used as is (no reward)")
    p.add_argument("--prompt-style", dest="prompt_style", choices=["tinyzero", "compact"],
                   help="countdown prompt style (default: the run's, else tinyzero)")
    p.add_argument("--num-prompts", dest="num_prompts", type=int, default=NUM_PROMPTS)
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int,
                   help=f"response length limit (default: the run's, else {MAX_NEW_TOKENS})")
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=BATCH_SIZE,
                   help="responses per generate call and per metrics forward")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto = float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--layers", type=parse_layers,
                   help="middle|all|top|bottom|comma list (default: the run's, else middle)")
    p.add_argument("--window", type=int, default=WAAD_WINDOW, help="W of WAAD (Eq. 9)")
    p.add_argument("--h-lo", dest="h_lo", type=int, default=FAI_H_LO,
                   help="H_lo of FAI (Eq. 10); H_hi = end of the response")
    p.add_argument("--perturb-positions", dest="perturb_positions", type=int, default=PERTURB_POSITIONS,
                   help="high-FAI and low-FAI positions per response (Table 1)")
    p.add_argument("--perturb-k", dest="perturb_k", type=int, default=PERTURB_ALTERNATIVES,
                   help="alternatives forced at each position")
    p.add_argument("--perturb-tokens", dest="perturb_tokens", type=int, default=PERTURB_TOKENS,
                   help="greedy tokens after each forced token")
    p.add_argument("--perturb-reference", dest="perturb_reference", choices=REFERENCES, default="response",
                   help="compare with the original response (default) or the original token continued greedily")
    p.add_argument("--perturb-batch", dest="perturb_batch", type=int, default=PERTURB_BATCH,
                   help="forced continuations per generate call")
    p.add_argument("--no-perturbation", dest="perturbation", action="store_false", help="skip the Table 1 test")
    return p


def _check_args(args):
    if args.prompts and (args.task or args.data):
        raise UsageError("pass either --prompts or --task/--data, not both")
    for name in ("num_prompts", "batch_size", "perturb_positions", "perturb_k", "perturb_batch", "window"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("perturb_tokens", "h_lo"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")


def main(argv=None):
    """`python train.py analyze ...`: see the module docstring. Returns a summary dict."""
    t_start = time.time()
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    _check_args(args)
    model_dir = resolve_model_dir(args.init)
    if args.layers is not None:
        check_layers(args.layers, model_config_field(model_dir, "num_hidden_layers"))
    run_config = read_run_config(model_dir)
    out = Path(args.out) if args.out else (model_dir.parent / "analysis" if run_config else DEFAULT_OUT)
    ensure_writable(out)
    device = pick_device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(args.seed)

    prompts, task = load_prompts(args, run_config, args.num_prompts)
    model = load_model(model_dir, dtype, device)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    rl = run_config.get("rl", {})
    stop_ids = tuple(dict.fromkeys([i for i in (tokenizer.eos_id,) if i is not None] + list(rl.get("stop_ids", []))))
    pad_id = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)
    max_new_tokens = args.max_new_tokens or rl.get("max_new_tokens", MAX_NEW_TOKENS)
    layer_choice = args.layers or (tuple(rl["credit_layers"]) if isinstance(rl.get("credit_layers"), list)
                                   else rl.get("credit_layers", "middle"))
    layers = default_layers(model.config.num_hidden_layers, layer_choice)

    prompt_ids = [tokenizer.encode(text, allow_special=True) for text, _ in prompts]
    if any(not ids for ids in prompt_ids):
        raise ValueError("a prompt encodes to no tokens; every prompt needs at least one")
    check_room(max_new_tokens, map(len, prompt_ids), model.config.max_position_embeddings)
    print(f"analyzing {model_dir} on {len(prompts)} {task.name if task else 'custom'} prompts "
          f"(temperature {args.temperature}, up to {max_new_tokens} tokens, layers {layers}) -> {out}/")

    responses = generate_responses(model, prompt_ids, max_new_tokens, args.temperature, args.seed, stop_ids,
                                   args.batch_size)
    texts = [tokenizer.decode(r[:-1] if r and r[-1] in stop_ids else r) for r in responses]
    rewards = [float(task.reward(t, ex)) if task else None for t, (_, ex) in zip(texts, prompts)]
    correct = [bool(task.correct(t, ex)) if task else False for t, (_, ex) in zip(texts, prompts)]
    signals = compute_signals(model, prompt_ids, responses, pad_id, layers, args.window, args.h_lo, args.batch_size)

    records = [dict(waad=s["waad"], fai_global=s["fai"], fai_receiver=s["fai_receiver"], entropy=s["entropy"])
               for s, r in zip(signals, responses) if r]
    if not records:
        raise ValueError("every response is empty: nothing to analyze (try a larger --max-new-tokens)")
    stats = coupling_stats(records, seed=args.seed)
    settings = dict(model=str(model_dir), task=task.name if task else "prompts", num_responses=len(responses),
                    num_tokens=sum(len(r) for r in responses), temperature=args.temperature,
                    max_new_tokens=max_new_tokens, seed=args.seed, layers=layers, window=args.window, h_lo=args.h_lo,
                    h_hi=None)
    _write_json(out / "couplings.json", dict(stats=stats, paper=PAPER_COUPLINGS, settings=settings))
    print(coupling_table(_clean(stats)))

    perturbation, perturbation_summary = [None] * len(responses), None
    if args.perturbation:
        for i in tqdm(range(0, len(responses), args.batch_size), desc="perturbation test"):
            perturbation[i:i + args.batch_size] = perturbation_batch(
                model, tokenizer, prompt_ids[i:i + args.batch_size], responses[i:i + args.batch_size],
                [s["fai"].tolist() for s in signals[i:i + args.batch_size]], args.perturb_positions, args.perturb_k,
                args.perturb_tokens, args.h_lo, args.perturb_reference, stop_ids, args.perturb_batch)
        perturbation_summary = summarize_perturbation(perturbation)
        per_problem = [dict(index=i, jaccard_high=r["jaccard_high"], jaccard_low=r["jaccard_low"])
                       for i, r in enumerate(perturbation) if r is not None]
        perturb_settings = dict(settings, positions=args.perturb_positions, k=args.perturb_k,
                                max_tokens=args.perturb_tokens, tail=args.h_lo, reference=args.perturb_reference)
        _write_json(out / "perturbation.json", dict(summary=perturbation_summary, paper=PAPER_PERTURBATION,
                                                    per_problem=per_problem, settings=perturb_settings))
        print(perturbation_table(perturbation_summary))

    figure, note = _figure_choice(responses, correct)
    if figure is not None:
        title = f"{note}: {prompts[figure][0].strip()[-60:]!r}"
        draw_figure(model, tokenizer, prompt_ids[figure], responses[figure], signals[figure], layers, out, title)
        print(f"figure: response {figure} ({len(responses[figure])} tokens, {note}) -> rhythm.png, rhythm.html")
    else:
        print(note)

    with (out / "responses.jsonl").open("w") as f:
        for i, ((prompt, _), response, sig) in enumerate(zip(prompts, responses, signals)):
            record = dict(index=i, prompt=prompt, response=texts[i], token_ids=response,
                          tokens=[tokenizer.decode([t]) for t in response], reward=rewards[i],
                          correct=correct[i] if task else None, waad=sig["waad"].tolist(), fai=sig["fai"].tolist(),
                          fai_receiver=sig["fai_receiver"].tolist(), entropy=sig["entropy"].tolist(),
                          perturbation=perturbation[i])
            f.write(json.dumps(_clean(record)) + "\n")

    summary = dict(settings, accuracy=sum(correct) / len(correct) if task else None, figure_index=figure,
                   figure_note=note, couplings=stats, perturbation=perturbation_summary,
                   wall_seconds=round(time.time() - t_start, 1))
    _write_json(out / "summary.json", summary)
    print(f"files in {out}/: couplings.json, perturbation.json, rhythm.png, rhythm.html, responses.jsonl, summary.json")
    return _clean(summary)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

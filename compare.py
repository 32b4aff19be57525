"""The paired comparison of credit strategies (`python train.py compare`): the runner, then the
statistics and report of its results.

The runner (compare) makes one warm-up per seed, then runs every strategy on every seed from it,
several side by side in their own processes (run_jobs); train.py hands it the function that runs
one job, so this file never imports train.py.

Runs are paired by seed: every strategy of a seed starts from the same warm-up and sees the same
prompts, so the per-seed difference "strategy final - baseline final" cancels the seed's luck.
The interval is the 95% Student t-interval over seeds: mean ± t_{0.975, n-1} * sd / sqrt(n).
scipy is not a dependency, so the t quantile comes from bisection on the t CDF, written with the
regularized incomplete beta function (continued fraction, modified Lentz method).
The evaluation's own noise is the binomial standard error of one held-out accuracy, at the mean
final accuracy of all runs: two runs whose finals differ by less than about 2 of those are not
told apart by one evaluation.

compare.json: {"baseline", "seeds", "eval_problems", "binomial_se", "interval", "strategies": {name:
{"per_seed": [{"seed", "before", "final", "best"}] in percent, "curve": {"steps", "mean", "low",
"high"} (EMA of best, min-max over seeds), and for every strategy but the baseline "delta": {"mean",
"ci_low", "ci_high", "wins", "seeds", "per_seed"} of final minus the baseline's final, in points, and
"delta_curve": {"steps", "mean", "low", "high"}, the paired difference at every evaluation}}}.
"""

import json
import math
import os
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from checkpoint import DamagedFile, read_json, read_jsonl_records
from cli import UsageError
from distributed import is_main
from plots import plot_compare

CONFIDENCE = 0.95
EMA_A = 0.3  # PAPER.md (end): the paper's curve smoothing constant is not given; project default


# -----------------------------------------------------------------------------
# The runner


# What a scratch run's warm-up depends on: the seed, the task's data, the model's shape and the SFT schedule.
WARMUP_FIELDS = ("seed", "task", "data", "num_numbers", "max_number", "max_target", "prompt_style", "solution",
                 "n_train", "n_test", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "intermediate",
                 "context", "sft_steps", "sft_batch", "sft_lr")
WARMUP_RECORD = "warmup.json"  # written last, so a warm-up folder without it is unfinished


def warmup_settings(run) -> dict:
    return json.loads(json.dumps({name: getattr(run, name) for name in WARMUP_FIELDS}))  # as read back


def saved_warmup(path: Path | None) -> dict | None:
    """The settings of the finished warm-up in path, or None when there is none to reuse."""
    try:
        record = read_json(path / WARMUP_RECORD) if path is not None and (path / "config.json").is_file() else None
    except (DamagedFile, OSError):
        return None
    return record if isinstance(record, dict) else None


def check_saved_warmups(folders: dict, run) -> set:
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


def compare(run, rl, credits: list[str], seeds: int, work, settings: dict, eval_problems: int, gpus: int = 0,
            jobs: int = 1, parallel: str | None = None) -> dict:
    """Every strategy in credits on seeds run.seed .. run.seed + seeds - 1, paired by seed.

    Paired: the strategies of a seed start from one warm-up (scratch models: warmup-seed<S>/, made
    once; a later command reuses it only with the same warm-up settings, check_saved_warmups) and see
    the same prompts in the same order (data_order depends on the seed only) and the same evaluation
    problems. credits[0] is the baseline; a label may add a gamma normalisation
    ('coupled+mean', credit_variant). Each run writes DIR/<label>-seed<S>/;
    a rerun of the same command skips finished runs and resumes the others from their checkpoints.
    jobs: runs side by side, each in its own process; on CPU each gets cores // jobs threads, with
    several GPUs each worker slot owns one (run_jobs). Writes compare.json, compare.md and compare.png.
    run, rl: the train.RunConfig and rl.RLConfig every run starts from; work: train.compare_job,
    which runs one job (given here so that this file never imports train.py); settings: the
    comparison's config as run_config.json holds it; eval_problems: held-out problems per evaluation.
    """
    root = Path(run.out)
    seed_list = list(range(run.seed, run.seed + seeds))
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
    run_jobs(warmups, [(s, job(sub_run, sub_rl, warm[s])) for _, s, sub_run, sub_rl in runs], jobs, work, gpus)
    if not is_main():
        return {}
    results = {credit: {} for credit in credits}
    for credit, s, sub_run, _ in runs:
        summary = read_json(Path(sub_run.out) / "summary.json")
        evals = [r for r in read_jsonl_records(Path(sub_run.out) / "metrics.jsonl") if r["kind"] == "eval"]
        results[credit][s] = dict(before=summary["accuracy_before_rl"], final=summary["accuracy_after_rl"],
                                  best=summary["best_accuracy"], steps=[r["step"] for r in evals],
                                  accuracy=[r["accuracy"] for r in evals])
    report = summarize(results, credits[0], eval_problems)
    report["settings"] = settings
    table = markdown(report)
    print(table)
    (root / "compare.md").write_text(table)
    (root / "compare.json").write_text(json.dumps(report, indent=2))
    plot_compare(report, root / "compare.png")
    return report


def run_jobs(warmups: dict, runs: list, workers: int, work, gpus: int = 0):
    """Run work (train.compare_job: one warm-up or one run) over the warm-ups ({seed: job}) and the
    runs ([(seed, job)]), `workers` at a time in fresh processes (or here when 1), with one bar. A
    seed's runs join the queue the moment its warm-up is saved, so no worker waits for the slowest warm-up (the 5-seed testbed
    comparison spent 29 minutes on warm-ups before any run could start). With gpus, worker slot i
    owns GPU i % gpus: two jobs share a GPU only when there are more workers than GPUs."""
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


def credit_variant(rl, label: str):
    """rl with the strategy a compare label names: 'coupled', or 'coupled+mean' for the same strategy
    with --gamma-norm mean (each response's gamma rescaled to mean 1), so one comparison can report
    the normalised runs beside the unnormalised ones. ConfigError (a ValueError) for a bad name."""
    strategy, plus, gamma_norm = label.partition("+")
    return replace(rl, strategy=strategy, gamma_norm=gamma_norm if plus else rl.gamma_norm)


# -----------------------------------------------------------------------------
# Statistics


def ema_of_best(values, a=EMA_A):
    """The paper's curve smoothing: EMA_t = a * max(x_t, EMA_{t-1}) + (1 - a) * EMA_{t-1}."""
    smoothed = []
    for x in values:
        smoothed.append(x if not smoothed else a * max(x, smoothed[-1]) + (1 - a) * smoothed[-1])
    return smoothed


def _beta_continued_fraction(x, a, b, iterations=300, eps=1e-15):
    """The continued fraction of I_x(a, b) (modified Lentz); converges fast for x < (a+1)/(a+b+2)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, iterations + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return result


def regularized_beta(x, a, b):
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_continued_fraction(x, a, b) / a
    return 1.0 - front * _beta_continued_fraction(1.0 - x, b, a) / b


def t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * regularized_beta(df / (df + t * t), df / 2, 0.5)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p, df):
    """The t with t_cdf(t, df) = p (0.5 < p < 1), by bisection."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1; got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def paired_delta(differences, confidence=CONFIDENCE):
    """Mean, t-interval and wins of per-seed differences (points); with one seed the interval is undefined (None)."""
    n = len(differences)
    if n == 0:
        raise ValueError("paired_delta needs at least one per-seed difference")
    mean = sum(differences) / n
    low = high = sd = None
    if n > 1:
        sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
        half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
        low, high = mean - half, mean + half
    return {"mean": mean, "ci_low": low, "ci_high": high, "sd": sd, "wins": sum(d > 0 for d in differences),
            "seeds": n, "per_seed": list(differences)}


def binomial_se(p, n_eval):
    """Standard error of one held-out accuracy p over n_eval problems, in points: 100 * sqrt(p(1-p)/n)."""
    return 100 * math.sqrt(p * (1 - p) / n_eval)


def _band(steps: list, curves: list) -> dict:
    """One curve per seed, all at the same steps -> their mean and min-max at each step."""
    at_step = list(zip(*curves))
    return {"steps": steps, "mean": [sum(v) / len(v) for v in at_step],
            "low": [min(v) for v in at_step], "high": [max(v) for v in at_step]}


def _paired_curve(runs: dict, baseline_runs: dict, seeds: list, name: str) -> dict:
    """Held-out accuracy minus the baseline's on the same seed at every evaluation (raw, not smoothed:
    the EMA of best would hide a drop), in points: mean and min-max over seeds."""
    steps = baseline_runs[seeds[0]]["steps"]
    for s in seeds:
        if runs[s]["steps"] != steps or baseline_runs[s]["steps"] != steps:
            raise ValueError(f"strategy {name}, seed {s}: evaluated at other steps than the baseline's {steps}")
    return _band(steps, [[100 * (a - b) for a, b in zip(runs[s]["accuracy"], baseline_runs[s]["accuracy"])]
                         for s in seeds])


def summarize(results: dict, baseline: str, eval_problems: int) -> dict:
    """The comparison as compare.json holds it.

    results: {strategy: {seed: {"before", "final", "best": accuracy in [0, 1], "steps": [...],
    "accuracy": [...] (the held-out curve)}}}, every strategy with the same seeds.
    """
    seeds = sorted(results[baseline])
    strategies = {}
    for name, runs in results.items():
        if sorted(runs) != seeds:
            raise ValueError(f"strategy {name} has seeds {sorted(runs)}, the baseline {seeds}: runs are paired by seed")
        curves = [[100 * v for v in ema_of_best(runs[s]["accuracy"])] for s in seeds]
        entry = {"per_seed": [{"seed": s, "before": 100 * runs[s]["before"], "final": 100 * runs[s]["final"],
                               "best": 100 * runs[s]["best"]} for s in seeds],
                 "curve": _band(runs[seeds[0]]["steps"], curves)}
        if name != baseline:
            entry["delta"] = paired_delta([100 * (runs[s]["final"] - results[baseline][s]["final"]) for s in seeds])
            entry["delta_curve"] = _paired_curve(runs, results[baseline], seeds, name)
        strategies[name] = entry
    finals = [run["final"] for runs in results.values() for run in runs.values()]
    return {"baseline": baseline, "seeds": seeds, "eval_problems": eval_problems,
            "binomial_se": binomial_se(sum(finals) / len(finals), eval_problems),
            "interval": f"{CONFIDENCE:.0%} Student t-interval over seeds of the paired differences",
            "strategies": strategies}


def _number(x, digits=1):
    return "n/a" if x is None else f"{x:+.{digits}f}" if digits < 0 else f"{x:.{digits}f}"


def markdown(report: dict) -> str:
    """compare.md: one row per strategy, then the per-seed finals."""
    seeds, base = report["seeds"], report["baseline"]
    lines = [f"Held-out accuracy (%), {len(seeds)} seeds ({', '.join(map(str, seeds))}), "
             f"{report['eval_problems']} problems per evaluation; baseline: {base}.",
             f"Delta = final minus the baseline's final on the same seed, in points; interval: {report['interval']}. "
             f"Binomial standard error of one evaluation: {report['binomial_se']:.1f} points.", "",
             "| strategy | after warm-up | final (mean ± sd) | best | delta vs baseline | 95% CI | seeds won |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in report["strategies"].items():
        finals = [r["final"] for r in entry["per_seed"]]
        mean = sum(finals) / len(finals)
        sd = math.sqrt(sum((f - mean) ** 2 for f in finals) / (len(finals) - 1)) if len(finals) > 1 else None
        before = sum(r["before"] for r in entry["per_seed"]) / len(finals)
        best = sum(r["best"] for r in entry["per_seed"]) / len(finals)
        delta = entry.get("delta")
        cells = [name, f"{before:.1f}", f"{mean:.1f} ± {_number(sd)}", f"{best:.1f}",
                 "baseline" if delta is None else f"{delta['mean']:+.1f}",
                 "" if delta is None else
                 ("n/a (one seed)" if delta["ci_low"] is None else f"[{delta['ci_low']:+.1f}, {delta['ci_high']:+.1f}]"),
                 "" if delta is None else f"{delta['wins']} of {delta['seeds']}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| strategy | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for name, entry in report["strategies"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r['final']:.1f}" for r in entry["per_seed"]) + " |")
    return "\n".join(lines) + "\n"

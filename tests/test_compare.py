"""compare: statistics against hand-computed values, and one real paired smoke comparison."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compare import binomial_se, ema_of_best, markdown, paired_delta, summarize, t_quantile

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("df,expected", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)])
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)


def test_paired_delta_all_wins():
    d = paired_delta([1.0, 2.0, 6.0])
    half = 4.303 * math.sqrt(7) / math.sqrt(3)
    assert d["mean"] == pytest.approx(3.0)
    assert d["sd"] == pytest.approx(math.sqrt(7))
    assert d["ci_low"] == pytest.approx(3 - half, abs=2e-3)
    assert d["ci_high"] == pytest.approx(3 + half, abs=2e-3)
    assert (d["wins"], d["seeds"]) == (3, 3)


def test_paired_delta_loss_and_tie():
    d = paired_delta([-2.0, 0.0, 5.0, 1.0])  # mean 1, sd sqrt(26/3), t_{0.975,3} = 3.182
    half = 3.182 * math.sqrt(26 / 3) / 2
    assert d["mean"] == pytest.approx(1.0)
    assert d["ci_low"] == pytest.approx(1 - half, abs=2e-3)
    assert d["wins"] == 2


def test_paired_delta_one_seed_has_no_interval():
    d = paired_delta([2.5])
    assert d["mean"] == 2.5 and d["ci_low"] is None and d["ci_high"] is None and d["wins"] == 1


def test_ema_of_best_hand_case():
    # 10; 0.3*max(5,10)+0.7*10 = 10; 0.3*20+0.7*10 = 13
    assert ema_of_best([10, 5, 20]) == pytest.approx([10, 10, 13])


def test_binomial_se():
    assert binomial_se(0.3, 512) == pytest.approx(100 * math.sqrt(0.21 / 512))


def test_summarize_pairs_by_seed_with_hand_computed_deltas():
    def run(before, final, best, curve):
        return dict(before=before, final=final, best=best, steps=[0, 2, 4], accuracy=curve)

    results = {"none": {0: run(0.1, 0.20, 0.25, [0.1, 0.3, 0.2]), 1: run(0.2, 0.30, 0.30, [0.2, 0.1, 0.3])},
               "coupled": {0: run(0.1, 0.25, 0.25, [0.1, 0.2, 0.25]), 1: run(0.2, 0.28, 0.32, [0.2, 0.32, 0.28])}}
    report = summarize(results, "none", eval_problems=100)
    coupled = report["strategies"]["coupled"]
    expected = [{"seed": 0, "before": 10.0, "final": 25.0, "best": 25.0},
                {"seed": 1, "before": 20.0, "final": 28.0, "best": 32.0}]
    assert [pytest.approx(r) for r in expected] == coupled["per_seed"]
    # differences +5 and -2 points: mean 1.5, sd 4.95, t_{0.975,1} = 12.706
    half = 12.7062 * math.sqrt(24.5) / math.sqrt(2)
    assert coupled["delta"]["mean"] == pytest.approx(1.5)
    assert coupled["delta"]["ci_low"] == pytest.approx(1.5 - half, rel=1e-4)
    assert coupled["delta"]["ci_high"] == pytest.approx(1.5 + half, rel=1e-4)
    assert (coupled["delta"]["wins"], coupled["delta"]["seeds"]) == (1, 2)
    assert "delta" not in report["strategies"]["none"] and "delta_curve" not in report["strategies"]["none"]
    # raw paired differences per evaluation: seed 0 [0, -10, +5], seed 1 [0, +22, -2]
    assert coupled["delta_curve"]["steps"] == [0, 2, 4]
    assert coupled["delta_curve"]["mean"] == pytest.approx([0, 6, 1.5])
    assert coupled["delta_curve"]["low"] == pytest.approx([0, -10, -2])
    assert coupled["delta_curve"]["high"] == pytest.approx([0, 22, 5])
    # EMA of best per seed: [10, 16, 17.2] and [20, 20, 23]; band = min-max over seeds
    assert report["strategies"]["none"]["curve"]["mean"] == pytest.approx([15, 18, 20.1])
    assert report["strategies"]["none"]["curve"]["low"] == pytest.approx([10, 16, 17.2])
    mean_final = (0.20 + 0.30 + 0.25 + 0.28) / 4
    assert report["binomial_se"] == pytest.approx(100 * math.sqrt(mean_final * (1 - mean_final) / 100))
    table = markdown(report)
    assert "| coupled | 15.0 | 26.5 ± 2.1 | 28.5 | +1.5 |" in table and "1 of 2" in table
    with pytest.raises(ValueError, match="paired by seed"):
        summarize({"none": {0: results["none"][0]}, "coupled": results["coupled"]}, "none", 100)
    shifted = {"none": results["none"], "coupled": {0: results["coupled"][0], 1: dict(results["coupled"][1], steps=[0, 3, 4])}}
    with pytest.raises(ValueError, match="other steps"):
        summarize(shifted, "none", 100)


def test_smoke_compare_is_paired_parallel_and_skips_finished_runs(tmp_path):
    out = tmp_path / "cmp"
    command = [sys.executable, str(ROOT / "train.py"), "compare", "--smoke", "--credit", "none,random,random+mean",
               "--seeds", "2", "--seed", "5", "--jobs", "2", "--out", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=600)
    report = json.loads((out / "compare.json").read_text())
    assert report["baseline"] == "none" and report["seeds"] == [5, 6]
    assert [r["seed"] for r in report["strategies"]["random"]["per_seed"]] == [5, 6]
    assert set(report["strategies"]["random"]["delta"]) >= {"mean", "ci_low", "ci_high", "wins", "seeds"}
    assert (out / "compare.md").is_file() and (out / "compare.png").stat().st_size > 0
    # 'random+mean': the random strategy with each response's gamma rescaled to mean 1, beside plain random
    assert set(report["strategies"]) == {"none", "random", "random+mean"}
    for label, gamma_norm in (("random", "none"), ("random+mean", "mean")):
        rl = json.loads((out / f"{label}-seed5" / "run_config.json").read_text())["rl"]
        assert (rl["strategy"], rl["gamma_norm"]) == ("random", gamma_norm)
    for seed in (5, 6):
        first = [[json.loads(line) for line in (out / f"{c}-seed{seed}" / "metrics.jsonl").read_text().splitlines()]
                 for c in ("none", "random", "random+mean")]
        # one warm-up per seed: the same held-out accuracy before RL, the same first rollouts
        for other in first[1:]:
            assert first[0][0] == other[0] and first[0][0]["kind"] == "eval"
            assert first[0][1]["reward_mean"] == other[1]["reward_mean"]
            assert first[0][1]["response_length"] == other[1]["response_length"]
    for seed in (5, 6):  # each warm-up is finished and records what it was made with
        assert json.loads((out / f"warmup-seed{seed}" / "warmup.json").read_text())["seed"] == seed
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*-seed*/summary.json")}
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=600)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*-seed*/summary.json")} == stamps  # nothing reran


def test_compare_refuses_a_warmup_made_with_other_settings(tmp_path):
    """A finished warm-up is reused only with the settings it was made with: one made with another
    --sft-steps is one line naming the difference, before any run starts (it used to be reused)."""
    import compare
    import config
    from cli import Parser
    import train
    from tokenizer import Tokenizer

    parser = Parser()
    config.add_run_flags(parser)
    config.add_rl_flags(parser)
    run, _ = config.resolve(parser.parse_args(["--smoke", "--seed", "5"]))
    folder = tmp_path / "cmp" / "warmup-seed5"
    tokenizer = Tokenizer.byte_level()
    train.save_warmup(folder, run, train.scratch_model(run, tokenizer), tokenizer)
    assert compare.saved_warmup(folder) == compare.warmup_settings(run)
    command = [sys.executable, str(ROOT / "train.py"), "compare", "--smoke", "--credit", "none", "--seeds", "1",
               "--seed", "5", "--sft-steps", str(run.sft_steps + 1), "--out", str(tmp_path / "cmp")]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert (f"warmup-seed5/ was made with sft_steps={run.sft_steps}, this comparison asks for "
            f"sft_steps={run.sft_steps + 1}") in lines[0]
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["warmup-seed5"]  # no run began
    # a folder whose record is missing or not an object (a killed warm-up, older code) is made again
    (folder / "warmup.json").write_text("[]")
    assert compare.saved_warmup(folder) is None
    (folder / "warmup.json").unlink()
    assert compare.saved_warmup(folder) is None


def fake_job(job):
    """Stands in for train.compare_job in run_jobs' worker processes: records when it ran and on
    which GPU; a job with wait_for blocks until that job has started (or fails after 60 s)."""
    log = Path(job["log"])
    (log / f"{job['name']}.start").write_text(json.dumps({"t": time.time(), "gpu": job["gpu"]}))
    deadline = time.time() + 60
    while job.get("wait_for") and not (log / f"{job['wait_for']}.start").exists():
        if time.time() > deadline:
            raise TimeoutError(f"{job['name']}: {job['wait_for']} never started")
        time.sleep(0.05)
    if job.get("fail"):
        raise RuntimeError(f"{job['name']} failed")
    time.sleep(0.2)
    (log / f"{job['name']}.end").write_text(json.dumps({"t": time.time()}))


def test_run_jobs_starts_a_seeds_runs_once_its_warmup_is_saved(tmp_path):
    from compare import run_jobs
    job = lambda name, **kw: dict(name=name, log=str(tmp_path), **kw)  # noqa: E731
    # warm-up 2 can only end after a run of seed 1 has started: a scheduler that waits for every
    # warm-up before any run would time out here
    warmups = {1: job("w1"), 2: job("w2", wait_for="r1a")}
    runs = [(1, job("r1a")), (1, job("r1b")), (2, job("r2a")), (2, job("r2b")), (3, job("r3a"))]
    run_jobs(warmups, runs, workers=2, gpus=2, work=fake_job)
    spans = {p.stem: (json.loads(p.read_text())["t"], json.loads(p.with_suffix(".end").read_text())["t"],
                      json.loads(p.read_text())["gpu"]) for p in tmp_path.glob("*.start")}
    assert set(spans) == {"w1", "w2", "r1a", "r1b", "r2a", "r2b", "r3a"}
    for name, (start, _, _) in spans.items():
        if name.startswith("r1") or name.startswith("r2"):
            assert start >= spans["w" + name[1]][1]  # after its seed's warm-up was saved
    for a, (start_a, end_a, gpu_a) in spans.items():  # a GPU holds one job at a time
        for b, (start_b, end_b, gpu_b) in spans.items():
            if a < b and gpu_a == gpu_b:
                assert end_a <= start_b or end_b <= start_a, (a, b)
    assert {gpu for _, _, gpu in spans.values()} == {0, 1}


def test_run_jobs_stops_at_a_failed_job(tmp_path):
    from compare import run_jobs
    job = lambda name, **kw: dict(name=name, log=str(tmp_path), **kw)  # noqa: E731
    with pytest.raises(RuntimeError, match="w1 failed"):
        run_jobs({1: job("w1", fail=True)}, [(1, job("r1a"))], workers=2, work=fake_job)
    assert not (tmp_path / "r1a.start").exists()  # a failed warm-up's runs never start

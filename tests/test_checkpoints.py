"""Checkpoints survive a crash at any instant of their swap, a damaged one is passed over on
--resume, and SIGINT / SIGTERM stop a run at the end of a step with a checkpoint to resume from.

The reference is an uninterrupted run of the same configuration: a resumed run must log the same
metrics (wall-clock keys aside), as tests/test_train.py's kill-and-resume test checks.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# Runs train.py in this process with one failure injected into the swap of the Nth checkpoint:
# os._exit (no clean-up, as a kill) at the named point of checkpoint.atomic_directory.
CRASHING_TRAIN = """
import os, runpy, sys
sys.path.insert(0, {root!r})
import checkpoint
point, nth = sys.argv[1], int(sys.argv[2])
seals = []
real_seal, real_replace = checkpoint.seal, os.replace

def seal(directory):
    if directory.name == "checkpoint.tmp":
        seals.append(directory)
        if point == "before_seal" and len(seals) == nth:
            os._exit(9)
    real_seal(directory)

def replace(src, dst):
    names = (os.path.basename(src), os.path.basename(dst))
    if len(seals) == nth and point == "before_retire" and names == ("checkpoint", "checkpoint.prev"):
        os._exit(9)
    real_replace(src, dst)
    if len(seals) == nth and point == "after_retire" and names == ("checkpoint", "checkpoint.prev"):
        os._exit(9)
    if len(seals) == nth and point == "after_rename" and names == ("checkpoint.tmp", "checkpoint"):
        os._exit(9)

checkpoint.seal, os.replace = seal, replace
sys.argv = ["train.py"] + sys.argv[3:]
runpy.run_path({train!r}, run_name="__main__")
"""
SWAP_POINTS = ("before_seal", "before_retire", "after_retire", "after_rename")


def train(*args, check=True):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, check=check, timeout=600)


def records(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time_")} for line in lines if line]


def crash_during_swap(out, point, nth=2):
    script = CRASHING_TRAIN.format(root=str(ROOT), train=str(ROOT / "train.py"))
    proc = subprocess.run([sys.executable, "-c", script, point, str(nth), "--smoke", "--out", str(out)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 9, proc.stderr[-2000:]


def step_of(directory):
    return json.loads((directory / "progress.json").read_text())["step"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "whole"
    train("--smoke", "--out", out)
    return records(out)


@pytest.mark.parametrize("point", SWAP_POINTS)
def test_crash_at_any_step_of_the_swap_resumes_to_the_same_metrics(point, tmp_path, uninterrupted):
    out = tmp_path / "run"
    crash_during_swap(out, point)  # the second checkpoint is the one after GRPO step 2
    resumed = train("--resume", out)
    expected_step = 0 if point == "before_seal" else 2  # a sealed checkpoint.tmp is complete
    assert f"(step {expected_step})" in resumed.stderr
    assert records(out) == uninterrupted
    assert step_of(out / "checkpoint") == 4 and not (out / "checkpoint.tmp").exists()


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, uninterrupted):
    out = tmp_path / "run"
    crash_during_swap(out, "after_rename")  # checkpoint/ at step 2, checkpoint.prev/ at step 0
    assert step_of(out / "checkpoint") == 2 and step_of(out / "checkpoint.prev") == 0
    weights = out / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    resumed = train("--resume", out)
    assert "skipping a checkpoint" in resumed.stderr and "model.safetensors" in resumed.stderr
    assert "(step 0)" in resumed.stderr
    assert records(out) == uninterrupted


def test_no_sound_checkpoint_is_one_clear_line(tmp_path):
    out = tmp_path / "run"
    crash_during_swap(out, "after_rename")
    for ckpt in ("checkpoint", "checkpoint.prev"):
        weights = out / ckpt / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    failed = train("--resume", out, check=False)
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: no sound copy")
    assert "model.safetensors" in lines[0]


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_checkpoints_the_current_step_and_says_how_to_resume(signum, code, tmp_path):
    steps = 40
    whole = tmp_path / "whole"
    train("--smoke", "--steps", steps, "--out", whole)
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--smoke", "--steps", str(steps),
                             "--out", str(out)], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and '"kind": "train"' in metrics.read_text():
            break
        time.sleep(0.01)
    proc.send_signal(signum)
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode == code, stderr[-2000:]
    assert f"python train.py --resume {out}" in stderr.strip().splitlines()[-1]
    done = step_of(out / "checkpoint")
    assert 1 <= done < steps
    assert max(r["step"] for r in records(out) if r["kind"] == "train") == done
    train("--resume", out)
    assert records(out) == records(whole)


def test_signal_during_the_warmup_stops_cleanly(tmp_path):
    """Ctrl-C in the supervised warm-up: the warm-up ends at its next step and the run stops with one
    line and exit code 130, no traceback, and no checkpoint (there is nothing to resume yet)."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--smoke", "--sft-steps", "100000",
                             "--out", str(out)], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300  # run_config.json is written just before the warm-up starts
    while time.time() < deadline and proc.poll() is None and not (out / "run_config.json").exists():
        time.sleep(0.01)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "stopped by a signal during the warm-up" in stderr.strip().splitlines()[-1]
    assert not (out / "checkpoint").exists()


@pytest.mark.parametrize("signals", [1, 2])
def test_signal_during_an_evaluation_stops_cleanly(signals, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the first evaluation runs: it finishes, the checkpoint of step 0 is written and
    the run stops with the resume command (exit 130). A second Ctrl-C stops at once, still with one
    line and no traceback."""
    import train

    real_evaluate = train.evaluate

    def interrupted(trainer, examples):
        for _ in range(signals):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs between bytecodes of this thread
        return real_evaluate(trainer, examples)

    monkeypatch.setattr(train, "evaluate", interrupted)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        train.main(["--smoke", "--sft-steps", "2", "--out", str(out)])
    assert stop.value.code == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    if signals == 1:
        assert f"checkpoint saved. Continue with: python train.py --resume {out}" in last
        assert step_of(out / "checkpoint") == 0
    else:
        assert "stopped by a second signal" in last
        assert not (out / "checkpoint").exists()


def test_trainer_state_of_the_wrong_shape_is_named(tmp_path):
    out = tmp_path / "run"
    crash_during_swap(out, "after_rename")  # checkpoint/ at step 2
    from safetensors.torch import load_file, save_file
    state_file = out / "checkpoint" / "trainer_state.safetensors"
    state = load_file(state_file)
    key = next(k for k in state if k.endswith(".exp_avg"))
    state[key] = state[key].flatten()[:-1].clone()
    save_file(state, state_file)
    (out / "checkpoint" / "manifest.json").unlink()  # as if written elsewhere: each file opens
    shutil.rmtree(out / "checkpoint.prev")
    failed = train("--resume", out, check=False)
    lines = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert failed.returncode == 2 and len(lines) == 1, failed.stderr[-2000:]
    assert "trainer_state.safetensors is damaged" in lines[0] and key in lines[0]

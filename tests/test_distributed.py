"""train.py under torchrun (2 processes, gloo on CPU) against the same run in one process.

The reference is a single-process run with the same seed and global batch. Two processes must take
the same optimizer steps on the same data, so every metric that counts sampled tokens (reward,
accuracy, lengths, credit shares) must be equal, and the float metrics must agree to within:

TOLERANCE (rtol 1e-4, atol 1e-6). Why: the only differences allowed are fp32 summation order (the
gradient all-reduce, the token sums of the split micro-batch, other left padding in generate).
The unit roundoff is 6e-8 and these sums run over ~10^3 terms, so the relative error of one sum is
about sqrt(10^3) x 6e-8 = 2e-6 typically and 10^3 x 6e-8 = 6e-5 at worst; AdamW's normalised update
does not amplify it (the gradient noise is far below its eps 1e-8 relative to the gradient scale),
so three steps stay at that level (measured: at most 2e-5 relative on the loss, 1e-6 on grad_norm).
rtol 1e-4 covers the worst case; atol 1e-6 covers values that are themselves rounding noise
(logp_gen_gap ~3e-7, a loss near 0 made of +-1 terms). A real bug (a rank's gradient not averaged,
a wrong share of the micro-batch, a missing token-count rescale) moves them by 1e-2 or more.
Weights after the same steps must agree to WEIGHT_ATOL 1e-5: one AdamW step moves a weight by up to
lr = 2e-4, so a different update is 20x above it; rounding moves them by ~2e-8 (measured).

"Ranks hold identical parameters" (DDP) is the per-step metric replica_spread, which GRPO computes
from float64 sums and norms of every parameter tensor gathered from all ranks (distributed.py).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distributed import shard_range
from model import Transformer
from distributed import check_world_size
from rl import RLConfig, merge_rollouts, policy_loss

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = dict(rel=1e-4, abs=1e-6)
WEIGHT_ATOL = 1e-5
# The smoke configuration, with a warm-up short enough that the answer format is only half learned
# and longer responses, so that groups have reward spread (non-zero advantages, so the update is not
# a no-op), checked after every GRPO step. Constant lr: the runs compared end at different steps.
RUN = ["--smoke", "--sft-steps", "40", "--min-lr-ratio", "1", "--max-new-tokens", "64", "--eval-size", "8", "--eval-every", "2",
       "--checkpoint-every", "1"]
EXACT = ("kind", "step", "reward_mean", "reward_std", "accuracy", "avg_at_k", "k", "response_length",
         "truncated_frac", "zero_adv_frac", "gamma_mean", "amplified_frac")
CLOSE = ("loss", "grad_norm", "clip_frac", "approx_kl", "ratio_mean", "logp_gen_gap")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args, processes=1):
    """train.py in one process, or under torchrun; one thread per process, as torchrun sets it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    prefix = [sys.executable]
    if processes > 1:
        prefix += ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_addr=127.0.0.1",
                   f"--master_port={free_port()}"]
    return subprocess.run([*prefix, str(ROOT / "train.py"), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


def run_ok(*args, processes=1):
    proc = launch(*args, processes=processes)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """ref: one process, 3 steps. ddp, fsdp: two processes, 2 steps; ddp with --grad-accum 2 (each
    rank's 4 responses of a micro-batch in 2 chunks: the same steps as ref). resumed: fsdp's run
    continued to step 3 in one process (another process count and another wrapper)."""
    root = tmp_path_factory.mktemp("dist")
    out = SimpleNamespace(**{name: root / name for name in ("ref", "ddp", "fsdp")})
    run_ok(*RUN, "--steps", 3, "--out", out.ref)
    run_ok(*RUN, "--steps", 2, "--dist", "ddp", "--grad-accum", 2, "--out", out.ddp, processes=2)
    run_ok(*RUN, "--steps", 2, "--dist", "fsdp", "--out", out.fsdp, processes=2)
    out.fsdp_at_2 = Transformer.from_pretrained(out.fsdp / "model")
    run_ok("--resume", out.fsdp, "--steps", 3)
    return out


def assert_same_run(mine: list, reference: list):
    assert [(r["kind"], r["step"]) for r in mine] == [(r["kind"], r["step"]) for r in reference]
    for got, want in zip(mine, reference):
        for key in EXACT:
            assert got.get(key) == want.get(key), (got["kind"], got["step"], key, got.get(key), want.get(key))
        for key in CLOSE:
            if key in want:
                assert got[key] == pytest.approx(want[key], **TOLERANCE), (got["step"], key, got[key], want[key])


def assert_same_weights(a: Transformer, b: Transformer):
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert (x - y).abs().max().item() <= WEIGHT_ATOL, name


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_process(runs, mode):
    mine = [r for r in records(getattr(runs, mode)) if r["step"] <= 2]  # fsdp's run is later resumed
    reference = [r for r in records(runs.ref) if r["step"] <= 2]
    assert_same_run(mine, reference)
    assert any(r.get("zero_adv_frac", 1) < 1 and abs(r["loss"]) > 0 for r in mine)  # a real update happened
    train = [r for r in mine if r["kind"] == "train"]
    if mode == "ddp":
        assert [r["replica_spread"] for r in train] == [0.0, 0.0]  # both ranks hold identical parameters
    else:
        assert all("replica_spread" not in r for r in train)


def test_checkpoints_are_one_hugging_face_directory_whatever_the_wrapper(runs):
    for out in (runs.ddp, runs.fsdp):
        assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no half-written dirs
        for folder in (out / "model", out / "checkpoint"):
            assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    ddp = Transformer.from_pretrained(runs.ddp / "model")
    assert ddp.lm_head.weight is ddp.embed_tokens.weight
    assert_same_weights(ddp, runs.fsdp_at_2)  # both: the same two steps from the same start
    summary = json.loads((runs.ddp / "summary.json").read_text())
    assert summary["steps"] == 2


def test_fsdp_run_resumes_in_one_process(runs):
    mine, reference = records(runs.fsdp), records(runs.ref)
    assert_same_run(mine, reference)  # steps 1-2 from two FSDP ranks, step 3 from one process
    assert_same_weights(Transformer.from_pretrained(runs.fsdp / "model"),
                        Transformer.from_pretrained(runs.ref / "model"))


@pytest.mark.parametrize("case", ["rollout-batch", "micro-batch", "fsdp-one-process"])
def test_bad_layout_fails_on_every_rank_with_one_message(case, tmp_path):
    out = tmp_path / "out"
    args, processes, expected = {
        "rollout-batch": (["--rollout-batch", 12, "--micro-batch", 4], 2, "multiple of processes x group_size"),
        "micro-batch": (["--micro-batch", 1], 2, "micro_batch_size (1) must be a multiple of the number of processes"),
        "fsdp-one-process": (["--dist", "fsdp"], 1, "launch with `torchrun"),
    }[case]
    proc = launch("--smoke", *args, "--out", out, processes=processes)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-3000:]
    if processes > 1:
        # torchrun's report lists the failed ranks: both (each exits with 2, or with SIGTERM when
        # torchrun stops it first after rank 0 failed)
        assert proc.stderr.count("exitcode  :") == 2 and "rank      : 1" in proc.stderr
    assert not out.exists()  # nothing written, so nothing half-written


# -----------------------------------------------------------------------------
# the pieces, without processes


def test_check_world_size():
    check_world_size(RLConfig(group_size=4, rollout_batch_size=16, micro_batch_size=8), 2)
    check_world_size(RLConfig(group_size=4, rollout_batch_size=16, micro_batch_size=4), 4)
    with pytest.raises(ValueError, match=r"processes x group_size \(4 x 4 = 16\)"):
        check_world_size(RLConfig(group_size=4, rollout_batch_size=8, micro_batch_size=8), 4)
    with pytest.raises(ValueError, match=r"micro_batch_size \(2\) must be a multiple .* \(4\)"):
        check_world_size(RLConfig(group_size=2, rollout_batch_size=16, micro_batch_size=2), 4)
    check_world_size(RLConfig(group_size=4, rollout_batch_size=16, micro_batch_size=8, grad_accum=2), 2)
    with pytest.raises(ValueError, match=r"grad_accum \(4\) must divide each process's share .* 8 / 4 = 2\)"):
        check_world_size(RLConfig(group_size=4, rollout_batch_size=16, micro_batch_size=8, grad_accum=4), 4)


def test_shard_range_blocks_cover_everything_once():
    for n, world in ((16, 2), (7, 3), (2, 4)):
        blocks = [shard_range(n, r, world) for r in range(world)]
        assert [i for lo, hi in blocks for i in range(lo, hi)] == list(range(n))
        assert max(hi - lo for lo, hi in blocks) - min(hi - lo for lo, hi in blocks) <= 1


@pytest.mark.parametrize("norm", ["sequence", "token"])
def test_rank_shares_of_a_micro_batch_average_to_its_loss_and_gradient(norm):
    """What update() relies on: two ranks' losses (token norm rescaled by world x tokens / all
    tokens), averaged as DDP averages gradients, equal the whole micro-batch's loss and gradient."""
    g = torch.Generator().manual_seed(0)
    B, T = 4, 6
    logp = (-torch.rand(B, T, generator=g)).requires_grad_()
    old, gamma = -torch.rand(B, T, generator=g), 1 + torch.rand(B, T, generator=g)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6, [0, 0, 0, 0, 0, 1], [0, 1, 1, 1, 1, 1]], dtype=torch.float)
    whole, _ = policy_loss(logp, old, adv, gamma, mask, norm=norm)
    (whole_grad,) = torch.autograd.grad(whole, logp)
    shares = []
    for rows in (slice(0, 2), slice(2, 4)):
        loss, _ = policy_loss(logp[rows], old[rows], adv[rows], gamma[rows], mask[rows], norm=norm)
        if norm == "token":
            loss = loss * (2 * mask[rows].sum() / mask.sum())
        shares.append(loss)
    averaged = (shares[0] + shares[1]) / 2
    (averaged_grad,) = torch.autograd.grad(averaged, logp)
    assert averaged.item() == pytest.approx(whole.item(), rel=1e-6)
    assert torch.allclose(averaged_grad, whole_grad, atol=1e-7)


def test_rollout_samples_do_not_depend_on_how_the_batch_is_split():
    """Per-response seeds: rolling out two halves (as two ranks do) samples the tokens of one call."""
    from test_rl import EXAMPLES, _trainer

    trainer = _trainer("none")
    whole = trainer.rollout(EXAMPLES, seed=7)
    halves = merge_rollouts([trainer.rollout(EXAMPLES[:2], seed=7, first=0),
                             trainer.rollout(EXAMPLES[2:], seed=7, first=2 * trainer.config.group_size)])
    assert halves.response_ids == whole.response_ids
    assert torch.equal(halves.advantages, whole.advantages)
    for a, b in zip(halves.gen_logp, whole.gen_logp):
        assert a == pytest.approx(b, abs=1e-5)

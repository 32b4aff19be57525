"""Several processes, one run: the torch.distributed pieces train.py and rl.py use.

`torchrun --nproc_per_node=N train.py ...` starts N copies of train.py with RANK, LOCAL_RANK and
WORLD_SIZE in the environment. `setup()` joins them into one process group, `wrap()` makes the
model data parallel with PyTorch's own engines, and the rest are the few collectives the GRPO
loop needs. With one process (no WORLD_SIZE) every function here is the plain single-process
behaviour, so the same code runs either way.

    --dist ddp    DistributedDataParallel: every rank holds the whole model and AdamW state;
                  gradients are averaged across ranks in the backward.
    --dist fsdp   FSDP2 `fully_shard` on each Block and then on the root: parameters, gradients
                  and AdamW state are split N ways; a layer's weights are all-gathered just
                  before it runs and freed after, gradients are reduce-scattered.

Project defaults (decided here, in one place):
- Backend nccl on GPUs (one GPU per process, chosen by LOCAL_RANK), gloo on CPUs.
- `--dist` defaults to ddp whenever WORLD_SIZE > 1; `--dist fsdp` in one process is an error
  (there is nothing to shard over), `--dist ddp` in one process is the plain run.
- FSDP gathers the whole model once for each no-grad phase (generation, the credit pass, old
  log-probs, evaluation; `gathered()`). Ranks decode different numbers of steps, so per-layer
  all-gathers inside `generate` would pair up collectives of different steps and hang; one
  gather per phase also avoids a gather per layer per token. The cost is one full copy of the
  weights per GPU during those phases (see the memory table of docs/performance.md).
- Checkpoints are gathered to rank 0 in full (`full_state_dict`, on CPU) and written by it in the
  Hugging Face layout, whatever the wrapper: a run can resume with another N or another --dist.
"""

import os
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

MODES = ("ddp", "fsdp")


def launched_world_size() -> int:
    """Processes started by torchrun (1 without it); readable before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def parallel_mode(requested: str | None) -> str | None:
    """The wrapper to use: None (one process), "ddp" or "fsdp"; a clear error for a bad choice."""
    if requested is not None and requested not in MODES:
        raise ValueError(f"unknown --dist {requested!r}; expected one of {MODES}")
    if launched_world_size() == 1:
        if requested == "fsdp":
            raise ValueError("--dist fsdp shards the model across processes, but this is one process: launch "
                             "with `torchrun --nproc_per_node=N train.py ...` (N >= 2), or drop --dist")
        return None
    return requested or "ddp"


def setup(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (a no-op without torchrun); returns this rank's device.

    On CUDA each process takes GPU LOCAL_RANK, so `--device cuda` means "my GPU" on every rank.
    """
    if launched_world_size() == 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def teardown():
    """Leave the process group together: a rank that destroys it while another still works (rank 0
    drawing the final pictures) can take gloo's threads down with it (seen once: SIGABRT at exit)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous block of n items; block sizes differ by at most one."""
    return n * rank // world_size, n * (rank + 1) // world_size


def check_world_size(config, world_size: int):
    """The batch sizes of config (rl.RLConfig) must split evenly over world_size processes: whole
    groups per rank for the rollout, equal parts of every micro-batch for the update, each in
    grad_accum equal chunks."""
    if config.rollout_batch_size % (world_size * config.group_size):
        raise ValueError(f"rollout_batch_size ({config.rollout_batch_size}) must be a multiple of processes x "
                         f"group_size ({world_size} x {config.group_size} = {world_size * config.group_size}), "
                         f"so that every process rolls out whole groups")
    if config.micro_batch_size % world_size:
        raise ValueError(f"micro_batch_size ({config.micro_batch_size}) must be a multiple of the number of "
                         f"processes ({world_size}): each optimizer step splits its micro-batch evenly over them")
    per_rank = config.micro_batch_size // world_size
    if per_rank % config.grad_accum:
        raise ValueError(f"grad_accum ({config.grad_accum}) must divide each process's share of the micro-batch "
                         f"(micro_batch_size / processes = {config.micro_batch_size} / {world_size} = {per_rank})")


def chunks(seq, size: int) -> list:
    seq = list(seq)
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def my_chunks(order: list, micro_batch_size: int, grad_accum: int) -> list:
    """This rank's share of the update: order (the shuffled responses) is cut into micro-batches of
    micro_batch_size, each micro-batch into world_size equal parts, and this rank's part into
    grad_accum equal chunks. Returns [micro-batch][chunk] -> response indices."""
    part = micro_batch_size // world_size()
    mine = [rows[rank() * part:(rank() + 1) * part] for rows in chunks(order, micro_batch_size)]
    return [chunks(rows, part // grad_accum) for rows in mine]


def grad_sync(policy, parallel: str | None, last: bool):
    """DDP all-reduces the accumulated gradient once, in the last chunk's backward. FSDP
    reduce-scatters every chunk, which keeps the gradient sharded (the memory the chunks save)."""
    if parallel == "ddp" and not last:
        return policy.no_sync()
    return nullcontext()


def whole_batch_means(logs: list, world: int) -> dict:
    """Per-step logs of this rank -> means over the steps of the whole micro-batches' values.

    Each log holds the rank's loss, its token-mean diagnostics times its token count, and that
    count; summed over ranks, loss / world is the micro-batch's loss (what the averaged gradient
    is the gradient of) and diagnostic / tokens its token mean.
    """
    keys = list(logs[0])
    total = all_reduce_sum(torch.tensor([[log[key] for key in keys] for log in logs], dtype=torch.float64))
    per_step = {key: total[:, i] for i, key in enumerate(keys)}  # (n_steps,) each
    tokens = per_step.pop("tokens").clamp(min=1)
    out = {"loss": (per_step.pop("loss") / world).mean().item()}
    out.update({key: (value / tokens).mean().item() for key, value in per_step.items()})
    return out


def barrier():
    if is_distributed():
        dist.barrier()


def all_gather_objects(obj) -> list:
    """[rank 0's obj, rank 1's obj, ...] on every rank (picklable objects); [obj] in one process."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Elementwise sum over ranks of a small tensor (a copy; the input is untouched)."""
    if not is_distributed():
        return t.clone()
    out = t.detach().to(_comm_device(), copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


def broadcast_parameters(model: torch.nn.Module):
    """Copy rank 0's parameters to every rank (weights trained in this process, e.g. the warm-up)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for p in model.parameters():
            buf = p.detach().to(_comm_device(), copy=True)
            dist.broadcast(buf, src=0)
            p.copy_(buf)


# -----------------------------------------------------------------------------
# The two wrappers


def wrap(model: torch.nn.Module, mode: str | None) -> torch.nn.Module:
    """The module whose forward the update calls: the model itself, DDP(model), or the model
    sharded in place by FSDP2. Build the optimizer from model.parameters() after this."""
    if mode is None:
        return model
    if mode == "ddp":
        device_ids = [model.device.index] if model.device.type == "cuda" else None
        # the only buffer (RoPE inv_freq) is a constant: no need to broadcast it every forward;
        # gradients live in DDP's all-reduce buckets instead of beside them (4 bytes/param saved)
        return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False,
                                       gradient_as_bucket_view=True)
    if mode == "fsdp":
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)  # after the blocks: the root holds embedding, final norm and the tied head
        # FSDP elects its root at the first forward; make it the whole model now, since the
        # first call may be generate or hidden_states, which only the blocks' hooks would see
        with torch.no_grad():
            model(torch.zeros(1, 1, dtype=torch.long, device=model.device))
        model.reshard()
        return model
    raise ValueError(f"unknown --dist {mode!r}; expected one of {MODES}")


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextmanager
def gathered(model: torch.nn.Module):
    """FSDP: hold every parameter whole for a no-grad phase, then shard again (no-op otherwise).

    Every rank must enter and leave together (the gather is a collective).
    """
    if not is_sharded(model):
        yield
        return
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    model.set_reshard_after_forward(False)
    for m in fsdp_modules:
        m.unshard()
    try:
        yield
    finally:
        for m in fsdp_modules:
            m.reshard()
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # FSDP's own choice for the root


def full_state_dict(model: torch.nn.Module) -> dict:
    """{parameter name: whole tensor on CPU} on rank 0 ({} on other ranks). A collective under FSDP."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (e.g. the grad norm FSDP computes across shards); others unchanged."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def replica_spread(model: torch.nn.Module) -> float:
    """Largest gap between any rank's parameters and rank 0's, over per-tensor float64 sums and
    norms: 0.0 when the DDP replicas agree, as averaged gradients and identical AdamW steps keep them."""
    with torch.no_grad():
        mine = torch.stack([torch.stack([p.sum(dtype=torch.float64), torch.linalg.vector_norm(p, dtype=torch.float64)])
                            for p in model.parameters()]).cpu()  # (n_tensors, 2)
    parts = all_gather_objects(mine)
    return max((part - parts[0]).abs().max().item() for part in parts)

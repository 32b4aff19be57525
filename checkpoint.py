"""Files on disk: safetensors and JSON in and out, directories swapped in whole, and what a
training run needs to resume (its checkpoint folder and the trainer state).

- Reading: read_json, open_safetensors and weight_files turn a damaged file into DamagedFile, one
  line naming the file (train.py prints it as `error: ...`, exit 2).
- Writing: atomic_directory stages a directory beside its target, seals it (a manifest of every
  file's size and tensor count, then fsync) and swaps it in with renames, so a crash at any
  instant leaves one complete copy; newest_sound_directory finds it again.
- Resuming: a run's checkpoint/ holds the weights (model.py writes them), the tokenizer,
  trainer_state.safetensors (trainer_state: RNG, step count, AdamW moments and lr by parameter
  name, never pickle) and progress.json; find_checkpoint picks the newest sound copy.

This file knows tensors by name only; the Hugging Face naming of the weights is model.py's.
"""

import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

from distributed import is_distributed, rank

CHECKPOINT_FILES = ("config.json", "tokenizer.json", "trainer_state.safetensors", "progress.json")
# The dtypes a weight may be stored in (safetensors' names); others (int, fp8 with scales) are refused.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# A checkpoint that matches the wrong config can mismatch in every tensor: name a few, count the rest.
MAX_PROBLEMS_SHOWN = 5


class DamagedFile(ValueError):
    """A file that is there but cannot be what it claims (truncated, not JSON, wrong tensors).

    The message is one line that names the file; train.py reports it as `error: ...`, exit 2.
    """


def read_json(file: Path):
    """json.loads of a file, or DamagedFile naming the file and where the parse failed."""
    try:
        return json.loads(Path(file).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DamagedFile(f"{file} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except UnicodeDecodeError:
        raise DamagedFile(f"{file} is not valid JSON: it is not UTF-8 text") from None


@contextmanager
def open_safetensors(file: Path):
    """safe_open for reading; a truncated or foreign file becomes DamagedFile naming it."""
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            yield f
    except SafetensorError as err:
        raise DamagedFile(f"{file} is damaged (truncated or not a safetensors file): {err}") from None


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a Hugging Face checkpoint directory: one file, or the shards its index lists."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise DamagedFile(f"{index} has no 'weight_map' object")
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists shard(s) that are not in {path}: {', '.join(absent)}")
        return files
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def read_tensors(path: Path, expected: dict, optional: tuple = (), dtype=None, device=None) -> dict:
    """{key: tensor} of the safetensors files of a checkpoint directory, each read from the
    memory-mapped file and cast to dtype (default: the file's) on device. Every tensor must be one of
    expected {key: shape} with that shape and a float dtype, and every expected key but the optional
    ones must be there; without dtype, all must share one. Else one DamagedFile names the problems."""
    found, problems, dtypes = {}, [], {}
    for file in weight_files(path):
        with open_safetensors(file) as f:
            for key in f.keys():
                if key not in expected:
                    problems.append(f"unexpected tensor {key} in {file.name}")
                    continue
                info = f.get_slice(key)
                shape, stored = tuple(info.get_shape()), info.get_dtype()
                if shape != tuple(expected[key]):
                    problems.append(f"tensor {key} in {file.name} has shape {shape}, expected {tuple(expected[key])}")
                    continue
                if stored not in FLOAT_DTYPES:
                    problems.append(f"tensor {key} in {file.name} has dtype {stored}, expected a float type")
                    continue
                dtypes.setdefault(stored, key)
                found[key] = f.get_tensor(key).to(device=device, dtype=dtype)
    if dtype is None and len(dtypes) > 1:  # one module would compute in another's precision
        problems.append(f"tensors of several dtypes ({', '.join(f'{d} e.g. {k}' for d, k in dtypes.items())}): "
                        "pass dtype= to load them as one")
    problems += [f"missing tensor {key} (expected shape {tuple(expected[key])})"
                 for key in sorted(expected.keys() - found.keys() - set(optional))]
    if problems:
        shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
        more = f" (and {len(problems) - MAX_PROBLEMS_SHOWN} more)" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        raise DamagedFile(f"checkpoint {path} does not match its config.json: {shown}{more}")
    return found


def split_into_shards(tensors: dict, max_bytes: int) -> list[dict]:
    shards, size = [{}], 0
    for key, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += t.nbytes
    return shards


def is_weights_or_config(name: str) -> bool:
    """A file that a save of the weights writes (and replaces): config.json and the safetensors."""
    return name in ("config.json", "model.safetensors", "model.safetensors.index.json") or (
        name.startswith("model-") and name.endswith(".safetensors"))


def write_safetensors(directory: Path, tensors: dict, max_shard_bytes: int):
    """{key: tensor} as model.safetensors, or as shards of at most max_shard_bytes with the index
    transformers reads (model.safetensors.index.json), into an existing directory."""
    shards = split_into_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def append_jsonl(path: Path, record: dict):
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# -----------------------------------------------------------------------------
# Directories swapped in whole


# Written last into a staged directory: every file's size and, for safetensors, its tensor count.
# Its presence says the staging finished; its entries let a reader check each file (check_directory).
MANIFEST = "manifest.json"


def swap_names(path: Path) -> tuple[Path, Path]:
    """(staging, retired) beside path: the copy being written, and the copy path held before."""
    return path.with_name(path.name + ".tmp"), path.with_name(path.name + ".prev")


@contextmanager
def atomic_directory(path, keep=lambda name: False, keep_previous=False):
    """Fill a staging directory, then swap it in for path: a crash at any instant leaves a
    complete copy (path, or the staging / retired copy beside it, see newest_sound_directory).

    The steps: write path.tmp; seal it (a manifest, then fsync); retire path to path.prev; rename
    path.tmp to path. Files of the old directory for which keep(name) is true are carried over.
    keep_previous leaves path.prev in place as the fallback for a later-damaged path (a damaged
    path is deleted instead of retired, so the fallback stays a good copy); without it path.prev
    is deleted once the swap is done. Nothing is swapped in if the block raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging, retired = swap_names(path)
    shutil.rmtree(staging, ignore_errors=True)  # left by a writer that was killed
    staging.mkdir()
    try:
        yield staging
        if path.is_dir():
            for old in path.iterdir():
                if keep(old.name) and not (staging / old.name).exists():
                    (shutil.copytree if old.is_dir() else shutil.copy2)(old, staging / old.name)
        seal(staging)
        if path.exists():
            if keep_previous and not is_sound(path):
                shutil.rmtree(path)
            else:
                shutil.rmtree(retired, ignore_errors=True)
                os.replace(path, retired)
        os.replace(staging, path)
        fsync(path.parent)
        if not keep_previous:
            shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def seal(directory: Path):
    """Write the manifest of a finished directory and flush everything to disk; opening each
    safetensors file to count its tensors also proves it reads back."""
    entries = {}
    for file in sorted(f for f in directory.rglob("*") if f.is_file() and f.name != MANIFEST):
        entry = {"bytes": file.stat().st_size}
        if file.suffix == ".safetensors":
            with open_safetensors(file) as f:
                entry["tensors"] = len(f.keys())
        entries[file.relative_to(directory).as_posix()] = entry
        fsync(file)
    (directory / MANIFEST).write_text(json.dumps(entries, indent=1))
    fsync(directory / MANIFEST)
    fsync(directory)


def check_directory(directory: Path, require_manifest: bool = False):
    """DamagedFile unless every file of directory reads: with a manifest, each listed file has its
    size and tensor count; without one (a directory from elsewhere), each safetensors opens and
    each JSON parses. require_manifest: a directory without one was never finished."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        if require_manifest:
            raise DamagedFile(f"{directory} is unfinished: no {MANIFEST} (the writer stopped before the end)")
        entries = {f.relative_to(directory).as_posix(): {} for f in directory.rglob("*") if f.is_file()}
    else:
        entries = read_json(manifest)
        if not isinstance(entries, dict):
            raise DamagedFile(f"{manifest} holds no object of file entries")
    for name, entry in entries.items():
        file = directory / name
        if not file.is_file():
            raise DamagedFile(f"{file} is missing (listed in {MANIFEST})")
        if "bytes" in entry and file.stat().st_size != entry["bytes"]:
            raise DamagedFile(f"{file} is damaged: {file.stat().st_size} bytes where {entry['bytes']} were written")
        if file.suffix == ".safetensors":
            with open_safetensors(file) as f:
                count = len(f.keys())
            if "tensors" in entry and count != entry["tensors"]:
                raise DamagedFile(f"{file} is damaged: {count} tensors where {entry['tensors']} were written")
        elif file.suffix == ".json":
            read_json(file)


def is_sound(directory: Path) -> bool:
    try:
        check_directory(directory)
    except (DamagedFile, OSError):
        return False
    return True


def newest_sound_directory(path, required=()) -> tuple[Path, list[str]]:
    """The newest complete copy of a directory atomic_directory writes, and why newer ones were passed over.

    Newest first: path.tmp when sealed (a swap stopped before it was renamed in), path, path.prev.
    Each must pass check_directory and hold the files in required. DamagedFile when none does.
    """
    path = Path(path)
    staging, retired = swap_names(path)
    passed_over = []
    for candidate, sealed in ((staging, True), (path, False), (retired, False)):
        if not candidate.is_dir() or (candidate == staging and not (staging / MANIFEST).is_file()):
            continue
        try:
            check_directory(candidate, require_manifest=sealed)
            missing = [name for name in required if not (candidate / name).is_file()]
            if missing:
                raise DamagedFile(f"{candidate} lacks {', '.join(missing)}")
        except (DamagedFile, OSError) as err:
            passed_over.append(str(err))
            continue
        return candidate, passed_over
    found = "; ".join(passed_over) if passed_over else "none of them exists"
    raise DamagedFile(f"no sound copy of {path} ({path.name}, {staging.name}, {retired.name}): {found}")


def fsync(path: Path):
    """Flush a file or a directory entry to disk, so a renamed-in copy survives a power cut too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -----------------------------------------------------------------------------
# A training run's checkpoint


def find_checkpoint(out: Path, quiet: bool = False) -> Path:
    """The newest checkpoint of the run in out that verifies (checkpoint/, or the copy a crash
    during its swap left: checkpoint.tmp sealed, or checkpoint.prev); says which, and why newer
    ones were passed over. DamagedFile when none verifies."""
    ckpt, passed_over = newest_sound_directory(out / "checkpoint", required=CHECKPOINT_FILES)
    if not quiet:
        for reason in passed_over:
            print(f"resume: skipping a checkpoint: {reason}", file=sys.stderr)
        print(f"resume: from {ckpt} (step {read_progress(ckpt)['step']})", file=sys.stderr)
    return ckpt


def read_progress(ckpt: Path) -> dict:
    progress = read_json(ckpt / "progress.json")
    if not isinstance(progress, dict) or not isinstance(progress.get("step"), int):
        raise DamagedFile(f"{ckpt / 'progress.json'} is damaged: no integer 'step'")
    return progress


def trainer_state(model, optimizer, rng: torch.Generator, steps: int) -> dict:
    """A GRPO trainer's state as a flat dict of tensors: RNG, step count, AdamW moments and lr.

    The moments are whole (never sharded) and keyed by parameter name, "optim.<name>.exp_avg",
    so they load into any number of processes under either wrapper. In a process group this is
    a collective and only rank 0 gets the moments. They may share memory with the live
    optimizer state: save them before the next step.
    """
    out = {"rng": rng.get_state(), "steps": torch.tensor(steps, dtype=torch.long)}
    sd = {}
    if optimizer.state:  # before the first update there are no moments (and asking torch for
        # them would initialise them with a zero-gradient AdamW step, which counts as a step)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_optimizer_state_dict(model, optimizer, options=options)
    for name, state in sd.get("state", {}).items():
        for key, value in state.items():
            out[f"optim.{name}.{key}"] = torch.as_tensor(value).contiguous()
    for g, group in enumerate(optimizer.param_groups):
        out[f"optim.group{g}.lr"] = torch.tensor(float(group["lr"]), dtype=torch.float64)
    return out


def restore_trainer_state(state: dict, model, optimizer, rng: torch.Generator) -> int:
    """Load what trainer_state() returned into optimizer and rng; returns the step count.

    In a process group every rank calls this; only rank 0's moments are read (they are
    broadcast and sharded as the wrapper needs), so other ranks may pass the state without them.
    """
    rng.set_state(state["rng"])
    steps = int(state["steps"])
    moments = {}
    for key, value in state.items():
        if not key.startswith("optim."):
            continue
        name, slot = key.removeprefix("optim.").rsplit(".", 1)  # e.g. "layers.0.mlp.up_proj.weight", "exp_avg"
        if name.startswith("group") and slot == "lr":
            optimizer.param_groups[int(name[5:])]["lr"] = float(value)
        else:
            moments.setdefault(name, {})[slot] = value
    if steps == 0:  # saved before the first update: AdamW has no moments yet
        return steps
    names = {p: name for name, p in model.named_parameters()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[p] for p in g["params"]]}
              for g in optimizer.param_groups]
    full = {"state": moments, "param_groups": groups}
    if is_distributed():
        set_optimizer_state_dict(model, optimizer, full if rank() == 0 else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        set_optimizer_state_dict(model, optimizer, full)
    return steps


def load_trainer_state(path: Path, with_moments: bool) -> dict:
    """trainer_state.safetensors; ranks other than 0 skip the AdamW moments (rank 0 broadcasts them)."""
    with open_safetensors(path) as f:
        return {key: f.get_tensor(key) for key in f.keys()
                if with_moments or not key.startswith("optim.") or key.endswith(".lr")}


def check_trainer_state(state: dict, model, path: Path):
    """DamagedFile unless the trainer state fits the model: its RNG and step count, and AdamW
    moments of each named parameter's shape in fp32 (a wrong one would load silently or fail deep
    inside torch)."""
    for key in ("rng", "steps"):
        if key not in state:
            raise DamagedFile(f"{path} is damaged: it holds no {key!r}")
    params = dict(model.named_parameters())
    for key, tensor in state.items():
        if not key.startswith("optim.") or key.endswith(".lr"):
            continue
        name, slot = key.removeprefix("optim.").rsplit(".", 1)
        if name not in params:
            raise DamagedFile(f"{path} is damaged: {key} belongs to no parameter of the model")
        if slot in ("exp_avg", "exp_avg_sq") and (tuple(tensor.shape) != tuple(params[name].shape)
                                                  or tensor.dtype != torch.float32):
            raise DamagedFile(f"{path} is damaged: {key} is {tensor.dtype} {tuple(tensor.shape)}, the parameter "
                              f"needs float32 {tuple(params[name].shape)}")

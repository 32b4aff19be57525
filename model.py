"""A Qwen3 transformer in one file: attention maps on request, KV-cache generation, and
Hugging Face checkpoints (config.json + safetensors) in and out.

Read it top to bottom: config, the four building blocks (RMSNorm, RoPE, Attention, MLP), the
Transformer that stacks them, generation, then loading and saving (the Hugging Face names here,
the files in checkpoint.py). The numbers match transformers' Qwen3ForCausalLM; tests/test_model.py
checks that on random checkpoints. The defaults are Qwen3Config's (Qwen3-0.6B's shape); the
project decides nothing here that transformers does not.
"""

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import DamagedFile, atomic_directory, is_weights_or_config, read_json, read_tensors, write_safetensors


# -----------------------------------------------------------------------------
# Config


@dataclass
class Qwen3Config:
    """The fields of a Hugging Face Qwen3 config.json that define the network (defaults: Qwen3-0.6B)."""

    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 40960
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    # Fields a config.json must give; the rest fall back to transformers' Qwen3Config defaults.
    REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    HF_DEFAULTS = dict(head_dim=128, rms_norm_eps=1e-6, rope_theta=10_000.0, tie_word_embeddings=False,
                       max_position_embeddings=32768)

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3Config":
        """Build from a config.json dict; anything this file does not implement is an error, not a guess."""
        if d.get("model_type") != "qwen3":
            raise ValueError(f"unsupported model_type {d.get('model_type')!r}: this file implements 'qwen3' only")
        missing = [name for name in cls.REQUIRED if name not in d]
        if missing:
            raise ValueError(f"config.json is missing required field(s): {', '.join(missing)}")
        unsupported = {
            "hidden_act": (d.get("hidden_act", "silu"), "silu"),
            "attention_bias": (d.get("attention_bias", False), False),
            "use_sliding_window": (d.get("use_sliding_window", False), False),
        }
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        unsupported["rope_type"] = (rope.get("rope_type", rope.get("type", "default")), "default")
        for name, (found, wanted) in unsupported.items():
            if found != wanted:
                raise ValueError(f"config.json has {name}={found!r}; only {name}={wanted!r} is implemented")
        values = {**cls.HF_DEFAULTS, **{f.name: d[f.name] for f in fields(cls) if f.name in d}}
        if "rope_theta" in rope:  # newer files keep theta inside rope_parameters
            values["rope_theta"] = rope["rope_theta"]
        values.setdefault("num_key_value_heads", d["num_attention_heads"])
        if values["num_key_value_heads"] is None:
            values["num_key_value_heads"] = d["num_attention_heads"]
        return cls(**values)

    def to_dict(self, dtype: torch.dtype = torch.float32) -> dict:
        """A config.json dict that transformers (old and new) reads as Qwen3ForCausalLM."""
        d = asdict(self)
        d.update(
            architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_act="silu", attention_bias=False,
            attention_dropout=0.0, use_sliding_window=False, sliding_window=None, rope_scaling=None,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            torch_dtype=str(dtype).removeprefix("torch."), use_cache=True,
        )
        return d


# -----------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back before the weight (as Qwen3 does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions, inv_freq, dtype):
    """cos and sin tables for integer positions (B, T) -> each (B, 1, T, D), split-half layout."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    """Rotate each (first half, second half) pair of x (B, H, T, D) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attention_probs(q, k, mask):
    """Explicit post-softmax attention (B, H, T, S), the eager path that hands maps back.

    q (B, H, T, D), k (B, Hkv, S, D), mask (B, 1, T, S) bool, True = may attend.
    Scores in the input dtype and softmax in fp32, like transformers' eager attention.
    """
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)  # (B, H, S, D)
    scores = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5  # (B, H, T, S)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)


class KVCache:
    """Keys and values of every layer, preallocated for the whole generation: (B, Hkv, T_max, D) each.

    dtype is the compute dtype (Transformer.compute_dtype): bf16 under bf16 autocast, where the
    attention kernels round k and v to bf16 anyway, so an fp32 cache would double its memory and
    change no result.
    """

    def __init__(self, config: Qwen3Config, batch_size: int, max_len: int, dtype, device):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.length = 0  # positions filled so far (the same for every row: rows are left padded)

    def update(self, layer: int, k, v):
        """Append k, v (B, Hkv, T, D) of one layer and return all keys and values so far."""
        end = self.length + k.size(2)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Grouped-query attention with per-head RMSNorm on q and k before RoPE, no biases."""

    def __init__(self, config: Qwen3Config, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, return_probs=False):
        """x (B, T, C) -> (output (B, T, C), probs (B, H, T, S) or None, (q, k) as fed to the softmax).

        mask is None for a plain causal batch with no padding, else (B, 1, T, S) bool.
        """
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.head_dim)).transpose(1, 2)  # (B, H, T, D)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, S, D)
        probs = None
        if return_probs:
            if mask is None:
                mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(k.size(2) - T)[None, None]
            probs = attention_probs(q, k, mask)
            y = probs @ v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               enable_gqa=self.n_head != self.n_kv_head)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y), probs, (q, k)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: Qwen3Config, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache=None, return_probs=False):
        a, probs, qk = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, return_probs)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, probs, qk


def attention_mask_4d(key_valid, q_len):
    """Which keys each query may see: (B, S) key validity -> (B, 1, T, S) bool for the last T queries.

    Query t sees key s when s is not after it and s is a real token; a padding query sees itself
    only, so its softmax row is never empty (its output is ignored anyway).
    """
    S = key_valid.size(1)
    q_pos = torch.arange(S - q_len, S, device=key_valid.device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=key_valid.device)[None, :]  # (1, S)
    causal = k_pos <= q_pos  # (T, S)
    return (causal & key_valid[:, None, :] | (k_pos == q_pos))[:, None]  # (B, 1, T, S)


def positions_from_mask(attention_mask):
    """Left padding: each row's positions count from its first real token (padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# -----------------------------------------------------------------------------
# The model


def hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face checkpoint key (the decoder lives under 'model.')."""
    return name if name.startswith("lm_head.") else "model." + name


class Transformer(nn.Module):
    """Qwen3ForCausalLM: token embedding, a stack of Blocks, final RMSNorm, output head."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)
        self.apply(self._init_weights)

    def _inv_freq(self, device=None):
        d = self.config.head_dim
        return 1.0 / self.config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float, device=device) / d)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def device(self):
        return self.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.embed_tokens.weight.dtype

    @property
    def compute_dtype(self):
        """The dtype matmuls and attention run in here: autocast's when it is on, else the weights'."""
        device_type = self.device.type
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return self.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once

    def _check_length(self, T):
        if T > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {T} tokens is longer than max_position_embeddings "
                f"({self.config.max_position_embeddings})")

    def hidden_states(self, input_ids, attn_layers=(), attention_mask=None, qk_layers=()):
        """Run the decoder: (B, T) ids -> (final-normed hidden states (B, T, C), attn, qk).

        attn: {layer: post-softmax probabilities (B, H, T, T)} for each layer in attn_layers; only
        those layers pay for explicit maps, every other layer uses scaled_dot_product_attention.
        qk: {layer: (q (B, H, T, D), k (B, Hkv, T, D))} after q/k norm and RoPE, for qk_layers, so
        attention statistics can be computed in tiles without the (T, T) maps.
        attention_mask (B, T): 1 = token, 0 = left padding.
        """
        B, T = input_ids.shape
        self._check_length(T)
        for layer in (*attn_layers, *qk_layers):
            if not 0 <= layer < len(self.layers):
                raise ValueError(f"layer index {layer} is out of range for a model with {len(self.layers)} layers")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {(B, T)}")
        if attention_mask is None or bool(attention_mask.all()):
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
            mask = None
        else:
            positions = positions_from_mask(attention_mask)
            mask = attention_mask_4d(attention_mask.bool(), T)
        x = self.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        attn, qk = {}, {}
        for i, block in enumerate(self.layers):
            x, probs, block_qk = block(x, cos, sin, mask, return_probs=i in attn_layers)
            if probs is not None:
                attn[i] = probs
            if i in qk_layers:
                qk[i] = block_qk
        return self.norm(x), attn, qk

    def forward(self, input_ids, attn_layers=(), attention_mask=None, logits_to_keep=0):
        """(B, T) token ids -> (logits (B, T, V), {layer: attention probabilities (B, H, T, T)}).

        logits_to_keep > 0 computes the logits of the last logits_to_keep positions only,
        (B, logits_to_keep, V), as transformers does: a loss over the response tokens then never
        builds the (B, T, V) tensor, and it still runs through forward, which is what DDP and FSDP hook.
        """
        h, attn, _ = self.hidden_states(input_ids, attn_layers, attention_mask)
        return self.lm_head(h[:, -logits_to_keep:]), attn

    # -------------------------------------------------------------------------
    # Generation

    def _decode(self, ids, positions, key_valid, cache):
        """Feed ids (B, T) through the cache; logits (B, V) of the last position only."""
        x = self.embed_tokens(ids)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        T = ids.size(1)
        mask = None if (T == 1 and bool(key_valid.all())) else attention_mask_4d(key_valid, T)
        for block in self.layers:
            x, _, _ = block(x, cos, sin, mask, cache)
        cache.length += T
        return head_logits(self.lm_head.weight, self.norm(x[:, -1]))

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, stop_ids=(), seed=None,
                 return_logprobs=False):
        """Continue a list of prompts (token-id lists of any lengths) as one left-padded batch.

        Returns the new tokens of each row (a stop token is kept when emitted; rows stop on their
        own). temperature 0 is greedy. With return_logprobs, also the log-probability of each new
        token under softmax(logits / temperature) before top-k/top-p truncation (softmax(logits)
        when greedy): the sampling policy's log-probs that GRPO needs. seed: an int seeds one
        generator for the batch; a list gives each row its own, so a row's samples do not depend on
        which rows share its batch (multi-process runs then sample what one process would).
        """
        if not prompts:
            raise ValueError("generate() needs at least one prompt; got an empty list")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token; got an empty prompt")
        if max_new_tokens < 1:
            return ([[] for _ in prompts], [[] for _ in prompts]) if return_logprobs else [[] for _ in prompts]
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(
                f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds "
                f"max_position_embeddings ({self.config.max_position_embeddings})")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
        B, device = len(prompts), self.device
        ids = torch.zeros(B, longest, dtype=torch.long, device=device)
        key_valid = torch.zeros(B, longest + max_new_tokens, dtype=torch.bool, device=device)
        for row, p in enumerate(prompts):
            if min(p) < 0 or max(p) >= self.config.vocab_size:
                raise ValueError(f"prompt {row} has a token id outside [0, {self.config.vocab_size})")
            ids[row, longest - len(p):] = torch.tensor(p, device=device)
            key_valid[row, longest - len(p):longest] = True
        generator, row_uniforms = None, None
        if isinstance(seed, (list, tuple)):
            if len(seed) != B:
                raise ValueError(f"seed list has {len(seed)} entries for {B} prompts; give one seed per prompt")
            # each row's uniforms for every step, drawn now: the numbers one draw per step would give,
            # without B generator calls per step (a sixth of a step's time at 128 rows on CPU)
            generators = [torch.Generator(device=device).manual_seed(s) for s in seed]
            row_uniforms = torch.stack([torch.rand(max_new_tokens, generator=g, device=device) for g in generators], 1)
        elif seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
        cache = KVCache(self.config, B, longest + max_new_tokens, self.compute_dtype, device)

        positions = positions_from_mask(key_valid[:, :longest])
        logits = self._decode(ids, positions, key_valid[:, :longest], cache)
        next_pos = positions[:, -1:] + 1  # (B, 1)
        tokens = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
        logprobs = torch.zeros(B, max_new_tokens, device=device)
        lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            u = None if row_uniforms is None else row_uniforms[step]
            token, logprob = sample_next(logits.float(), temperature, top_p, top_k, generator, u)
            tokens[:, step], logprobs[:, step] = token, logprob
            stopped = ~done & torch.isin(token, stop)
            lengths[stopped] = step + 1
            done |= stopped
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            key_valid[:, cache.length] = True
            logits = self._decode(token[:, None], next_pos, key_valid[:, :cache.length + 1], cache)
            next_pos = next_pos + 1
        lengths = lengths.tolist()  # rows that never stopped ran the full max_new_tokens
        out = [tokens[row, :n].tolist() for row, n in enumerate(lengths)]
        if return_logprobs:
            return out, [logprobs[row, :n].tolist() for row, n in enumerate(lengths)]
        return out

    # -------------------------------------------------------------------------
    # Checkpoints in the Hugging Face layout (the names here; the files: checkpoint.py)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "Transformer":
        """Load a Hugging Face Qwen3 directory (config.json + model.safetensors or a sharded index).

        Tensors are read one at a time from the memory-mapped files (checkpoint.read_tensors) into
        an empty model, so the weights are never held twice. dtype defaults to the checkpoint's.
        """
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in {path}: expected a Hugging Face Qwen3 checkpoint directory")
        values = read_json(config_file)
        if not isinstance(values, dict):
            raise DamagedFile(f"{config_file} holds a JSON {type(values).__name__}; expected an object of fields")
        try:
            config = Qwen3Config.from_dict(values)
        except (ValueError, TypeError) as err:  # a field of the wrong type fails deep in __post_init__
            raise DamagedFile(f"{config_file}: {err}") from None
        with torch.device("meta"):
            model = cls(config)
        expected = {hf_name(name): tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
        tied = ("lm_head.weight",) if config.tie_word_embeddings else ()  # a tied file may still store it
        for key, tensor in read_tensors(path, expected, tied, dtype, device).items():
            if key not in tied:  # the embedding wins
                module, leaf = key.removeprefix("model.").rsplit(".", 1)
                setattr(model.get_submodule(module), leaf, nn.Parameter(tensor))
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.inv_freq = model._inv_freq(model.device)
        return model

    def save_pretrained(self, path, max_shard_bytes: int = 5 * 2**30):
        """Write config.json + safetensors (sharded with an index past max_shard_bytes) to path.

        Everything is written to path.tmp beside path and swapped in with renames (atomic_directory),
        so an interrupted save leaves the old checkpoint or the new one, never half of one.
        Other files already in path (a tokenizer, say) are kept.
        """
        save_state_dict(path, dict(self.named_parameters()), self.config, max_shard_bytes)


def save_state_dict(path, state_dict: dict, config: Qwen3Config, max_shard_bytes: int = 5 * 2**30):
    """Transformer.save_pretrained for a bare {parameter name: tensor} dict and its config.

    For weights that exist whole on no module, e.g. FSDP shards gathered to one rank: no second
    model is built to save them. A tied lm_head.weight is left out (it is the embedding).
    """
    with atomic_directory(path, keep=lambda name: not is_weights_or_config(name)) as staging:
        write_state_dict(staging, state_dict, config, max_shard_bytes)


def write_state_dict(directory, state_dict: dict, config: Qwen3Config, max_shard_bytes: int = 5 * 2**30):
    """The files of save_state_dict written straight into an existing directory (no swap): for a
    caller that stages a bigger directory itself, as train.py's checkpoints do."""
    directory = Path(directory)
    tensors = {hf_name(name): t.detach().to("cpu").contiguous() for name, t in state_dict.items()
               if not (config.tie_word_embeddings and name == "lm_head.weight")}
    write_safetensors(directory, tensors, max_shard_bytes)
    dtype = tensors["model.embed_tokens.weight"].dtype
    (directory / "config.json").write_text(json.dumps(config.to_dict(dtype), indent=2))


def head_logits(weight, h):
    """Logits (B, V) = h (B, C) @ weight (V, C)^T of one decoding step.

    On CPU with a few rows, (V, C) @ (C, B) and a transposed copy of the result is the faster
    route: MKL streams the weight there about 1.5x faster than in its kernel for few rows times a
    transposed matrix, and the head is a third of a decoding step. Past 8 rows the copy costs more
    than it saves (measured on a 32k vocabulary, 512 wide; see bench.py).
    """
    if h.device.type == "cpu" and h.size(0) <= 8:
        return (weight @ h.T).T.contiguous()
    return F.linear(h, weight)


def sample_next(logits, temperature, top_p, top_k, generator=None, u=None):
    """Pick one token per row from logits (B, V); returns (tokens (B,), their log-probs (B,)).
    u: the rows' uniform numbers in [0, 1) (B,); drawn from generator when None."""
    if temperature == 0:
        token = logits.argmax(-1)
        return token, F.log_softmax(logits, -1).gather(-1, token[:, None])[:, 0]
    if temperature != 1:
        logits = logits / temperature
    logprobs = F.log_softmax(logits, -1)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token once the tokens ranked above it already cover top_p (the first always stays)
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(-1) if top_k > 0 or top_p < 1 else logprobs.exp()  # untruncated: one pass less
    if u is None:
        u = torch.rand(probs.size(0), generator=generator, device=probs.device, dtype=probs.dtype)
    token = draw(probs, u)
    return token, logprobs.gather(-1, token[:, None])[:, 0]


def draw(probs, u):
    """One index per row of probs (B, V), drawn with probability proportional to its entry, from
    one uniform number per row u (B,) in [0, 1).

    Inverts the running sum at u: one pass over the vocabulary, where torch.multinomial draws an
    exponential per entry (about 20x slower on CPU: a fifth of a decoding step at batch 32). An
    entry of probability 0 is never drawn: the point lies in (0, total] and the first running sum
    to reach it has just grown.
    """
    cdf = probs.cumsum(-1)  # (B, V), non-decreasing
    return torch.searchsorted(cdf, (1 - u.to(cdf.dtype))[:, None] * cdf[:, -1:])[:, 0]


"""Section 4 on any Hugging Face causal LM: the attention signals of a transformers model, without
an N x N map per head, through the same lean path the project's own Qwen3 runs.

transformers lets a model's attention call a registered function (AttentionInterface). The one
registered here, "rhythm_capture", receives every layer's query and key after RoPE (and after
Qwen3's q/k norms), keeps those of the chosen layers, and then runs the usual SDPA, so the model
computes what it always does. HFCausalLM wraps a transformers model in the small interface the
project's code calls (hidden_states with q/k or explicit maps, the LM head, generate), so
attention_lean.rhythm_signals, analyze.py and the TRL trainer run on Llama, Qwen2, Qwen3, Mistral
and the other architectures whose attention goes through that interface.

    signals = hf_rhythm_signals(model, input_ids, attention_mask, starts)   # as rhythm_signals

Positions follow the attention mask (left padding: each row counts from its first token), as
transformers' generate and the project's model do; a plain transformers forward would count the
padding instead.
"""

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from attention_lean import rhythm_signals
from model import attention_mask_4d, attention_probs, positions_from_mask

CAPTURE = "rhythm_capture"
_capture = {"qk_layers": (), "attn_layers": (), "qk": {}, "attn": {}, "mask": None}  # filled during one forward


def capture_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """An AttentionInterface function: store q/k (or the explicit maps) of the chosen layers, then
    attend with SDPA. q is stored scaled so that q k^T / sqrt(D) is the model's own scores, the
    convention of the lean path and of model.attention_probs (for most models scaling = D**-0.5)."""
    layer = module.layer_idx
    if layer in _capture["qk_layers"] or layer in _capture["attn_layers"]:
        q = query
        if scaling is not None and abs(scaling * query.size(-1) ** 0.5 - 1) > 1e-12:
            q = query * (scaling * query.size(-1) ** 0.5)
        if layer in _capture["qk_layers"]:
            _capture["qk"][layer] = (q, key)
        if layer in _capture["attn_layers"]:
            _capture["attn"][layer] = attention_probs(q, key, _capture["mask"])
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


AttentionInterface.register(CAPTURE, capture_attention)
AttentionMaskInterface.register(CAPTURE, sdpa_mask)


class HFCausalLM:
    """A transformers causal LM behind the interface of model.Transformer that the project calls."""

    def __init__(self, model):
        self.hf = model
        config = model.config
        self.config = config
        self.lm_head = model.get_output_embeddings()
        if getattr(config, "final_logit_softcapping", None):
            raise ValueError(f"{config.model_type}: logit soft-capping is not supported (the entropy would be wrong)")

    @property
    def device(self):
        return self.lm_head.weight.device

    def hidden_states(self, input_ids, attn_layers=(), attention_mask=None, qk_layers=()):
        """(final-normed hidden states (B, T, C), {layer: maps (B, H, T, T)}, {layer: (q, k)}), as
        model.Transformer.hidden_states returns them."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        previous = self.hf.config._attn_implementation
        _capture.update(qk_layers=tuple(qk_layers), attn_layers=tuple(attn_layers), qk={}, attn={},
                        mask=attention_mask_4d(attention_mask.bool(), input_ids.size(1)))
        self.hf.set_attn_implementation(CAPTURE)
        try:
            out = self.hf.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                        position_ids=positions_from_mask(attention_mask), use_cache=False)
        finally:
            self.hf.set_attn_implementation(previous)
            qk, attn = _capture["qk"], _capture["attn"]
            _capture.update(qk_layers=(), attn_layers=(), qk={}, attn={}, mask=None)
        return out.last_hidden_state, attn, qk

    def __call__(self, input_ids, attn_layers=(), attention_mask=None, logits_to_keep=0):
        """(logits (B, T, V) of the last logits_to_keep positions (all: 0), {layer: maps}), as
        model.Transformer.forward."""
        h, attn, _ = self.hidden_states(input_ids, attn_layers, attention_mask)
        return self.lm_head(h[:, -logits_to_keep:]), attn

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, stop_ids=(), seed=None):
        """New tokens of each prompt (token-id lists), up to and including the first stop token, from
        transformers' generate on a left-padded batch. seed: an int seeds torch's generator (a row's
        samples then depend on its batch, unlike model.Transformer.generate's per-row seeds)."""
        if seed is not None:
            torch.manual_seed(seed if isinstance(seed, int) else seed[0])
        longest = max(len(p) for p in prompts)
        pad = next(i for i in (self.config.pad_token_id, *stop_ids, 0) if i is not None)
        ids = torch.tensor([[pad] * (longest - len(p)) + list(p) for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if temperature > 0 else \
            dict(do_sample=False)
        out = self.hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=0,
                               eos_token_id=list(stop_ids) or None, pad_token_id=pad, **sampling)
        responses = []
        for row in out[:, longest:].tolist():
            stop = next((i for i, t in enumerate(row) if t in stop_ids), None)
            responses.append(row if stop is None else row[:stop + 1])
        return responses


def hf_rhythm_signals(model, input_ids, attention_mask, starts, **knobs):
    """attention_lean.rhythm_signals of a transformers causal LM: WAAD, FAI and entropy of every
    response of a left-padded batch (starts[b]: where row b's response begins), from q and k of the
    chosen layers; the knobs (layers, heads, window, h_lo, h_hi, receivers, temperature, ...) and
    the result are rhythm_signals'. method="explicit" takes the explicit maps instead (the reference)."""
    with torch.no_grad():
        return rhythm_signals(HFCausalLM(model), input_ids, starts, attention_mask, **knobs)

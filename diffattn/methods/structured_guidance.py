"""Training-free structured diffusion guidance (Feng et al., ICLR 2023) for SD 1.x / 2.x / SDXL UNets.

Each noun phrase of the prompt is encoded on its own (c_i) and aligned into the full prompt's encoding c_0 at the
phrase's token positions (A_i: a copy of c_0 whose span holds c_i's tokens, the phrase's own start/end tokens
dropped). In every cross-attention layer, for the conditional branch only:

- default mode: out = mean_j softmax(Q K_0^T / sqrt d) V_j with V_j from [c_0, A_1, ..., A_k]; since the values are
  linear in the states (to_v has no bias in SD), this is one attention with keys from c_0 and values from
  mean(c_0, A_1, ..., A_k): no extra attention cost;
- conjunction mode: out = mean_i softmax(Q K_i^T / sqrt d) V with keys from [c_0, A_1, ..., A_k] and values from c_0
  with every phrase aligned into it (later phrases overwrite earlier ones); one batched attention call.

Phrases come from `diffattn.text.noun_phrases` unless given. The unconditional branch is untouched.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass

import torch

from ..adapters import AttentionLayer, ModelAdapter, UNetAttnProcessor
from ..control import AttentionMethod, MethodConfig
from ..state import DenoiserState
from ..text import noun_phrases, token_spans
from ..validation import check_choice, check_str_list


logger = logging.getLogger(__name__)

MODES = ("default", "conjunction")


@dataclass(frozen=True)
class StructuredGuidanceConfig(MethodConfig):
    """Structured diffusion guidance.

    Args:
        mode: "default" (values averaged over the phrase encodings) or "conjunction" (attention averaged over
            key sets; for "A and B" prompts).
        phrases: the noun phrases to use (each must occur in the prompt); None parses them from the prompt.
    """

    mode: str = "default"
    phrases: tuple[str, ...] | None = None

    def __post_init__(self):
        check_choice("mode", self.mode, MODES)
        if self.phrases is not None:
            object.__setattr__(self, "phrases", check_str_list("phrases", self.phrases, allow_empty=True))


def align_phrase(full: torch.Tensor, phrase: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    """A copy of `full: [L, D]` whose positions [start, end) hold the phrase encoding's tokens 1..(end-start)."""
    start, end = span
    aligned = full.clone()
    aligned[start:end] = phrase[1 : 1 + end - start]
    return aligned


class StructuredCrossAttnProcessor(UNetAttnProcessor):
    """Cross-attention whose conditional rows use the structured contexts the method prepared for this call."""

    def __init__(self, method: "StructuredGuidanceMethod"):
        self.method = method

    def _conditional_rows(self, batch: int) -> slice | None:
        ctx = self.method.contexts
        if ctx is None:
            return None
        rows = ctx["values"].shape[0]
        if batch == rows:
            return slice(0, batch)
        if batch == 2 * rows and self.method.state.cfg_batched:  # [uncond, cond]
            return slice(rows, batch)
        return None

    def value_states(self, attn, context):
        rows = self._conditional_rows(context.shape[0])
        if rows is None or self.method.config.mode != "default":
            return context
        values = context.clone()
        values[rows] = self.method.contexts["values"].to(context)
        return values

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        self._keys = None
        if encoder_hidden_states is not None and self.method.config.mode == "conjunction":
            rows = self._conditional_rows(encoder_hidden_states.shape[0])
            if rows is not None:
                self._keys = (rows, [attn.to_k(k.to(encoder_hidden_states)) for k in self.method.contexts["keys"]])
                encoder_hidden_states = encoder_hidden_states.clone()
                encoder_hidden_states[rows] = self.method.contexts["values"].to(encoder_hidden_states)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)

    def attend(self, attn, query, key, value, attention_mask, is_cross):
        if self._keys is None or not is_cross:
            return super().attend(attn, query, key, value, attention_mask, is_cross)
        rows, key_sets = self._keys
        out = super().attend(attn, query, key, value, attention_mask, is_cross)
        batch, heads, _, dim = query.shape
        q = query[rows]
        # One batched call over the key sets: (1/|K|) sum_i softmax(Q K_i^T) V == mean of per-set attention.
        ks = torch.stack([k.view(q.shape[0], -1, heads, dim).transpose(1, 2) for k in key_sets])  # [S, b, H, L, D]
        sets = ks.shape[0]
        q_rep = q.unsqueeze(0).expand(sets, *q.shape).reshape(sets * q.shape[0], heads, -1, dim)
        v_rep = value[rows].unsqueeze(0).expand(sets, *value[rows].shape).reshape(sets * q.shape[0], heads, -1, dim)
        mixed = torch.nn.functional.scaled_dot_product_attention(q_rep, ks.flatten(0, 1), v_rep)
        out = out.clone()
        out[rows] = mixed.view(sets, q.shape[0], heads, -1, dim).mean(0).to(out.dtype)
        return out


class StructuredGuidanceMethod(AttentionMethod):
    supported_families = ("stable-diffusion-unet",)

    def __init__(self, config: StructuredGuidanceConfig):
        super().__init__(config)
        self.contexts: dict | None = None
        self.pipe = None
        self.state: DenoiserState | None = None

    def processors(self, adapter: ModelAdapter, layers: list[AttentionLayer], state: DenoiserState):
        self.state = state
        return {layer.key: StructuredCrossAttnProcessor(self) for layer in layers if layer.kind == "cross"}

    def attach(self, pipe) -> None:
        if pipe is None or not hasattr(pipe, "encode_prompt") or not hasattr(pipe, "tokenizer"):
            raise ValueError(
                "StructuredGuidanceConfig needs the pipeline (its tokenizer and text encoder), not a UNet"
            )
        self.pipe = pipe
        original = pipe.encode_prompt
        signature = inspect.signature(original)

        @functools.wraps(original)
        def encode_prompt(*args, **kwargs):
            result = original(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            self.contexts = self._structured_contexts(original, bound.arguments, result[0])
            return result

        pipe.encode_prompt = encode_prompt

    def detach(self) -> None:
        if self.pipe is not None:
            self.pipe.__dict__.pop("encode_prompt", None)
            self.pipe = None
        self.contexts = None

    def _structured_contexts(self, encode, arguments: dict, prompt_embeds: torch.Tensor) -> dict | None:
        prompt = arguments.get("prompt")
        if prompt is None:
            logger.warning("structured guidance needs the prompt text; with prompt_embeds only it is skipped")
            return None
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        per_prompt = prompt_embeds.shape[0] // len(prompts)  # num_images_per_prompt
        values, keys = [], None
        for i, text in enumerate(prompts):
            full = prompt_embeds[i * per_prompt]
            phrases = list(self.config.phrases) if self.config.phrases is not None else noun_phrases(text)
            aligned = []
            for phrase in phrases:
                span = token_spans(self.pipe.tokenizer, text, phrase)[0]
                encoded = encode(
                    prompt=phrase,
                    device=arguments.get("device"),
                    num_images_per_prompt=1,
                    do_classifier_free_guidance=False,
                )[0][0]
                aligned.append(align_phrase(full, encoded, span))
            if self.config.mode == "default":
                values.append(torch.stack([full, *aligned]).mean(0))
            else:
                merged = full.clone()
                for phrase, a in zip(phrases, aligned):
                    start, end = token_spans(self.pipe.tokenizer, text, phrase)[0]
                    merged[start:end] = a[start:end]  # single alignment: later phrases overwrite earlier ones
                values.append(merged)
                key_sets = [full, *aligned]
                keys = [[] for _ in key_sets] if keys is None else keys
                if len(keys) != len(key_sets):
                    raise ValueError("conjunction mode needs the same number of phrases in every prompt of a batch")
                for slot, k in zip(keys, key_sets):
                    slot.append(k)
        value_ctx = torch.stack(values).repeat_interleave(per_prompt, dim=0)
        contexts = {"values": value_ctx}
        if keys is not None:
            contexts["keys"] = [torch.stack(k).repeat_interleave(per_prompt, dim=0) for k in keys]
        return contexts


StructuredGuidanceConfig.method_class = StructuredGuidanceMethod

"""The policy: any Hugging Face image-text-to-text model, a value head, and LoRA through peft.

``VLMPolicy.load(path_or_hub_id, PolicyConfig(...))`` loads a model with the Auto classes
(``AutoModelForImageTextToText`` + ``AutoProcessor``), so Qwen2-VL, Qwen2.5-VL, LLaVA, LLaVA-NeXT and
others run through the same code. A folder written by ``policy.save(dir)`` loads with the same call.

Sampling and scoring agree exactly: ``generate`` samples from ``softmax(logits / temperature)``
(optionally cut to the top-p nucleus) with our own seeded ``torch.Generator``, and records the
tempered log-prob of every sampled token; ``score`` recomputes the same tempered log-probs in one
forward pass. Like RL4VLM, the PPO ratio uses the tempered softmax; with ``top_p < 1`` the nucleus
renormalisation is left out of it (``Generation.sample_logprobs`` holds the nucleus value).

Constrained action decoding (``policy/constrain.py``): with ``PolicyConfig.constrained_actions`` (or
``constrained=True``) and per-row ``legal_actions``, once a response has written ``"action": "`` only a
legal word, then ``"}`` and the stop token can be drawn. There the recorded log-prob is that of the
tempered distribution renormalised over the allowed ids; a nucleus (top_p < 1) is then cut within
that set (``sample_logprobs``). ``score`` given the same ``legal_actions`` rebuilds the same masks
from the response ids (``constrain.constraint_masks``) and scores under them, entropy included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

from vlmrl.config import PolicyConfig
from vlmrl.policy.hf import quiet_library_bars
from vlmrl.errors import UserError
from vlmrl.policy import logprob as lp
from vlmrl.policy.constrain import ActionConstraints, ConstrainedBatch, ConstraintMasks, allowed_matrix
from vlmrl.policy.input_cache import LRU, InputCache, image_key
from vlmrl.policy.vision_cache import install as install_vision_cache

VALUE_HEAD_FILE = "value_head.safetensors"
POLICY_CONFIG_FILE = "vlmrl_policy.json"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# names of the vision tower attribute on the base model, across architectures
_VISION_ATTRS = ("visual", "vision_tower", "vision_model")


@dataclass
class Encoded:
    """A left-padded batch of prompt (+ response) tokens, ready for the model's forward."""

    # model kwargs: input_ids [B, L], attention_mask [B, L], pixel inputs, mm_token_type_ids, ...
    inputs: dict[str, torch.Tensor]
    # [B, L] True on response tokens (they are right-aligned: the last response_lengths[i] of row i)
    response_mask: torch.Tensor
    # [B] number of response tokens per row
    response_lengths: torch.Tensor
    # the response ids per row (unpadded), for decoding
    response_ids: list[list[int]] = field(default_factory=list)
    # input_cache.image_key of each row's image (None: a text-only batch), for the vision cache
    image_keys: list[Any] | None = None


@dataclass
class Generation:
    texts: list[str]
    # [B, N] sampled ids, left-aligned, pad_token_id after each row's length (EOS included in the length)
    response_ids: torch.Tensor
    lengths: torch.Tensor  # [B]
    # [B, N] log-prob of each sampled token under softmax(logits / T) -- what score() recomputes
    logprobs: torch.Tensor
    # [B, N] log-prob under the distribution actually sampled from (top-p nucleus renormalised)
    sample_logprobs: torch.Tensor
    values: torch.Tensor  # [B]
    # [B, N] True where the token was drawn under the action constraint; None when sampling was free
    constrained: torch.Tensor | None = None
    # the legal words per row the constraint used (pass them to score); None when sampling was free
    legal_actions: list[list[str]] | None = None


@dataclass
class Scores:
    action_logprob: torch.Tensor  # [B] lambda * sum logp(CoT) + sum logp(action part)
    values: torch.Tensor  # [B]
    entropy: torch.Tensor  # [B] mean token entropy over the response
    token_logprobs: torch.Tensor  # [B, R] left-aligned, 0 after each row's length
    lengths: torch.Tensor  # [B]
    boundaries: torch.Tensor  # [B] number of CoT tokens (weighted by lambda)


class ValueHead(nn.Module):
    """Small MLP: hidden state of the last prompt token [B, H] -> value [B]."""

    def __init__(self, in_size: int, hidden_size: int, generator: torch.Generator | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, 1))
        for layer in (self.net[0], self.net[2]):
            bound = 1.0 / in_size**0.5 if layer is self.net[0] else 0.01
            with torch.no_grad():
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden.float()).squeeze(-1)


class NonFiniteLogits(UserError):
    """The model's next-token scores hold NaN or +inf: its weights have blown up (a ``UserError``, so
    ``vlmrl eval`` of such a policy is one line; the trainer reports it as a diverged run)."""


class _Sampler(LogitsProcessor):
    """Draws the next token itself (seeded) and records its log-probs; generate() then runs greedy.

    Returning a score row that is 0 at the drawn token and -inf elsewhere makes HF's greedy step
    pick exactly that token, while HF keeps the model-specific work (KV cache, Qwen's M-RoPE
    positions, per-row EOS stopping).
    """

    def __init__(
        self,
        temperature: float,
        top_p: float,
        generator: torch.Generator | None,
        banned: Sequence[int],
        constraint: ConstrainedBatch | None = None,
        draw: str = "multinomial",
    ):
        self.temperature, self.top_p, self.generator, self.banned = temperature, top_p, generator, banned
        self.draw = draw  # PolicyConfig.sampler
        self.constraint = constraint  # None: free sampling, exactly the unconstrained path
        self.logprobs: list[torch.Tensor] = []
        self.sample_logprobs: list[torch.Tensor] = []
        self.constrained: list[torch.Tensor] = []  # [B] bool per step (only with a constraint)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if bool(torch.isnan(scores).any() or torch.isposinf(scores).any()):
            raise NonFiniteLogits("the policy's next-token scores hold NaN or +inf: its weights have blown up; "
                                  "use an earlier checkpoint, or lower the learning rate and train again")
        logp = lp.policy_logprobs(scores, self.temperature, self.banned)
        if self.constraint is not None:
            rows, allowed = self.constraint.step_masks(logp.shape[-1], logp.device)
            if rows.numel():  # the other rows keep their values bit for bit
                logp = logp.index_put((rows,), lp.constrain_logprobs(logp[rows], allowed))
            here = torch.zeros(logp.shape[0], dtype=torch.bool, device=logp.device)
            self.constrained.append(here.index_fill(0, rows, True))
        if self.temperature <= 0:
            token = logp.argmax(-1)
            nucleus = logp
        else:
            nucleus = _top_p_logprobs(logp, self.top_p) if self.top_p < 1.0 else logp
            probs = nucleus.exp()
            device = self.generator.device if self.generator is not None else probs.device
            if self.draw == "cdf":
                token = inverse_cdf_sample(probs.to(device), self.generator).to(probs.device)
            else:
                token = torch.multinomial(probs.to(device), 1, generator=self.generator).squeeze(-1).to(probs.device)
        self.logprobs.append(logp.gather(-1, token[:, None]).squeeze(-1))
        self.sample_logprobs.append(nucleus.gather(-1, token[:, None]).squeeze(-1))
        if self.constraint is not None:
            self.constraint.push(token.tolist())
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter(-1, token[:, None], 0.0)


def inverse_cdf_sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row drawn by inverse transform: the first id whose cumulative mass (float64)
    exceeds a uniform draw times the row's total. probs [B, V] >= 0, each row with some mass -> [B].

    The same distribution as ``torch.multinomial(probs, 1)`` from B uniforms instead of B x V
    exponentials; a zero-probability id is never drawn (its cumulative mass equals its predecessor's).
    """
    cdf = probs.double().cumsum(-1)
    u = torch.rand((probs.shape[0], 1), generator=generator, dtype=torch.float64, device=probs.device)
    token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
    # u * total may round up to the total itself: take the row's last id with mass, not one past the end
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(-1)
    return torch.minimum(token, last)


def _top_p_logprobs(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """Renormalised log-probs of the smallest set of tokens with mass >= top_p. [B, V] -> [B, V]."""
    sorted_logp, order = logp.sort(dim=-1, descending=True)
    mass_before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()
    drop_sorted = mass_before >= top_p  # the top token is always kept
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return F.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)


@contextlib.contextmanager
def _capture_input(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the first positional input of every call to ``module`` (the LM head's hidden states)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


class VLMPolicy(nn.Module):
    """A VLM (optionally with LoRA adapters), its processor and a value head (None: no value function,
    for the group estimators; values are then reported as zeros)."""

    def __init__(self, model: nn.Module, processor: Any, value_head: ValueHead | None, config: PolicyConfig,
                 source: str):
        super().__init__()
        self.model = model
        self.processor = processor
        self.value_head = value_head
        self.config = config
        self.source = source  # what was loaded (folder or hub id), for logs
        self.tokenizer = processor.tokenizer
        self.pad_token_id = int(self.tokenizer.pad_token_id)
        self.stop_token_ids = _stop_ids(self.tokenizer, self.hf_model)
        self.banned_token_ids = _placeholder_ids(self.hf_model, processor)
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.hf_model.forward).parameters
        # speed caches (policy/input_cache.py): processor output per (image, prompt); CoT boundary per response
        self.input_cache = InputCache(self.pad_token_id, left=self.tokenizer.padding_side == "left")
        self.boundary_cache = LRU(max_entries=8192, max_bytes=1 << 62)  # bounded by count: ~2 kB each
        # image features per image while the tower is frozen (policy/vision_cache.py; None: not Qwen2-VL)
        self.vision_cache = install_vision_cache(self.hf_model)
        self._action_constraints: ActionConstraints | None = None  # built on first use (constrain.py)

    # --- loading and saving ---------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, config: PolicyConfig | None = None, value_head: bool = True) -> "VLMPolicy":
        """Load a model folder, a hub id, or a folder written by ``save`` (same call for all).
        ``value_head=False`` builds no value head (the group estimators need no value function)."""
        from vlmrl.policy.presets import hub_snapshot, is_hub_id

        path = str(path)
        if is_hub_id(path):  # through huggingface_hub: its cache and HF_HUB_OFFLINE apply
            path = str(hub_snapshot(path))
        local = Path(path).expanduser()
        saved = local / POLICY_CONFIG_FILE
        if config is None:
            config = _read_config(saved) if saved.is_file() else PolicyConfig()
        adapter = (local / "adapter_config.json").is_file()
        base_path = json.loads((local / "adapter_config.json").read_text())["base_model_name_or_path"] if adapter else path

        with quiet_library_bars():
            model = _load_model(base_path, config)
            processor = _load_processor(path if (local / "processor_config.json").exists() or not adapter else base_path)
            with torch.random.fork_rng(devices=[]):  # peft draws LoRA_A from the global generator
                torch.manual_seed(config.seed)
                model = _apply_finetune(model, config, adapter_dir=local if adapter else None)
        if config.gradient_checkpointing:
            _enable_checkpointing(_hf(model))
        hidden = _hf(model).get_output_embeddings().in_features
        head_file = local / VALUE_HEAD_FILE
        if not value_head:
            head = None
        elif head_file.is_file():
            state = load_file(str(head_file))
            head = ValueHead(hidden, state["net.0.weight"].shape[0])
            head.load_state_dict(state)
        else:
            head = ValueHead(hidden, config.value_hidden_size, torch.Generator().manual_seed(config.seed))
        policy = cls(model, processor, head, config, source=path)
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return policy.to(device)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write adapter (LoRA) or full weights, the processor, the value head and the config."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with quiet_library_bars():
            self.model.save_pretrained(out)
            self.processor.save_pretrained(out)
        if self.value_head is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()}
            save_file(state, str(out / VALUE_HEAD_FILE))
        settings = dataclasses.asdict(self.config) | {"device": None}  # the loading machine decides
        (out / POLICY_CONFIG_FILE).write_text(json.dumps(settings, indent=2))
        return out

    # --- helpers --------------------------------------------------------------------------------
    @property
    def hf_model(self) -> nn.Module:
        """The transformers model (inside the peft wrapper when LoRA is on)."""
        return _hf(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _value(self, hidden: torch.Tensor) -> torch.Tensor:
        """The value head on [B, H] hidden states, or zeros [B] without a head."""
        if self.value_head is None:
            return torch.zeros(hidden.shape[0], device=hidden.device)
        return self.value_head(hidden)

    @property
    def action_constraints(self) -> ActionConstraints:
        """The constrained-decoding machinery for this tokenizer (caches shared by generate and score)."""
        if self._action_constraints is None:
            self._action_constraints = ActionConstraints(self.tokenizer, self.stop_token_ids[0])
        return self._action_constraints

    def _constrained(
        self, legal_actions: Sequence[Sequence[str]] | None, constrained: bool | None, batch: int
    ) -> list[list[str]] | None:
        """The per-row words to enforce, or None for free sampling/scoring.

        ``constrained`` None follows ``config.constrained_actions`` (and without ``legal_actions`` stays
        free); True needs ``legal_actions``; False is always free.
        """
        on = self.config.constrained_actions if constrained is None else constrained
        if not on:
            return None
        if legal_actions is None:
            if constrained:
                raise UserError("constrained=True needs legal_actions: one list of legal words per prompt")
            return None
        if isinstance(legal_actions, str) or len(legal_actions) != batch:
            raise UserError(f"give one list of legal words per prompt: got {len(legal_actions)} for {batch} prompts")
        return [[str(w) for w in words] for words in legal_actions]

    def constraint_masks(
        self, response_ids: Sequence[Sequence[int]], legal_actions: Sequence[Sequence[str]]
    ) -> ConstraintMasks:
        """Where each response was constrained and to which ids (``constrain.constraint_masks``, cached)."""
        return self.action_constraints.masks(response_ids, legal_actions)

    def prompt_texts(self, prompts: Sequence[str], with_image: bool = True) -> list[str]:
        """Each prompt as one user turn through the processor's chat template: image + text, or text
        only (no image placeholder) when ``with_image`` is False (text tasks such as ALFWorld)."""
        image_part = [{"type": "image"}] if with_image else []
        out = []
        for prompt in prompts:
            messages = [{"role": "user", "content": image_part + [{"type": "text", "text": prompt}]}]
            out.append(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        return out

    @contextlib.contextmanager
    def reference(self) -> Iterator["VLMPolicy"]:
        """The frozen starting policy, for a KL penalty: LoRA adapters switched off, no second copy."""
        if self.config.finetune == "lora":
            with self.model.disable_adapter():
                yield self
        elif self.config.finetune == "none":
            yield self
        else:
            raise UserError(
                "a reference policy needs finetune='lora' (full fine-tuning keeps no copy of the "
                "starting weights): use LoRA or turn the KL penalty off"
            )

    # --- batching -------------------------------------------------------------------------------
    def encode(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        responses: Sequence[str] | Sequence[Sequence[int]] | torch.Tensor | None = None,
        lengths: torch.Tensor | Sequence[int] | None = None,
    ) -> Encoded:
        """Prompts (one image each) and optional responses -> a left-padded batch on the policy's device.

        An image of None means a text-only prompt (no image placeholder, no pixel inputs); a batch is
        either all images or all None. ``responses`` are texts (tokenized, then the stop token
        appended: what SFT trains on) or token ids as sampled (a list of lists, or a padded [B, N]
        tensor with ``lengths``).
        """
        if len(images) != len(prompts):
            raise UserError(f"got {len(images)} images for {len(prompts)} prompts: give one image per prompt")
        text_only = _text_only(images)  # checked on the whole batch, before rows are looked up one by one
        keys = None if text_only else [image_key(im) for im in images]
        inputs = self.input_cache(images, prompts, lambda ims, ps: self._process_prompts(ims, ps, text_only), keys)
        ids = _response_id_lists(self, responses, lengths, len(prompts))
        inputs, mask = _append_left_padded(inputs, ids, self.pad_token_id)
        return Encoded(
            inputs={k: v.to(self.device) for k, v in inputs.items()},
            response_mask=mask.to(self.device),
            response_lengths=torch.tensor([len(r) for r in ids], dtype=torch.long, device=self.device),
            response_ids=ids,
            image_keys=keys,
        )

    def _images_of(self, enc: Encoded) -> contextlib.AbstractContextManager:
        """Tells the vision cache which images the next model call encodes (saves hashing pixels)."""
        if self.vision_cache is None or enc.image_keys is None:
            return contextlib.nullcontext()
        return self.vision_cache.images(enc.image_keys)

    def _process_prompts(self, images: Sequence[Any], prompts: Sequence[str], text_only: bool) -> dict[str, torch.Tensor]:
        """The processor on a batch of prompts (chat template, image preprocessing, left padding)."""
        if text_only:
            return dict(self.processor(text=self.prompt_texts(prompts, with_image=False), padding=True, return_tensors="pt"))
        pil = [Image.fromarray(np.asarray(im)) if not isinstance(im, Image.Image) else im for im in images]
        return dict(self.processor(text=self.prompt_texts(prompts), images=pil, padding=True, return_tensors="pt"))

    # --- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        temperature: float | None = None,
        top_p: float | None = None,
        max_new_tokens: int | None = None,
        seed: int | torch.Generator | None = None,
        legal_actions: Sequence[Sequence[str]] | None = None,
        constrained: bool | None = None,
    ) -> Generation:
        """Sample one response per prompt (batched, KV cache, each row stops at its EOS).

        ``temperature`` 0 is greedy. ``seed`` (an int or a ``torch.Generator``) makes it reproducible;
        None draws from a fresh unseeded generator. The model runs in eval mode (no dropout).

        ``legal_actions`` (one list of words per prompt) with ``constrained`` (None: follow
        ``config.constrained_actions``) turns on constrained action decoding: after ``"action": "``
        each row can only write one of its words, ``"}`` and the stop token. ``logprobs`` then hold the
        renormalised (masked) log-probs there; pass ``Generation.legal_actions`` to ``score``.
        Without it the sampling is exactly the unconstrained one.
        """
        cfg = self.config
        temperature = cfg.temperature if temperature is None else temperature
        top_p = cfg.top_p if top_p is None else top_p
        max_new_tokens = cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
            raise UserError("generate: temperature must be >= 0, top_p in (0, 1], max_new_tokens >= 1")
        generator = seed if isinstance(seed, torch.Generator) else torch.Generator(self.device)
        if isinstance(seed, int):
            generator.manual_seed(seed)
        elif seed is None:
            generator.seed()

        words = self._constrained(legal_actions, constrained, len(prompts))
        batch = None if words is None else ConstrainedBatch(self.action_constraints, words, self.stop_token_ids)
        enc = self.encode(images, prompts)
        sampler = _Sampler(temperature, top_p, generator, self.banned_token_ids, batch, cfg.sampler)
        gen_config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.stop_token_ids,
            pad_token_id=self.pad_token_id,
            use_cache=True,
            return_dict_in_generate=True,
        )
        was_training = self.training
        self.eval()
        try:
            with _capture_input(self.hf_model.get_output_embeddings()) as seen, self._images_of(enc):
                out = self.model.generate(
                    **enc.inputs, generation_config=gen_config, logits_processor=LogitsProcessorList([sampler])
                )
            values = self._value(seen[0][:, -1])
        finally:
            self.train(was_training)

        prompt_len = enc.inputs["input_ids"].shape[1]
        response = out.sequences[:, prompt_len:]
        lengths = _lengths_to_stop(response, self.stop_token_ids)
        keep = torch.arange(response.shape[1], device=response.device)[None] < lengths[:, None]
        response = response.masked_fill(~keep, self.pad_token_id)
        logprobs = torch.stack(sampler.logprobs, 1).masked_fill(~keep, 0.0)
        sample_logprobs = torch.stack(sampler.sample_logprobs, 1).masked_fill(~keep, 0.0)
        texts = self.tokenizer.batch_decode(
            [row[:n].tolist() for row, n in zip(response, lengths)],
            skip_special_tokens=True,
            clean_up_tokenization_spaces=False,
        )
        mask = None if batch is None else torch.stack(sampler.constrained, 1) & keep
        return Generation(texts, response, lengths, logprobs, sample_logprobs, values, mask, words)

    # --- scoring --------------------------------------------------------------------------------
    def cot_weights(
        self, response_ids: Sequence[Sequence[int]], width: int, thought_weight: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token weights [B, width] (lambda on CoT tokens, ``config.reading_weight`` on the CoT's
        state fields where set, 1 on the action part, 0 past the end) and the boundaries [B], from the
        decoded text's character offsets."""
        lam = self.config.thought_weight if thought_weight is None else thought_weight
        # the reading's boundary only where it gets a weight of its own: the paper's path decodes no more
        reading = self.config.reading_weight if self.config.reading_weight != lam else None
        bounds, reads = [], []
        for ids in response_ids:
            key = tuple(int(i) for i in ids)  # PPO epochs score the same responses again
            found = self.boundary_cache.get(key)
            if found is None or (reading is not None and found[1] is None):
                text = self.tokenizer.decode(key, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                # O(log T) decodes each, the same as the slow path
                bound = found[0] if found is not None else lp.boundary_from_ids(self.tokenizer, key, text)
                found = (bound, lp.reading_from_ids(self.tokenizer, key, text) if reading is not None else None)
                self.boundary_cache.put(key, found, len(key))
            bounds.append(found[0])
            reads.append(found[1])
        boundaries = torch.tensor(bounds, dtype=torch.long)
        lengths = torch.tensor([len(ids) for ids in response_ids], dtype=torch.long)
        readings = torch.tensor(reads, dtype=torch.long) if reading is not None else None
        return lp.cot_weights(boundaries, lengths, width, lam, readings, reading), boundaries

    def action_logprob(
        self, response_ids: Sequence[Sequence[int]], token_logprobs: torch.Tensor, thought_weight: float | None = None
    ) -> torch.Tensor:
        """The action log-prob [B] from per-token log-probs [B, N] (left-aligned, e.g. ``Generation.logprobs``),
        weighted exactly as ``score`` weighs them, so rollouts need no second forward pass."""
        weights, _ = self.cot_weights(response_ids, token_logprobs.shape[1], thought_weight)
        return (token_logprobs.float() * weights.to(token_logprobs.device)).sum(-1)

    @torch.no_grad()
    def values(self, images: Sequence[Any], prompts: Sequence[str]) -> torch.Tensor:
        """V(prompt) [B]: the value head on the last prompt token, without sampling anything."""
        enc = self.encode(images, prompts)
        extra = {"logits_to_keep": 1} if self._keeps_logits else {}
        was_training = self.training
        self.eval()
        try:
            with _capture_input(self.hf_model.get_output_embeddings()) as seen, self._images_of(enc):
                self.model(**enc.inputs, use_cache=False, **extra)
        finally:
            self.train(was_training)
        if self.value_head is None:
            raise UserError("this policy was loaded without a value head (value_head=False): it has no values")
        return self.value_head(seen[-1][:, -1])

    def forward(self, *args: Any, **kwargs: Any) -> "Scores":
        """Same as ``score``, so a DDP-wrapped policy is called through its own forward."""
        return self.score(*args, **kwargs)

    def score(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        responses: Sequence[str] | Sequence[Sequence[int]] | torch.Tensor,
        lengths: torch.Tensor | Sequence[int] | None = None,
        temperature: float | None = None,
        thought_weight: float | None = None,
        legal_actions: Sequence[Sequence[str]] | None = None,
        constrained: bool | None = None,
    ) -> Scores:
        """One forward pass: the lambda-weighted action log-prob, the value and the mean entropy.

        Log-probs are of ``softmax(logits / temperature)`` with the sampling temperature (config
        default), so a response scored right after ``generate`` reproduces ``Generation.logprobs``.
        For SFT pass texts and ``temperature=1``: ``-token_logprobs.sum() / lengths.sum()`` is the NLL.
        ``legal_actions`` / ``constrained`` as in ``generate``: responses sampled under the action
        constraint must be scored with the same words, so the same positions are renormalised over
        the same ids (log-probs and entropy); a token outside its allowed set is a ``UserError``.
        """
        temperature = self.config.temperature if temperature is None else temperature
        lam = self.config.thought_weight if thought_weight is None else thought_weight
        enc = self.encode(images, prompts, responses, lengths)
        n = enc.response_lengths
        width = int(n.max()) if len(n) else 0
        keep = width + 1  # the last prompt token (value, first prediction) and the response
        extra = {"logits_to_keep": keep} if self._keeps_logits else {}
        words = self._constrained(legal_actions, constrained, len(prompts))
        # the masks first: a response not sampled under these words fails before the forward pass
        cm = None if words is None else self.constraint_masks(enc.response_ids, words)
        with _capture_input(self.hf_model.get_output_embeddings()) as seen, self._images_of(enc):
            out = self.model(**enc.inputs, use_cache=False, **extra)
        logits = out.logits[:, -keep:]
        hidden = seen[-1][:, -keep:]

        tokens = enc.inputs["input_ids"][:, enc.inputs["input_ids"].shape[1] - width :]
        masked = None
        if cm is not None:
            cols = cm.cols + width - n.cpu()[cm.rows]  # left-aligned -> right-aligned columns
            masked = (cm.rows, cols, allowed_matrix(cm.allowed, logits.shape[-1]))
        # right-aligned [B, width]
        logp_r, ent_r = lp.token_logprobs(logits[:, :-1], tokens, temperature, self.banned_token_ids, masked)
        logp, ent = lp.right_to_left(logp_r, n), lp.right_to_left(ent_r, n)
        rows = torch.arange(len(n), device=hidden.device)
        values = self._value(hidden[rows, width - n])

        weights, boundaries = self.cot_weights(enc.response_ids, width, lam)
        weights = weights.to(logp.device)
        mask = weights > 0
        return Scores(
            action_logprob=(logp * weights).sum(-1),
            values=values,
            entropy=lp.masked_mean(ent, mask),
            token_logprobs=logp,
            lengths=n,
            boundaries=boundaries,
        )


#: Below this many parameters a model is bound by per-op overhead on a CPU: a second torch thread is
#: hardly faster on an idle machine and much slower on a busy one (OpenMP threads spin and contend).
SMALL_MODEL_PARAMS = 5_000_000


@contextlib.contextmanager
def cpu_threads(policy: "VLMPolicy", threads: int = 0) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads, then restore the count.

    ``threads=0`` is automatic: one thread for a model under ``SMALL_MODEL_PARAMS`` on the CPU (the
    tiny preset), torch's setting otherwise.
    """
    before = torch.get_num_threads()
    set_cpu_threads(policy, threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def set_cpu_threads(policy: "VLMPolicy", threads: int = 0) -> None:
    """Set torch's CPU thread count for ``policy`` (``threads=0``: automatic, see ``cpu_threads``)."""
    small = sum(p.numel() for p in policy.parameters()) < SMALL_MODEL_PARAMS
    if threads or (small and policy.device.type == "cpu"):
        torch.set_num_threads(threads or 1)


# --- loading helpers --------------------------------------------------------------------------------


def _hf(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _read_config(path: Path) -> PolicyConfig:
    data = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(PolicyConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{path}: unknown policy setting(s) {', '.join(unknown)}; remove them or update vlmrl")
    return PolicyConfig(**data)


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or Path(path).expanduser().exists()


def _load_model(path: str, config: PolicyConfig) -> nn.Module:
    local = Path(path).expanduser()
    if _looks_local(path):
        if not local.is_dir():
            raise UserError(f"model folder {path!r} does not exist: give a folder with config.json or a hub id")
        if not (local / "config.json").is_file():
            raise UserError(f"{path!r} is not a Hugging Face model folder (no config.json): point at a saved VLM")
    # an absolute folder, so a saved adapter's base_model_name_or_path works from any directory
    source = str(local.resolve()) if local.is_dir() else path
    try:
        hf_config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UserError(
            f"could not load model {path!r}: it is neither a local model folder nor a hub id available "
            f"offline ({type(err).__name__}). Download it first (e.g. `hf download {path}`) or give a local folder"
        ) from err
    if type(hf_config) not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        raise UserError(
            f"{path!r} is a {hf_config.model_type!r} model, not an image-text-to-text (vision-language) model: "
            "use a VLM such as Qwen2-VL, Qwen2.5-VL or LLaVA"
        )
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=_DTYPES[config.dtype])
    # Sampling settings come only from generate()'s arguments: drop the checkpoint's defaults
    # (top_k=50, repetition_penalty, ...) that HF would otherwise fill into our generation config.
    old = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=old.bos_token_id, eos_token_id=old.eos_token_id, pad_token_id=old.pad_token_id
    )
    return model


def _load_processor(path: str) -> Any:
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load the processor of {path!r}: {err}") from err
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise UserError(
            f"{path!r} has no image processor (AutoProcessor gave a {type(processor).__name__}): "
            "save the model's full processor with it (and `import vlmrl.policy` for Qwen without torchvision)"
        )
    if not getattr(processor, "chat_template", None):
        raise UserError(f"the processor of {path!r} has no chat template: save one with the processor")
    tok = processor.tokenizer
    tok.padding_side = "left"  # batched generation appends on the right
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return processor


def _module_name(root: nn.Module, target: nn.Module) -> str | None:
    for name, module in root.named_modules():
        if module is target:
            return name
    return None


def _vision_name(model: nn.Module) -> str | None:
    base = getattr(model, "model", model)
    for attr in _VISION_ATTRS:
        if isinstance(getattr(base, attr, None), nn.Module):
            return _module_name(model, getattr(base, attr))
    return None


def lora_target_regex(model: nn.Module, config: PolicyConfig) -> str:
    """peft ``target_modules`` regex: the LoRA names inside the language model (and vision tower if on).

    Vision towers also have ``q_proj``-like layers, so the match is anchored at the LM's path.
    """
    lm = _module_name(model, model.get_decoder())
    if not lm:
        raise UserError(f"cannot find the language model inside {type(model).__name__} to place LoRA adapters")
    parts = [rf"{re.escape(lm)}\..*\.(?:{'|'.join(map(re.escape, config.lora_targets))})"]
    if config.train_vision:
        vision = _vision_name(model)
        if vision is None:
            raise UserError(f"train_vision: no vision tower found in {type(model).__name__}")
        names = sorted(set(config.lora_targets) | set(config.lora_vision_targets))
        parts.append(rf"{re.escape(vision)}\..*\.(?:{'|'.join(map(re.escape, names))})")
    return "|".join(f"(?:{p})" for p in parts)


def _apply_finetune(model: nn.Module, config: PolicyConfig, adapter_dir: Path | None) -> nn.Module:
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=config.finetune == "lora")
        if config.finetune != "lora":  # continue without adapters: fold them into the weights
            model = model.merge_and_unload()
    if config.finetune == "lora":
        if adapter_dir is None:
            lora = LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=lora_target_regex(model, config),
                bias="none",
            )
            model = get_peft_model(model, lora)
        return model
    for p in model.parameters():
        p.requires_grad_(config.finetune == "full")
    if config.finetune == "full" and not config.train_vision:
        vision = _vision_name(model)
        if vision:
            for p in model.get_submodule(vision).parameters():
                p.requires_grad_(False)
    return model


def _enable_checkpointing(model: nn.Module) -> None:
    # non-reentrant: works with a frozen base (LoRA) without forcing grads onto the input embeddings
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _stop_ids(tokenizer: Any, model: nn.Module) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.insert(0, tokenizer.eos_token_id)
    if not ids:
        raise UserError("the model has no end-of-sequence token (tokenizer.eos_token): set one in its tokenizer")
    return [int(i) for i in ids]


def _placeholder_ids(model: nn.Module, processor: Any) -> list[int]:
    """Image/video placeholder ids: never sampled, since the forward pass reads them as image slots."""
    vocab = model.get_output_embeddings().out_features
    found = {getattr(model.config, a, None) for a in ("image_token_id", "image_token_index", "video_token_id", "video_token_index")}
    found |= {getattr(processor, a, None) for a in ("image_token_id", "video_token_id")}
    return sorted(int(i) for i in found if isinstance(i, int) and 0 <= i < vocab)


# --- batching helpers ------------------------------------------------------------------------------


def _text_only(images: Sequence[Any]) -> bool:
    """True when every image is None (a text-only batch), False when none is; a mix is refused,
    since one padded batch cannot hold rows with and without pixel inputs for every architecture."""
    missing = sum(im is None for im in images)
    if 0 < missing < len(images):
        raise UserError(
            f"{missing} of {len(images)} prompts have no image: a batch must be all images or all text-only "
            "(None); split it by whether the observation has an image"
        )
    return missing == len(images) > 0


def _response_id_lists(policy: VLMPolicy, responses: Any, lengths: Any, batch: int) -> list[list[int]]:
    if responses is None:
        return [[] for _ in range(batch)]
    if isinstance(responses, torch.Tensor):
        if lengths is None:
            raise UserError("a padded response tensor needs its lengths: pass lengths=[...]")
        rows = [row[: int(n)].tolist() for row, n in zip(responses.cpu(), torch.as_tensor(lengths).cpu())]
    elif all(isinstance(r, str) for r in responses):
        eos = policy.stop_token_ids[0]
        rows = [policy.tokenizer(r, add_special_tokens=False)["input_ids"] + [eos] for r in responses]
    else:
        rows = [[int(t) for t in r] for r in responses]
        if lengths is not None:
            rows = [r[: int(n)] for r, n in zip(rows, lengths)]
    if len(rows) != batch:
        raise UserError(f"got {len(rows)} responses for {batch} prompts: give one response per prompt")
    return rows


def _append_left_padded(
    inputs: dict[str, torch.Tensor], responses: list[list[int]], pad_id: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Append each row's response after its prompt and left-pad again.

    Per-token tensors (shape [B, P] like input_ids: attention_mask, mm_token_type_ids, ...) are
    realigned; the response gets attention 1 and type 0 (text). Returns (inputs, response mask [B, L]).
    """
    ids, attn = inputs["input_ids"], inputs["attention_mask"]
    batch, width = ids.shape
    plen = attn.sum(1).tolist()
    full = [p + len(r) for p, r in zip(plen, responses)]
    total = max(full) if full else 0
    out = dict(inputs)
    for key, value in inputs.items():
        if not (isinstance(value, torch.Tensor) and value.shape == ids.shape):
            continue
        fill = pad_id if key == "input_ids" else 0
        new = torch.full((batch, total), fill, dtype=value.dtype)
        for i in range(batch):
            start, stop = total - full[i], total - len(responses[i])
            new[i, start:stop] = value[i, width - plen[i] :]
            if key == "input_ids":
                new[i, stop:] = torch.tensor(responses[i], dtype=value.dtype)
            elif key == "attention_mask":
                new[i, stop:] = 1
        out[key] = new
    col = torch.arange(total)[None]
    rlen = torch.tensor([len(r) for r in responses])[:, None]
    return out, col >= total - rlen


def _lengths_to_stop(response: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """[B, N] sampled ids -> [B] tokens up to and including the first stop token (N if none)."""
    is_stop = torch.isin(response, torch.tensor(stop_ids, device=response.device))
    n = response.shape[1]
    first = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, torch.full_like(is_stop[:, 0], n, dtype=torch.long))
    return first.long()


__all__ = ["Encoded", "Scores", "Generation", "NonFiniteLogits", "PolicyConfig", "VLMPolicy", "ValueHead",
           "lora_target_regex"]

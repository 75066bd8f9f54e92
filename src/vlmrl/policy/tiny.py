"""Build a tiny vision-language model offline, saved in Hugging Face format.

Nothing is downloaded: the model is a real ``transformers`` architecture (Qwen2-VL, Qwen2.5-VL,
LLaVA or LLaVA-NeXT) created from a small config with random weights, and its tokenizer is a
byte-level BPE trained here with the ``tokenizers`` library on the tasks' own text. Byte-level means
any text encodes (no unknown token), so the model can be prompted and sampled like any other.
The folder loads back with ``AutoModelForImageTextToText.from_pretrained`` and
``AutoProcessor.from_pretrained`` (after ``import vlmrl.policy``, which registers the processors).

``tiny_preset_path()`` builds the ``--model tiny`` preset once and caches it;
``tiny_preset_path(task="ALFWorld")`` builds ALFWorld's own (a wider text vocabulary and context,
its tokenizer trained on train-split walkthroughs; the vision tower is there but never used);
``tiny_preset_path(task=my_task)`` for any other task (a user's own) builds the same small model
with a tokenizer trained on that task's text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
)
from transformers.models.clip.configuration_clip import CLIPVisionConfig
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava.processing_llava import LlavaProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlmrl.errors import UserError
from vlmrl.policy.hf import quiet_library_bars
from vlmrl.policy.processors import PROCESSOR_FOR_ARCH, register_processors

if TYPE_CHECKING:
    from vlmrl.tasks import Task

ARCHS = ("qwen2_vl", "qwen2_5_vl", "llava", "llava_next")

# Special tokens shared by every arch (each uses its own subset); Qwen's names, LLaVA's "<image>".
PAD, EOS, BOS_TURN = "<|endoftext|>", "<|im_end|>", "<|im_start|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
LLAVA_IMAGE = "<image>"
SPECIAL_TOKENS = [PAD, BOS_TURN, EOS, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, LLAVA_IMAGE]


@dataclass
class TinySize:
    """Sizes of the tiny model; every field can be overridden through ``build_tiny_vlm(**overrides)``."""

    # language model
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    # vision tower (a ViT from scratch)
    vision_hidden_size: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    # the processor resizes every image to image_size x image_size; patch_size px per ViT patch
    image_size: int = 84
    patch_size: int = 14
    # tokenizer
    vocab_size: int = 1024
    max_position_embeddings: int = 2048
    # std of the random initial weights. HF's default 0.02 suits wide models; at width 64 it leaves
    # attention nearly uniform and SFT sits on a plateau for ~200 steps before it reads the image.
    initializer_range: float = 0.15


def _size_from(overrides: dict[str, Any]) -> TinySize:
    names = {f.name for f in dataclasses.fields(TinySize)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise UserError(f"unknown tiny-model setting(s) {', '.join(unknown)}: use any of {', '.join(sorted(names))}")
    size = TinySize(**overrides)
    if size.hidden_size % size.num_heads or size.num_heads % size.num_kv_heads:
        raise UserError("tiny model: hidden_size must divide by num_heads, and num_heads by num_kv_heads")
    if size.vision_hidden_size % size.vision_heads:
        raise UserError("tiny model: vision_hidden_size must divide by vision_heads")
    if size.image_size % size.patch_size:
        raise UserError(f"tiny model: image_size {size.image_size} must be a multiple of patch_size {size.patch_size}")
    return size


# --- text and tokenizer ---------------------------------------------------------------------------


def task_texts(episodes: int = 12, max_steps: int = 8, seed: int = 0,
               tasks: Sequence["str | Task"] | None = None) -> list[str]:
    """Prompts and responses from seeded episodes of each task (names or Task objects; default the
    card tasks): expert and random-action answers, with and without CoT. A task without an expert
    gives its prompts and random legal actions, action-only (CoT answers need its expert side).

    Built-in tasks named by a name whose module is missing are skipped, so this works while tasks
    are still being written; a Task object that fails raises.
    """
    from vlmrl.tasks import CARD_TASKS, get_task

    rng = np.random.default_rng(seed)
    texts: list[str] = []
    for item in tasks or CARD_TASKS:
        try:
            task = get_task(item)
            env = task.make_env()
        except (ImportError, AttributeError):
            if not isinstance(item, str):
                raise
            continue
        try:
            for ep in range(episodes):
                _, info = env.reset(seed=seed + ep)
                for _ in range(max_steps):
                    n = len(task.legal_actions(info))
                    if task.has_expert:
                        expert = task.expert_action(info)
                        rand = int(rng.integers(n))
                        for cot in (True, False):
                            texts.append(task.prompt(info, cot))
                            texts.append(task.expert_response(info, cot))
                            texts.append(task.response(info, rand, cot))
                        action = expert if rng.random() < 0.5 else rand
                    else:  # the prompts, and a random legal action without the CoT fields (read_state)
                        action = int(rng.integers(n))
                        texts += [task.prompt(info, True), task.prompt(info, False), task.response(info, action, False)]
                    _, _, terminated, truncated, info = env.step(action)
                    if terminated or truncated:
                        break
        finally:
            env.close()
    return texts


# Used only when no task module can be imported: enough text for a working tokenizer.
_FALLBACK_TEXTS = [
    'You are playing a game. Answer with one JSON object and nothing else, in this format:',
    '{"current": "3", "target": "7", "thoughts": "3 is less than 7, so I move right.", "action": "+"}',
    '{"cards": [1, 2, 10, 13], "formula": "1+2*", "thoughts": "I add the next card.", "action": "10"}',
    '{"action": "stand"}', '{"action": "-"}', "0123456789 +-*/()=", "hit stand",
]


# A JSON key with its quotes, colon and the opening quote of the value: `"action": "`.
_JSON_KEY = Regex(r'"[^"\n]*": "')


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Tokenizer:
    """A byte-level BPE over ``texts``; short to generate, with token edges where the pipeline needs them.

    - No word-level regex split, so merges cross spaces and punctuation: the fixed phrases of prompts
      and thoughts become a few long tokens and responses stay short to generate.
    - Each JSON key (``"action": "``) is one piece of its own, so a key is about one token and never
      shares a token with the value before it or after it (the CoT/action boundary is a token edge).
    - Newlines stand alone, so the prompt/response boundary after ``assistant\n`` is a token edge.
    - Digits stand alone, so numbers are written and read digit by digit.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(_JSON_KEY, behavior="isolated"),
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The chat roles appear in every sequence: make each a single token.
    tok.train_from_iterator(list(texts) + ["system", "user", "assistant"] * 64, trainer=trainer)
    return tok


def chat_template(image_text: str) -> str:
    """ChatML with system/user/assistant turns; an image part becomes ``image_text``."""
    return (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{{ '" + image_text + "' }}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{ '<|im_end|>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
    )


def _wrap_tokenizer(tok: Tokenizer, template: str, max_length: int = 2048) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",  # batched generation appends on the right
        chat_template=template,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )


# --- per-architecture configs and processors ------------------------------------------------------


def _language_model(size: TinySize, vocab: int, ids: dict[str, int]) -> dict[str, Any]:
    """The text-model fields every arch shares: sizes, special token ids, tied embeddings, init scale."""
    return dict(
        vocab_size=vocab,
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads,
        max_position_embeddings=size.max_position_embeddings,
        bos_token_id=ids[BOS_TURN],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        tie_word_embeddings=True,
        initializer_range=size.initializer_range,
    )


def _qwen_text(size: TinySize, vocab: int, ids: dict[str, int]) -> dict[str, Any]:
    head_dim = size.hidden_size // size.num_heads
    half = head_dim // 2
    # mrope splits the rotary half-dimension into (temporal, height, width) sections summing to half
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    return dict(
        **_language_model(size, vocab, ids),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        layer_types=["full_attention"] * size.num_layers,
        max_window_layers=size.num_layers,
    )


def _qwen_ids(ids: dict[str, int]) -> dict[str, int]:
    return dict(
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
    )


def _qwen_image_processor(size: TinySize) -> Qwen2VLImageProcessorPil:
    pixels = size.image_size * size.image_size
    # min = max pixels pins every image to image_size x image_size (aspect ratio 1, like the envs)
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=size.patch_size, merge_size=2, temporal_patch_size=2
    )


def _config(arch: str, size: TinySize, vocab: int, ids: dict[str, int]):
    if arch == "qwen2_vl":
        vision = dict(
            depth=size.vision_layers,
            embed_dim=size.vision_hidden_size,
            hidden_size=size.hidden_size,  # the merger projects to the LM width
            num_heads=size.vision_heads,
            mlp_ratio=4,
            patch_size=size.patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
            initializer_range=size.initializer_range,
        )
        return Qwen2VLConfig(text_config=_qwen_text(size, vocab, ids), vision_config=vision, tie_word_embeddings=True, initializer_range=size.initializer_range, **_qwen_ids(ids))
    if arch == "qwen2_5_vl":
        vision = dict(
            depth=size.vision_layers,
            hidden_size=size.vision_hidden_size,
            intermediate_size=4 * size.vision_hidden_size,
            out_hidden_size=size.hidden_size,
            num_heads=size.vision_heads,
            patch_size=size.patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=2 * 2 * size.patch_size,
            fullatt_block_indexes=[size.vision_layers - 1],
            initializer_range=size.initializer_range,
        )
        return Qwen2_5_VLConfig(text_config=_qwen_text(size, vocab, ids), vision_config=vision, tie_word_embeddings=True, **_qwen_ids(ids))
    text = LlamaConfig(**_language_model(size, vocab, ids))
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden_size,
        intermediate_size=4 * size.vision_hidden_size,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=size.image_size,
        patch_size=size.patch_size,
        projection_dim=size.vision_hidden_size,
        initializer_range=size.initializer_range,
    )
    common = dict(
        text_config=text,
        vision_config=vision,
        image_token_index=ids[LLAVA_IMAGE],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )
    if arch == "llava":
        return LlavaConfig(image_seq_length=(size.image_size // size.patch_size) ** 2, **common)
    # one grid cell of the base size: LLaVA-NeXT's anyres tiling kept to the minimum
    return LlavaNextConfig(image_grid_pinpoints=[[size.image_size, size.image_size]], **common)


def _processor(arch: str, size: TinySize, tokenizer: PreTrainedTokenizerFast):
    if arch in PROCESSOR_FOR_ARCH:
        tokenizer.image_token = IMAGE_PAD  # read by the Qwen processors
        return PROCESSOR_FOR_ARCH[arch](
            image_processor=_qwen_image_processor(size), tokenizer=tokenizer, chat_template=tokenizer.chat_template
        )
    square = {"height": size.image_size, "width": size.image_size}
    kwargs = dict(size={"shortest_edge": size.image_size}, crop_size=square)
    if arch == "llava":
        image_processor = LlavaImageProcessorPil(**kwargs)
        cls = LlavaProcessor
    else:
        image_processor = LlavaNextImageProcessorPil(image_grid_pinpoints=[[size.image_size, size.image_size]], **kwargs)
        cls = LlavaNextProcessor
    return cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=size.patch_size,
        vision_feature_select_strategy="default",
        chat_template=tokenizer.chat_template,
        image_token=LLAVA_IMAGE,
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
    )


# --- public API -----------------------------------------------------------------------------------


def build_tiny_vlm(
    out_dir: str | os.PathLike,
    arch: str = "qwen2_vl",
    texts: Sequence[str] | None = None,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Create a tiny ``arch`` VLM with random weights and a tokenizer trained on ``texts``; save it.

    ``texts`` defaults to ``task_texts(seed=seed)``; ``overrides`` set ``TinySize`` fields.
    Returns ``out_dir``, which then loads with the Auto classes like any Hugging Face checkpoint.
    """
    if arch not in ARCHS:
        raise UserError(f"unknown tiny-model arch {arch!r}: choose one of {', '.join(ARCHS)}")
    size = _size_from(overrides)
    register_processors()
    if texts is None:
        texts = task_texts(seed=seed) or _FALLBACK_TEXTS
    tok = train_tokenizer(texts, size.vocab_size)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    image_text = VISION_START + IMAGE_PAD + VISION_END if arch in PROCESSOR_FOR_ARCH else LLAVA_IMAGE
    tokenizer = _wrap_tokenizer(tok, chat_template(image_text), size.max_position_embeddings)
    processor = _processor(arch, size, tokenizer)

    config = _config(arch, size, tok.get_vocab_size(), ids)
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS_TURN], eos_token_id=ids[EOS], pad_token_id=ids[PAD], max_new_tokens=64
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_library_bars():
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return out


TINY_VERSION = "1"
#: The ``--model tiny`` preset: a ~0.45M-parameter Qwen2-VL (2+2 layers, width 64) that sees the
#: 300 px observations at 84 px through 14 px patches (9 image tokens after the 2x2 merge), with
#: initial weights of std 0.15. Measured with ``benchmarks/reading.py`` (SFT on NumberLine, lr 1e-3,
#: batch 16, 2 shared CPU cores): reads both numbers on 100% of held-out images after 50-75 steps
#: (3 seeds); with HF's default init std 0.02 it needs 250-300 steps (4 seeds); at 56 px it stays near
#: chance after 250 steps (a digit then spans about one patch); 112 px works but is no faster.
TINY_PRESET: dict[str, Any] = {"arch": "qwen2_vl", "initializer_range": 0.15}


#: ALFWorld's tiny preset: the same Qwen2-VL class, sized for text. Prompts run to ~400-800 tokens
#: (room description + a few dozen admissible commands), so a larger vocabulary (fewer tokens per
#: command), a longer context and a wider, deeper LM that can learn to copy a command from the list.
ALFWORLD_PRESET: dict[str, Any] = {
    "arch": "qwen2_vl", "hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
    "intermediate_size": 384, "vocab_size": 4096, "max_position_embeddings": 4096,
    "vision_hidden_size": 32, "vision_layers": 1, "vision_heads": 2, "initializer_range": 0.1,
}
#: train games whose walkthroughs (prompts and responses, CoT and action-only) train its tokenizer
ALFWORLD_TOKENIZER_GAMES = 40


def alfworld_texts(games: int = ALFWORLD_TOKENIZER_GAMES, seed: int = 0) -> list[str]:
    """Prompts and CoT walkthrough responses of ``games`` train-split ALFWorld games (needs
    ALFWORLD_DATA); the action-only answer is a suffix of the CoT one, so it needs no text of its own.

    Read through ``vlmrl.tasks.demos.cached_demonstrations``: collected once (about 2 s a game), then cached.
    """
    from vlmrl.tasks import get_task
    from vlmrl.tasks.demos import cached_demonstrations

    demos = cached_demonstrations(get_task("ALFWorld"), games, 0.0, True, seed, {"split": "train"})
    return [text for d in demos for text in (d.prompt, d.response)]


# Built-in tasks that use the card preset (as they always have): the card tasks, and ALFWorld-THOR,
# whose env needs a THOR build that cannot run here, so its text could not be played for a tokenizer.
_CARD_PRESET_TASKS = ("NumberLine", "EZPoints", "Points24", "Blackjack", "ALFWorld-THOR")


def tiny_preset_path(cache_dir: str | os.PathLike | None = None, task: "str | Task | None" = None) -> Path:
    """The ``--model tiny`` preset for ``task`` (a name, an import path or a Task), built on first use
    and cached under ``cache_dir``.

    ``cache_dir`` defaults to ``$VLMRL_CACHE`` or ``~/.cache/vlmrl``. The folder name carries the
    preset version and a digest of the tokenizer's training text, so a change in the tasks' prompts
    builds a fresh preset instead of reusing a stale tokenizer. The build goes to a temporary folder
    renamed into place, so concurrent or interrupted builds never leave a half-written model.
    ``task="ALFWorld"`` gives ``ALFWORLD_PRESET``, whose digest covers the preset and the ALFWorld task
    class's source instead of the text (playing the games just to name the folder would take minutes).
    None or a built-in card task gives the card-task preset (``tiny-1-<digest>``). Any other task,
    a user's own included, gets ``TINY_PRESET`` with a tokenizer trained on its own text
    (``task_texts`` of a few seeded episodes), in ``tiny-<name>-1-<digest>``; a text-only task gets
    the same model, whose vision tower it never uses.
    """
    if isinstance(task, str) and task.removeprefix("vlmrl/").removesuffix("-v0").casefold() == "alfworld":
        task_obj = None  # known by its name: no need to import the ALFWorld module to name the folder
        kind = "alfworld"
    elif task is None:
        task_obj, kind = None, "cards"
    else:
        from vlmrl.tasks import get_task

        task_obj = get_task(task)
        builtin = task_obj.name in (*_CARD_PRESET_TASKS, "ALFWorld") and get_task(task_obj.name) is task_obj
        kind = ("alfworld" if task_obj.name == "ALFWorld" else "cards") if builtin else "own"
    if kind == "alfworld":
        import inspect

        from vlmrl.tasks.alfworld import ALFWorldTask

        preset = ALFWORLD_PRESET
        spec: list[Any] = ["ALFWorld", preset, ALFWORLD_TOKENIZER_GAMES, inspect.getsource(ALFWorldTask)]
        name, texts = "tiny-alfworld", None
    else:
        preset = TINY_PRESET
        texts = task_texts(tasks=[task_obj]) if kind == "own" else task_texts() or _FALLBACK_TEXTS
        size = _size_from({k: v for k, v in TINY_PRESET.items() if k != "arch"})
        spec = [TINY_PRESET["arch"], dataclasses.asdict(size), texts]
        # the task's name in the folder is for people; the digest of its text tells tasks apart
        name = "tiny" if kind == "cards" else "tiny-" + (re.sub(r"[^a-z0-9]+", "-", task_obj.name.lower()).strip("-") or "task")
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(cache_dir or os.environ.get("VLMRL_CACHE") or Path.home() / ".cache" / "vlmrl")
    path = root / f"{name}-{TINY_VERSION}-{digest}"
    if (path / "config.json").exists():
        return path
    if texts is None:
        texts = alfworld_texts()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-{TINY_VERSION}-", dir=root))
    try:
        build_tiny_vlm(tmp, texts=texts, **preset)
        try:
            tmp.rename(path)
        except OSError:  # another process finished first: keep its copy
            if not (path / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


__all__ = ["ALFWORLD_PRESET", "ARCHS", "TINY_PRESET", "alfworld_texts", "TINY_VERSION", "TinySize", "build_tiny_vlm", "task_texts", "tiny_preset_path", "train_tokenizer"]

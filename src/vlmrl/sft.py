"""Supervised fine-tuning on expert demonstrations: the step before PPO.

Demonstrations come from playing seeded episodes with the task's expert, optionally mixed with random
actions (``random_action_fraction``) to make a deliberately imperfect starting policy, as in RL4VLM.
Each step is one (image, prompt, response) example whose response is ``task.response(info, a, cot)``
for the action ``a`` actually taken; text tasks (ALFWorld) give examples without an image. The loss
is the cross-entropy of the response tokens only (and the end-of-turn token, so the model learns to
stop). The result is saved with ``save_pretrained`` (model + processor), so
``vlmrl eval TASK --policy DIR`` and PPO load it like any checkpoint.

A run folder holds ``sft_config.json`` (written when the run starts), ``checkpoints/checkpoint-N``
(every ``checkpoint_every`` steps: weights, processor, and ``trainer_state.pt`` with the optimizer,
schedule, shuffling generator, the rest of the epoch's order, the torch RNG and the losses so far),
and at the end the model, ``sft_summary.json`` and ``sft_losses.json``. ``run_sft(cfg, resume=True)``
(``vlmrl sft --resume``) continues a killed run from its newest checkpoint to the same final weights,
bit for bit, as a run never interrupted.

DAgger (Ross et al., 2011; ``dagger_rounds`` > 0): after that SFT, each round the policy as trained so
far plays ``dagger_episodes`` seeded training episodes (``dagger_seed``: the demonstration seeds
continued, below the held-out range), the expert labels every state it visited (states where the
expert has no answer get none), the labeled steps join the demonstrations, and SFT continues on the
aggregate (``dagger_steps``, a fresh warmup + cosine schedule; AdamW's moments kept). A label is a
``Demo`` built exactly like a demonstration's: the expert's action in the response (CoT thoughts
included), the memory (``history_length``) holding the actions the policy took. The summary's
``dagger`` holds each round's episodes, success rate of the policy's own episodes, steps visited and
labeled, and the aggregate's size; ``dagger_episodes.json`` what the policy played (seed, actions).
A resume is exact here too: a checkpoint records the rounds' seeds and actions, and the aggregate is
rebuilt by replaying them on fresh envs (envs are deterministic given the seed), so it holds no images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vlmrl.algorithms import cosine_schedule
from vlmrl.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from vlmrl.config import SFTConfig, check_unchanged, validate
from vlmrl.errors import UserError
from vlmrl.files import write_atomic
from vlmrl.policy.hf import quiet_library_bars
from vlmrl.policy.presets import resolve_model
from vlmrl.seeds import demo_seed
from vlmrl.tasks import Task, get_task, require_expert
from vlmrl.tasks.base import Memory, episode_success, observation_image
from vlmrl.tasks.demos import Demo, cached_demonstrations, collect_demonstrations
from vlmrl.tasks.parsing import parse_action

IGNORE = -100  # label of tokens that carry no loss (prompt, image, padding)


# --- encoding ---------------------------------------------------------------------------------------


def encode_example(policy: Any, image: Any, prompt: str, response: str) -> dict[str, torch.Tensor]:
    """One example as model inputs with a batch dim of 1, plus ``labels`` (IGNORE outside the response).

    Built by ``VLMPolicy.encode``, so the chat template and the response ids (tokenised apart from
    the prompt, then the stop token) are exactly those that sampling and PPO use.
    """
    enc = policy.encode([image], [prompt], [response])
    out = dict(enc.inputs)
    out["labels"] = torch.where(enc.response_mask, out["input_ids"], torch.full_like(out["input_ids"], IGNORE))
    return out


def encode_all(policy: Any, demos: Sequence[Demo]) -> list[dict[str, torch.Tensor]]:
    """Encode every demonstration once (each step then only pads and concatenates).

    Identical (image, prompt, response) triples share one encoding: small tasks revisit the same
    states often (NumberLine has 30 distinct images), and the image processor is the costly part.
    """
    cache: dict[tuple[bytes, str, str], dict[str, torch.Tensor]] = {}
    out = []
    for d in demos:
        image = None if d.image is None else np.ascontiguousarray(d.image)
        seen = b"" if image is None else hashlib.sha1(image.tobytes()).digest() + str(image.shape).encode()
        key = (seen, d.prompt, d.response)
        if key not in cache:
            cache[key] = encode_example(policy, image, d.prompt, d.response)
        out.append(cache[key])
    return out


_SEQUENCE_KEYS = {"input_ids": None, "attention_mask": 0, "mm_token_type_ids": 0, "labels": IGNORE}


def collate(examples: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad the token sequences to one length; concatenate image tensors along dim 0.

    Each example has batch dim 1. Image tensors (pixel values, grids, sizes) stack along dim 0 for
    every supported arch (Qwen's flattened patches included, since their rows are per image).
    """
    width = max(e["input_ids"].shape[1] for e in examples)
    batch: dict[str, torch.Tensor] = {}
    for key in examples[0]:
        if key in _SEQUENCE_KEYS:
            fill = pad_id if _SEQUENCE_KEYS[key] is None else _SEQUENCE_KEYS[key]
            rows = [F.pad(e[key], (width - e[key].shape[1], 0), value=fill) for e in examples]
        else:
            rows = [e[key] for e in examples]
        batch[key] = torch.cat(rows, 0)
    return batch


# --- training --------------------------------------------------------------------------------------


def load_policy(
    path: str | os.PathLike, image_size: int | None = None, finetune: str = "full", train_vision: bool = True, dtype: str = "fp32"
) -> Any:
    """The model as a ``VLMPolicy`` ready to train (by default every weight, vision tower included:
    a model built from scratch must learn to see)."""
    from vlmrl.config import PolicyConfig
    from vlmrl.policy.model import VLMPolicy

    if finetune not in ("full", "lora"):
        raise UserError(f"sft finetune must be 'full' or 'lora', got {finetune!r}")
    policy = VLMPolicy.load(path, PolicyConfig(finetune=finetune, train_vision=train_vision, dtype=dtype))
    if image_size is not None:
        set_image_size(policy.processor, image_size)
    return policy


def set_image_size(processor: Any, image_size: int) -> None:
    """Make the processor resize every image to ``image_size`` x ``image_size``."""
    ip = processor.image_processor
    if hasattr(ip, "merge_size"):  # Qwen: pixel budget, pinned so the image stays square
        factor = ip.patch_size * ip.merge_size
        if image_size % factor:
            raise UserError(f"image_size {image_size} must be a multiple of {factor} for this model")
        ip.size = {"shortest_edge": image_size * image_size, "longest_edge": image_size * image_size}
    else:
        raise UserError("image_size can only be changed for Qwen-style processors; build the model at that size instead")


CONFIG_FILE = "sft_config.json"  # the run's SFTConfig, written when it starts; --resume reads it
STATE_FILE = "trainer_state.pt"  # in each checkpoint: what the weights alone cannot continue from
LOSSES_FILE = "sft_losses.json"  # the loss of every step, beside the final model
# fields that change nothing a run computes: a resume may give other values for them
_NOT_SETTINGS = ("out_dir", "progress")


def saved_config(out_dir: str | os.PathLike) -> SFTConfig:
    """The ``SFTConfig`` of the run in ``out_dir`` (its ``sft_config.json``), with ``out_dir`` as given."""
    path = Path(out_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"sft --resume: {out_dir} holds no SFT run to resume (no {CONFIG_FILE}): start it without --resume")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"sft --resume: {path} is not valid JSON ({e}): start a new --out") from None
    known = {f.name for f in dataclasses.fields(SFTConfig)}
    unknown = sorted(set(data) - known) if isinstance(data, dict) else ["<not an object>"]
    if unknown:
        raise UserError(f"sft --resume: {path} has settings this vlmrl does not know ({', '.join(unknown)}): start a new --out")
    return dataclasses.replace(SFTConfig(**data), out_dir=str(out_dir))


def check_resume_settings(saved: SFTConfig, given: dict[str, Any]) -> None:
    """One ``UserError`` naming every setting in ``given`` that differs from the saved run's
    (``out_dir`` and ``progress`` may: they change nothing the run computes)."""
    check_unchanged("sft", saved, given, free=_NOT_SETTINGS)


def _existing_run(out: Path) -> str | None:
    """What in ``out`` shows that it already holds an SFT run (None: nothing)."""
    for name in (CONFIG_FILE, "sft_summary.json"):
        if (out / name).is_file():
            return name
    return "checkpoints/" if list_checkpoints(out / "checkpoints") else None


def finished(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds a completed run (``save_final`` moves ``config.json`` in last)."""
    return (Path(out_dir) / "sft_summary.json").is_file() and (Path(out_dir) / "config.json").is_file()


def demos_digest(demos: Sequence[Demo]) -> str:
    """sha256 of the demonstrations (images, prompts, responses, expert flags), recorded in each
    checkpoint: a resume must train on exactly the examples the run started with."""
    h = hashlib.sha256()
    for d in demos:
        h.update(json.dumps([d.prompt, d.response, bool(d.expert), None if d.image is None else list(d.image.shape)]).encode())
        if d.image is not None:
            h.update(np.ascontiguousarray(d.image).tobytes())
    return h.hexdigest()


def run_sft(cfg: SFTConfig, callback: Callable[[int, Any], None] | None = None,
            demos: Sequence[Demo] | None = None, resume: bool = False) -> Path:
    """Collect demonstrations, fine-tune on the response tokens, save model + processor to ``out_dir``.

    ``callback(step, policy)``, if given, runs after every optimiser step with the ``VLMPolicy``
    being trained (for learning curves: ``policy.generate`` restores train mode itself).
    ``demos``, if given, are trained on instead of collecting ``cfg.episodes`` episodes (e.g. several
    cached ALFWorld sets joined).

    ``out_dir`` must not hold a run already, unless ``resume``: then ``cfg`` must equal the run's
    saved config (``out_dir`` and ``progress`` aside), and training continues from the newest
    checkpoint (from step 0 if there is none yet) to the weights an uninterrupted run would give.
    """
    validate(cfg)
    task = get_task(cfg.task)
    require_expert(task, "vlmrl sft --dagger-rounds" if cfg.dagger_rounds else "vlmrl sft")
    out = Path(cfg.out_dir)
    if resume:
        check_resume_settings(saved_config(out), dataclasses.asdict(cfg))
        if finished(out):
            return out  # nothing left to do
    elif (found := _existing_run(out)) is not None:
        raise UserError(f"sft: {out} already holds an SFT run ({found}): continue it with --resume, or pass a new --out")
    threads = torch.get_num_threads()
    # A library call leaves the process as it found it: thread count and global RNG restored.
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # for any dropout; shuffling has its own generator
            return _train(cfg, task, callback, demos, resume)
    finally:
        torch.set_num_threads(threads)


def _phase_steps(cfg: SFTConfig, phase: int, examples: int) -> int:
    """Optimiser steps of phase ``phase`` (0: the SFT on the demonstrations; k: after DAgger round k)
    on ``examples`` examples: ``dagger_steps`` after a round where set, else ``steps``, else ``epochs``
    passes."""
    if phase and cfg.dagger_steps:
        return cfg.dagger_steps
    return cfg.steps or max(1, math.ceil(cfg.epochs * examples / cfg.batch_size))


def _chain(digest: str, demos: Sequence[Demo]) -> str:
    """The digest of the aggregate after ``demos`` joined it (each round hashes only its own examples)."""
    return hashlib.sha256((digest + demos_digest(demos)).encode()).hexdigest()


def _train(cfg: SFTConfig, task: Task, callback: Callable[[int, Any], None] | None,
           demos: Sequence[Demo] | None = None, resume: bool = False) -> Path:
    out = Path(cfg.out_dir)
    started = time.perf_counter()

    from vlmrl.policy.model import set_cpu_threads

    # clean=True: a save the kill interrupted is debris, never loaded
    checkpoint = latest_checkpoint(out / "checkpoints") if resume else None
    # a checkpoint is a model folder (full weights, or a LoRA adapter naming its base): load it like one
    source = checkpoint if checkpoint is not None else resolve_model(cfg.model, task)
    policy = load_policy(source, cfg.image_size, cfg.finetune, cfg.train_vision, cfg.dtype)
    model, processor = policy.model, policy.processor  # model: the peft wrapper under LoRA
    set_cpu_threads(policy, cfg.threads)  # run_sft restores the process's thread count
    if not resume:  # only now: settings that fail to load (model, image_size) leave no folder behind
        write_atomic(out / CONFIG_FILE, json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    if demos is None and task.text_only:
        demos = cached_demonstrations(task, cfg.episodes, cfg.random_action_fraction, cfg.cot, cfg.seed, cfg.env_kwargs,
                                      history_length=cfg.history_length)
    elif demos is None:
        demos = collect_demonstrations(task, cfg.episodes, cfg.random_action_fraction, cfg.cot, cfg.seed,
                                       env_kwargs=cfg.env_kwargs, history_length=cfg.history_length)
    demos = [d for d in demos if d.expert or not cfg.expert_only]
    if not demos:
        raise UserError(f"sft: no demonstrations collected for {task.name}: raise episodes")
    saving = bool(cfg.checkpoint_every or checkpoint is not None)
    digest = demos_digest(demos) if saving else ""
    examples = encode_all(policy, demos)
    pad_id = policy.pad_token_id

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    history: list[float] = []
    done = phase = phase_step = 0  # steps in all; the phase (0: SFT, k: after DAgger round k); its steps
    played: list[list[PlayedEpisode]] = []  # each DAgger round's episodes, so far
    rounds: list[dict[str, Any]] = []  # each round's log line
    state = None
    if checkpoint is not None:
        state = _restore(checkpoint, opt, gen, policy.device)
        done, order, history = int(state["step"]), list(state["order"]), list(state["losses"])
        phase, phase_step = int(state.get("phase", 0)), int(state.get("phase_step", done))
        played = [[PlayedEpisode(**e) for e in r] for r in state.get("dagger_episodes", [])]
        rounds = list(state.get("dagger_rounds", []))
        # the aggregate this phase trains on, rebuilt by replaying the policy's recorded actions
        # (envs are deterministic given the seed), so a checkpoint holds no images
        for episodes in played:
            new = replay_round(task, cfg, episodes)
            examples += encode_all(policy, new)
            digest = _chain(digest, new)
        if state["demos_sha256"] != digest:
            raise UserError(f"sft --resume: the demonstrations differ from those {checkpoint} was trained on "
                            "(a changed task, expert, env or demos= argument): start a new --out")

    while True:
        total = _phase_steps(cfg, phase, len(examples))
        # each phase warms up and decays afresh (a decayed lr would barely learn the new labels);
        # AdamW's moments carry over
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s, total=total: cosine_schedule(s, total, cfg.warmup_steps, cfg.min_lr_ratio))
        if state is not None:  # the restored phase's schedule (once: later phases start afresh)
            sched.load_state_dict(state["scheduler"])
            for group, lr in zip(opt.param_groups, sched.get_last_lr()):
                group["lr"] = lr  # building the scheduler had set its step-0 lr
            state = None
        last = phase == cfg.dagger_rounds
        desc = f"sft {task.name}" + (f" dagger {phase}/{cfg.dagger_rounds}" if phase else "")
        model.train()
        bar = tqdm(range(phase_step, total), initial=phase_step, total=total, desc=desc, disable=not cfg.progress)
        for step in bar:
            if len(order) < cfg.batch_size:  # reshuffle per epoch
                order += torch.randperm(len(examples), generator=gen).tolist()
            idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
            batch = collate([examples[i] for i in idx], pad_id)
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            done += 1
            history.append(loss.item())
            bar.set_postfix(loss=f"{history[-1]:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            if callback is not None:
                callback(done, policy)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and not (last and step + 1 == total):
                # taken after the callback, which may draw from the RNG too: the resumed run skips it
                saved = {"step": done, "phase": phase, "phase_step": step + 1, "order": list(order),
                         "losses": list(history), "demos_sha256": digest,
                         "dagger_episodes": [[dataclasses.asdict(e) for e in r] for r in played],
                         "dagger_rounds": [dict(r) for r in rounds],
                         "torch_rng": torch.get_rng_state(),
                         "cuda_rng": torch.cuda.get_rng_state(policy.device) if policy.device.type == "cuda" else None}
                save_checkpoint(out / "checkpoints", done, _writer(model, processor, opt, sched, gen, saved))
        bar.close()
        if last:
            break
        # DAgger round: the policy as trained so far plays, the expert labels what it saw
        phase, phase_step, order = phase + 1, 0, []  # a new epoch over the grown aggregate
        new, episodes = dagger_round(policy, task, cfg, phase)
        played.append(episodes)
        examples += encode_all(policy, new)
        if saving:
            digest = _chain(digest, new)
        rounds.append({
            "round": phase,
            "episodes": len(episodes),
            "success_rate": float(np.mean([e.success for e in episodes])),
            "visited_steps": sum(len(e.actions) for e in episodes),
            "labeled_steps": len(new),
            "aggregate": len(examples),
            "sft_steps": _phase_steps(cfg, phase, len(examples)),
        })
        if cfg.progress:
            tqdm.write("dagger " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in rounds[-1].items()))

    model.eval()
    summary = {
        "config": dataclasses.asdict(cfg),
        "demonstrations": len(demos),
        "expert_fraction": float(np.mean([d.expert for d in demos])),
        "steps": done,
        "final_loss": float(np.mean(history[-10:])),
        "seconds": round(time.perf_counter() - started, 1),  # of this process only, after a resume
    }
    if cfg.dagger_rounds:
        summary["dagger"] = {"aggregate": len(examples), "rounds": rounds}
        # what the policy played, so anyone can replay its episodes and check the labels
        write_atomic(out / DAGGER_FILE, json.dumps([[dataclasses.asdict(e) for e in r] for r in played]) + "\n")
    if cfg.finetune == "lora":  # a plain HF folder: the adapters folded into the weights
        model = model.merge_and_unload()
    save_final(model, processor, out, summary, history)
    return out


def _restore(checkpoint: Path, opt: Any, gen: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Put the optimizer, shuffling generator and RNG of ``checkpoint`` back; return its trainer
    state (the caller rebuilds the phase's schedule and checks the demonstrations' digest)."""
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    if "order" not in state:
        raise UserError(f"sft --resume: {checkpoint} has no resume state (an older vlmrl wrote it): start a new --out")
    opt.load_state_dict(state["optimizer"])  # moves the moments onto the parameters' device
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])  # inside run_sft's fork_rng: the caller's RNG is untouched
    if state["cuda_rng"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return state


# --- DAgger ------------------------------------------------------------------------------------------

DAGGER_FILE = "dagger_episodes.json"  # beside the final model: each round's episodes (seed, actions, success)
MAX_EPISODE_STEPS = 100  # as collect_demonstrations: a cap for an env without a time limit of its own


@dataclass
class PlayedEpisode:
    """One episode the policy played in a DAgger round: enough to replay it exactly."""

    seed: int  # its reset seed
    actions: list[int]  # the actions the policy took, in order
    success: bool  # won (``episode_success``); an episode cut at MAX_EPISODE_STEPS counts as lost


@dataclass
class _Slot:  # one env's running episode
    index: int
    seed: int
    obs: Any
    info: dict[str, Any]
    memory: Memory
    rng: np.random.Generator  # the parser's, for an answer without exactly one legal action
    seen: dict[str, Any] | None = None  # the info with memory, as prompted this step
    actions: list[int] = dataclasses.field(default_factory=list)
    demos: list[Demo] = dataclasses.field(default_factory=list)
    ret: float = 0.0


def dagger_seed(cfg: SFTConfig, round_index: int, episode: int) -> int:
    """Reset seed of episode ``episode`` of DAgger round ``round_index`` (from 1): the demonstration
    seeds continued (``demo_seed(seed, episodes + ...)``), so they repeat no demonstration episode and
    stay below the held-out range (SFTConfig checks the count)."""
    return demo_seed(cfg.seed, cfg.episodes + (round_index - 1) * cfg.dagger_episodes + episode)


def expert_label(task: Task, info: dict[str, Any]) -> int | None:
    """The expert's action from this state, or None where it has none (ALFWorld's walkthrough once
    the policy left it: ``info["expert_action"]`` is None): such a state gets no label."""
    try:
        return task.expert_action(info)
    except ValueError:
        return None


def play_and_label(task: Task, cfg: SFTConfig, seeds: Sequence[int],
                   choose: Callable[[list[_Slot]], list[int]]) -> tuple[list[Demo], list[PlayedEpisode]]:
    """Play one episode per reset seed, ``cfg.dagger_num_envs`` at a time, with ``choose`` (the running
    slots -> their actions); label every state visited with the expert's action.

    Each label is a ``Demo`` built like a demonstration's (``tasks.demos.collect_demonstrations``):
    the prompt and response of the state as seen with memory, the response ``task.response`` of the
    expert's action (CoT thoughts included), while the memory records what the policy did. The demos
    come back in episode order, whatever order the episodes finished in.
    """
    results: list[tuple[list[Demo], PlayedEpisode] | None] = [None] * len(seeds)
    pending = list(range(len(seeds)))[::-1]
    envs: list[Any] = []
    try:
        for _ in range(min(cfg.dagger_num_envs, len(seeds))):
            envs.append(task.make_env(**cfg.env_kwargs))
        slots: list[_Slot | None] = [None] * len(envs)

        def start(k: int) -> None:
            slots[k] = None
            if pending:
                i = pending.pop()
                obs, info = envs[k].reset(seed=seeds[i])
                slots[k] = _Slot(i, seeds[i], obs, info, Memory(task, cfg.history_length), np.random.default_rng(seeds[i]))

        for k in range(len(envs)):
            start(k)
        while any(s is not None for s in slots):
            active = [s for s in slots if s is not None]
            for s in active:
                s.seen = s.memory.view(s.info)
            actions = choose(active)
            for s, action in zip(active, actions):
                label = expert_label(task, s.info)
                if label is not None:
                    s.demos.append(Demo(observation_image(s.obs), task.prompt(s.seen, cfg.cot),
                                        task.response(s.seen, label, cfg.cot), True))
                s.memory.record(s.info, task.legal_actions(s.info)[action])
                s.actions.append(int(action))
                k = slots.index(s)
                s.obs, reward, terminated, truncated, s.info = envs[k].step(action)
                s.ret += float(reward)
                if terminated or truncated or len(s.actions) >= MAX_EPISODE_STEPS:
                    won = bool(terminated or truncated) and episode_success(s.info, s.ret)
                    results[s.index] = (s.demos, PlayedEpisode(s.seed, s.actions, won))
                    start(k)
    finally:
        for env in envs:
            env.close()
    demos = [d for r in results if r is not None for d in r[0]]
    return demos, [r[1] for r in results if r is not None]


def dagger_round(policy: Any, task: Task, cfg: SFTConfig, round_index: int) -> tuple[list[Demo], list[PlayedEpisode]]:
    """DAgger round ``round_index`` (from 1): ``policy`` (a ``VLMPolicy``) plays ``cfg.dagger_episodes``
    seeded training episodes at ``cfg.dagger_temperature``, one batched generate per step, and the
    expert labels the states it visited. Same weights and settings, same result."""
    from vlmrl.evaluate import ModelPolicy

    seeds = [dagger_seed(cfg, round_index, j) for j in range(cfg.dagger_episodes)]
    actor = ModelPolicy(policy, task, cot=cfg.cot, temperature=cfg.dagger_temperature, seed=seeds[0],
                        max_new_tokens=cfg.dagger_max_new_tokens, name="dagger")

    def choose(slots: list[_Slot]) -> list[int]:
        texts = actor.act([s.obs for s in slots], [s.seen for s in slots])
        return [parse_action(text, task.legal_actions(s.info), s.rng).action for text, s in zip(texts, slots)]

    return play_and_label(task, cfg, seeds, choose)


def replay_round(task: Task, cfg: SFTConfig, episodes: Sequence[PlayedEpisode]) -> list[Demo]:
    """The labeled demos of a played round, rebuilt from its record: each episode's recorded actions
    replayed on a fresh env (what a resumed run trains on, without storing images)."""
    recorded = {e.seed: e.actions for e in episodes}

    def choose(slots: list[_Slot]) -> list[int]:
        for s in slots:
            if len(s.actions) >= len(recorded[s.seed]):
                raise UserError(f"sft --resume: replaying the DAgger episode of seed {s.seed} went past its "
                                "recorded actions (a changed env): start a new --out")
        return [recorded[s.seed][len(s.actions)] for s in slots]

    demos, replayed = play_and_label(task, cfg, list(recorded), choose)
    if [e.actions for e in replayed] != [e.actions for e in episodes]:
        raise UserError("sft --resume: the replayed DAgger episodes end elsewhere than recorded (a changed env): "
                        "start a new --out")
    return demos


def _writer(model, processor, opt, sched, gen, extra: dict[str, Any]):
    def write(folder: Path) -> None:
        with quiet_library_bars():
            model.save_pretrained(folder)
            processor.save_pretrained(folder)
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "generator": gen.get_state(), **extra},
                   folder / STATE_FILE)

    return write


def save_final(model: Any, processor: Any, out: Path, summary: dict[str, Any], losses: Sequence[float] = ()) -> None:
    """save_pretrained into a temporary folder, then move the files in, ``config.json`` last.

    Each move is an atomic rename, and a loader needs ``config.json``, so a crash never leaves a
    folder that loads half-old, half-new weights; other files in ``out`` (checkpoints/) are kept.
    """
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-final-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with quiet_library_bars():
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
        (tmp / "sft_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / LOSSES_FILE).write_text(json.dumps(list(losses)) + "\n")
        names = sorted(p.name for p in tmp.iterdir())
        names.sort(key=lambda n: n == "config.json")
        if (out / "config.json").exists():
            (out / "config.json").unlink()  # the old folder stops loading before its files change
        for name in names:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["DAGGER_FILE", "Demo", "PlayedEpisode", "SFTConfig", "cached_demonstrations", "check_resume_settings", "collate", "collect_demonstrations", "dagger_round", "dagger_seed", "demos_digest", "encode_all", "encode_example", "expert_label", "finished", "load_policy", "play_and_label", "replay_round", "run_sft", "saved_config"]

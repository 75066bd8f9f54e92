"""vlmrl's GRPO against TRL's ``GRPOTrainer`` on the same VLM and the same work, in one run.

    pip install -e '.[bench]'          # trl==1.16.0 (pinned in constraints.txt)
    python benchmarks/vs_trl.py                                  # the tiny preset and a 16.8M model
    python benchmarks/vs_trl.py --models preset --steps 4 --sft-steps 0 --eval-episodes 4   # a smoke run

The work: one NumberLine step as a single-step task. Each training step takes ``--prompts`` start
states, samples ``--group-size`` answers for each (prompt + image in, answer out), scores each answer
with the env's reward for the action vlmrl's parser reads from it, and takes GRPO optimizer steps on
those ``prompts x group_size`` samples. Both sides start from the same weights (the model, after an
optional shared ``--sft-steps`` SFT run of ``vlmrl sft`` on the demo recipe's imperfect expert), see
the same start states (vlmrl's group seeds), and run the same group size, prompts per step, max new
tokens, temperature, epochs, minibatch size, gradient accumulation, AdamW settings (constant lr, no
warm-up, no weight decay), clip range and grad-norm clip, in fp32, on the same torch threads.

- vlmrl: ``vlmrl.trainer.train`` with ``ppo.advantage = "grpo"`` on NumberLine, ``num_steps = 1``:
  a group run plays one episode per env from the group start and cuts it after ``num_steps`` steps,
  so every episode is exactly one step and its return is that step's reward.
- TRL: ``GRPOTrainer`` (Hugging Face ``generate``, no vLLM, ``beta = 0`` so no reference model), a
  dataset of (conversational prompt, image, seed) rows built by vlmrl's own task code, and a reward
  function that replays the seed in a NumberLine env and steps it with ``vlmrl.tasks.parsing``.

Equal loss. vlmrl's GRPO loss is PPO's clipped surrogate on a sequence-level ratio,
``exp(sum_t w_t (logp_t - old_t))``, averaged over samples (``w`` = lambda on the CoT tokens, 1 after).
With ``thought_weight = 1`` (set here; TRL has no lambda) its gradient at ratio 1 is
``-mean_i A_i sum_t grad logp_it``. TRL's ``loss_type="luspo"`` with ``importance_sampling_level=
"sequence"`` gives exactly that (the sequence ratio is ``exp(mean_t ...)``, and the loss is multiplied
by the sequence length), and with one epoch both are on-policy (ratio 1), so the two losses have the same
gradient. They differ only off-policy (``--epochs`` > 1: TRL clips the per-token mean ratio, vlmrl the
ratio of the summed log-probs), and in the advantage's std: TRL divides by the unbiased group std + 1e-4,
vlmrl by the population std + 1e-6, a constant factor sqrt((G-1)/G) on every advantage (Adam takes it
out; the grad-norm clip sees it). The script prints this check with the measured tokens per step.

Measured per side, each in its own subprocess (peak RSS from ``os.wait4`` of that child): end-to-end
training samples/s (generation, reward, update; from the end of step 1 to the end of the last step, so
start-up and the first step's one-time costs stay out on both sides), generation tokens/s (the HF
``generate`` call of each side wrapped by the same timer, tokens counted up to and including each row's
stop token), update seconds per step (vlmrl: ``charts/update_seconds``; TRL: the step minus its
generate-and-score), and held-out success (``vlmrl.evaluate`` on held-out seeds, the trained weights
loaded the same way for both). Each rate is given by the wall clock and by the process's CPU clock:
on a shared machine a busy neighbour stretches the wall time of a one-thread process far more than the
CPU time it needs, so the target is judged on samples per CPU-second (the load average is printed
beside every figure). ``--repeats`` runs each side that many times in alternating order; the ratio is
of the medians.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODELS = {
    # the --model tiny preset (0.46M): vlmrl.policy.tiny.TINY_PRESET
    "preset": {},
    # the README's 16.8M variant (benchmarks/throughput.py --set ...)
    "16.8m": {"hidden_size": 512, "intermediate_size": 2048, "num_heads": 8, "num_kv_heads": 4, "num_layers": 4},
}
TARGETS = {"preset": 2.0, "16.8m": 1.0}  # vlmrl / TRL end-to-end samples/s
TASK = "NumberLine"


def machine(threads: int) -> str:
    """Date, CPU, cores, torch threads, torch / transformers / trl versions and the load average."""
    from vlmrl.metrics import (
        machine_line,  # here: the parent process imports vlmrl only when it must
    )

    return machine_line(f"torch {_version('torch')} with {threads} threads, transformers {_version('transformers')}, "
                        f"trl {_version('trl')}")


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _load() -> str:
    from vlmrl.metrics import load_average

    return load_average()


# --- what both sides share ----------------------------------------------------------------------------


def start_states(spec: dict[str, Any]) -> list[list[int]]:
    """The reset seeds of every step's prompts: vlmrl's group starts (rank 0), step u, group j."""
    from vlmrl.rollout.collect import group_seed

    return [[group_seed(spec["seed"], 0, j, u) for j in range(spec["prompts"])] for u in range(spec["steps"])]


class GenerateTimer:
    """Wraps a Hugging Face model's ``generate``: wall time, rows, decode width and tokens up to each
    row's first stop token (inclusive), per call, while ``on``."""

    def __init__(self, model):
        self.calls: list[dict[str, float]] = []
        self.on = True
        inner = model.generate

        def generate(*args, **kwargs):
            import torch

            t0, c0 = time.perf_counter(), time.process_time()
            out = inner(*args, **kwargs)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            if self.on:
                seqs = out if isinstance(out, torch.Tensor) else out.sequences
                response = seqs[:, kwargs["input_ids"].shape[1]:]
                eos = kwargs["generation_config"].eos_token_id
                eos = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=response.device)
                stop = torch.isin(response, eos)
                first = torch.where(stop.any(1), stop.int().argmax(1) + 1, torch.full_like(stop[:, 0], response.shape[1],
                                                                                           dtype=torch.long))
                self.calls.append({"seconds": seconds, "cpu_seconds": cpu, "rows": response.shape[0], "width": response.shape[1],
                                   "tokens": int(first.sum())})
            return out

        model.generate = generate  # an instance attribute: this model only


def held_out(folder: str, spec: dict[str, Any]) -> dict[str, float]:
    """vlmrl's held-out evaluation of the weights in ``folder``, loaded alike for both sides."""
    from vlmrl.config import PolicyConfig
    from vlmrl.evaluate import ModelPolicy, evaluate
    from vlmrl.policy.model import VLMPolicy
    from vlmrl.tasks import get_task

    if spec["eval_episodes"] <= 0:
        return {}
    task = get_task(TASK)
    config = PolicyConfig(finetune="full", train_vision=True, temperature=spec["temperature"],
                          max_new_tokens=spec["max_new_tokens"], thought_weight=1.0)
    policy = VLMPolicy.load(folder, config, value_head=False)
    agent = ModelPolicy(policy, task, True, spec["temperature"], spec["seed"], spec["max_new_tokens"])
    r = evaluate(task, agent, spec["eval_episodes"], seed=spec["seed"], num_envs=min(spec["eval_episodes"], 32),
                 progress=False)
    return {"success_rate": r.success_rate, "success_ci95": list(r.success_ci95),
            "invalid_action_rate": r.invalid_action_rate}


def _summary(step_ends: list[float], cpu_ends: list[float], gen: GenerateTimer, update_seconds: list[float],
             spec: dict[str, Any], threads_seen: set[int]) -> dict[str, Any]:
    """The figures of one side. ``step_ends`` / ``cpu_ends``: wall / process CPU clock at the end of each
    step. CPU-clock rates are the robust ones on a shared machine: a busy neighbour stretches the wall
    time of a one-thread process, not the CPU time it needs."""
    samples = spec["prompts"] * spec["group_size"]
    timed = len(step_ends) - 1  # from the end of step 1 to the end of the last
    calls = gen.calls
    later = calls[1:] if len(calls) > 1 else calls  # generation after the first step's warm-up
    return {
        "steps": len(step_ends),
        "samples_per_step": samples,
        "samples_per_second": timed * samples / (step_ends[-1] - step_ends[0]) if timed > 0 else float("nan"),
        "step_seconds": (step_ends[-1] - step_ends[0]) / timed if timed > 0 else float("nan"),
        "samples_per_cpu_second": timed * samples / (cpu_ends[-1] - cpu_ends[0]) if timed > 0 else float("nan"),
        "tokens_per_step": [c["tokens"] for c in calls],
        "decode_width_per_step": [c["width"] for c in calls],
        "rows_per_generate": [c["rows"] for c in calls],
        "generate_tokens_per_second": sum(c["tokens"] for c in later) / max(sum(c["seconds"] for c in later), 1e-9),
        "generate_tokens_per_cpu_second": sum(c["tokens"] for c in later) / max(sum(c["cpu_seconds"] for c in later), 1e-9),
        "generate_seconds_per_step": sum(c["seconds"] for c in later) / max(len(later), 1),
        "update_seconds_per_step": sum(update_seconds[1:] or update_seconds) / max(len(update_seconds[1:] or update_seconds), 1),
        "threads": sorted(threads_seen),
    }


# --- vlmrl's side --------------------------------------------------------------------------------------


def run_vlmrl(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    import torch

    from vlmrl import metrics as M
    from vlmrl.config import PolicyConfig, PPOConfig, TrainConfig
    from vlmrl.policy.model import VLMPolicy
    from vlmrl.trainer import train

    G, P = spec["group_size"], spec["prompts"]
    ppo = PPOConfig(advantage="grpo", group_size=G, lr=spec["lr"], lr_schedule="constant", adam_eps=spec["adam_eps"],
                    weight_decay=0.0, clip=spec["clip"], epochs=spec["epochs"], minibatch_size=spec["minibatch_size"],
                    grad_accum_steps=spec["grad_accum_steps"], max_grad_norm=spec["max_grad_norm"], thought_weight=1.0,
                    ent_coef=0.0, kl_coef=0.0, target_kl=None, normalize_group_std=True)
    cfg = TrainConfig(task=TASK, model=spec["model"], num_envs=P * G, num_steps=1, total_updates=spec["steps"],
                      seed=spec["seed"], cot=True, temperature=spec["temperature"], top_p=1.0,
                      max_new_tokens=spec["max_new_tokens"], out_dir=str(out / "run"), checkpoint_every=0,
                      keep_checkpoints=1, eval_every=0, tensorboard=False, log_samples=0, ppo=ppo,
                      policy=PolicyConfig(finetune="full", train_vision=True, sampler=spec.get("sampler", "multinomial")))
    policy = VLMPolicy.load(spec["model"], cfg.policy_config(), value_head=False)
    gen = GenerateTimer(policy.model)
    parameters = sum(p.numel() for p in policy.parameters())
    step_ends: list[float] = []
    cpu_ends: list[float] = []
    threads_seen: set[int] = set()

    def callback(_):
        step_ends.append(time.perf_counter())
        cpu_ends.append(time.process_time())
        threads_seen.add(torch.get_num_threads())

    t0 = time.perf_counter()
    final = train(cfg, policy=policy, progress=False, callback=callback)
    total = time.perf_counter() - t0
    gen.on = False
    rows = [json.loads(line) for line in (out / "run" / M.METRICS_FILE).read_text().splitlines() if line.strip()]
    result = _summary(step_ends, cpu_ends, gen, [r[M.UPDATE_SECONDS] for r in rows], spec, threads_seen)
    result["train_call_seconds"] = total
    result["parameters"] = parameters
    result["train_success_per_step"] = [r.get(M.SUCCESS_RATE) for r in rows]
    result["held_out"] = held_out(str(final), spec)
    return result


# --- TRL's side ----------------------------------------------------------------------------------------


def run_trl(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    import numpy as np
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    import vlmrl.policy  # noqa: F401  (registers the tiny model's processor class)
    from vlmrl.policy.hf import quiet_library_bars
    from vlmrl.tasks import get_task
    from vlmrl.tasks.parsing import parse_action

    task = get_task(TASK)
    G, P = spec["group_size"], spec["prompts"]
    samples = P * G
    m, k = spec["minibatch_size"], spec["grad_accum_steps"]

    # one row per (step, prompt): the prompt vlmrl writes for that start, its image and its seed
    env = task.make_env()
    rows = []
    for step_seeds in start_states(spec):
        for seed in step_seeds:
            obs, info = env.reset(seed=seed)
            rows.append({"prompt": [{"role": "user", "content": task.prompt(info, True)}],
                         "image": Image.fromarray(np.asarray(obs)), "seed": seed})
    env.close()
    dataset = Dataset.from_list(rows)

    reward_env = task.make_env()
    parse_rng = np.random.default_rng([spec["seed"], 7])

    def numberline_reward(prompts, completions, seed, **_) -> list[float]:
        """The env's reward for the action vlmrl's parser reads from each completion."""
        rewards = []
        for completion, s in zip(completions, seed):
            text = completion[-1]["content"] if isinstance(completion, list) else completion
            _, info = reward_env.reset(seed=int(s))
            parsed = parse_action(text, task.legal_actions(info), parse_rng)
            rewards.append(float(reward_env.step(parsed.action)[1]))
        return rewards

    # the same number of optimizer steps per generation as vlmrl: epochs x samples / (minibatch x accumulation)
    chunks = samples // m  # minibatches per generation (vlmrl: per epoch)
    optimizer_steps = spec["steps"] * spec["epochs"] * chunks // k
    args = GRPOConfig(
        output_dir=str(out / "trl"), seed=spec["seed"], use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, max_steps=optimizer_steps,
        per_device_train_batch_size=m, gradient_accumulation_steps=k, steps_per_generation=chunks,
        num_iterations=spec["epochs"], num_generations=G, shuffle_dataset=False,
        max_completion_length=spec["max_new_tokens"], temperature=spec["temperature"], top_p=1.0, top_k=0,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_epsilon=spec["adam_eps"], max_grad_norm=spec["max_grad_norm"], optim="adamw_torch",
        beta=0.0, epsilon=spec["clip"], loss_type="luspo", importance_sampling_level="sequence",
        scale_rewards="group", log_completions=False,
    )
    with quiet_library_bars():
        model = AutoModelForImageTextToText.from_pretrained(spec["model"], dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(spec["model"])
    gen = GenerateTimer(model)
    parameters = sum(p.numel() for p in model.parameters())

    step_ends: list[float] = []
    cpu_ends: list[float] = []
    step_starts: list[float] = []
    threads_seen: set[int] = set()
    score_seconds: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            step_starts.append(time.perf_counter())

        def on_step_end(self, *a, **kw):
            step_ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())
            threads_seen.add(torch.get_num_threads())

    trainer = GRPOTrainer(model=model, reward_funcs=numberline_reward, args=args, train_dataset=dataset,
                          processing_class=processor, callbacks=[Clock()])
    inner = trainer._generate_and_score_completions

    def generate_and_score(*a, **kw):
        t = time.perf_counter()
        result = inner(*a, **kw)
        score_seconds.append(time.perf_counter() - t)
        return result

    trainer._generate_and_score_completions = generate_and_score
    trainer.remove_callback(PrinterCallback)  # its log line per step; the figures are printed at the end
    torch.set_num_threads(spec["threads"])  # the Trainer does not change it; set again in case
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    gen.on = False

    # one vlmrl "step" (one generation) = epochs * chunks / k optimizer steps of TRL
    per_gen = spec["epochs"] * chunks // k
    ends = step_ends[per_gen - 1::per_gen]
    starts = step_starts[::per_gen]
    update = [(e - s) - g for s, e, g in zip(starts, ends, score_seconds)]
    result = _summary(ends, cpu_ends[per_gen - 1::per_gen], gen, update, spec, threads_seen)
    result["train_call_seconds"] = total
    logged = [h for h in trainer.state.log_history if "reward" in h]
    result["train_reward_per_step"] = [h["reward"] for h in logged]
    result["parameters"] = parameters
    result["loss_type"] = args.loss_type
    result["importance_sampling_level"] = args.importance_sampling_level

    folder = out / "trl-final"
    with quiet_library_bars():
        trainer.model.save_pretrained(folder)
        processor.save_pretrained(folder)
    result["held_out"] = held_out(str(folder), spec)
    return result


# --- the parent: build the start, run each side in its own process, print ----------------------------


def worker(side: str, spec_file: str, out_file: str) -> None:
    import warnings

    import torch

    # transformers 5 renames gradient_checkpointing, which TRL's config still sets: not this script's concern
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")

    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    if side == "start":
        result = build_start(spec)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = (run_vlmrl if side == "vlmrl" else run_trl)(spec, Path(tmp))
    result["machine"] = machine(spec["threads"])
    Path(out_file).write_text(json.dumps(result, indent=1) + "\n")


def run_side(side: str, spec: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """``side`` ("start", "vlmrl" or "trl") in a fresh process of its own. This process never imports
    torch: Linux carries a process's peak RSS across exec, so a child started from a heavy parent
    would report the parent's peak as its own."""
    spec_file, out_file = tmp / f"{side}-spec.json", tmp / f"{side}-result.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, __file__, "--worker", side, str(spec_file), str(out_file)], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"vs_trl.py: the {side} side failed (exit {proc.returncode}); its error is above")
    result = json.loads(out_file.read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
    return result


def build_start(spec: dict[str, Any]) -> dict[str, Any]:
    """The model folder both sides start from (built, then the shared SFT), and its held-out success."""
    name, tmp = spec["name"], Path(spec["tmp"])
    if name not in MODELS:
        folder = name  # a folder given with --model
    elif not MODELS[name]:
        from vlmrl.policy.tiny import tiny_preset_path

        folder = str(tiny_preset_path())
    else:
        from vlmrl.policy.tiny import TINY_PRESET, build_tiny_vlm

        folder = str(build_tiny_vlm(tmp / name, **{**TINY_PRESET, **MODELS[name]}))
    sft_seconds = 0.0
    if spec["sft_steps"] > 0:
        from vlmrl.demo import load_recipe, recipe_file
        from vlmrl.sft import SFTConfig, run_sft

        recipe = load_recipe(recipe_file(TASK))["sft"]
        cfg = SFTConfig(task=TASK, model=folder, out_dir=str(tmp / f"{Path(name).name}-sft"), episodes=recipe["episodes"],
                        random_action_fraction=recipe["random_action_fraction"], steps=spec["sft_steps"],
                        batch_size=recipe["batch_size"], lr=recipe["lr"], seed=spec["seed"], progress=False,
                        threads=spec["threads"])
        t0 = time.perf_counter()
        folder = str(run_sft(cfg))
        sft_seconds = time.perf_counter() - t0
    return {"folder": folder, "sft_steps": spec["sft_steps"], "sft_seconds": sft_seconds, "held_out": held_out(folder, spec)}


def _median(runs: list[dict[str, Any]], key: str) -> float:
    values = sorted(r[key] for r in runs)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _fmt_rate(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:,.1f}"


def report(name: str, parameters: int, spec: dict[str, Any], res: dict[str, dict[str, Any]],
           start: dict[str, Any]) -> list[str]:
    title = (f"\n## {name}: {parameters / 1e6:.2f}M parameters; {spec['steps']} steps of {spec['prompts']} prompts x "
             f"{spec['group_size']} answers, max {spec['max_new_tokens']} new tokens at temperature "
             f"{spec['temperature']}, {spec['epochs']} epoch(s), minibatch {spec['minibatch_size']} x "
             f"{spec['grad_accum_steps']} accumulated, lr {spec['lr']:g}, fp32; vlmrl draws tokens with "
             f"sampler={spec.get('sampler', 'multinomial')!r} (TRL: torch.multinomial in HF generate)")
    header = ("| side | train samples/s | samples per CPU-s | step s | generate tokens/s | tokens per CPU-s | "
              "generate s/step | update s/step | peak RSS MB | held-out success | threads |")
    lines = [title, header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    def success(h: dict[str, Any]) -> str:
        return f"{100 * h['success_rate']:.1f}% ({100 * h['success_ci95'][0]:.0f}-{100 * h['success_ci95'][1]:.0f})" if h else "not run"

    rss = "" if math.isnan(start["peak_rss_mb"]) else f"{start['peak_rss_mb']:,.0f}"
    lines.append(f"| the shared start ({start['sft_steps']} SFT steps) | | | | | | | | {rss} | "
                 f"{success(start['held_out'])} | |")
    for side, runs in res.items():
        for i, r in enumerate(runs):
            label = side if len(runs) == 1 else f"{side} (run {i + 1})"
            lines.append(f"| {label} | {_fmt_rate(r['samples_per_second'])} | {_fmt_rate(r['samples_per_cpu_second'])} | "
                         f"{r['step_seconds']:.2f} | {r['generate_tokens_per_second']:,.0f} | "
                         f"{r['generate_tokens_per_cpu_second']:,.0f} | {r['generate_seconds_per_step']:.2f} | "
                         f"{r['update_seconds_per_step']:.2f} | {r['peak_rss_mb']:,.0f} | {success(r['held_out'])} | "
                         f"{','.join(map(str, r['threads']))} |")
    if res.get("vlmrl") and res.get("trl"):
        v, t = res["vlmrl"][0], res["trl"][0]
        lines.append("")
        vt, tt = v["tokens_per_step"], t["tokens_per_step"]
        lines.append(f"check, tokens generated per step: vlmrl {vt}, TRL {tt} (mean {sum(vt) / len(vt):.0f} vs "
                     f"{sum(tt) / len(tt):.0f}; decode width vlmrl {v['decode_width_per_step']}, TRL "
                     f"{t['decode_width_per_step']}; rows per generate {v['rows_per_generate'][0]} vs "
                     f"{t['rows_per_generate'][0]})")
        lines.append(f"check, loss: vlmrl grpo (sequence ratio of summed log-probs, thought_weight 1, mean over "
                     f"samples, / grad_accum) vs TRL loss_type={t['loss_type']!r}, importance_sampling_level="
                     f"{t['importance_sampling_level']!r} (per-token-mean ratio x length, mean over samples, / "
                     f"grad_accum): the same gradient on-policy"
                     + (" (1 epoch: on-policy, same)" if spec["epochs"] == 1 else
                        f" ({spec['epochs']} epochs: the clip acts on different ratios after the first)")
                     + f"; advantages differ by the constant sqrt((G-1)/G) = {((spec['group_size'] - 1) / spec['group_size']) ** 0.5:.3f} "
                       "(TRL unbiased std, vlmrl population std)")
        ratio = _median(res["vlmrl"], "samples_per_second") / _median(res["trl"], "samples_per_second")
        cpu_ratio = _median(res["vlmrl"], "samples_per_cpu_second") / _median(res["trl"], "samples_per_cpu_second")
        target = TARGETS.get(name)
        verdict = "" if target is None else f" (target >= {target:g}x: {'met' if cpu_ratio >= target else 'MISSED'})"
        runs = len(res["vlmrl"])
        lines.append(f"vlmrl / TRL end-to-end{f' (medians of {runs} runs each)' if runs > 1 else ''}: {ratio:.2f}x in "
                     f"samples/s (wall clock), {cpu_ratio:.2f}x in samples per CPU-second{verdict}")
        lines.append(f"machine (vlmrl side): {v['machine']}")
        lines.append(f"machine (TRL side):   {t['machine']}")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["preset", "16.8m"], choices=sorted(MODELS))
    parser.add_argument("--model", default=None, metavar="FOLDER",
                        help="a model folder (save_pretrained) to compare on instead of --models")
    parser.add_argument("--sides", nargs="+", default=["vlmrl", "trl"], choices=["vlmrl", "trl"])
    parser.add_argument("--steps", type=int, default=12, help="training steps (generations) per side")
    parser.add_argument("--steps-16m", type=int, default=None, help="steps for the 16.8M model (default --steps)")
    parser.add_argument("--prompts", type=int, default=4, help="start states (prompts) per step")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--epochs", type=int, default=1, help="passes over each generation (TRL num_iterations)")
    parser.add_argument("--minibatch-size", type=int, default=16)
    parser.add_argument("--grad-accum-steps", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--clip", type=float, default=0.2)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both sides")
    parser.add_argument("--sampler", choices=("multinomial", "cdf"), default="multinomial",
                        help="vlmrl's token draw (PolicyConfig.sampler); TRL's generate uses torch.multinomial")
    parser.add_argument("--sft-steps", type=int, default=100,
                        help="shared SFT steps (demo recipe) before both sides; 0: start from the random weights")
    parser.add_argument("--eval-episodes", type=int, default=100, help="held-out NumberLine episodes per side (0: none)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each side, in alternating order (held-out evaluation on the first)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write every figure to this file")
    parser.add_argument("--worker", nargs=3, metavar=("SIDE", "SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return {}
    if importlib.util.find_spec("trl") is None:
        print("vs_trl.py: trl is not installed: pip install -c constraints.txt -e '.[bench]' (trl==1.16.0)")
        sys.exit(2)
    samples = args.prompts * args.group_size
    if args.group_size < 2 or samples % args.minibatch_size or (samples // args.minibatch_size) % args.grad_accum_steps:
        parser.error("--group-size must be >= 2, and prompts x group_size a multiple of minibatch_size x grad_accum_steps")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is not timed)")

    print(f"machine: {machine(args.threads)}", flush=True)
    print(f"equal work: the same start weights, start states, group size, prompts per step, max new tokens, "
          f"temperature, epochs, minibatches, AdamW, clip and {args.threads} torch thread(s); each side in its own "
          f"process", flush=True)
    summary: dict[str, Any] = {"load_before": _load(), "models": {}}
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name in [args.model] if args.model else args.models:
            spec = {"steps": args.steps_16m if (name == "16.8m" and args.steps_16m) else args.steps,
                    "prompts": args.prompts, "group_size": args.group_size, "max_new_tokens": args.max_new_tokens,
                    "temperature": args.temperature, "epochs": args.epochs, "minibatch_size": args.minibatch_size,
                    "grad_accum_steps": args.grad_accum_steps, "lr": args.lr, "clip": args.clip,
                    "max_grad_norm": args.max_grad_norm, "adam_eps": 1e-7, "threads": args.threads,
                    "eval_episodes": args.eval_episodes, "seed": args.seed, "sampler": args.sampler}
            if name in MODELS or args.sft_steps > 0:  # build / SFT / evaluate the start in a process of its own
                start = run_side("start", {**spec, "name": name, "tmp": tmp_name, "sft_steps": args.sft_steps}, tmp)
            else:  # a folder as it is: nothing to build, its held-out success not measured
                start = {"folder": name, "sft_steps": 0, "sft_seconds": 0.0, "held_out": {}, "peak_rss_mb": float("nan")}
            spec["model"] = start["folder"]
            if args.sft_steps > 0:
                print(f"[{name}] shared start: {args.sft_steps} SFT steps in {start['sft_seconds']:.0f} s", flush=True)
            res: dict[str, list[dict[str, Any]]] = {side: [] for side in args.sides}
            for rep in range(args.repeats):  # alternate the order, so neither side always runs first
                for side in args.sides if rep % 2 == 0 else args.sides[::-1]:
                    print(f"[{name}] {side} (run {rep + 1}): {spec['steps']} steps ...", flush=True)
                    run_spec = spec if rep == 0 else {**spec, "eval_episodes": 0}  # held-out once: same seeds, same result
                    res[side].append(run_side(side, run_spec, tmp))
                    print(f"[{name}] {side} (run {rep + 1}): {_fmt_rate(res[side][-1]['samples_per_second'])} samples/s, "
                          f"{_fmt_rate(res[side][-1]['samples_per_cpu_second'])} per CPU-s, load average {_load()}",
                          flush=True)
            parameters = next(iter(res.values()))[0]["parameters"]
            block = report(name, parameters, spec, res, start)
            print("\n".join(block), flush=True)
            lines += block
            summary["models"][name] = {"parameters": parameters, "spec": spec, "start": start, "results": res}
    summary["load_after"] = _load()
    print(f"\nload average before {summary['load_before']}, after {summary['load_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()

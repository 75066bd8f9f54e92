"""ALFWorld-THOR adapter: only what runs without THOR (the adapter itself is marked untested).

THOR cannot be installed on our machines, so these tests check the frame conversion, the prompt the VLM
gets, and that asking for the env gives one clear error naming what to install.
"""

from __future__ import annotations

import importlib.util

import gymnasium as gym
import numpy as np
import pytest

from vlmrl.errors import UserError
from vlmrl.tasks import get_task
from vlmrl.tasks.alfworld import TASK as TEXT_TASK
from vlmrl.tasks.alfworld import paper_reward
from vlmrl.tasks.alfworld_thor import FRAME_SIZE, frame_to_rgb


def test_frame_is_flipped_back_to_rgb_and_resized():
    bgr = np.zeros((600, 400, 3), np.uint8)
    bgr[..., 0] = 200  # blue in alfworld's BGR frame
    rgb = frame_to_rgb(bgr)
    assert rgb.shape == (FRAME_SIZE, FRAME_SIZE, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 2] == 200).all() and (rgb[..., :2] == 0).all()
    with pytest.raises(ValueError, match="H, W, 3"):
        frame_to_rgb(np.zeros((10, 10)))


def test_task_shares_the_text_prompt_and_parser_but_takes_an_image():
    task = get_task("ALFWorld-THOR")
    assert task.env_id == "vlmrl/ALFWorld-THOR-v0" and not task.text_only and TEXT_TASK.text_only
    info = {"goal": "put a mug in cabinet.", "observation": "You arrive at cabinet 1.",
            "admissible_commands": ["go to desk 1", "look"], "expert_action": "look"}
    prompt = task.prompt(info)
    assert "Your task is to: put a mug in cabinet." in prompt and "\ngo to desk 1\nlook" in prompt
    assert "the image is what you see" in prompt
    assert task.legal_actions(info)[task.expert_action(info)] == "look"


def test_reward_is_the_papers():
    assert paper_reward(True, 1.0, True) == 51.0
    assert paper_reward(False, 0.5, False) == -0.5
    assert paper_reward(False, 0.0, True, success_reward=10.0, invalid_penalty=2.0) == 0.0


@pytest.mark.skipif(importlib.util.find_spec("ai2thor") is not None, reason="THOR is installed here")
def test_without_thor_the_env_says_what_to_install():
    with pytest.raises(UserError, match="ALFWorld-THOR needs AI2-THOR.*untested"):
        gym.make("vlmrl/ALFWorld-THOR-v0", split="valid_unseen")

"""Fixtures shared by the suite: the tiny VLMs, built once per test session (real Hugging Face
folders saved with save_pretrained). Tests must not change these folders: copy one to change it."""

import pytest

from vlmrl.policy.tiny import build_tiny_vlm, task_texts


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """The card-task tiny Qwen2-VL (tokenizer trained on every card task's text), seed 0."""
    return str(build_tiny_vlm(tmp_path_factory.mktemp("tiny") / "model", seed=0))


@pytest.fixture(scope="session")
def tiny_numberline(tmp_path_factory) -> str:
    """A tiny Qwen2-VL whose tokenizer knows only a little NumberLine text (fast to build and run)."""
    texts = task_texts(episodes=3, max_steps=3, tasks=["NumberLine"])
    return str(build_tiny_vlm(tmp_path_factory.mktemp("tiny-numberline") / "model", texts=texts))


@pytest.fixture(scope="module")
def tiny_by_arch(tmp_path_factory, request):
    """arch -> folder of a tiny VLM of that architecture, its tokenizer trained on the test module's
    ``TEXTS`` (three times over), each built once per module."""
    root = tmp_path_factory.mktemp("tiny-by-arch")
    texts = list(request.module.TEXTS) * 3
    cache: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in cache:
            cache[arch] = str(build_tiny_vlm(root / arch, arch=arch, texts=texts, seed=0))
        return cache[arch]

    return get

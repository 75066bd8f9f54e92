"""Any Gymnasium env with ``Discrete`` actions as a vlmrl task, without writing an env class.

    from vlmrl.tasks.gym_adapter import GymTask

    task = GymTask(
        "Cliff", "CliffWalking-v1", action_words=("up", "right", "down", "left"),
        description="Walk from the bottom left to the bottom right without stepping off the cliff.",
    )
    env = task.make_env()            # CliffWalking-v1 rendered as an image, with info["action_words"]

``GymTask`` takes the env (a registered id with ``env_kwargs``, or a factory that returns an env),
one word per action, the description, and where the policy's view comes from:

- ``image="render"``: ``env.render()`` with ``render_mode="rgb_array"`` (passed to ``gym.make``; a
  factory must build its env that way);
- ``image="observation"``: the observation itself, when it already is an (H, W, 3) uint8 image;
- ``image=None``: a text env; ``obs_text(obs, info)`` writes the text the policy reads.

The optional pieces say what CoT answers and SFT write: ``state_fields`` with ``state_text(info)``
(their true values, ``read_state``), ``expert(info)`` (an action index) and ``thoughts(info, action)``.
``extra_info(env, obs, info)`` adds what those functions need and the info lacks (read from the base
env, e.g. FrozenLake's map), so the task side still reads only info. ``state_key(info)`` (a hashable
key of the true state) lets GiGPO group identical states; without it a GiGPO run refuses to start.

The env is wrapped in ``TaskWrapper``: it publishes ``action_words``, puts ``info["action_words"]``,
``info["obs"]`` (the raw observation as JSON-able data; not for image observations) and the extra
info in every info, and returns the image as the observation. Gymnasium's API is unchanged: same
``reset(seed=...)``, five-tuple ``step``, and the wrapped env passes ``check_env`` where the base does.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from vlmrl.errors import UserError
from vlmrl.tasks.base import Info, Task, discrete_actions, first_line

IMAGE_SOURCES = ("render", "observation", None)


def jsonable(value: Any) -> Any:
    """``value`` as plain Python data (numpy scalars and arrays, tuples -> lists), so a stored
    transition (a JSON round trip) gives the task the same info as the live env."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    return value


def check_words(words: Any, where: str) -> tuple[str, ...]:
    """The action words as a tuple of distinct, non-empty strings (UserError otherwise)."""
    if isinstance(words, str) or not isinstance(words, Sequence) or not words:
        raise UserError(f"{where}: action_words must be a non-empty sequence of words (index -> word), got {words!r}")
    words = tuple(words)
    bad = [w for w in words if not isinstance(w, str) or not w.strip()]
    if bad:
        raise UserError(f"{where}: every action word must be a non-empty string, got {bad!r}")
    repeated = sorted({w for w in words if words.count(w) > 1})
    if repeated:
        raise UserError(f"{where}: the action words {repeated} appear more than once: a word must name one action")
    return words


class TaskWrapper(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Publishes the action words and the task's info on a Gymnasium env; the observation is the image.

    ``action_words[i]`` names action ``i`` of the env's ``Discrete(n)`` space (checked here: count, and
    the space). ``image``: ``"render"`` (the observation becomes ``env.render()``, so the env needs
    ``render_mode="rgb_array"``), ``"observation"`` (already an image) or None (kept as it is: text).
    ``image_shape`` (H, W, 3) of the rendered frames; None: read from one ``reset(seed=0)`` and
    ``render()`` here, a seeded reset so that nothing is drawn from unseeded entropy.
    """

    def __init__(self, env: gym.Env, action_words: Sequence[str], image: str | None = "render",
                 image_shape: Sequence[int] | None = None,
                 extra_info: Callable[[gym.Env, Any, Info], Mapping[str, Any]] | None = None):
        # recorded so that env.spec.make() (check_env does) can build the same wrapped env again
        gym.utils.RecordConstructorArgs.__init__(self, action_words=action_words, image=image,
                                                 image_shape=image_shape, extra_info=extra_info)
        gym.Wrapper.__init__(self, env)
        where = _env_name(env)
        if image not in IMAGE_SOURCES:
            raise UserError(f"{where}: image must be 'render', 'observation' or None, got {image!r}")
        space = discrete_actions(env, where)
        words = check_words(action_words, where)
        if len(words) != space.n:
            raise UserError(f"{where}: {len(words)} action words {words} for {space.n} actions (Discrete({space.n})): "
                            "give one word per action, in action order")
        self.action_words = words
        self.image = image
        self._extra_info = extra_info
        if image == "render":
            if env.render_mode != "rgb_array":
                raise UserError(f"{where}: image='render' needs the env built with render_mode='rgb_array', "
                                f"it has render_mode={env.render_mode!r}")
            shape = tuple(image_shape) if image_shape is not None else self._probe_shape()
            if len(shape) != 3 or shape[2] != 3:
                raise UserError(f"{where}: rendered frames must be (height, width, 3) RGB, got shape {shape}")
            self.observation_space = spaces.Box(0, 255, shape=shape, dtype=np.uint8)
            # the observation is the rgb_array frame: no other render mode gives one
            self.metadata = {**env.metadata, "render_modes": ["rgb_array"]}
        elif image == "observation":
            obs_space = env.observation_space
            if not (isinstance(obs_space, spaces.Box) and obs_space.dtype == np.uint8 and len(obs_space.shape) == 3
                    and obs_space.shape[2] == 3):
                raise UserError(f"{where}: image='observation' needs (H, W, 3) uint8 Box observations, "
                                f"the observation space is {obs_space}")

    def _probe_shape(self) -> tuple[int, ...]:
        self.env.reset(seed=0)
        return tuple(np.asarray(self.env.render()).shape)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        return self._observe(obs, info)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        obs, info = self._observe(obs, info)
        return obs, reward, terminated, truncated, info

    def _observe(self, obs: Any, info: Info) -> tuple[Any, Info]:
        info = dict(info)
        info["action_words"] = self.action_words
        if self.image != "observation":  # an image observation is the image; no need to copy it into info
            info["obs"] = jsonable(obs)
        if self._extra_info is not None:
            info.update(self._extra_info(self.env, obs, info))
        if self.image != "render":
            return obs, info
        frame = self.env.render()
        if not isinstance(frame, np.ndarray) or frame.shape != self.observation_space.shape:
            got = getattr(frame, "shape", type(frame).__name__)
            raise UserError(f"{_env_name(self.env)}: render() gave {got}, expected an array of shape "
                            f"{self.observation_space.shape} (pass image_shape to match the env's frames)")
        return frame.astype(np.uint8, copy=False), info


class GymTask(Task):
    """A vlmrl ``Task`` around a Gymnasium env with ``Discrete`` actions (see the module docstring).

    ``env``: a Gymnasium id (made with ``gym.make(env, **env_kwargs, **make_env kwargs)``) or a factory
    ``env(**kwargs) -> gym.Env``. ``env_id``: a registered id whose entry point is ``build_env`` (for
    built-in tasks, so ``gym.make(env_id)`` works); "" makes envs directly. ``description``: text, or a
    function info -> text where it depends on env options. The action words are checked against the
    env's action space whenever an env is built.
    """

    def __init__(
        self,
        name: str,
        env: str | Callable[..., gym.Env],
        action_words: Sequence[str],
        description: str | Callable[[Info], str],
        *,
        env_kwargs: Mapping[str, Any] | None = None,
        env_id: str = "",
        image: str | None = "render",
        image_shape: Sequence[int] | None = None,
        obs_text: Callable[[Any, Info], str] | None = None,
        state_fields: Sequence[tuple[str, str]] = (),
        state_text: Callable[[Info], Sequence[str]] | None = None,
        expert: Callable[[Info], int] | None = None,
        thoughts: Callable[[Info, int], str] | None = None,
        random_actions: Callable[[Info], Sequence[int]] | None = None,
        extra_info: Callable[[gym.Env, Any, Info], Mapping[str, Any]] | None = None,
        state_key: Callable[[Info], Hashable] | None = None,
    ):
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"GymTask: name must be a non-empty string, got {name!r}")
        where = f"GymTask {name!r}"
        if not (isinstance(env, str) and env) and not callable(env):
            raise UserError(f"{where}: env must be a Gymnasium id or a function that returns an env, got {env!r}")
        if image not in IMAGE_SOURCES:
            raise UserError(f"{where}: image must be 'render', 'observation' or None, got {image!r}")
        if image is None and obs_text is None:
            raise UserError(f"{where}: a text env (image=None) needs obs_text(obs, info) -> the text the agent reads")
        if bool(state_fields) != (state_text is not None):
            raise UserError(f"{where}: give state_fields (name, hint) and state_text(info) together, or neither")
        if not isinstance(description, str) and not callable(description):
            raise UserError(f"{where}: description must be text or a function info -> text")
        self.name = name
        self.env_id = env_id
        self.action_words = check_words(action_words, where)
        self.description = description if isinstance(description, str) else ""
        self.state_fields = tuple((str(f), str(h)) for f, h in state_fields)
        self.text_only = image is None
        self._env, self._env_kwargs = env, dict(env_kwargs or {})
        self._image, self._image_shape = image, image_shape
        self._describe = description if callable(description) else None
        self._obs_text, self._state_text, self._expert = obs_text, state_text, expert
        self._thoughts, self._random_actions, self._extra_info = thoughts, random_actions, extra_info
        self._state_key = state_key

    # --- envs -------------------------------------------------------------------------------------
    def build_env(self, **kwargs: Any) -> TaskWrapper:
        """A new base env (``env_kwargs`` updated by ``kwargs``), wrapped: the entry point of ``env_id``."""
        kw = {**self._env_kwargs, **kwargs}
        if isinstance(self._env, str):
            if self._image == "render":
                kw.setdefault("render_mode", "rgb_array")
            try:
                base = gym.make(self._env, **kw)
            except gym.error.Error as e:
                raise UserError(f"task {self.name!r}: cannot make env {self._env!r}: {type(e).__name__}: {first_line(e)}") from None
            except TypeError as e:
                raise UserError(f"{self._env} does not take the options {kw}: {first_line(e)}") from None
        else:
            base = self._env(**kw)
            if not isinstance(base, gym.Env):
                raise UserError(f"task {self.name!r}: the env factory returned {type(base).__name__}, not a gymnasium.Env")
        try:
            return TaskWrapper(base, self.action_words, self._image, self._image_shape, self._extra_info)
        except UserError:
            base.close()
            raise

    def make_env(self, **kwargs: Any) -> gym.Env:
        """``gym.make(env_id)`` when the task has a registered id, else ``build_env``; checked either way."""
        if self.env_id:
            return super().make_env(**kwargs)
        env = self.build_env(**kwargs)
        self.check_actions(env)
        return env

    def check_actions(self, env: gym.Env) -> None:
        """The base check, reading the words from the wrapper (``env.unwrapped`` is the Gymnasium env,
        which knows no words)."""
        where = self.env_id or self.name
        space = discrete_actions(env, where)
        words = env.get_wrapper_attr("action_words") if env.has_wrapper_attr("action_words") else None
        if words is None or len(words) != space.n:
            raise UserError(f"{where}: the env publishes action words {words} for {space.n} actions")
        check_words(words, where)

    # --- text ---------------------------------------------------------------------------------------
    @property
    def has_expert(self) -> bool:
        return self._expert is not None

    @property
    def has_state_key(self) -> bool:
        return self._state_key is not None

    def state_key(self, info: Info) -> Hashable | None:
        return self._state_key(info) if self._state_key is not None else None

    def describe(self, info: Info) -> str:
        return self._describe(info) if self._describe is not None else self.description

    def info_text(self, info: Info) -> str:
        return self._obs_text(info["obs"], info) if self._obs_text is not None else ""

    def read_state(self, info: Info) -> tuple[str, ...]:
        if self._state_text is None:
            return ()
        values = tuple(str(v) for v in self._state_text(info))
        if len(values) != len(self.state_fields):
            raise UserError(f"task {self.name!r}: state_text gave {len(values)} values for "
                            f"{len(self.state_fields)} state_fields")
        return values

    def expert_action(self, info: Info) -> int:
        if self._expert is None:
            return super().expert_action(info)  # the base's one-line "no expert" error
        return int(self._expert(info))

    def thoughts(self, info: Info, action: int) -> str:
        return self._thoughts(info, action) if self._thoughts is not None else ""

    def random_actions(self, info: Info) -> Sequence[int]:
        if self._random_actions is None:
            return super().random_actions(info)
        return self._random_actions(info)


def _env_name(env: gym.Env) -> str:
    # the unwrapped env's spec: a wrapper caches its own spec on first access, and gym.make sets the
    # final id (e.g. vlmrl/FrozenLake-v0) on the unwrapped env only after the entry point returns
    spec = env.unwrapped.spec
    return spec.id if spec is not None else type(env.unwrapped).__name__

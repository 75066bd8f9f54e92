"""ALFWorld on the text engine: household tasks played by choosing one admissible command per step.

The games are ALFWorld's (Shridhar et al., ICLR 2021) PDDL games, played through TextWorld's PDDL
engine with ALFWorld's name demangler ("cabinet 3", not the THOR object id). No THOR, no torch.

Spaces
- Action: ``Discrete(MAX_COMMANDS)``, an index into ``info["admissible_commands"]`` of the current
  step (sorted, as the engine gives them). An index past the end of that list is a command that is not
  admissible: the engine is not called, the observation is "Nothing happens." (the engine's own reply
  to such a command) and the step costs ``invalid_penalty``. The trainer's parser maps the model's
  text to an index with ``task.legal_actions(info)``, so it only produces in-range indices; out of
  range ones come from other callers (random agents, ``check_env``).
- Observation: the latest observation text, as a ``Text`` space (printable ASCII, at most
  ``OBS_MAX_CHARS``). The env has no image; the task's prompt is text only (``ALFWorldTask.text_only``).
  A THOR adapter could supply 300x300 frames for the same games (alfworld's ``AlfredThorEnv`` renders
  them): NOT provided and untested here, as THOR needs a display and a GPU.

Reward (RL4VLM, ``VLM_PPO_ALF/alf_utils.py: compute_reward``), every step:
``success_reward * won + goal_condition_success_rate - invalid_penalty * (command not admissible)``
with 50 and 1 as in the paper. The goal-condition rate is the fraction of the task's goal conditions
that hold in the state *after* the step, and it is paid at every step (not only when it rises), exactly
as in the paper's code. The text engine has no goal-condition counter, so ``goal_conditions`` recomputes
ALFWorld's THOR definitions (``alfworld/env/tasks.py``) from the PDDL facts; one difference: THOR
remembers an object as heated/cooled/cleaned for good, the text engine's ``isHot``/``isCool`` can be
undone by the opposite action. A reply the parser cannot read is the trainer's business (it draws a
random legal command and marks the step invalid): set the trainer's invalid-text penalty to 1 to match
the paper, where such a reply also cost 1.

Episodes terminate when the task is won and are truncated after ``max_steps`` (50) steps.

Expert (``expert=``), ``info["expert_action"]``: its next command, always one of the step's
``admissible_commands``, or ``None`` where it has none.
- ``"walkthrough"`` (default): the game file's stored walkthrough (it won every game tried). Its next
  command while the agent is still on it; detours that leave the world unchanged (look, examine,
  inventory, help) or only move the agent keep it (the expert first walks back); any other deviation
  leaves no expert (``None``), unless ``replan_expert=True``, which asks the PDDL planner for a new
  plan (about 4 s a call, once per deviation).
- ``"handcoded"``: alfworld's handcoded TextWorld expert (``alfworld.agents.expert``), which searches
  the room for what it needs. It is fed every command actually played, the agent's own included, so
  it proposes a command from any state the agent reaches (what DAgger needs). Its random choices draw
  from a generator spawned from ``np_random``, so the same seed gives the same episode. Three narrow
  corrections of alfworld 0.4.2's expert, at run time (``_SearchFixes``): it tracks ``move X to Y``
  as the ``put`` it was written for; it forgets "close R" chores once it has walked away from R; and
  where its ``go to R`` is inadmissible because R shares the agent's spot, it proposes
  ``examine R``. Where its command is still inadmissible, ``expert_action`` is ``None`` for that step
  (it keeps tracking). It does not win every game (pick_two within 50 steps especially): demonstration
  collection (``vlmrl.tasks.demos``) replays a game it did not win with the walkthrough, which it
  asks for with the reset option ``{"expert": "walkthrough"}`` (``fallback_expert``).
"""

from __future__ import annotations

import json
import os
import random
import string
from contextlib import contextmanager
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import gymnasium as gym
from gymnasium import spaces

from vlmrl.errors import UserError
from vlmrl.tasks.base import MEMORY_KEY, Info, Task, discrete_actions, memory_text

TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
SPLITS = ("train", "valid_train", "valid_seen", "valid_unseen")
EXPERTS = ("walkthrough", "handcoded")
#: size of the Discrete action space; admissible lists are far shorter (a few dozen commands)
MAX_COMMANDS = 512
#: longest observation text kept (the engine's replies are well under 1,000 characters)
OBS_MAX_CHARS = 4096
OBS_CHARSET = frozenset(string.printable)
NOTHING = "Nothing happens."
_BANNER = "-= Welcome to TextWorld, ALFRED! =-"
_GOAL_PREFIX = "Your task is to:"

# A fact: (predicate, argument ids), lower case, e.g. ("inreceptacle", ("apple_bar_...", "fridge_bar_...")).
Fact = tuple[str, tuple[str, ...]]
# "checked" is bookkeeping (set by look, examine, open) that no action or goal reads.
_BOOKKEEPING = frozenset({"checked", "not_checked"})
_LOCATION = frozenset({"atlocation", "not_atlocation"})


# --- game files -----------------------------------------------------------------------------------
def data_root(data_path: str | os.PathLike[str] | None = None) -> Path:
    """The ALFWorld data folder (holding ``json_2.1.1/``): ``data_path`` or ``$ALFWORLD_DATA``."""
    raw = data_path if data_path is not None else os.environ.get("ALFWORLD_DATA")
    if not raw:
        raise UserError(
            "ALFWorld game files not found: set ALFWORLD_DATA to the folder that holds json_2.1.1/ "
            "(e.g. export ALFWORLD_DATA=../shared/data/alfworld) or pass data_path=..."
        )
    root = Path(raw).expanduser()
    if not (root / "json_2.1.1").is_dir():
        raise UserError(
            f"ALFWorld data folder {str(root)!r} has no json_2.1.1/ subfolder: point ALFWORLD_DATA "
            "(or data_path) at the folder that contains json_2.1.1/ and logic/"
        )
    return root


@lru_cache(maxsize=16)
def _split_games(root: str, split: str) -> tuple[tuple[str, str], ...]:
    """(game file, task type) for every game of a split, sorted by path."""
    games = []
    for game in sorted(Path(root, "json_2.1.1", split).glob("*/*/game.tw-pddl")):
        task_type, _ = read_game_meta(game)
        games.append((str(game), task_type))
    return tuple(games)


def list_games(root: Path, split: str, task_types: Sequence[str] = TASK_TYPES) -> list[str]:
    """Game files of ``split`` whose task type is in ``task_types``, sorted by path."""
    if split not in SPLITS:
        raise UserError(f"unknown ALFWorld split {split!r}: choose one of {', '.join(SPLITS)}")
    wanted = set(task_types)
    games = [g for g, t in _split_games(str(root), split) if t in wanted]
    if not games:
        raise UserError(
            f"no ALFWorld games of types {sorted(wanted)} in {root / 'json_2.1.1' / split}: "
            "check ALFWORLD_DATA and the task types"
        )
    return games


def read_game_meta(game: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """(task type, pddl_params) from the ``traj_data.json`` beside a game file."""
    traj = Path(game).parent / "traj_data.json"
    try:
        data = json.loads(traj.read_text())
        return data["task_type"], data["pddl_params"]
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot read task_type/pddl_params from {traj}: {err}") from err


def _task_types(task_types: str | Sequence[str] | None) -> tuple[str, ...]:
    if task_types is None:
        return TASK_TYPES
    chosen = (task_types,) if isinstance(task_types, str) else tuple(task_types)
    unknown = [t for t in chosen if t not in TASK_TYPES]
    if unknown or not chosen:
        raise UserError(f"unknown ALFWorld task types {unknown}: choose from {', '.join(TASK_TYPES)}")
    return chosen


# --- text and facts (pure) ------------------------------------------------------------------------
def clean_text(text: str) -> str:
    """Engine text -> observation: printable ASCII, at most OBS_MAX_CHARS, never empty."""
    text = "".join(c if c in OBS_CHARSET else "?" for c in text.strip())
    return text[:OBS_MAX_CHARS] or NOTHING


def split_intro(feedback: str) -> tuple[str, str]:
    """The first observation -> (room description, goal), without the TextWorld banner."""
    text = feedback.replace(_BANNER, "").strip()
    head, sep, goal = text.partition(_GOAL_PREFIX)
    if not sep:
        return clean_text(text), ""
    return clean_text(head), goal.strip()


def to_facts(propositions: Iterable[Any]) -> frozenset[Fact]:
    """TextWorld propositions -> a frozenset of (predicate, argument ids), lower case."""
    return frozenset(
        (p.name.casefold(), tuple(a.name.strip().casefold() for a in p.arguments)) for p in propositions
    )


def goal_conditions(facts: frozenset[Fact], task_type: str, params: dict[str, Any]) -> tuple[int, int]:
    """(goal conditions met, goal conditions in all), ALFWorld's THOR definitions over PDDL facts.

    pick_and_place: a target object in a target receptacle (1). pick_two: up to two target objects in
    one target receptacle (2). look_at: a target object held; a toggled target lamp where the agent is
    (2). heat/cool/clean: a target object in place; one treated; one both (3).
    """

    def typed(pred: str, name: str) -> set[str]:
        kind = f"{name}type".casefold()
        return {args[0] for p, args in facts if p == pred and len(args) == 2 and args[1] == kind}

    def unary(pred: str) -> set[str]:
        return {args[0] for p, args in facts if p == pred and args}

    def pairs(pred: str) -> set[tuple[str, str]]:
        return {(args[0], args[1]) for p, args in facts if p == pred and len(args) == 2}

    objects = typed("objecttype", params["object_target"])
    inside = pairs("inreceptacle")
    if task_type == "look_at_obj_in_light":
        held = {o for _, o in pairs("holds")}
        lamps = typed("objecttype", params["toggle_target"]) & unary("istoggled")
        here = {loc for _, loc in pairs("atlocation")}
        where = pairs("objectatlocation") | {
            (o, loc) for o, r in inside for r2, loc in pairs("receptacleatlocation") if r == r2
        }
        lit = any(o in lamps and loc in here for o, loc in where)
        return int(bool(held & objects)) + int(lit), 2
    receptacles = typed("receptacletype", params["parent_target"])
    placed = {o for o, r in inside if o in objects and r in receptacles}
    if task_type == "pick_and_place_simple":
        return int(bool(placed)), 1
    if task_type == "pick_two_obj_and_place":
        most = max((sum((o, r) in inside for o in objects) for r in receptacles), default=0)
        return min(most, 2), 2
    treated_by = {
        "pick_heat_then_place_in_recep": "ishot",
        "pick_cool_then_place_in_recep": "iscool",
        "pick_clean_then_place_in_recep": "isclean",
    }
    if task_type not in treated_by:
        raise ValueError(f"unknown ALFWorld task type {task_type!r}")
    treated = objects & unary(treated_by[task_type])
    return int(bool(placed)) + int(bool(treated)) + int(bool(placed & treated)), 3


def _without(facts: frozenset[Fact], predicates: frozenset[str]) -> frozenset[Fact]:
    return frozenset(f for f in facts if f[0] not in predicates)


# --- the environment ------------------------------------------------------------------------------
def select_games(split: str, task_types: str | Sequence[str] | None, data_path: str | os.PathLike[str] | None,
                 num_games: int | None, max_steps: int) -> tuple[tuple[str, ...], Path, list[str]]:
    """The env options every ALFWorld env takes, checked: (task types, data root, the split's games)."""
    if max_steps < 1:
        raise UserError(f"max_steps must be at least 1, got {max_steps}")
    types = _task_types(task_types)
    root = data_root(data_path)
    games = list_games(root, split, types)
    if num_games is not None:
        if num_games < 1:
            raise UserError(f"num_games must be at least 1 (or None for all), got {num_games}")
        games = games[:num_games]  # the first ones by path, as alfworld's num_*_games
    return types, root, games


def choose_game(games: Sequence[str], rng: Any, options: dict[str, Any], accepted: Sequence[str] = ("game",)) -> str:
    """The game a reset plays: ``options["game"]`` (an index into ``games`` or a game file / folder
    path) if given, else one drawn with ``rng`` (the env's ``np_random``). ``accepted``: the reset
    options the caller takes (those other than "game" it reads itself)."""
    unknown = set(options) - set(accepted)
    if unknown:
        raise UserError(f"unknown ALFWorld reset options {sorted(unknown)}: only {', '.join(map(repr, accepted))} accepted")
    game = options.get("game")
    if game is None:
        return games[int(rng.integers(len(games)))]
    if isinstance(game, int) or hasattr(game, "__index__"):
        i = int(game)
        if not 0 <= i < len(games):
            raise UserError(f"game index {i} out of range: this split has {len(games)} games")
        return games[i]
    path = Path(game)
    if path.is_dir():
        path = path / "game.tw-pddl"
    if not path.is_file():
        raise UserError(f"ALFWorld game {str(game)!r} not found: give a game.tw-pddl file, its folder or an index")
    return str(path)


def paper_reward(won: bool, goal_condition_rate: float, valid: bool, success_reward: float = 50.0,
                 invalid_penalty: float = 1.0) -> float:
    """RL4VLM's per-step reward: success bonus + goal-condition rate - penalty for an inadmissible command."""
    return float(success_reward * won + goal_condition_rate - (0.0 if valid else invalid_penalty))


class ALFWorldEnv(gym.Env):
    """One ALFWorld text game per episode; see the module docstring for spaces, reward and expert.

    Arguments: ``split`` (train, valid_train, valid_seen, valid_unseen); ``task_types`` (a subset of
    TASK_TYPES, default all); ``data_path`` (default ``$ALFWORLD_DATA``); ``max_steps`` (truncation);
    ``num_games`` (keep only the first N games of the split, by path); ``success_reward`` and
    ``invalid_penalty`` (50 and 1 in the paper); ``expert`` ("walkthrough" or "handcoded", see the
    module docstring); ``replan_expert`` (walkthrough only: plan again after a deviation).
    ``reset(seed=...)`` draws the game with ``self.np_random``; ``options={"game": i}`` takes game
    ``i`` of ``self.games``, or a game file / folder path, instead; ``options={"expert": name}`` plays
    that episode with another expert ("walkthrough", or "handcoded" on an env made with it).
    ``fallback_expert``: the expert that demonstrates a game this env's expert did not win (None for
    the walkthrough itself).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        split: str = "train",
        task_types: str | Sequence[str] | None = None,
        data_path: str | os.PathLike[str] | None = None,
        max_steps: int = 50,
        num_games: int | None = None,
        success_reward: float = 50.0,
        invalid_penalty: float = 1.0,
        replan_expert: bool = False,
        render_mode: str | None = None,
        expert: str = "walkthrough",
    ) -> None:
        if render_mode not in (None, "ansi"):
            raise UserError(f"render_mode {render_mode!r} is not supported: use None or 'ansi'")
        _check_expert(expert)
        if replan_expert and expert != "walkthrough":
            raise UserError(f"replan_expert=True replans the walkthrough: it does not apply to expert={expert!r}")
        self.split = split
        self.task_types, self.root, self.games = select_games(split, task_types, data_path, num_games, max_steps)
        self.max_steps = max_steps
        self.success_reward = float(success_reward)
        self.invalid_penalty = float(invalid_penalty)
        self.replan_expert = replan_expert
        self.expert = expert
        self.fallback_expert = None if expert == "walkthrough" else "walkthrough"
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(MAX_COMMANDS)
        self.observation_space = spaces.Text(OBS_MAX_CHARS, min_length=1, charset=OBS_CHARSET)

        self._tw: Any = None  # the TextWorld env of the loaded game
        self._game: str | None = None
        self._task_type = ""
        self._params: dict[str, Any] = {}
        self._state: Any = None
        self._facts: frozenset[Fact] = frozenset()
        self._goal = ""
        self._observation = ""
        self._last_command: str | None = None
        self._steps = 0
        self._plan: list[str] | None = None  # the walkthrough's commands; None once off the plan
        self._pos = 0  # index of the walkthrough's next command in _plan
        self._searcher: _SearchingExpert | None = None  # the handcoded expert of this episode, if playing

    # --- gymnasium API ----------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, Info]:
        super().reset(seed=seed)
        options = dict(options or {})
        expert = options.pop("expert", self.expert)
        _check_expert(expert)
        if expert == "handcoded" and self.expert != "handcoded":
            raise UserError("reset option expert='handcoded' needs an env made with expert='handcoded' "
                            "(it requests the facts that expert reads)")
        game = choose_game(self.games, self.np_random, options, accepted=("game", "expert"))
        self._load(game)
        self._state = self._tw.reset()
        self._facts = to_facts(self._state["_facts"])
        self._observation, self._goal = split_intro(self._state.feedback)
        self._plan, self._pos = list(self._state.get("extra.walkthrough") or []), 0
        self._searcher = None
        if expert == "handcoded":
            # spawn() draws nothing from np_random: the games drawn are those of the walkthrough env
            rng = random.Random(int(self.np_random.spawn(1)[0].integers(2**63)))
            self._searcher = _SearchingExpert(game, self._state, rng, self.max_steps + 1)
        self._last_command = None
        self._steps = 0
        return self._observation, self._info()

    def step(self, action: Any) -> tuple[str, float, bool, bool, Info]:
        if self._state is None:
            raise RuntimeError("ALFWorldEnv.step() called before reset()")
        index = int(action)
        commands = self._state["admissible_commands"]
        self._steps += 1
        valid = 0 <= index < len(commands)
        if valid:
            command = commands[index]
            before = self._facts
            self._state, _, _ = self._tw.step(command)
            self._facts = to_facts(self._state["_facts"])
            self._observation = clean_text(self._state.feedback)
            if self._searcher is not None:
                self._searcher.observe(self._state, command)
            else:
                self._follow_plan(command, before)
        else:
            command = None
            self._observation = NOTHING  # the engine's reply to a command it does not know
        self._last_command = command
        info = self._info()
        reward = paper_reward(info["won"], info["goal_condition_success_rate"], valid,
                              self.success_reward, self.invalid_penalty)
        terminated = info["won"]
        truncated = not terminated and self._steps >= self.max_steps
        return self._observation, reward, terminated, truncated, info

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            return f"Task: {self._goal}\n{self._observation}\n"
        return None

    def close(self) -> None:
        if self._tw is not None:
            # The planner's library copy stays loaded: unloading it (fast_downward.close_lib) crashed.
            self._tw.close()
            self._tw, self._game = None, None
        self._state = None

    # --- helpers ----------------------------------------------------------------------------------
    def _load(self, game: str) -> None:
        """Start the game's TextWorld env unless it is already loaded (loading costs seconds)."""
        if game == self._game:
            return
        if self._tw is None:
            textworld, pddl_env, demangler = _engine()
            # facts (readable names) only for the handcoded expert: they cost about 0.1 s a step
            requested = textworld.EnvInfos(won=True, admissible_commands=True, facts=self.expert == "handcoded",
                                           extras=["walkthrough"])
            # One engine for the env's lifetime: each PddlEnv loads its own copy of the planner's
            # shared library and never unloads it, so one per game would leak.
            self._tw = demangler(pddl_env(requested))
        self._game = None  # until the load below succeeds
        # Loading the parsed JSON (not the path) is what textworld.start does, minus its unclosed file.
        self._tw.load(json.loads(Path(game).read_text()))
        self._game = game
        self._task_type, self._params = read_game_meta(game)

    def _follow_plan(self, command: str, before: frozenset[Fact]) -> None:
        """Advance the expert's plan after ``command`` took the world from ``before`` to now."""
        plan, pos = self._plan, self._pos
        if plan is not None and pos < len(plan) and command == plan[pos]:
            self._pos += 1
            return
        world_before, world_now = _without(before, _BOOKKEEPING), _without(self._facts, _BOOKKEEPING)
        if plan is not None and _without(world_before, _LOCATION) == _without(world_now, _LOCATION):
            if world_before == world_now:
                return  # look, examine, inventory, help: nothing changed, the plan still holds
            # The agent only walked elsewhere: the plan holds once it walks back where it was going.
            if pos < len(plan) and plan[pos].startswith("go to "):
                if plan[pos] not in self._state["admissible_commands"]:
                    self._pos += 1  # it walked to exactly that place
                return
            back = next((c for c in reversed(plan[:pos]) if c.startswith("go to ")), None)
            if back is not None:
                plan.insert(pos, back)
                return
        self._plan, self._pos = None, 0
        if self.replan_expert and not self._state["won"]:
            inner = self._tw.unwrapped
            self._plan = list(inner._pddl_state.replan(inner._entity_infos) or []) or None

    def _expert_command(self) -> str | None:
        if self._searcher is not None:
            return self._searcher.command
        if self._plan is None or self._pos >= len(self._plan):
            return None
        command = self._plan[self._pos]
        return command if command in self._state["admissible_commands"] else None

    def _info(self) -> Info:
        met, total = goal_conditions(self._facts, self._task_type, self._params)
        return {
            "goal": self._goal,
            "observation": self._observation,
            "admissible_commands": list(self._state["admissible_commands"]),
            "task_type": self._task_type,
            "won": bool(self._state["won"]),
            "goal_condition_success_rate": met / total,
            "game": self._game,
            "expert_action": self._expert_command(),
            "last_command": self._last_command,
            "steps": self._steps,
        }


@lru_cache(maxsize=1)
def _engine() -> tuple[Any, Any, Any]:
    """(textworld, its PDDL env class, ALFWorld's demangler wrapper), imported on first use."""
    try:
        import fast_downward
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
        from textworld.envs.pddl import PddlEnv
    except ImportError as err:
        raise UserError(
            f"ALFWorld needs the alfworld package ({err}): pip install 'vlmrl[alfworld]'"
        ) from err
    _memoize_translation(fast_downward)
    return textworld, PddlEnv, AlfredDemangler


def _memoize_translation(fast_downward: Any) -> None:
    """Keep the last few PDDL -> SAS translations (process-wide).

    TextWorld translates a game's PDDL twice on load and twice again on *every* reset; that is most
    of a reset's cost (0.3-1.5 s each). The translation is a pure function of the text and TextWorld
    only reads its result, so a game's first reset after its load, and every later reset of the same
    game, reuse it. TextWorld looks the function up on the module at call time, hence the patch.
    """
    if getattr(fast_downward.pddl2sas, "vlmrl_memo", False):
        return
    translate = fast_downward.pddl2sas

    @lru_cache(maxsize=8)
    def pddl2sas(domain: str, problem: str, verbose: bool = False, optimize: bool = False) -> Any:
        return translate(domain, problem, verbose=verbose, optimize=optimize)

    pddl2sas.vlmrl_memo = True  # type: ignore[attr-defined]
    fast_downward.pddl2sas = pddl2sas


def _check_expert(expert: Any) -> None:
    if expert not in EXPERTS:
        raise UserError(f"unknown ALFWorld expert {expert!r}: choose one of {', '.join(EXPERTS)}")


class _SearchingExpert:
    """alfworld's handcoded TextWorld expert for one episode, fed every command actually played.

    The protocol is alfworld's own (``AlfredExpert``): ``observe`` the intro once, then after every
    step ``act(state, last_command)``, which first updates its beliefs (where it is, what it holds,
    what it has seen) from that command and its feedback, then proposes the next command. Unlike
    ``AlfredExpert`` it asks for a first command on the intro instead of opening with "look", and an
    inadmissible proposal becomes ``None`` instead of "look".
    """

    def __init__(self, game: str, state: Any, rng: random.Random, max_steps: int) -> None:
        self._agent = _handcoded_agent_class()(max_steps=max_steps)
        self._agent.reset(game)  # reads the task's pddl_params from the game's traj_data.json
        self._agent.observe(state["feedback"])
        self._rng = rng
        self._lost = False
        self._substitute: tuple[str, str] | None = None  # (examine R, the go to R it stands for)
        self.command: str | None = None
        self._ask(state, "")

    def observe(self, state: Any, command: str) -> None:
        """Feed the command just played (by anyone) and the state it led to; update ``command``."""
        if self._substitute is not None and command == self._substitute[0]:
            command = self._substitute[1]  # the tracker learns it is at R, as if it had walked there
        self._ask(state, command)

    def _ask(self, state: Any, last_command: str) -> None:
        self._substitute, self.command = None, None
        if self._lost or state["won"]:
            return
        from alfworld.agents.expert import (
            HandCodedAgentFailed,
            HandCodedAgentTimeout,
            handcoded_expert,
        )

        try:
            with _random_of(handcoded_expert, self._rng):
                command = self._agent.act(state, 0, False, last_command)
        except (HandCodedAgentTimeout, HandCodedAgentFailed, IndexError, KeyError):
            # out of steps or out of ideas; its heuristics also index empty lists (no receptacle left
            # to search, an empty inventory) in states they were not written for
            self._lost = True
            return
        admissible = state["admissible_commands"]
        if command.startswith("go to ") and command not in admissible:
            here = "examine " + command[len("go to "):]
            if here in admissible:  # R shares the agent's spot ("shelf 2" and "shelf 3"): look at it
                self._substitute, command = (here, command), here
        self.command = command if command in admissible else None


@contextmanager
def _random_of(module: Any, rng: random.Random) -> Iterator[None]:
    """Point ``module.random`` at ``rng`` for a while.

    The expert draws with the ``random`` module (which of two equal objects to take; a random command
    to break out of repeating itself): its module's name for it is pointed at the episode's own
    generator, so episodes are seeded and the process's global random state is left alone. Not for
    threads: the envs of one process step one after another (the worker pool uses processes).
    """
    saved = module.random
    module.random = rng
    try:
        yield
    finally:
        module.random = saved


@lru_cache(maxsize=1)
def _handcoded_agent_class() -> type:
    """alfworld's ``HandCodedTWAgent`` whose task policies carry ``_SearchFixes``."""
    _engine()  # the same clear error where alfworld is missing
    from alfworld.agents.expert import HandCodedTWAgent

    class SearchingTWAgent(HandCodedTWAgent):
        def get_task_policy(self, task_param: dict[str, Any]) -> type:
            return _fixed_policy(super().get_task_policy(task_param))

    return SearchingTWAgent


@cache
def _fixed_policy(policy: type) -> type:
    return type(policy.__name__, (_SearchFixes, policy), {})


class _SearchFixes:
    """Run-time corrections of alfworld 0.4.2's handcoded expert (the installed package is unchanged)."""

    def update_state_tracking(self, game_state: Any, last_action: str) -> None:
        # alfworld 0.4 renamed the command "put X in/on Y" to "move X to Y", but the tracker
        # (handcoded_expert.py, BasePolicy.update_state_tracking) still looks for "put": after placing
        # an object it believed it still held it, so on pick_two (and after discarding a wrong
        # object) it kept proposing an inadmissible move.
        tracked = "put " + last_action[len("move "):] if last_action.startswith("move ") else last_action
        super().update_state_tracking(game_state, tracked)  # type: ignore[misc]
        if last_action.startswith("go to "):
            # It queues "close R" after opening R and pops it later wherever it stands (after taking
            # what it found in R, it would propose closing R from the sink): R is closed only from R.
            keep = f"close {self.curr_recep}"  # type: ignore[attr-defined]
            self.action_backlog = [a for a in self.action_backlog if a == keep]  # type: ignore[has-type]


# --- the task's text side -------------------------------------------------------------------------
class ALFWorldTask(Task):
    name = "ALFWorld"
    env_id = "vlmrl/ALFWorld-v0"
    description = (
        "You are in a household. Finish the task below by choosing, at every step, one of the "
        "admissible commands, copied exactly."
    )
    state_fields = ()  # everything the agent needs is already text in the prompt
    #: no image: the policy builds a text-only prompt
    text_only = True

    def legal_actions(self, info: Info) -> Sequence[str]:
        # per step, from the env: action i is admissible command i (an index past the list is a no-op)
        return tuple(info["admissible_commands"])

    def check_actions(self, env: gym.Env) -> None:
        # The words change every step (a few dozen commands, far below MAX_COMMANDS), so only the
        # space can be checked without a reset, which costs seconds here.
        discrete_actions(env, self.env_id)

    def read_state(self, info: Info) -> tuple[str, ...]:
        return ()

    def state_key(self, info: Info) -> tuple[str, str, tuple[str, ...]]:
        # what the agent is shown: the goal, the observation text and the admissible commands (the
        # observation alone would make every "Nothing happens." one state, wherever the agent stands)
        return info["goal"], info["observation"], tuple(info["admissible_commands"])

    def expert_action(self, info: Info) -> int:
        command = info.get("expert_action")
        if command is None:
            raise ValueError(
                "no expert command here: the agent left the walkthrough, the handcoded expert has no "
                "admissible command, or the game is over; create the env with expert='handcoded' (or "
                "replan_expert=True) for an expert from any state"
            )
        return list(info["admissible_commands"]).index(command)

    def thoughts(self, info: Info, action: int) -> str:
        return f"My task is to {info['goal'].rstrip('.')}. Next step: {self.legal_actions(info)[action]}."

    def info_text(self, info: Info) -> str:
        commands = "\n".join(info["admissible_commands"])
        return (
            f"Your task is to: {info['goal']}\n"
            f"Observation: {info['observation']}\n"
            f"Admissible commands:\n{commands}"
        )

    def step_text(self, info: Info) -> str:
        # a remembered step keeps what was seen, not the (long) list of commands of that step
        return info["observation"]

    def prompt(self, info: Info, cot: bool = True) -> str:
        # As the base prompt, but the commands are listed once (in info_text), not again in the hint.
        fields: dict[str, str] = {}
        if cot:
            fields["thoughts"] = "<reason step by step from the observation to the next command>"
        fields["action"] = "<one admissible command, copied exactly>"
        memory = [memory_text(info[MEMORY_KEY])] if info.get(MEMORY_KEY) else []
        return "\n".join(
            [
                f"You are playing {self.name}. {self.describe(info)}",
                *memory,
                self.info_text(info),
                "Answer with one JSON object and nothing else, in this format:",
                json.dumps(fields, ensure_ascii=False),
            ]
        )


TASK = ALFWorldTask()

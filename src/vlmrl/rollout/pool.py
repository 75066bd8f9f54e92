"""Where the envs of a rollout or an evaluation live: in this process, or in worker processes.

``make_env_pool(task, num_envs, env_kwargs, workers)`` gives one of two pools with one interface:

- ``SerialEnvPool`` (``workers=0``, the default): the envs in this process, stepped one after another;
- ``WorkerEnvPool`` (``workers=W >= 1``): the envs split into W contiguous shares, each share in its own
  process, through Gymnasium's ``AsyncVectorEnv``. The W processes step their shares at the same time.

Both address env ``i`` by its index and run the same per-env code (``EnvGroup``): ``reset`` and
``step`` take only the envs named (an evaluation or a group rollout steps the envs still playing),
each with its own seed, options and action, and return each env's own ``(obs, info)`` or five-tuple
unchanged, so a run gives the same transitions with either pool. The envs stay plain ``gym.Env``.

Why the worker pool drives ``AsyncVectorEnv`` through ``call`` rather than its ``step``/``reset``:
those step every env at once, take one ``options`` for all, batch observations through the
observation space and merge the infos into arrays, while the callers here step subsets, pass
per-env options (``{"game": i}``) and need each info as the env wrote it. What ``AsyncVectorEnv``
gives is the rest: the processes, the pipes, ``call`` and ``close``.

A worker that dies (killed, out of memory), an env that raises inside one, or a worker that does not
answer within ``timeout`` seconds (a hung env: a deadlocked engine, a lost socket) ends the call with
an ``EnvWorkerError``: one line naming the env or the process and what to do.

Workers start from a fork server (``WORKER_START_METHOD``), so, as with any spawned process, each
imports the main script again (as ``__mp_main__``): a script that starts workers keeps its heavy
imports (torch) inside functions or under ``if __name__ == "__main__"``, or each worker pays for them.
"""

from __future__ import annotations

import functools
import io
import multiprocessing
import multiprocessing.connection
import pickle
import signal
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

from vlmrl.config import env_timeout_problem
from vlmrl.errors import UserError

# reset requests: env index -> (seed or None, options or None); step requests: env index -> action
Resets = Mapping[int, tuple[int | None, dict[str, Any] | None]]
Transition = tuple[Any, float, bool, bool, dict]

# forkserver, not fork: the trainer forks workers from a process that runs torch, tqdm and TensorBoard
# threads, and a fork copies whatever lock one of them held at that moment
WORKER_START_METHOD = "forkserver"

#: seconds a worker may take over one call (start, reset, step, ...) before it counts as hung. Generous:
#: an ALFWorld game loads and resets in 1-3 s, so a share of envs takes well under a minute even at load.
DEFAULT_WORKER_TIMEOUT_S = 600.0


class EnvWorkerError(UserError):
    """An env worker process died, or an env raised inside one. A ``UserError``, so the CLI prints
    it as one line (exit code 2): the run stops and its last checkpoint stays as it was."""


class _CompactPickler(pickle.Pickler):
    """Writes an array whose elements are all the same bytes as ``np.full(shape, value, dtype)``."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is np.ndarray and obj.size > 64 and obj.dtype.kind in "biuf" and obj.flags.c_contiguous:
            flat = obj.reshape(-1).view(np.uint8).reshape(obj.size, obj.itemsize)
            if (flat == flat[0]).all():
                return np.full, (obj.shape, obj.reshape(-1)[0], obj.dtype)
        return NotImplemented


def dumps_env(env: gym.Env) -> bytes:
    """``pickle.dumps(env)``, with constant arrays written by value (``pickle.loads`` reads it).

    A Box observation space keeps four arrays of the observation's shape (low, high and where each
    is bounded), nearly all constant: they were 1.1 of the 1.35 MB of each 300 x 300 image env, and
    checkpoints of 32 NumberLine envs took 57 MB.
    """
    buf = io.BytesIO()
    _CompactPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(env)
    return buf.getvalue()


class EnvGroup:
    """Envs at global indices ``indices``, each made by ``make()``: the per-env operations of a pool
    (the serial pool holds one group of all its envs; each worker process holds one group)."""

    def __init__(self, make: Callable[[], gym.Env], indices: Sequence[int]):
        self.envs: dict[int, gym.Env] = {}
        for i in indices:
            self.envs[i] = make()

    def reset(self, requests: Resets) -> dict[int, tuple[Any, dict]]:
        out = {}
        for i in sorted(requests):
            seed, options = requests[i]
            out[i] = self.envs[i].reset(seed=seed, options=options)
        return out

    def step(self, actions: Mapping[int, int]) -> dict[int, Transition]:
        return {i: self.envs[i].step(actions[i]) for i in sorted(actions)}

    def attr(self, name: str) -> Any:
        """Attribute ``name`` of the first env's unwrapped env, or None (e.g. ALFWorld's ``games``)."""
        first = self.envs[min(self.envs)]
        return getattr(first.unwrapped, name, None)

    def state(self, _: Any = None) -> dict[int, bytes] | None:
        """Each env pickled, or None when one cannot be (ALFWorld holds a running game engine)."""
        try:
            return {i: dumps_env(env) for i, env in self.envs.items()}
        except Exception:  # noqa: BLE001  (any env may hold unpicklable handles; resume then re-seeds)
            return None

    def load(self, blobs: Mapping[int, bytes]) -> None:
        """Replace the envs named by pickles from ``state()``."""
        for i, blob in blobs.items():
            self.envs[i].close()
            self.envs[i] = pickle.loads(blob)

    def close(self) -> None:
        for env in self.envs.values():
            env.close()


class EnvPool(Protocol):
    """The envs of one Collector or evaluation, addressed by index ``0 .. num_envs - 1``."""

    num_envs: int

    def reset(self, requests: Resets) -> dict[int, tuple[Any, dict]]:
        """Reset the envs named, each ``reset(seed=, options=)``; their ``(obs, info)`` by index."""

    def step(self, actions: Mapping[int, int]) -> dict[int, Transition]:
        """Step the envs named, each with its action; their ``(obs, reward, terminated, truncated,
        info)`` by index, as the env returned it. Envs not named are left alone."""

    def attr(self, name: str) -> Any:
        """Attribute ``name`` of env 0's unwrapped env, or None."""

    def state(self) -> list[bytes] | None:
        """Every env pickled (in index order), or None when an env cannot be pickled."""

    def load(self, blobs: Sequence[bytes]) -> None:
        """Put back the envs of ``state()`` (of either pool: the format is the same)."""

    def close(self) -> None: ...


class SerialEnvPool:
    """The envs in this process, stepped one after another (the default)."""

    def __init__(self, make: Callable[[], gym.Env], num_envs: int):
        self.num_envs = num_envs
        self.group = EnvGroup(make, range(num_envs))

    def reset(self, requests: Resets) -> dict[int, tuple[Any, dict]]:
        return self.group.reset(requests)

    def step(self, actions: Mapping[int, int]) -> dict[int, Transition]:
        return self.group.step(actions)

    def attr(self, name: str) -> Any:
        return self.group.attr(name)

    def state(self) -> list[bytes] | None:
        blobs = self.group.state()
        return None if blobs is None else [blobs[i] for i in range(self.num_envs)]

    def load(self, blobs: Sequence[bytes]) -> None:
        self.group.load(dict(enumerate(blobs)))

    def close(self) -> None:
        self.group.close()


class _Worker(gym.Env):
    """The one env ``AsyncVectorEnv`` sees per worker process: an ``EnvGroup`` behind ``run``.

    Its spaces are placeholders: only ``call`` reaches it, never the vector env's ``step``/``reset``.
    The group is built on the first ``run``, in the worker: ``AsyncVectorEnv`` also builds one of these
    in the main process to read its spaces, and that one must cost nothing.
    """

    observation_space = gym.spaces.Discrete(1)
    action_space = gym.spaces.Discrete(1)

    def __init__(self, make: Callable[[], gym.Env], indices: Sequence[int]):
        self.make, self.indices = make, list(indices)
        self.group: EnvGroup | None = None

    def run(self, op: str, payload: Any = None) -> tuple[bool, Any]:
        """``EnvGroup.<op>`` on this worker's part of ``payload`` (a mapping keyed by env index):
        (True, result), or (False, what went wrong) instead of raising, which would end the worker
        and leave Gymnasium to log the traceback; the main process raises one ``EnvWorkerError``."""
        env = None
        try:
            if self.group is None:
                self.group = EnvGroup(self.make, self.indices)
            if op == "start":
                return True, None
            if isinstance(payload, Mapping):  # every worker gets the whole request: keep this share's
                payload = {i: payload[i] for i in self.indices if i in payload}
            if op not in ("reset", "step"):
                return True, getattr(self.group, op)(payload)
            out = {}
            for env in payload:  # env by env, so that a failure names its env
                out.update(getattr(self.group, op)({env: payload[env]}))
            return True, out
        except Exception as e:  # noqa: BLE001  (reported to the main process, not hidden)
            return False, _describe(e, env)

    def reset(self, *, seed=None, options=None):
        raise RuntimeError("a pool worker is driven through run(), not reset()")

    def step(self, action):
        raise RuntimeError("a pool worker is driven through run(), not step()")

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None


def _describe(error: Exception, env: int | None) -> dict[str, Any]:
    """A worker's exception as plain data (the exception itself may not pickle)."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return {"env": env, "type": type(error).__name__, "message": str(error), "where": where,
            "user_error": isinstance(error, UserError)}


class WorkerEnvPool:
    """The envs in ``workers`` processes (Gymnasium's ``AsyncVectorEnv``), each stepping a contiguous
    share of them: worker ``w`` holds the envs of ``shares[w]``."""

    def __init__(self, make: Callable[[], gym.Env], num_envs: int, workers: int, name: str = "env",
                 timeout: float | None = None):
        from gymnasium.vector import AsyncVectorEnv, AutoresetMode

        self.num_envs, self.name = num_envs, name
        self.timeout = DEFAULT_WORKER_TIMEOUT_S if timeout is None else float(timeout)
        self.shares = [s.tolist() for s in np.array_split(np.arange(num_envs), min(workers, num_envs))]
        self._closed = False
        # the fork server (started once per process, on first use) imports this module and the tasks
        # once, so that each worker starts as a fork of it instead of importing them again
        multiprocessing.get_context(WORKER_START_METHOD).set_forkserver_preload(["vlmrl.rollout.pool"])
        # AutoresetMode.DISABLED: the callers reset an env themselves, when and with what seed they mean to
        try:
            self.vec = AsyncVectorEnv([functools.partial(_Worker, make, share) for share in self.shares],
                                      shared_memory=False, copy=False, context=WORKER_START_METHOD,
                                      autoreset_mode=AutoresetMode.DISABLED)
        except (EOFError, OSError) as e:  # a worker that could not start (its traceback is above)
            raise EnvWorkerError(f"the {name} env worker processes did not start ({type(e).__name__}: {e}); "
                                 f"use env_workers=0 to make the envs in this process") from None
        self._run("start")  # build every share now, all at once, so a broken env fails here

    def _run(self, op: str, payload: Any = None) -> list[Any]:
        """``op`` on every worker; each worker's result, or one ``EnvWorkerError``."""
        if self._closed:
            raise RuntimeError(f"the {self.name} env pool is closed")
        try:
            self.vec.call_async("run", op, payload)
            replies = self.vec.call_wait(timeout=self.timeout)
        except multiprocessing.TimeoutError:
            message = self._hung(op)
            self._shutdown()
            raise EnvWorkerError(message) from None
        except (EOFError, OSError) as e:  # a pipe to a dead worker: BrokenPipe, ConnectionReset, EOF
            message = self._death(e)  # before the shutdown, which ends the others too
            self._shutdown()
            raise EnvWorkerError(message) from None
        except Exception as e:  # noqa: BLE001  (a worker failed outside run(): reported as one line)
            self._shutdown()
            raise EnvWorkerError(f"an {self.name} env worker failed: {type(e).__name__}: {e}") from None
        for w, (ok, result) in enumerate(replies):
            if not ok:
                self.close()
                raise self._env_error(w, result)
        return [result for _, result in replies]

    def _death(self, error: Exception) -> str:
        # the dead worker's exit status may come a moment after its pipe's end of file
        multiprocessing.connection.wait([p.sentinel for p in self.vec.processes], timeout=2.0)
        dead = [(w, p) for w, p in enumerate(self.vec.processes) if p.exitcode is not None]
        if not dead:
            return f"lost touch with an {self.name} env worker process ({type(error).__name__}: {error})"
        w, p = dead[0]
        how = (f"was killed by {signal.Signals(-p.exitcode).name}" if p.exitcode < 0
               else f"exited with code {p.exitcode}")
        return (f"{self.name} env worker process {w} (pid {p.pid}, envs {_span(self.shares[w])}) {how}, so the "
                f"envs stopped; a training run continues from its last checkpoint with `vlmrl train --resume`. "
                f"If workers keep dying (out of memory?), use fewer env_workers, or env_workers=0 to step the "
                f"envs in this process")

    def _hung(self, op: str) -> str:
        # a worker that answered has its reply waiting in its pipe; the others are still inside the call
        silent = [w for w, pipe in enumerate(self.vec.parent_pipes) if pipe is not None and not pipe.poll(0)]
        w = silent[0] if silent else 0
        p = self.vec.processes[w]
        return (f"{self.name} env worker process {w} (pid {p.pid}, envs {_span(self.shares[w])}) did not answer a "
                f"{op} within {self.timeout:g} s, so the envs stopped (an env that hangs?); a training run continues "
                f"from its last checkpoint with `vlmrl train --resume`. If the env is only slow, raise "
                f"env_timeout_s; env_workers=0 steps the envs in this process, where a hang can be inspected")

    def _env_error(self, w: int, what: dict[str, Any]) -> Exception:
        env = f"env {what['env']}" if what["env"] is not None else f"envs {_span(self.shares[w])}"
        if what["user_error"]:  # the env's own message about bad input, as the serial pool would give it
            return UserError(what["message"])
        at = f" (at {what['where']})" if what["where"] else ""
        return EnvWorkerError(f"{self.name} {env} raised {what['type']}: {what['message']}{at} in env worker "
                              f"process {w}, so the envs stopped. Fix the env (env_workers=0 shows the full "
                              f"traceback); a training run continues from its last checkpoint with "
                              f"`vlmrl train --resume`")

    def _shutdown(self) -> None:
        """End every worker at once: after a death the pipes are out of step and close() would wait."""
        if self._closed:
            return
        self._closed = True
        for p in self.vec.processes:
            if p.is_alive():
                p.kill()
        for pipe in self.vec.parent_pipes:
            if pipe is not None:
                pipe.close()
        for p in self.vec.processes:
            p.join()
        self.vec.closed = True  # nothing left for AsyncVectorEnv.close (or __del__) to do

    def _gather(self, op: str, payload: Any) -> dict[int, Any]:
        out: dict[int, Any] = {}
        for part in self._run(op, payload):
            out.update(part)
        return out

    def reset(self, requests: Resets) -> dict[int, tuple[Any, dict]]:
        return self._gather("reset", dict(requests)) if requests else {}

    def step(self, actions: Mapping[int, int]) -> dict[int, Transition]:
        return self._gather("step", {i: int(a) for i, a in actions.items()}) if actions else {}

    def attr(self, name: str) -> Any:
        return self._run("attr", name)[0]

    def state(self) -> list[bytes] | None:
        parts = self._run("state")
        if any(part is None for part in parts):
            return None
        blobs = {i: b for part in parts for i, b in part.items()}
        return [blobs[i] for i in range(self.num_envs)]

    def load(self, blobs: Sequence[bytes]) -> None:
        self._run("load", dict(enumerate(blobs)))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.vec.close()
        except BaseException:  # a worker that died while closing, or Ctrl-C: end the rest, at once
            self._closed = False
            self._shutdown()
            raise


def _span(share: Sequence[int]) -> str:
    return f"{share[0]}-{share[-1]}" if len(share) > 1 else str(share[0])


def make_env_pool(task, num_envs: int, env_kwargs: Mapping[str, Any] | None = None, workers: int = 0,
                  timeout: float | None = None) -> EnvPool:
    """``num_envs`` envs of ``task`` (``task.make_env(**env_kwargs)``): in this process when ``workers``
    is 0, else in ``min(workers, num_envs)`` worker processes, each of which must answer a call within
    ``timeout`` seconds (None: ``DEFAULT_WORKER_TIMEOUT_S``)."""
    if workers < 0:
        raise UserError(f"env_workers must be >= 0 (0: the envs in this process), got {workers}")
    problem = env_timeout_problem(timeout, workers)
    if problem:
        raise UserError(problem)
    make = functools.partial(task.make_env, **dict(env_kwargs or {}))
    if workers == 0:
        return SerialEnvPool(make, num_envs)
    return WorkerEnvPool(make, num_envs, workers, name=task.name, timeout=timeout)

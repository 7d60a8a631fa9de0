"""Meta-World MT10 environments as a vision-language-action task.

The policy sees only camera images, an instruction and the proprioceptive state (hand xyz +
gripper opening): object and goal positions must be read from the images. Start states come
from `metaworld.MT1(task, seed)` (50 fixed starts per seed, deterministic resets), so a start is
named by (task, seed, index); train and evaluation use disjoint seeds.

Rendering uses `mujoco.Renderer` directly with the cheap settings (no multisampling, shadows,
reflections or skybox): the gymnasium viewer renders a large shadow map every frame and, once
its flags are changed, can produce black frames in later environments of the same process.
"""

from __future__ import annotations

import atexit
import functools
import os
import weakref
import zlib
from dataclasses import dataclass

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402

from quantvla_core.sim.instructions import INSTRUCTIONS, instruction_for  # noqa: E402

TASKS: tuple[str, ...] = (
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
)
# Each seed gives 50 start states per task. Demos come from TRAIN_SEEDS, evaluation from
# EVAL_SEEDS only, so evaluation starts are never seen in training.
STARTS_PER_SEED = 50
TRAIN_SEEDS: tuple[int, ...] = (0, 1, 2, 3)
EVAL_SEEDS: tuple[int, ...] = (1000, 1001)
# Starts for choosing between trained candidates (`quantvla eval --eval-seeds 1002`, and 1003
# when 10 per task cannot separate them), so the choice never looks at the evaluation starts it
# is then reported on.
VALIDATION_SEEDS: tuple[int, ...] = (1002, 1003)
CAMERAS: tuple[str, ...] = ("topview", "corner", "corner2", "corner3", "corner4")
DEFAULT_CAMERAS: tuple[str, ...] = ("corner", "topview")
DEFAULT_IMAGE_SIZE = 96
DEFAULT_MAX_STEPS = 200
STATE_DIM = 4
ACTION_DIM = 4
# Goal spheres are 2 cm: one pixel at 96 px. Rendering them larger (visual only, no physics)
# makes the goal readable from the image at the resolution a small policy uses.
DEFAULT_GOAL_MARKER_SCALE = 2.0


@dataclass(frozen=True)
class StartState:
    """Names one deterministic start: the `index`-th of `metaworld.MT1(task, seed)`'s starts."""

    task: str
    seed: int
    index: int


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown MT10 task {task!r}; accepted: {', '.join(TASKS)}")
    return task


def check_eval_seeds(seeds) -> tuple[int, ...]:
    """Seeds whose starts may be reported as evaluation: distinct, >= 0 and none a demo
    (training) seed, so a success rate never comes from starts the policy was trained on.
    The error names the bad seeds and what is accepted (the CLI prefixes its flag)."""
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"{seeds}: give distinct seeds >= 0")
    overlap = sorted(set(seeds) & set(TRAIN_SEEDS))
    if overlap:
        raise ValueError(
            f"{overlap} are demo (training) seeds; accepted: any seed outside "
            f"{list(TRAIN_SEEDS)} (held-out: {list(EVAL_SEEDS)}, validation: "
            f"{list(VALIDATION_SEEDS)})"
        )
    return tuple(seeds)


def starts_for(task: str, seeds: tuple[int, ...] | list[int], per_seed: int = STARTS_PER_SEED):
    """The first `per_seed` starts of every seed, in a fixed order."""
    check_task(task)
    if not 1 <= per_seed <= STARTS_PER_SEED:
        raise ValueError(f"per_seed must be in 1..{STARTS_PER_SEED}, got {per_seed}")
    return [StartState(task, int(s), i) for s in seeds for i in range(per_seed)]


def instruction_variant(start: StartState) -> int:
    """Which paraphrase a start uses: fixed per start, spread over the paraphrases."""
    key = f"{start.task}/{start.seed}/{start.index}".encode()
    return zlib.crc32(key) % len(INSTRUCTIONS[start.task])


@functools.lru_cache(maxsize=32)
def _benchmark(task: str, seed: int):
    import metaworld

    return metaworld.MT1(task, seed=seed)


def _close_at_exit(ref) -> None:
    env = ref()
    if env is not None:
        env.close()


def _load_triton_before_egl() -> None:
    """Triton's bundled LLVM must be loaded before MuJoCo's EGL (Mesa) driver brings another
    LLVM into the process; importing triton afterwards (a quantized policy's kernels, or torch's
    optimizers) segfaults. Load it first where it is installed."""
    try:
        import triton  # noqa: F401
    except ImportError:
        pass


class MT10Env:
    """One MT10 task with rendering; `reset(seed, index)` then `step(action)` until `done`."""

    def __init__(
        self,
        task: str,
        cameras=DEFAULT_CAMERAS,
        image_size: int = DEFAULT_IMAGE_SIZE,
        max_steps: int = DEFAULT_MAX_STEPS,
        goal_marker_scale: float = DEFAULT_GOAL_MARKER_SCALE,
    ):
        _load_triton_before_egl()
        import mujoco

        self.task = check_task(task)
        self.cameras = tuple(cameras)
        for cam in self.cameras:
            if cam not in CAMERAS:
                raise ValueError(f"unknown camera {cam!r}; accepted: {', '.join(CAMERAS)}")
        if not self.cameras:
            raise ValueError("at least one camera is needed")
        if not 16 <= int(image_size) <= 512:
            raise ValueError(f"image_size must be in 16..512 pixels, got {image_size}")
        if int(max_steps) < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.image_size = int(image_size)
        self.max_steps = int(max_steps)
        self._mujoco = mujoco
        self._env = _benchmark(task, TRAIN_SEEDS[0]).train_classes[task]()
        self._env.max_path_length = self.max_steps + 1
        model = self._env.model
        model.vis.quality.offsamples = 0
        if goal_marker_scale != 1.0:
            for site_id in range(model.nsite):
                if model.site(site_id).name == "goal":
                    model.site_size[site_id] *= goal_marker_scale
        self._renderer = mujoco.Renderer(model, self.image_size, self.image_size)
        for flag in (
            mujoco.mjtRndFlag.mjRND_SHADOW,
            mujoco.mjtRndFlag.mjRND_REFLECTION,
            mujoco.mjtRndFlag.mjRND_SKYBOX,
        ):
            self._renderer.scene.flags[flag] = 0
        # Registered after the GL context exists, so it runs before mujoco's own atexit
        # eglTerminate; freeing a context after that raises EGL errors at shutdown.
        atexit.register(_close_at_exit, weakref.ref(self))
        self.start: StartState | None = None
        self.instruction = ""
        self.sim_obs: np.ndarray | None = None  # full Meta-World observation (experts only)
        self.steps = 0
        self.success = False
        # False: an episode runs on past its first success (until max_steps), e.g. to record
        # what an expert does after reaching the goal; `success` stays True once reached.
        self.stop_at_success = True

    def reset(self, seed: int, index: int, instruction: str | None = None) -> dict:
        """Deterministic: the same (seed, index) gives the same first observation."""
        if not 0 <= int(index) < STARTS_PER_SEED:
            raise ValueError(f"index must be in 0..{STARTS_PER_SEED - 1}, got {index}")
        self.start = StartState(self.task, int(seed), int(index))
        self._env.set_task(_benchmark(self.task, int(seed)).train_tasks[int(index)])
        self._env.reset()
        # Meta-World's reset moves bodies (drawer, window, goal marker) without recomputing
        # their world positions, so the first frame showed them where the previous episode or
        # the model file had them (up to 255 levels off on drawer/window tasks, 1 on push), its
        # observation put window-close's handle 0.2 m off, and an episode's outcome depended on
        # what the process ran before it. Recompute, then rebuild the observation the way its
        # reset does (the frame-stacked half equal to the current one).
        self._mujoco.mj_forward(self._env.model, self._env.data)
        self._env._prev_obs = self._env._get_curr_obs_combined_no_goal().copy()
        self.sim_obs = self._env._get_obs().astype(np.float64)
        self.instruction = instruction or instruction_for(self.task, instruction_variant(self.start))
        self.steps = 0
        self.success = False
        return self.observation()

    def step(self, action) -> tuple[dict, dict]:
        """Apply one action; info has `success` (ever reached), `steps`, `done`."""
        if self.start is None:
            raise RuntimeError("call reset(seed, index) before step()")
        if self.done:
            raise RuntimeError("episode is over (success or max_steps); call reset()")
        action = np.asarray(action, dtype=np.float32)
        if action.shape != (ACTION_DIM,) or not np.all(np.isfinite(action)):
            raise ValueError(
                f"action must be {ACTION_DIM} finite floats in [-1, 1] (dx, dy, dz, grip); got shape {action.shape}"
            )
        self.sim_obs, _, _, _, info = self._env.step(np.clip(action, -1.0, 1.0))
        self.steps += 1
        self.success = self.success or bool(info["success"])
        return self.observation(), {"success": self.success, "steps": self.steps, "done": self.done}

    @property
    def done(self) -> bool:
        return (self.success and self.stop_at_success) or self.steps >= self.max_steps

    @property
    def object_position(self) -> np.ndarray:
        """Simulator position of the task's object (puck, handle, button, peg): diagnostics only."""
        return np.asarray(self.sim_obs[4:7], np.float64).copy()

    @property
    def goal_position(self) -> np.ndarray:
        """Simulator goal position of this start (diagnostics only; the policy never sees it)."""
        return np.asarray(self._env._target_pos, np.float64).copy()

    @property
    def tcp_position(self) -> np.ndarray:
        """Midpoint between the fingers, the point Meta-World's success tests measure from (the
        state's hand xyz is the end-effector body, a few centimetres above it)."""
        return np.asarray(self._env.tcp_center, np.float64).copy()

    def observation(self) -> dict:
        return {
            "images": self.render(),
            "instruction": self.instruction,
            "state": self.sim_obs[:STATE_DIM].astype(np.float32),
        }

    def render(self) -> list[np.ndarray]:
        """One HxWx3 uint8 RGB image per camera, right way up."""
        images = []
        for cam in self.cameras:
            self._renderer.update_scene(self._env.data, camera=cam)
            img = self._renderer.render()
            # The corner cameras' frames come out upside down.
            images.append(np.ascontiguousarray(img[::-1] if cam.startswith("corner") else img))
        return images

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
            self._env.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

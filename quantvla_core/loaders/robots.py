"""openpi's per-robot data transforms for the pi0 / pi0.5 checkpoints openpi publishes.

openpi wraps the model in robot-specific transforms (`policies/<robot>_policy.py` and the
`training/config.py` data configs). Inference runs, in this order:
  inputs:  robot Inputs (camera key mapping, ALOHA state decoding) -> Normalize -> pad to 32
  outputs: Unnormalize -> AbsoluteActions (delta dims + state) -> robot Outputs (first N dims,
           ALOHA action encoding)
Here each robot is one `RobotTransform` (selected by name with `robot_transform`); ExternalIO
applies `state_in` / `images_in` before normalisation and `actions_out` after unnormalisation.
`actions_in` is the training direction (robot actions -> model actions), kept for round trips.

Robots (dims are the robot's; the model pads to its own 32):
- "libero": state 8 (eef position 3, axis-angle 3, gripper 2), actions 7. Cameras: `image` ->
  base, `wrist_image` -> left wrist, right wrist absent (masked). pi0_libero trains the first 6
  action dims as deltas from state[:6] (gripper absolute); pi05_libero uses absolute actions.
- "droid": state 8 (joint position 7 + gripper position 1), actions 8 (joint velocity 7 + gripper),
  no delta transform in pi0_droid / pi05_droid. Cameras: `exterior_image_1_left` -> base,
  `wrist_image_left` -> left wrist, right wrist absent.
- "aloha": state / actions 14 (two arms: 6 joints + gripper each). Joints 0-5 and 7-12 are deltas
  from the (decoded) state, grippers 6 and 13 absolute. adapt_to_pi: joints 1, 2, 8, 9 change sign;
  the state gripper (linear opening, normalised) becomes the pi gripper angle, the action gripper
  angle becomes the robot's normalised gripper command. Cameras: `cam_high` -> base,
  `cam_left_wrist` -> left wrist, `cam_right_wrist` -> right wrist; `cam_low` is not used.
- "aloha_sim": as "aloha" without delta actions (pi0_aloha_sim).
- "none": no transform (actions = the unnormalised first N dims, N = the action statistics').
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..checkpoint import CheckpointError

ROBOTS = ("libero", "droid", "aloha", "aloha_sim", "none")
# openpi asset ids of the published checkpoints -> robot
ASSET_ROBOTS = {"trossen": "aloha", "droid": "droid", "physical-intelligence/libero": "libero", "libero": "libero"}

# ALOHA <-> pi conventions (aloha_policy.py)
ALOHA_FLIP = np.array([1, -1, -1, 1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1], np.float32)
ALOHA_GRIPPERS = (6, 13)
GRIPPER_LINEAR = (0.01844, 0.05800)  # m, the normalised state gripper's range
GRIPPER_ANGLE = (0.5476, 1.6296)  # rad, the pi gripper angle's range
GRIPPER_CMD = (-0.6213, 1.4910)  # rad, range of the robot's normalised gripper command
ARM_LENGTH, HORN_RADIUS = 0.036, 0.022


def bool_mask(*dims: int) -> tuple[bool, ...]:
    """openpi make_bool_mask: positive n -> n True, negative n -> |n| False."""
    out: list[bool] = []
    for d in dims:
        out.extend([d > 0] * abs(d))
    return tuple(out)


def aloha_gripper_state_to_angle(v: np.ndarray) -> np.ndarray:
    """Normalised linear gripper opening -> normalised pi gripper angle (law of cosines on the horn)."""
    lin = v * (GRIPPER_LINEAR[1] - GRIPPER_LINEAR[0]) + GRIPPER_LINEAR[0]
    c = (HORN_RADIUS**2 + lin**2 - ARM_LENGTH**2) / (2 * HORN_RADIUS * lin)
    ang = np.arcsin(np.clip(c, -1.0, 1.0))
    return (ang - GRIPPER_ANGLE[0]) / (GRIPPER_ANGLE[1] - GRIPPER_ANGLE[0])


def aloha_gripper_angle_to_command(v: np.ndarray) -> np.ndarray:
    return (v + GRIPPER_ANGLE[0] - GRIPPER_CMD[0]) / (GRIPPER_CMD[1] - GRIPPER_CMD[0])


def aloha_gripper_command_to_angle(v: np.ndarray) -> np.ndarray:
    return v * (GRIPPER_CMD[1] - GRIPPER_CMD[0]) + GRIPPER_CMD[0] - GRIPPER_ANGLE[0]


@dataclass(frozen=True)
class RobotTransform:
    """One robot's openpi input / output transforms (see the module docstring)."""

    name: str
    state_dim: int
    action_dim: int
    cameras: tuple[str, ...]  # the robot's camera names, in the order a list of images gives them
    slots: tuple[int, ...]  # model camera slot (0 base, 1 left wrist, 2 right wrist) per camera; -1 unused
    delta_mask: tuple[bool, ...] = ()  # action dims the model predicts relative to the state
    aloha: bool = False  # ALOHA joint flips and gripper conversions (adapt_to_pi)

    def describe(self) -> str:
        delta = [i for i, m in enumerate(self.delta_mask) if m]
        return (
            f"openpi robot transform {self.name!r}: state {self.state_dim}, actions {self.action_dim}, cameras "
            + ", ".join(f"{c}->{'unused' if s < 0 else s}" for c, s in zip(self.cameras, self.slots))
            + (f", delta action dims {delta} (+ state)" if delta else ", absolute actions")
            + (", ALOHA joint flips and gripper conversion" if self.aloha else "")
        )

    def check(self, state_stats: int, action_stats: int, where: str) -> None:
        if state_stats != self.state_dim or action_stats < self.action_dim:
            raise CheckpointError(
                f"{where}: robot {self.name!r} has state {self.state_dim} / actions "
                f"{self.action_dim}, but the norm stats have state {state_stats} / actions "
                f"{action_stats}; accepted robots: {', '.join(ROBOTS)} (or 'none')"
            )

    # -- inputs ------------------------------------------------------------------------------
    def state_in(self, state) -> np.ndarray:
        """Robot state -> the state the model was trained on (before normalisation)."""
        s = np.asarray(state, np.float32).reshape(-1)
        if s.shape != (self.state_dim,):
            raise ValueError(f"state has {s.size} entries; robot {self.name!r} expects {self.state_dim}")
        if self.aloha:
            s = s * ALOHA_FLIP
            g = list(ALOHA_GRIPPERS)
            s[g] = aloha_gripper_state_to_angle(s[g])
        return s.astype(np.float32)

    def images_in(self, images) -> list:
        """A list (in `cameras` order) or a dict by camera name -> model slots (None = absent)."""
        if isinstance(images, dict):
            unknown = set(images) - set(self.cameras)
            if unknown:
                raise ValueError(
                    f"unknown camera(s) {sorted(unknown)} for robot {self.name!r}; accepted: {', '.join(self.cameras)}"
                )
            named = [images.get(c) for c in self.cameras]
        else:
            if not isinstance(images, (list, tuple)) or not 1 <= len(images) <= len(self.cameras):
                raise ValueError(
                    f"robot {self.name!r} takes 1..{len(self.cameras)} images in the order "
                    f"{', '.join(self.cameras)} (or a dict by those names)"
                )
            named = list(images) + [None] * (len(self.cameras) - len(images))
        n = max(self.slots) + 1
        out: list = [None] * n
        for img, slot in zip(named, self.slots):
            if slot >= 0 and img is not None:
                out[slot] = img
        if out[0] is None:
            raise ValueError(f"robot {self.name!r} needs its base camera {self.cameras[0]!r}")
        while out and out[-1] is None:
            out.pop()
        return out

    # -- outputs -----------------------------------------------------------------------------
    def _delta(self, actions: np.ndarray, model_state: np.ndarray, sign: float) -> np.ndarray:
        if not self.delta_mask:
            return actions
        m = np.asarray(self.delta_mask)
        d = m.shape[0]
        out = actions.copy()
        out[..., :d] += sign * np.where(m, np.asarray(model_state, np.float32)[:d], 0.0)
        return out

    def actions_out(self, actions, model_state) -> np.ndarray:
        """Unnormalised model actions (..., >= action_dim) -> the robot's actions (..., action_dim).

        `model_state` is `state_in(robot state)` (openpi adds back the state the model saw)."""
        a = self._delta(np.asarray(actions, np.float32), model_state, +1.0)[..., : self.action_dim]
        if self.aloha:
            a = a * ALOHA_FLIP
            g = list(ALOHA_GRIPPERS)
            a[..., g] = aloha_gripper_angle_to_command(a[..., g])
        return a.astype(np.float32)

    def actions_in(self, actions, model_state) -> np.ndarray:
        """Inverse of `actions_out` (openpi's training direction: robot actions -> model actions)."""
        a = np.asarray(actions, np.float32).copy()
        if self.aloha:
            a = a * ALOHA_FLIP
            g = list(ALOHA_GRIPPERS)
            a[..., g] = aloha_gripper_command_to_angle(a[..., g])
        return self._delta(a, model_state, -1.0).astype(np.float32)


def robot_transform(name: str, arch: str) -> RobotTransform | None:
    """The transform of robot `name` for a pi0 (`arch` "pi0") or pi0.5 ("pi05") checkpoint; None for 'none'."""
    if name not in ROBOTS:
        raise CheckpointError(f"unknown robot {name!r}; accepted: {', '.join(ROBOTS)}")
    if name == "none":
        return None
    if name == "libero":  # pi0_libero: extra_delta_transform=True; pi05_libero: False
        return RobotTransform(
            "libero", 8, 7, ("image", "wrist_image"), (0, 1), bool_mask(6, -1) if arch == "pi0" else ()
        )
    if name == "droid":
        return RobotTransform("droid", 8, 8, ("exterior_image_1_left", "wrist_image_left"), (0, 1))
    return RobotTransform(
        name,
        14,
        14,
        ("cam_high", "cam_left_wrist", "cam_right_wrist", "cam_low"),
        (0, 1, 2, -1),
        bool_mask(6, -1, 6, -1) if name == "aloha" else (),
        aloha=True,
    )


def robot_from_asset(asset_id: str) -> str:
    """The robot of a published openpi asset id ('trossen', 'droid', 'physical-intelligence/libero'), else 'none'."""
    return ASSET_ROBOTS.get(asset_id, "none")

"""Input gating: everything a sensor message goes through before the model may see it.

Sensor callbacks only validate, convert and store the newest value, so they never wait for
inference. Each refused message is counted and logged once per burst through the node's
`refuse`; what is stored is exactly what inference may use: stamp-checked, geometry-checked,
decoded frames, a cleaned instruction and a joint-state vector whose names, lengths and values
were checked. `camera_ages` tells diagnostics how old each camera's newest frame is, so a
camera that stops publishing is seen as such even though it never sent a bad message.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from quantvla_ros.diagnostics import RateMeter
from quantvla_ros.frame_sync import FrameStore
from quantvla_ros.image_conversion import ImageConversionError, message_to_rgb
from quantvla_ros.input_validation import InputError, check_stamp, clean_instruction, joint_state_vector, stamp_seconds

# How long an image callback sleeps after storing a frame, so the woken inference thread takes
# the GIL at once (measured: queue p50 0.6 -> 0.1 ms at 640x480 30 Hz on 2 cores).
GIL_HANDOFF_S = 1e-4


class InputGate:
    """Validated newest inputs of one configured node.

    cfg: the configure-time parameter dict (camera_topics, kinds, state_dim, ...);
    live(name): a live parameter's current value; now_s(): node-clock seconds;
    refuse(source, code, message, level): count + log once per burst;
    counters: the node's Counters; log_info(text): INFO logger.
    """

    def __init__(self, cfg: dict, live, now_s, refuse, counters, log_info):
        self.cfg, self._live, self._now_s = cfg, live, now_s
        self._refuse, self._counters, self._log_info = refuse, counters, log_info
        n = len(cfg["kinds"])
        self.frames = FrameStore(n, cfg["sync_queue_size"])
        self._lock = threading.Lock()
        self._last_stamp: list[float | None] = [None] * n
        self._newest: list[float | None] = [None] * n  # newest accepted frame stamp (node clock)
        self.rates = [RateMeter() for _ in range(n)]  # accepted frames per second, per camera
        self._watch_since = now_s()  # age of a camera that never sent, counted from here
        self._instruction = None  # (text, receive time s) or None
        self._joint_state = None  # (vector, receive time s) or None

    def restart_watch(self) -> None:
        """Activation: a camera silent from now on is judged from now, stored frames dropped."""
        self.frames.clear()
        self._watch_since = self._now_s()

    # ------------------------------------------------------------------ callbacks
    def on_image(self, cam: int, msg) -> None:
        source = f"camera{cam}"
        self._counters.bump(f"received.{source}")
        t_recv = time.perf_counter()
        now = self._now_s()
        cfg = self.cfg
        try:
            stamp = stamp_seconds(msg.header.stamp)
            check_stamp(stamp, now, self._last_stamp[cam], self._live("image_timeout_s"), self._live("max_future_s"))
            rgb = message_to_rgb(
                msg,
                max_pixels=cfg["max_image_pixels"],
                depth_max_m=cfg["depth_max_m"],
                min_side=cfg["min_image_side"],
                max_aspect=cfg["max_image_aspect"],
            )
        except (InputError, ImageConversionError) as exc:
            self._refuse(
                source,
                exc.code,
                f"{exc} (topic {cfg['camera_topics'][cam]})",
                "warn" if exc.code == "stamp_old" else "error",
            )
            return
        except Exception as exc:  # noqa: BLE001 - never let a message kill the node
            self._refuse(source, "conversion_failed", f"{type(exc).__name__}: {exc}")
            return
        self._last_stamp[cam] = stamp
        self._newest[cam] = stamp
        self.rates[cam].tick()
        # meta: (header stamp, node-clock receive time, perf_counter at receive and after
        # conversion, conversion ms)
        t_done = time.perf_counter()
        self.frames.put(cam, stamp, rgb, meta=(msg.header.stamp, now, t_recv, t_done, (t_done - t_recv) * 1e3))
        # Hand the GIL to the inference thread now: put() woke it, but it would otherwise wait
        # for the executor's own bookkeeping (~0.5 ms here) or the switch interval.
        time.sleep(GIL_HANDOFF_S)

    def on_instruction(self, msg) -> None:
        self._counters.bump("received.instruction")
        try:
            text = clean_instruction(msg.data, self._live("max_instruction_chars"))
        except InputError as exc:
            with self._lock:
                self._instruction = None  # a refused newer instruction supersedes the old one
            self._refuse("instruction", exc.code, str(exc))
            return
        with self._lock:
            changed = self._instruction is None or self._instruction[0] != text
            self._instruction = (text, self._now_s())  # a repeat still refreshes its age
        if changed:  # a planner re-sending the same task at 10 Hz must not flood the log
            self._log_info(f"instruction: {text!r}")
        else:
            self._counters.bump("repeated.instruction")

    def on_joint_state(self, msg) -> None:
        self._counters.bump("received.joint_state")
        try:
            stamp_seconds(msg.header.stamp)
            vec = joint_state_vector(
                list(msg.name),
                list(msg.position),
                self.cfg["state_dim"],
                self.cfg["state_joint_names"],
                list(msg.velocity),
                list(msg.effort),
            )
        except InputError as exc:
            with self._lock:
                self._joint_state = None
            self._refuse("joint_state", exc.code, str(exc))
            return
        with self._lock:
            self._joint_state = (vec, self._now_s())

    # ------------------------------------------------------------------ readers
    def instruction_text(self) -> str | None:
        with self._lock:
            return self._instruction[0] if self._instruction else None

    def input_ages(self, now: float) -> dict[str, float | None]:
        """Seconds since the current instruction / joint state arrived (None: none valid)."""
        with self._lock:
            instruction, joint_state = self._instruction, self._joint_state
        return {
            "instruction": now - instruction[1] if instruction else None,
            "joint_state": now - joint_state[1] if joint_state else None,
        }

    def camera_ages(self, now: float) -> list[tuple[float, bool]]:
        """Per camera (age in s of its newest accepted frame, ever received since activation).
        A camera that never sent counts from configure/activate."""
        return [
            (max(0.0, now - self._watch_since), False) if stamp is None else (max(0.0, now - stamp), True)
            for stamp in self._newest
        ]

    def _too_old(self, what: str, received: float, now: float, timeout_param: str) -> bool:
        timeout = self._live(timeout_param)
        if timeout > 0 and now - received > timeout:
            self._refuse(
                what,
                "stale",
                f"{what.replace('_', ' ')} is {now - received:.2f} s old ({timeout_param} {timeout})",
                "warn",
            )
            return True
        return False

    def stale_frame(self, matched, now: float) -> bool:
        """Refuse (count, warn once per burst) a matched set with a frame older than
        image_timeout_s: never act on a camera that stopped."""
        timeout = self._live("image_timeout_s")
        if timeout <= 0:
            return False
        if now - matched.stamp_s > timeout:
            self._refuse(
                "camera0",
                "stale",
                f"newest frame is {now - matched.stamp_s:.3f} s old (image_timeout_s {timeout}); no action",
                "warn",
            )
            return True
        return False

    def current_inputs(self, now: float):
        """(instruction, state) for the next chunk, or None after counting why not."""
        with self._lock:
            instruction, joint_state = self._instruction, self._joint_state
        if instruction is None:
            self._refuse(
                "instruction",
                "missing",
                f"no valid instruction yet on {self.cfg['instruction_topic']}; no action",
                "warn",
            )
            return None
        if self._too_old("instruction", instruction[1], now, "instruction_timeout_s"):
            return None
        if joint_state is None:
            if not self.cfg["joint_state_topic"] or not self._live("require_joint_state"):
                return instruction[0], np.zeros(self.cfg["state_dim"], np.float32)
            self._refuse(
                "joint_state",
                "missing",
                f"no valid joint state yet on {self.cfg['joint_state_topic']}; no action",
                "warn",
            )
            return None
        # A state that arrived but went stale is never fed, required or not.
        if self._too_old("joint_state", joint_state[1], now, "joint_state_timeout_s"):
            return None
        return instruction[0], joint_state[0]

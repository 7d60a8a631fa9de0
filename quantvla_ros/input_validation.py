"""Checks on the non-image inputs (instruction text, joint states, stamps) before inference.

Each check returns the cleaned value or raises `InputError` with a short `code` (a diagnostics
counter key) and a message that names what was wrong and what is accepted, so invalid data can
never reach the model and the node never dies on it.
"""

from __future__ import annotations

import unicodedata

import numpy as np

# Bidirectional overrides/isolates can make a displayed instruction differ from what the model
# reads; they are refused together with control, surrogate, private-use and unassigned points.
_BIDI_CONTROLS = {chr(c) for c in list(range(0x202A, 0x202F)) + list(range(0x2066, 0x206A))}
_REFUSED_CATEGORIES = {"Cc", "Cs", "Co", "Cn"}


class InputError(ValueError):
    """Input refused before inference; `code` is a short failure class."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def clean_instruction(text: str, max_chars: int) -> str:
    """NFC-normalised, whitespace-collapsed instruction, or InputError.

    Accepted: 1..max_chars characters of letters, marks, numbers, punctuation, symbols (emoji
    included) and spaces in any script. Refused: empty/blank text, longer text (not silently
    truncated: a cut instruction can change its meaning), control characters, bidi overrides,
    surrogates, private-use and unassigned code points.
    """
    if not isinstance(text, str):
        raise InputError("instruction_type", f"instruction must be a str, got {type(text).__name__}")
    text = unicodedata.normalize("NFC", text)
    cleaned = " ".join(text.split())
    if not cleaned:
        raise InputError(
            "instruction_empty", "instruction is empty or only whitespace; publish a non-empty task description"
        )
    if len(cleaned) > max_chars:
        raise InputError(
            "instruction_too_long",
            f"instruction has {len(cleaned)} characters; "
            f"at most {max_chars} are accepted (parameter max_instruction_chars)",
        )
    for ch in cleaned:
        if ch in _BIDI_CONTROLS or unicodedata.category(ch) in _REFUSED_CATEGORIES:
            raise InputError(
                "instruction_bad_char",
                f"instruction contains U+{ord(ch):04X} "
                f"({unicodedata.category(ch)}); control, bidi-override, surrogate, "
                "private-use and unassigned characters are refused",
            )
    return cleaned


NANOSEC_PER_SEC = 1_000_000_000


def stamp_seconds(stamp) -> float:
    """builtin_interfaces/Time -> seconds, or InputError for a non-normalised stamp.

    nanosec must be < 1e9 (REP 103 / builtin_interfaces): a stamp like sec=5, nanosec=2e9 is a
    publisher bug, and copying it into the output stamp would pass the bug on to the robot.
    """
    if not 0 <= int(stamp.nanosec) < NANOSEC_PER_SEC:
        raise InputError(
            "stamp_invalid",
            f"header stamp nanosec {stamp.nanosec} is not in "
            "[0, 1e9); normalise the stamp (carry whole seconds into sec)",
        )
    if int(stamp.sec) < 0:
        raise InputError("stamp_invalid", f"header stamp sec {stamp.sec} is negative")
    return stamp.sec + stamp.nanosec * 1e-9


def joint_state_vector(names, positions, state_dim: int, wanted_names, velocities=(), efforts=()) -> np.ndarray:
    """JointState name/position -> float32 (state_dim,) in model order, or InputError.

    With `wanted_names` empty the positions are taken in message order and must number exactly
    `state_dim`; otherwise each wanted joint is looked up by name. Non-finite values are refused.
    """
    positions = np.asarray(positions, dtype=np.float64)
    # sensor_msgs/JointState: name, position, velocity and effort are parallel arrays; each
    # may be empty, otherwise it has one entry per joint. A mismatch is a malformed message
    # (which position belongs to which joint is unknown), never "take the first N".
    if len(names) and len(positions) != len(names):
        raise InputError(
            "joint_state_length", f"joint state has {len(names)} names but {len(positions)} positions; they must match"
        )
    for field, arr in (("velocity", velocities), ("effort", efforts)):
        if len(arr) and len(arr) != len(positions):
            raise InputError(
                "joint_state_length",
                f"joint state has {len(arr)} {field} "
                f"entries for {len(positions)} positions; give one per joint or "
                "none",
            )
    if wanted_names:
        index = {name: i for i, name in enumerate(names)}
        missing = [n for n in wanted_names if n not in index]
        if missing:
            raise InputError(
                "joint_state_missing",
                f"joint state lacks joint(s) {missing[:5]}; parameter state_joint_names wants {list(wanted_names)[:8]}",
            )
        values = positions[[index[n] for n in wanted_names]]
    else:
        values = positions
    if values.shape[0] != state_dim:
        raise InputError(
            "joint_state_length",
            f"joint state has {values.shape[0]} positions; "
            f"the model wants exactly {state_dim} (or set state_joint_names)",
        )
    if not np.all(np.isfinite(values)):
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise InputError(
            "joint_state_nonfinite", f"joint state position {bad} is {values[bad]}; all positions must be finite"
        )
    return values.astype(np.float32)


def check_stamp(stamp_s: float, now_s: float, last_s: float | None, max_age_s: float, max_future_s: float) -> None:
    """Refuse a zero, too old, future or out-of-order message stamp (seconds).

    With use_sim_time and no /clock yet the node's time is 0: age and lead cannot be judged
    then, so only the zero and order checks apply.
    """
    if stamp_s <= 0.0:
        raise InputError("stamp_zero", "message stamp is zero; fill header.stamp with the capture time")
    if now_s <= 0.0:
        if last_s is not None and stamp_s <= last_s:
            raise InputError(
                "stamp_out_of_order",
                f"message stamp {stamp_s:.6f} is not newer than the previous one {last_s:.6f} on this topic",
            )
        return
    if max_age_s > 0 and now_s - stamp_s > max_age_s:
        raise InputError(
            "stamp_old",
            f"message stamp is {now_s - stamp_s:.3f} s old; at most "
            f"{max_age_s:.3f} s is accepted (parameter image_timeout_s)",
        )
    if stamp_s - now_s > max_future_s:
        raise InputError(
            "stamp_future",
            f"message stamp is {stamp_s - now_s:.3f} s in the future; at most {max_future_s:.3f} s is accepted",
        )
    if last_s is not None and stamp_s <= last_s:
        raise InputError(
            "stamp_out_of_order",
            f"message stamp {stamp_s:.6f} is not newer than the previous one {last_s:.6f} on this topic",
        )

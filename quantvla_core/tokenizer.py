"""Offline tokenizer for the reference models and the prompt formats of each family.

The reference models use a byte-level vocabulary (no download, any language): id = byte + 3,
with 0 = pad, 1 = bos, 2 = eos. Real checkpoints bring their own SentencePiece / tokenizers
model (see quantvla_core.loaders); the prompt formats below are shared.
"""

from __future__ import annotations

import unicodedata

import numpy as np

PAD, BOS, EOS = 0, 1, 2
BYTE_OFFSET = 3
MAX_INSTRUCTION_CHARS = 2000


def clean_instruction(text: str) -> str:
    """Normalise an instruction the way the policies were trained on: NFC, one line, trimmed.

    Raises ValueError for non-strings, empty text or text over MAX_INSTRUCTION_CHARS characters.
    """
    if not isinstance(text, str):
        raise ValueError(f"instruction must be a str, got {type(text).__name__}")
    text = unicodedata.normalize("NFC", text)
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    text = " ".join(text.split())
    if not text:
        raise ValueError("instruction is empty; accepted: 1 to %d printable characters" % MAX_INSTRUCTION_CHARS)
    if len(text) > MAX_INSTRUCTION_CHARS:
        raise ValueError(f"instruction has {len(text)} characters; accepted: at most {MAX_INSTRUCTION_CHARS}")
    return text


def discretize_state(state: np.ndarray, bins: int = 256) -> list[int]:
    """pi0.5 writes the normalised state (clipped to [-1, 1]) into the prompt as bin indices."""
    s = np.clip(np.asarray(state, dtype=np.float64), -1.0, 1.0)
    return [int(i) for i in np.minimum(((s + 1.0) / 2.0 * bins).astype(np.int64), bins - 1)]


def prompt_text(arch: str, instruction: str, state: np.ndarray | None = None) -> str:
    """pi0: task + newline. pi0.5: task, binned state, then the action cue. GR00T: the task."""
    task = clean_instruction(instruction).lower() if arch in ("pi0", "pi05") else clean_instruction(instruction)
    if arch == "pi05":
        if state is None:
            raise ValueError("pi0.5 prompts need the normalised state")
        bins = " ".join(str(b) for b in discretize_state(state))
        return f"Task: {task}, State: {bins};\nAction: "
    if arch == "pi0":
        return task + "\n"
    return task


class ByteTokenizer:
    """UTF-8 bytes as tokens; deterministic, reversible and vocabulary-size 259."""

    vocab_size = 256 + BYTE_OFFSET

    def encode(self, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (ids (max_len,) int64, mask (max_len,) bool); BOS first, truncated to max_len."""
        ids = [BOS] + [b + BYTE_OFFSET for b in text.encode("utf-8")]
        ids = ids[:max_len]
        out = np.full(max_len, PAD, dtype=np.int64)
        out[: len(ids)] = ids
        mask = np.zeros(max_len, dtype=bool)
        mask[: len(ids)] = True
        return out, mask

    def decode(self, ids) -> str:
        data = bytes(int(i) - BYTE_OFFSET for i in ids if int(i) >= BYTE_OFFSET)
        return data.decode("utf-8", errors="replace")

"""Tokenizers the user provides (never downloaded) and the prompt formats of the real policies.

- PaliGemma / Gemma (pi0, pi0.5): a SentencePiece `tokenizer.model`, read with `sentencepiece`.
- SmolVLM (SmolVLA) and Qwen3 / Eagle (GR00T): a `tokenizer.json`, read with `tokenizers`.
Prompt formats, as the originals build them before tokenising:
- pi0, openpi: task cleaned (strip, "_" -> " ", newlines -> " "), BOS + tokens(task) + tokens("\\n").
- pi0, LeRobot: BOS + tokens(task + "\\n") (Pi0NewLineProcessor, then the tokenizer).
- pi0.5 (both): BOS + tokens("Task: {task}, State: {bins};\\nAction: "), bins = the normalised
  state in 256 bins (np.digitize over linspace(-1, 1, 257)[:-1], minus one).
- SmolVLA: tokens(task + "\\n") with the tokenizer's own special-token rule.
- GR00T: tokens(str([task])), e.g. "['pick up the cube']" (the Eagle chat template around it is
  not reproduced, see docs/real-checkpoints.md).
Sequences are right-padded with zeros to the model's max length and truncated past it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..checkpoint import CheckpointError
from ..tokenizer import clean_instruction

PROMPT_STYLES = ("openpi-pi0", "lerobot-pi0", "pi05", "smolvla", "groot")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


class SentencePieceTokenizer:
    """A SentencePiece model from a file (PaliGemma's `tokenizer.model`)."""

    kind = "sentencepiece"

    def __init__(self, path: str | Path):
        import sentencepiece
        self.path = Path(path)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{self.path}: not a SentencePiece model ({e})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()

    def ids(self, text: str, add_bos: bool) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if add_bos and self.bos_id >= 0 else []) + list(ids)


class JsonTokenizer:
    """A Hugging Face `tokenizer.json` (SmolVLM2, Qwen3), read with the `tokenizers` package."""

    kind = "tokenizers"

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer
        self.path = Path(path)
        try:
            self.tok = Tokenizer.from_file(str(self.path))
        except Exception as e:  # the Rust binding raises its own Exception type
            raise CheckpointError(f"{self.path}: not a tokenizers JSON file ({e})") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def ids(self, text: str, add_bos: bool) -> list[int]:
        """`add_bos` = apply the file's own post-processor (special tokens), as HF does by default."""
        return list(self.tok.encode(text, add_special_tokens=add_bos).ids)


def open_tokenizer(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: tokenizer file not found")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".json":
        return JsonTokenizer(path)
    raise CheckpointError(f"{path}: unknown tokenizer file; accepted: a SentencePiece .model or a tokenizers .json")


def find_tokenizer_file(directory: Path, wanted: str, explicit: str | Path | None = None) -> Path | None:
    """The user's tokenizer: `explicit`, else $QUANTVLA_TOKENIZER, else `wanted` in the checkpoint dir."""
    import os
    if explicit:
        return Path(explicit)
    env = os.environ.get("QUANTVLA_TOKENIZER")
    if env:
        return Path(env)
    for cand in (directory / wanted, directory / "tokenizer" / wanted):
        if cand.is_file():
            return cand
    return None


def openpi_clean(task: str) -> str:
    return task.strip().replace("_", " ").replace("\n", " ")


def discretize_state_openpi(state: np.ndarray, bins: int = 256) -> np.ndarray:
    """pi0.5: bin index of each normalised state entry (values below -1 give -1, as in openpi)."""
    edges = np.linspace(-1.0, 1.0, bins + 1)[:-1]
    return np.digitize(np.asarray(state, dtype=np.float64), bins=edges) - 1


def prompt_ids(style: str, tokenizer, instruction: str, state: np.ndarray | None) -> list[int]:
    """Token ids of one prompt, before padding."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; accepted: {PROMPT_STYLES}")
    clean_instruction(instruction)  # validation only (type, empty, length): the originals see the raw task
    task = instruction
    if style == "openpi-pi0":
        return tokenizer.ids(openpi_clean(task), add_bos=True) + tokenizer.ids("\n", add_bos=False)
    if style == "lerobot-pi0":
        return tokenizer.ids(task if task.endswith("\n") else task + "\n", add_bos=True)
    if style == "pi05":
        if state is None:
            raise ValueError("pi0.5 prompts need the normalised state")
        bins = " ".join(str(int(b)) for b in discretize_state_openpi(state))
        return tokenizer.ids(f"Task: {openpi_clean(task)}, State: {bins};\nAction: ", add_bos=True)
    if style == "smolvla":
        return tokenizer.ids(task + "\n", add_bos=True)
    return tokenizer.ids(str([task]), add_bos=True)  # GR00T's processor writes the task as str([task])


def pad_ids(ids: list[int], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    ids = ids[:max_len]
    out = np.zeros(max_len, dtype=np.int64)
    out[: len(ids)] = ids
    mask = np.zeros(max_len, dtype=bool)
    mask[: len(ids)] = True
    return out, mask

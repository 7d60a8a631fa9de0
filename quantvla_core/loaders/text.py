"""Tokenizers the user provides (never downloaded) and the prompt formats of the real policies.

- PaliGemma / Gemma (pi0, pi0.5): a SentencePiece `tokenizer.model`, read with `sentencepiece`.
- SmolVLM (SmolVLA) and Qwen3 / Eagle (GR00T): a `tokenizer.json`, read with `tokenizers`.
Prompt formats, as the originals build them before tokenising:
- pi0, openpi: task cleaned (strip, "_" -> " ", newlines -> " "), BOS + tokens(task) + tokens("\\n").
- pi0, LeRobot: BOS + tokens(task + "\\n") (Pi0NewLineProcessor, then the tokenizer).
- pi0.5 (both): BOS + tokens("Task: {task}, State: {bins};\\nAction: "), bins = the normalised
  state in 256 bins (np.digitize over linspace(-1, 1, 257)[:-1], minus one).
- SmolVLA: tokens(task + "\\n") with the tokenizer's own special-token rule.
- GR00T N1.5 ("groot-eagle"): Eagle 2.5's chat template as LeRobot's groot processor applies it
  (one user turn: the images, then the text str([task]); add_generation_prompt):
    <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n
    <image 1><img>{<IMG_CONTEXT> x n}</img><image 2><img>...</img>['pick up the cube']<|im_end|>\n
    <|im_start|>assistant\n
  (no newlines between the parts), n = the model's image tokens per camera (64 for N1.5: 256
  SigLIP patches after the 2x2 pixel shuffle). `eagle_layout` gives the original's full ids and
  where its image tokens go. A model with `config.image_token_id` (real checkpoints) reads these
  ids with the placeholders set to that id and puts the image tokens there, as Eagle does; a
  model without it (saved before) reads all image tokens first and the ids without the
  <IMG_CONTEXT> runs (same tokens, same order; see docs/real-checkpoints.md).
- GR00T, legacy "groot" (policy_io.json written before the template): tokens(str([task])).
Sequences are right-padded with zeros to the model's max length and truncated past it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..checkpoint import CheckpointError
from ..tokenizer import clean_instruction

PROMPT_STYLES = ("openpi-pi0", "lerobot-pi0", "pi05", "smolvla", "groot", "groot-eagle")
EAGLE_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
EAGLE_USER, EAGLE_END = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"
EAGLE_IMAGE_TOKEN, EAGLE_IMG_START, EAGLE_IMG_END = "<IMG_CONTEXT>", "<img>", "</img>"
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

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

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


def eagle_prompt(task: str, n_images: int, tokens_per_image: int) -> str:
    """The text Eagle 2.5's processor tokenises for GR00T N1.5 (chat template + image expansion)."""
    images = "".join(
        f"<image {i + 1}>{EAGLE_IMG_START}{EAGLE_IMAGE_TOKEN * tokens_per_image}{EAGLE_IMG_END}"
        for i in range(n_images)
    )
    return EAGLE_SYSTEM + EAGLE_USER + images + str([task]) + EAGLE_END


def eagle_layout(tokenizer, task: str, n_images: int, tokens_per_image: int) -> tuple[list[int], list[int]]:
    """(the original's input_ids, the positions its image embeddings replace) for one observation."""
    image_id = tokenizer.token_id(EAGLE_IMAGE_TOKEN) if hasattr(tokenizer, "token_id") else None
    if image_id is None:
        raise CheckpointError(
            f"{getattr(tokenizer, 'path', 'tokenizer')}: no {EAGLE_IMAGE_TOKEN} token; GR00T N1.5 "
            "needs the Eagle 2.5 (Qwen3) tokenizer.json with its added image tokens"
        )
    ids = tokenizer.ids(eagle_prompt(task, n_images, tokens_per_image), add_bos=True)
    slots = [i for i, t in enumerate(ids) if t == image_id]
    if len(slots) != n_images * tokens_per_image:
        raise CheckpointError(
            f"{getattr(tokenizer, 'path', 'tokenizer')}: {EAGLE_IMAGE_TOKEN} did not tokenise to "
            f"one token each ({len(slots)} for {n_images * tokens_per_image})"
        )
    return ids, slots


def prompt_ids(
    style: str,
    tokenizer,
    instruction: str,
    state: np.ndarray | None,
    n_images: int = 1,
    tokens_per_image: int = 64,
    image_token_id: int | None = None,
) -> list[int]:
    """Token ids of one prompt, before padding. For "groot-eagle": with `image_token_id`, the
    template's ids with each `<IMG_CONTEXT>` set to that id (the model's placeholder, where it
    puts the `n_images` present cameras' tokens in order); without, the ids without the
    image-context runs (the model reads the cameras' tokens before the text)."""
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
    if style == "groot-eagle":
        ids, slots = eagle_layout(tokenizer, task, n_images, tokens_per_image)
        drop = set(slots)
        if image_token_id is None:
            return [t for i, t in enumerate(ids) if i not in drop]
        clash = [i for i, t in enumerate(ids) if t == image_token_id and i not in drop]
        if clash:
            raise CheckpointError(
                f"{getattr(tokenizer, 'path', 'tokenizer')}: the prompt tokenises to the model's "
                f"image placeholder id {image_token_id} at position {clash[0]} outside the "
                f"{EAGLE_IMAGE_TOKEN} runs: it is not this policy's tokenizer"
            )
        return [image_token_id if i in drop else t for i, t in enumerate(ids)]
    return tokenizer.ids(str([task]), add_bos=True)  # legacy: the task as str([task]) alone


def pad_ids(ids: list[int], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    ids = ids[:max_len]
    out = np.zeros(max_len, dtype=np.int64)
    out[: len(ids)] = ids
    mask = np.zeros(max_len, dtype=bool)
    mask[: len(ids)] = True
    return out, mask

"""A real checkpoint's input / output conventions, as the component a Policy holds (`policy.io`).

The model itself is one of ours (weights mapped by name); what differs from the reference
policies is everything around it, which `ExternalIO` holds and `policy_io.json` stores:
the user's tokenizer and the prompt format, image resize-with-pad placement, the original
normalisation (mode, statistics, epsilon convention) and the robot's true state / action sizes
(the model works on vectors zero-padded to `config.state_dim` / `config.action_dim`), and for
openpi checkpoints the robot's data transforms (`robot`, see robots.py): applied to the state and
camera list before normalisation and to the unnormalised actions after the model.

ExternalIO fulfils the contract of policy_io.PolicyIO (the Policy calls it; this module does not
import the Policy, so that Policy.load can use the loaders without an import cycle).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import CheckpointError
from ..config import ModelConfig
from ..fileio import atomic_write_json
from ..models import Batch
from .imaging import PAD_MODES, images_to_model
from .normalization import FeatureNormalizer, pad
from .robots import ROBOTS, RobotTransform, robot_transform
from .text import PROMPT_STYLES, open_tokenizer, pad_ids, prompt_ids

IO_FILE = "policy_io.json"
IO_FORMAT = "quantvla-policy-io"


@dataclass
class ExternalIO:
    format: str  # e.g. "lerobot/pi0", "openpi/pi05"
    prompt_style: str
    tokenizer_name: str  # the file the user provides: tokenizer.model or tokenizer.json
    image_pad: str
    state_norm: FeatureNormalizer
    action_norm: FeatureNormalizer
    tokenizer_path: str | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)
    robot: str = "none"  # openpi robot transform (robots.ROBOTS)
    _tokenizer: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.prompt_style not in PROMPT_STYLES:
            raise CheckpointError(f"unknown prompt style {self.prompt_style!r}; accepted: {PROMPT_STYLES}")
        if self.image_pad not in PAD_MODES:
            raise CheckpointError(f"unknown image padding {self.image_pad!r}; accepted: {PAD_MODES}")
        if self.robot not in ROBOTS:
            raise CheckpointError(f"unknown robot {self.robot!r}; accepted: {', '.join(ROBOTS)}")

    def tokenizer(self, vocab_rows: int | None = None):
        """The user's tokenizer, opened on first use (a model can be inspected without one)."""
        if self._tokenizer is None:
            if not self.tokenizer_path or not Path(self.tokenizer_path).is_file():
                raise CheckpointError(
                    f"{self.format} policy from {self.source}: no {self.tokenizer_name} found. Put the "
                    f"policy's {self.tokenizer_name} in the checkpoint directory (or set QUANTVLA_TOKENIZER "
                    "to its path); it is never downloaded"
                )
            tok = open_tokenizer(self.tokenizer_path)
            if vocab_rows is not None and tok.vocab_size > vocab_rows:
                raise CheckpointError(
                    f"{self.tokenizer_path}: tokenizer has {tok.vocab_size} tokens but the "
                    f"model's embedding has {vocab_rows} rows: it is not this policy's tokenizer"
                )
            self._tokenizer = tok
        return self._tokenizer

    # -- the PolicyIO contract (policy_io.py) ---------------------------------------------------
    def robot_for(self, config: ModelConfig) -> RobotTransform | None:
        """The openpi robot transform for this model's architecture; None for robot 'none'."""
        return robot_transform(self.robot, config.arch)

    def state_dim(self, config: ModelConfig) -> int:
        robot = self.robot_for(config)
        return robot.state_dim if robot is not None else self.state_norm.dim

    def action_dim(self, config: ModelConfig) -> int:
        robot = self.robot_for(config)
        return robot.action_dim if robot is not None else self.action_norm.dim

    def describe(self, config: ModelConfig) -> dict[str, Any]:
        return {
            "action_dim": self.action_dim(config),
            "state_dim": self.state_dim(config),
            "format": self.format,
            "source": self.source,
            "model_action_dim": config.action_dim,
            "model_state_dim": config.state_dim,
            "differences": list(self.notes),
            "robot": self.robot,
        }

    def to_batch(self, obs, config: ModelConfig, model: torch.nn.Module) -> Batch:
        """The robot's input transform, the original image placement, normalisation and prompt;
        state and actions are zero-padded to the model's sizes."""
        robot = self.robot_for(config)
        raw_images = robot.images_in(obs.images) if robot is not None else obs.images
        images, image_mask = images_to_model(raw_images, config.vision.image_size, config.max_cameras, self.image_pad)
        state = self.state_norm.normalize(robot.state_in(obs.state) if robot is not None else obs.state)
        emb = _embedding_rows(model)
        placeholder = getattr(config, "image_token_id", None)  # GR00T N1.5: image tokens placed inside the prompt
        if placeholder is not None and self.prompt_style != "groot-eagle":
            raise CheckpointError(
                f"{self.format} policy from {self.source}: the model places image tokens "
                f"at placeholder id {placeholder}, which needs the 'groot-eagle' prompt, not "
                f"{self.prompt_style!r}; re-create it from the LeRobot directory"
            )
        n_images = int(image_mask.sum())
        ids = prompt_ids(
            self.prompt_style,
            self.tokenizer(emb),
            obs.instruction,
            state,
            n_images=n_images,
            tokens_per_image=config.num_image_tokens,
            image_token_id=placeholder,
        )
        if self.prompt_style == "groot-eagle" and len(ids) > config.max_text_tokens:
            what = (
                "" if placeholder is None else f" ({n_images} x {config.num_image_tokens} image placeholders included)"
            )
            raise ValueError(
                f"the GR00T prompt needs {len(ids)} tokens{what} but the model reads "
                f"{config.max_text_tokens}; accepted: a shorter instruction"
            )
        real = [i for i in ids if placeholder is None or i != placeholder]  # the placeholder is never embedded
        if real and emb is not None and max(real) >= emb:
            raise ValueError(
                f"token id {max(real)} is outside the model's vocabulary of {emb}; "
                f"{self.tokenizer_path} is not this policy's tokenizer"
            )
        tokens, token_mask = pad_ids(ids, config.max_text_tokens)
        return Batch(
            torch.from_numpy(images)[None],
            torch.from_numpy(image_mask)[None],
            torch.from_numpy(tokens)[None],
            torch.from_numpy(token_mask)[None],
            torch.from_numpy(pad(state, config.state_dim))[None],
        )

    def actions_out(self, actions: np.ndarray, obs, config: ModelConfig) -> np.ndarray:
        """Unnormalise (keeping the robot's action_dim of the padded output), then the robot's
        output transform (delta -> absolute, ALOHA encoding)."""
        out = self.action_norm.unnormalize(actions).astype(np.float32)
        robot = self.robot_for(config)
        return robot.actions_out(out, robot.state_in(obs.state)) if robot is not None else out

    # -- policy_io.json -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": IO_FORMAT,
            "version": 1,
            "policy_format": self.format,
            "prompt_style": self.prompt_style,
            "tokenizer_name": self.tokenizer_name,
            "image_pad": self.image_pad,
            "state_norm": self.state_norm.to_dict(),
            "action_norm": self.action_norm.to_dict(),
            "source": self.source,
            "notes": self.notes,
            "robot": self.robot,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], directory: Path) -> "ExternalIO":
        if not isinstance(d, dict) or d.get("format") != IO_FORMAT:
            raise CheckpointError(f"{directory / IO_FILE}: not a {IO_FORMAT} file")
        try:
            tok = directory / d["tokenizer_name"]
            return cls(
                format=d["policy_format"],
                prompt_style=d["prompt_style"],
                tokenizer_name=d["tokenizer_name"],
                image_pad=d["image_pad"],
                state_norm=FeatureNormalizer.from_dict(d["state_norm"]),
                action_norm=FeatureNormalizer.from_dict(d["action_norm"]),
                tokenizer_path=str(tok) if tok.is_file() else None,
                source=d.get("source", ""),
                notes=list(d.get("notes", [])),
                robot=d.get("robot", "none"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{directory / IO_FILE}: malformed ({e})") from None

    def save(self, directory: str | Path) -> None:
        """Write policy_io.json (and a copy of the tokenizer) so a derived model dir keeps them."""
        directory = Path(directory)
        atomic_write_json(directory / IO_FILE, self.to_dict())
        if self.tokenizer_path and Path(self.tokenizer_path).is_file():
            dst = directory / self.tokenizer_name
            if Path(self.tokenizer_path).resolve() != dst.resolve():
                tmp = directory / f".{self.tokenizer_name}.tmp"
                shutil.copyfile(self.tokenizer_path, tmp)
                tmp.replace(dst)


def read_io(directory: Path) -> ExternalIO | None:
    path = Path(directory) / IO_FILE
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return ExternalIO.from_dict(d, Path(directory))


@dataclass
class ExternalCheckpoint:
    """A real checkpoint converted: our model holding its weights, the model's config, and the
    checkpoint's conventions (what `Policy(model, config, io=io)` needs)."""

    model: torch.nn.Module
    config: ModelConfig
    io: ExternalIO


def _embedding_rows(model) -> int | None:
    for name, mod in model.named_modules():
        if name.endswith("embed_tokens") and isinstance(mod, torch.nn.Embedding):
            return mod.num_embeddings
    return None

"""How a policy turns an Observation into model inputs and model outputs into robot actions.

A `Policy` runs one of our models; what the model expects around it (tokenizer and prompt
format, image resizing, state / action normalisation, robot-specific transforms) is a
component the Policy holds, `policy.io`. Two kinds exist:

- `ReferenceIO` (here): the conventions of the models this project trains and of the presets
  (byte tokenizer, resize-with-pad to [-1, 1], mean/std statistics from config.json);
- `loaders.external.ExternalIO`: a real checkpoint's conventions (LeRobot / openpi), stored in
  policy_io.json next to any model directory derived from that checkpoint.

Keeping these out of the Policy class lets the loaders describe a checkpoint's conventions
without importing the Policy, so the dependency points one way: policy -> loaders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .config import ModelConfig
from .models import Batch
from .preprocess import Normalizer, images_to_array
from .tokenizer import ByteTokenizer, prompt_text


class PolicyIO(Protocol):
    """The contract `Policy` relies on (ReferenceIO and loaders.external.ExternalIO fulfil it).

    `config` is the model's ModelConfig; `model` is the model itself (for checks such as the
    embedding size). Batches come back on the CPU in float32; the Policy moves them."""

    state_norm: Any  # .normalize(state) / .unnormalize(actions); .dim
    action_norm: Any

    def state_dim(self, config: ModelConfig) -> int:
        """Entries of the robot state an Observation must carry."""

    def action_dim(self, config: ModelConfig) -> int:
        """Entries of each returned action."""

    def to_batch(self, obs, config: ModelConfig, model: torch.nn.Module) -> Batch:
        """One Observation -> a batch of one; ValueError naming the field on bad input."""

    def actions_out(self, actions: np.ndarray, obs, config: ModelConfig) -> np.ndarray:
        """The model's (horizon, model action_dim) normalised output -> actions in robot units."""

    def describe(self, config: ModelConfig) -> dict[str, Any]:
        """Keys Policy.describe() adds or overrides (empty for the reference conventions)."""

    def save(self, directory: str | Path) -> None:
        """Write what a model directory needs to reproduce these conventions (may be nothing)."""


class ReferenceIO:
    """The project's own conventions: UTF-8 byte tokens with the architecture's prompt format,
    images resized with padding to [-1, 1], mean/std normalisation from the model config."""

    def __init__(self, config: ModelConfig):
        self.tokenizer = ByteTokenizer()
        self.state_norm = Normalizer(config.state_mean, config.state_std, config.state_dim, "state")
        self.action_norm = Normalizer(config.action_mean, config.action_std, config.action_dim, "action")

    def state_dim(self, config: ModelConfig) -> int:
        return config.state_dim

    def action_dim(self, config: ModelConfig) -> int:
        return config.action_dim

    def to_batch(self, obs, config: ModelConfig, model: torch.nn.Module) -> Batch:
        images, image_mask = images_to_array(obs.images, config.vision.image_size, config.max_cameras)
        state = self.state_norm.normalize(obs.state)
        text = prompt_text(config.arch, obs.instruction, state)
        tokens, token_mask = self.tokenizer.encode(text, config.max_text_tokens)
        needed = 1 + len(text.encode("utf-8"))
        if config.arch == "pi05" and needed > config.max_text_tokens:
            raise ValueError(
                f"the pi0.5 prompt needs {needed} tokens but the model reads {config.max_text_tokens}: "
                "the state and the action cue would be cut off; accepted: a shorter instruction"
            )
        return Batch(
            torch.from_numpy(images)[None],
            torch.from_numpy(image_mask)[None],
            torch.from_numpy(tokens)[None],
            torch.from_numpy(token_mask)[None],
            torch.from_numpy(state)[None],
        )

    def actions_out(self, actions: np.ndarray, obs, config: ModelConfig) -> np.ndarray:
        return self.action_norm.unnormalize(actions).astype(np.float32)

    def describe(self, config: ModelConfig) -> dict[str, Any]:
        return {}

    def save(self, directory: str | Path) -> None:
        """Nothing to write: config.json carries the statistics and the byte tokenizer has no file."""

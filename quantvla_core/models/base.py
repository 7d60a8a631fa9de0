"""What every reference VLA shares: the batch format, flow matching, Euler sampling.

A chunk is produced in three stages that the runtime times separately: `encode_images`
(vision), `encode_prefix` (backbone over images + instruction, cached once per chunk) and
`num_steps` calls of `denoise_step` (the action head only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..config import ModelConfig
from .layers import Conditioning


@dataclass
class Batch:
    """Model inputs, already preprocessed.

    images: (B, C, 3, S, S) float in [-1, 1]; image_mask: (B, C) bool (False = camera absent);
    tokens: (B, L) long; token_mask: (B, L) bool; state: (B, state_dim) normalised float.
    """

    images: torch.Tensor
    image_mask: torch.Tensor
    tokens: torch.Tensor
    token_mask: torch.Tensor
    state: torch.Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Batch":
        f = lambda x: x.to(device=device, dtype=dtype) if (dtype and x.is_floating_point()) else x.to(device)  # noqa: E731
        return Batch(
            f(self.images),
            self.image_mask.to(device),
            self.tokens.to(device),
            self.token_mask.to(device),
            f(self.state),
        )


def prefix_validity(
    batch: Batch, image_tokens: torch.Tensor, *extra: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid (B, T) bool, RoPE positions (B, T)) of a prefix [image tokens; text; *extra].

    Every camera contributes the same number of tokens; absent cameras and padding are invalid,
    and positions count valid tokens only, so dropping them changes nothing."""
    per_image = image_tokens.shape[1] // batch.image_mask.shape[1]
    valid = torch.cat([batch.image_mask.repeat_interleave(per_image, dim=1), batch.token_mask, *extra], dim=1)
    return valid, (valid.long().cumsum(-1) - 1).clamp(min=0)


def check_shared_attention(cfg: ModelConfig) -> None:
    """pi0 / SmolVLA experts attend over the backbone's cached K/V, layer by layer: both stacks
    must have the same depth and attention geometry."""
    bb, ex = cfg.backbone, cfg.expert
    if (bb.heads, bb.kv_heads, bb.head_dim, bb.depth) != (ex.heads, ex.kv_heads, ex.head_dim, ex.depth):
        raise ValueError(
            f"{cfg.arch} backbone and expert must share depth, heads, kv_heads and head_dim "
            f"(backbone {bb.depth}/{bb.heads}/{bb.kv_heads}/{bb.head_dim}, "
            f"expert {ex.depth}/{ex.heads}/{ex.kv_heads}/{ex.head_dim})"
        )


class FlowMatchingVLA(nn.Module):
    """Base class. Subclasses define the three stages and the flow-time convention.

    `noise_at_one=True` (pi0): x_t = t * noise + (1 - t) * actions, sampling t: 1 -> 0.
    `noise_at_one=False` (GR00T): x_t = (1 - t) * noise + t * actions, sampling t: 0 -> 1.
    In both, the network predicts d x_t / d t and sampling takes Euler steps.
    """

    noise_at_one = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg

    # -- stages (subclasses) -------------------------------------------------------------
    def encode_images(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def encode_prefix(self, batch: Batch, image_tokens: torch.Tensor) -> Any:
        raise NotImplementedError

    def denoise_step(self, cache: Any, x_t: torch.Tensor, t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def velocity_joint(self, batch: Batch, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Training-time path (no cache); must equal encode_prefix + denoise_step."""
        raise NotImplementedError

    def prepare_steps(self, cache: Any, times: list[torch.Tensor]) -> None:
        """Compute at once, for every denoising step of a chunk, what a step derives from its
        flow time alone (time embedding, time MLP, adaptive-norm modulations): one batched pass
        instead of one per step. Stored in ``cache`` keyed by each step's own ``t`` tensor, so
        ``denoise_step(cache, x, t, ...)`` with that very tensor skips the work; any other ``t``
        computes it as before. Default: nothing (subclasses that have such work override)."""

    @staticmethod
    def _store_time_conditions(cache: Any, times: list[torch.Tensor], cond: Any) -> None:
        """Split ``cond``, computed for ``torch.cat(times)``, into one entry per step, keyed in
        ``cache.time_conditions`` by that step's own t tensor (identity)."""
        b = times[0].shape[0]
        rows = [(i * b, (i + 1) * b) for i in range(len(times))]
        per_step = [cond.rows(*r) if isinstance(cond, Conditioning) else cond[r[0] : r[1]] for r in rows]
        cache.time_conditions = dict(zip(times, per_step))

    @staticmethod
    def _prepared_time_condition(cache: Any, t: torch.Tensor) -> Any:
        """The entry prepare_steps stored for this very ``t``, or None. torch.compile is checked
        first: it must not trace (and guard on) the tensor-keyed dict."""
        if torch.compiler.is_compiling() or not cache.time_conditions:
            return None
        return cache.time_conditions.get(t)

    # -- flow matching --------------------------------------------------------------------
    def time_grid(self, num_steps: int) -> list[float]:
        dt = 1.0 / num_steps
        if self.noise_at_one:
            return [1.0 - i * dt for i in range(num_steps)]
        return [i * dt for i in range(num_steps)]

    def step_size(self, num_steps: int) -> float:
        return -1.0 / num_steps if self.noise_at_one else 1.0 / num_steps

    def noisy_actions(
        self, actions: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, target velocity) for training."""
        tt = t[:, None, None]
        if self.noise_at_one:
            return tt * noise + (1 - tt) * actions, noise - actions
        return (1 - tt) * noise + tt * actions, actions - noise

    def sample_noise(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        return torch.randn(
            batch_size, self.cfg.horizon, self.cfg.action_dim, generator=generator, device=device, dtype=torch.float32
        )

    def flow_loss(self, batch: Batch, actions: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b = actions.shape[0]
        dev = generator.device if generator is not None else actions.device
        noise = torch.randn(actions.shape, generator=generator, device=dev).to(actions.device)
        u = torch.distributions.Beta(
            torch.tensor(1.5, device=actions.device), torch.tensor(1.0, device=actions.device)
        ).sample((b,))
        t = u * 0.999 + 0.001
        if not self.noise_at_one:
            t = 1.0 - t  # GR00T puts more weight near the data end of its (0 -> 1) time axis
        x_t, target = self.noisy_actions(actions, noise, t)
        v = self.velocity_joint(batch, x_t.to(actions.dtype), t)
        return torch.mean((v.float() - target.float()) ** 2)

    @torch.no_grad()
    def sample_actions(
        self,
        batch: Batch,
        noise: torch.Tensor,
        num_steps: int | None = None,
        on_stage: Callable[[str], None] | None = None,
    ) -> torch.Tensor:
        """Euler integration from noise to actions (normalised space), using the prefix cache.

        `on_stage(name)` is called after each stage ('vision', 'prefix', 'denoise_step_i') so
        that a caller can time stages without this code knowing about clocks.
        """
        num_steps = num_steps or self.cfg.num_steps
        mark = on_stage or (lambda _name: None)
        image_tokens = self.encode_images(batch)
        mark("vision")
        cache = self.encode_prefix(batch, image_tokens)
        x = noise.float()
        times = [torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32) for t in self.time_grid(num_steps)]
        self.prepare_steps(cache, times)  # once per chunk: counted with the prefix
        mark("prefix")
        dt = self.step_size(num_steps)
        for i, tt in enumerate(times):
            x = self.euler_step(cache, x, tt, dt, batch.state)
            mark(f"denoise_step_{i}")
        return x

    def euler_step(self, cache: Any, x: torch.Tensor, t: torch.Tensor, dt: float, state: torch.Tensor) -> torch.Tensor:
        """One integration step of ``sample_actions``. The integration state stays fp32 (as
        openpi/LeRobot keep x_t); only the network's input is cast to the model dtype, so 10
        bf16 roundings do not accumulate."""
        v = self.denoise_step(cache, x.to(state.dtype), t, state)
        return x + dt * v.float()

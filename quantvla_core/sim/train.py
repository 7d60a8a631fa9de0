"""Flow-matching behaviour cloning of a reference policy on demo shards (`quantvla train` parses
its flags in sim/cli.py and calls `train`).

Each sample is one observation (images, instruction paraphrase, state) and the next `horizon`
expert actions (the last action repeated past the episode end). Normalisation statistics come
from the demos and are stored in the model config, so the trained directory is a complete
policy. Training resumes from `<out>/train_state/` (safetensors + JSON, no pickle).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..checkpoint import save_model_dir
from ..config import ModelConfig
from ..fileio import atomic_directory, atomic_write_json
from ..models import Batch, build_model
from ..tokenizer import ByteTokenizer, prompt_text


@dataclass
class TrainConfig:
    steps: int = 6000
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup: int = 200
    grad_clip: float = 1.0
    shift_pixels: int = 4  # random-shift augmentation (pad + crop)
    seed: int = 0
    save_every: int = 500
    threads: int = 2
    device: str = "cpu"
    max_seconds: float = 0.0  # > 0: stop (and finish the LR schedule) at this wall-clock budget
    init: str = ""  # a model directory to start from (fine-tuning), instead of random weights
    ema: float = 0.0  # > 0: the saved policy is an exponential moving average of the weights
    # task -> how many times as often its observations are drawn (default 1; 0 leaves it out):
    # fine-tuning can spend its steps on the tasks the policy still fails
    task_weights: dict = field(default_factory=dict)


class DemoDataset:
    """Demo shards as tensors on the training device, and batches drawn from them there.

    Each sample is one observation row and the next `horizon` actions. Images stay uint8 on
    the device and prompts are tokenised once per paraphrase, so a batch is a few gathers
    (no per-sample Python work): on a GPU the data path no longer limits the step rate.
    """

    def __init__(self, folder: str | Path | list, cfg: ModelConfig, device: str | torch.device = "cpu"):
        from .instructions import INSTRUCTIONS
        from .shards import load_demos

        if isinstance(folder, (list, tuple)) or str(folder).endswith(".npz"):
            # compact bundle(s): images only for some rows; several parts are joined
            from .compact import read_bundles

            demos, rows = read_bundles(folder if isinstance(folder, (list, tuple)) else [folder])
        else:
            demos = load_demos(folder)
            rows = np.arange(len(demos.actions))
        if demos.images.shape[1] > cfg.max_cameras:
            raise ValueError(f"demos have {demos.images.shape[1]} cameras; model accepts {cfg.max_cameras}")
        self.cfg = cfg
        dev = self.device = torch.device(device)
        self._raw_states = states = demos.states.astype(np.float32)
        self._raw_actions = actions = demos.actions.astype(np.float32)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
        self.use_normalization(states.mean(0), states.std(0) + 1e-3, actions.mean(0), actions.std(0) + 1e-3)
        self.images = t(demos.images).permute(0, 1, 4, 2, 3)  # (kept rows, C, 3, S, S) uint8
        image_of_row = np.full(len(actions), -1, np.int64)
        image_of_row[rows] = np.arange(len(rows))
        self.image_of_row, self.rows = t(image_of_row), t(rows.astype(np.int64))
        starts = demos.episode_starts
        episode_of = np.repeat(np.arange(len(starts) - 1), np.diff(starts))
        self.episode_of, self.episode_end = t(episode_of), t(starts[1:][episode_of])
        self.num_episodes = len(starts) - 1
        # paraphrases: one table of distinct option lists; an episode samples within its own
        tasks = [demos.tasks[i] for i in demos.episode_task]
        self.task_names = list(demos.tasks)
        self.row_task = t(demos.episode_task[episode_of[rows]].astype(np.int64))
        self.row_probs = None  # None: every observation equally likely
        options = [tuple(INSTRUCTIONS.get(k, (str(i),))) for k, i in zip(tasks, demos.episode_instruction)]
        texts: list[str] = []
        first: dict[tuple, int] = {}
        for o in options:
            if o not in first:
                first[o] = len(texts)
                texts.extend(o)
        self.option_first = t(np.array([first[o] for o in options], np.int64))
        self.option_count = t(np.array([len(o) for o in options], np.int64))
        self.texts = texts
        tok = ByteTokenizer()
        if cfg.arch != "pi05":  # pi0.5 prompts carry the state: tokenised per sample
            enc = [tok.encode(prompt_text(cfg.arch, x), cfg.max_text_tokens) for x in texts]
            self.text_tokens = t(np.stack([e[0] for e in enc]))
            self.text_masks = t(np.stack([e[1] for e in enc]))
        self.tokenizer = tok

    def use_normalization(self, state_mean, state_std, action_mean, action_std) -> None:
        """Normalise states and actions with these statistics (default: the demos' own)."""
        stats = [np.asarray(v, np.float32) for v in (state_mean, state_std, action_mean, action_std)]
        for name, v, dim in zip(
            ("state_mean", "state_std", "action_mean", "action_std"),
            stats,
            (self._raw_states.shape[1],) * 2 + (self._raw_actions.shape[1],) * 2,
        ):
            if v.shape != (dim,) or not np.all(np.isfinite(v)):
                raise ValueError(f"{name} must be {dim} finite numbers, got {v.tolist()}")
            if name.endswith("std") and not np.all(v > 0):
                raise ValueError(f"{name} must be positive, got {v.tolist()}")
        self.state_mean, self.state_std, self.action_mean, self.action_std = stats
        norm = lambda a, m, sd: torch.from_numpy(np.ascontiguousarray((a - m) / sd)).to(self.device)  # noqa: E731
        self.states = norm(self._raw_states, self.state_mean, self.state_std)
        self.actions = norm(self._raw_actions, self.action_mean, self.action_std)

    def __len__(self) -> int:
        return len(self.rows)

    def use_task_weights(self, weights: dict) -> dict:
        """Draw each task's observations `weights[task]` times as often (unnamed tasks: 1).
        Returns the resulting share of each task in the batches."""
        present = sorted(set(self.row_task.tolist()))
        names = [self.task_names[i] for i in present]
        w = {}
        for task, value in weights.items():
            if task not in names:
                raise ValueError(
                    f"task weight for {task!r}, which has no observations in these demos; accepted: {', '.join(names)}"
                )
            value = float(value)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"task weight for {task} must be a finite number >= 0, got {value}")
            w[task] = value
        per_task = torch.tensor([w.get(n, 1.0) for n in self.task_names], dtype=torch.float64)
        probs = per_task.to(self.device)[self.row_task]
        if float(probs.sum()) <= 0:
            raise ValueError("every task weight is 0: nothing left to train on")
        self.row_probs = (probs / probs.sum()).float()
        share = torch.zeros(len(self.task_names), dtype=torch.float64, device=self.device)
        share.index_add_(0, self.row_task, self.row_probs.double())
        return {self.task_names[i]: float(share[i]) for i in present}

    def sample(self, gen: torch.Generator, n: int) -> torch.Tensor:
        """Row indices of n random training observations."""
        if self.row_probs is not None:
            return self.rows[torch.multinomial(self.row_probs, n, replacement=True, generator=gen)]
        return self.rows[torch.randint(len(self.rows), (n,), generator=gen, device=self.device)]

    def _shift(self, x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
        """Random-shift augmentation (replicate pad + crop), an independent offset per image."""
        n, _, s, _ = x.shape
        padded = torch.nn.functional.pad(x, (shift,) * 4, mode="replicate")
        o = torch.randint(0, 2 * shift + 1, (2, n), generator=gen, device=x.device)
        ar = torch.arange(s, device=x.device)
        ys, xs = o[0][:, None] + ar, o[1][:, None] + ar
        out = padded[torch.arange(n, device=x.device)[:, None, None], :, ys[:, :, None], xs[:, None, :]]
        return out.permute(0, 3, 1, 2)

    def batch(self, idx, gen: torch.Generator, shift: int) -> tuple[Batch, torch.Tensor]:
        cfg, dev = self.cfg, self.device
        idx = torch.as_tensor(idx, device=dev)
        h = cfg.horizon
        steps = torch.minimum(idx[:, None] + torch.arange(h, device=dev)[None], self.episode_end[idx][:, None] - 1)
        actions, states = self.actions[steps], self.states[idx]
        imgs = self.images[self.image_of_row[idx]].float() / 127.5 - 1.0
        b, c, _, s, _ = imgs.shape
        flat = imgs.flatten(0, 1)
        if shift:
            flat = self._shift(flat, shift, gen)
        size = cfg.vision.image_size
        if s != size:
            flat = torch.nn.functional.interpolate(flat, size=size, mode="area")
        full = torch.zeros(b, cfg.max_cameras, 3, size, size, device=dev)
        full[:, :c] = flat.view(b, c, 3, size, size)
        image_mask = torch.zeros(b, cfg.max_cameras, dtype=torch.bool, device=dev)
        image_mask[:, :c] = True
        ep = self.episode_of[idx]
        pick = self.option_first[ep] + (torch.rand(b, generator=gen, device=dev) * self.option_count[ep]).long()
        if cfg.arch != "pi05":
            toks, masks = self.text_tokens[pick], self.text_masks[pick]
        else:
            enc = [
                self.tokenizer.encode(prompt_text(cfg.arch, self.texts[k], st), cfg.max_text_tokens)
                for k, st in zip(pick.tolist(), states.cpu().numpy())
            ]
            toks = torch.from_numpy(np.stack([e[0] for e in enc])).to(dev)
            masks = torch.from_numpy(np.stack([e[1] for e in enc])).to(dev)
        return Batch(full, image_mask, toks, masks, states), actions


def _lr_at(step: int, tc: TrainConfig, elapsed: float = 0.0) -> float:
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    p = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    if tc.max_seconds > 0:
        p = max(p, elapsed / tc.max_seconds)
    return tc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def _save_train_state(
    out: Path, model, opt, step: int, cfg: ModelConfig, tc: TrainConfig, history, ema: dict | None = None
) -> None:
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema/{k}": v.detach().cpu().contiguous() for k, v in (ema or {}).items()})
    scalars = {
        "step": step,
        "model_config": cfg.to_dict(),
        "train_config": vars(tc),
        "history": history,
        "param_names": [n for n, _ in model.named_parameters()],
    }
    names = dict(enumerate(n for n, _ in model.named_parameters()))
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt/{names[i]}/{k}"] = v.detach().cpu().contiguous()
    with atomic_directory(out / "train_state") as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        atomic_write_json(tmp / "state.json", scalars)


def _load_train_state(out: Path, model, opt, ema: dict | None = None) -> tuple[int, list]:
    d = out / "train_state"
    meta = json.loads((d / "state.json").read_text())
    tensors = load_file(str(d / "state.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
    for k in ema or {}:
        ema[k].copy_(tensors.get(f"ema/{k}", model.state_dict()[k]))
    sd = opt.state_dict()
    index = {n: i for i, n in enumerate(meta["param_names"])}
    for key, v in tensors.items():
        if key.startswith("opt/"):
            name, field = key[4:].rsplit("/", 1)
            sd["state"].setdefault(index[name], {})[field] = v
    opt.load_state_dict(sd)
    return int(meta["step"]), list(meta["history"])


def train(demos: str | Path, out: str | Path, model_cfg: ModelConfig, tc: TrainConfig, progress: bool = True) -> dict:
    """Train and write a complete model directory to `out` (resuming if a train_state exists)."""
    torch.set_num_threads(tc.threads)
    out = Path(out)
    device = torch.device(tc.device)
    data = DemoDataset(demos, model_cfg, device)
    if tc.init:
        # Fine-tuning keeps the normalisation the weights were trained with: demos of a few
        # tasks have other means and spreads, and new statistics would shift every input and
        # output of the starting policy (a loss jump instead of a continuation).
        from ..checkpoint import read_config

        norm = read_config(Path(tc.init))
        stats = (norm.state_mean, norm.state_std, norm.action_mean, norm.action_std)
        if all(v is not None for v in stats):
            data.use_normalization(*stats)
    if tc.task_weights:
        share = data.use_task_weights(tc.task_weights)
        print("task shares: " + ", ".join(f"{k} {v:.1%}" for k, v in share.items()), flush=True)
    model_cfg.state_mean, model_cfg.state_std = data.state_mean.tolist(), data.state_std.tolist()
    model_cfg.action_mean, model_cfg.action_std = data.action_mean.tolist(), data.action_std.tolist()
    model = build_model(model_cfg, seed=tc.seed)
    if tc.init:
        from ..checkpoint import load_state_into, verify_manifest

        verify_manifest(Path(tc.init))
        load_state_into(model, tc.init)
    model = model.to(device).train()
    params = dict(model.named_parameters())
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr,
        betas=(0.9, 0.95),
    )
    ema = {k: v.detach().clone() for k, v in params.items()} if tc.ema > 0 else None
    step, history = 0, []
    if (out / "train_state" / "state.json").is_file():
        step, history = _load_train_state(out, model, opt, ema)
    gen = torch.Generator(device).manual_seed(tc.seed + step)
    torch.manual_seed(tc.seed + step)
    bar = tqdm(total=tc.steps, initial=step, desc="train", disable=not progress, unit="step")
    t0, running = time.time(), None
    last_line, first_step = t0, step
    while step < tc.steps and not (tc.max_seconds > 0 and time.time() - t0 > tc.max_seconds):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, tc, time.time() - t0)
        batch, actions = data.batch(data.sample(gen, tc.batch_size), gen, tc.shift_pixels)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model.flow_loss(batch, actions, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        if ema is not None:  # warm-up: early averages must not be dominated by the start weights
            w = 1.0 - min(tc.ema, (1.0 + step) / (10.0 + step))
            torch._foreach_lerp_(list(ema.values()), [params[k].detach() for k in ema], w)
        step += 1
        if step % 10 == 0 or step == tc.steps:  # .item() synchronises: not every step on a GPU
            value = loss.item()
            running = value if running is None else 0.8 * running + 0.2 * value
            bar.set_postfix(loss=f"{running:.4f}")
        bar.update(1)
        if step % 50 == 0:
            history.append({"step": step, "loss": running, "seconds": time.time() - t0})
            if not progress and time.time() - last_line > 30:  # logs of unattended runs
                last_line = time.time()
                rate = (step - first_step) / (last_line - t0)
                print(f"step {step} loss {running:.4f} {rate:.1f} steps/s", flush=True)
        if step % tc.save_every == 0:
            _save_train_state(out, model, opt, step, model_cfg, tc, history, ema)
    bar.close()
    if running is None:  # fewer than 10 steps in this call
        running = float("nan")
    _save_train_state(out, model, opt, step, model_cfg, tc, history, ema)
    model.eval()
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    weights.update({k: v.detach().cpu() for k, v in (ema or {}).items()})
    save_model_dir(
        out / "policy",
        model_cfg,
        weights,
        extra_files={
            "training.json": {
                "train_config": vars(tc),
                "history": history,
                "demos": str(demos),
                "episodes": data.num_episodes,
                "samples": len(data),
                "weights": "ema" if ema else "last",
            }
        },
    )
    return {"steps": step, "final_loss": running, "policy": str(out / "policy")}

"""`quantvla train`: flow-matching behaviour cloning of a reference policy on demo shards.

Each sample is one observation (images, instruction paraphrase, state) and the next `horizon`
expert actions (the last action repeated past the episode end). Normalisation statistics come
from the demos and are stored in the model config, so the trained directory is a complete
policy. Training resumes from `<out>/train_state/` (safetensors + JSON, no pickle).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .checkpoint import save_model_dir
from .config import PRESETS, ModelConfig, preset
from .fileio import atomic_directory, atomic_write_json
from .models import Batch, build_model
from .tokenizer import ByteTokenizer, prompt_text


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


class DemoDataset:
    """Flattens demo shards into (observation, action chunk) samples."""

    def __init__(self, folder: str | Path, cfg: ModelConfig):
        from .sim.instructions import INSTRUCTIONS
        from .sim.shards import load_demos
        if str(folder).endswith(".npz"):  # a compact bundle: images only for some rows
            from .sim.compact import read_bundle
            demos, self.rows = read_bundle(folder)
        else:
            demos = load_demos(folder)
            self.rows = np.arange(len(demos.actions))
        self.image_of_row = np.full(len(demos.actions), -1, np.int64)
        self.image_of_row[self.rows] = np.arange(len(self.rows))
        self.cfg = cfg
        self.images = demos.images  # (rows, C, S, S, 3) uint8
        if self.images.shape[1] > cfg.max_cameras:
            raise ValueError(f"demos have {self.images.shape[1]} cameras; model accepts {cfg.max_cameras}")
        self.states = demos.states.astype(np.float32)
        self.actions = demos.actions.astype(np.float32)
        starts = demos.episode_starts
        self.episode_of = np.repeat(np.arange(len(starts) - 1), np.diff(starts))
        self.episode_end = starts[1:][self.episode_of]
        self.tasks = [demos.tasks[i] for i in demos.episode_task]
        self.paraphrases = [INSTRUCTIONS.get(t, (str(i),)) for t, i in zip(self.tasks, demos.episode_instruction)]
        self.tokenizer = ByteTokenizer()
        self.state_mean, self.state_std = self.states.mean(0), self.states.std(0) + 1e-3
        self.action_mean, self.action_std = self.actions.mean(0), self.actions.std(0) + 1e-3
        self.num_episodes = len(starts) - 1

    def __len__(self) -> int:
        return len(self.rows)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Row indices of n random training observations."""
        return self.rows[rng.integers(0, len(self.rows), n)]

    def batch(self, idx: np.ndarray, rng: np.random.Generator, shift: int) -> tuple[Batch, torch.Tensor]:
        cfg = self.cfg
        h = cfg.horizon
        steps = np.minimum(idx[:, None] + np.arange(h)[None], self.episode_end[idx][:, None] - 1)
        actions = (self.actions[steps] - self.action_mean) / self.action_std
        states = (self.states[idx] - self.state_mean) / self.state_std
        imgs = torch.from_numpy(self.images[self.image_of_row[idx]]).permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0
        b, c, _, s, _ = imgs.shape
        if shift:
            padded = torch.nn.functional.pad(imgs.flatten(0, 1), (shift,) * 4, mode="replicate")
            ox, oy = rng.integers(0, 2 * shift + 1, size=2)
            imgs = padded[:, :, oy:oy + s, ox:ox + s].reshape(b, c, 3, s, s)
        if imgs.shape[-1] != cfg.vision.image_size:
            imgs = torch.nn.functional.interpolate(imgs.flatten(0, 1), size=cfg.vision.image_size,
                                                   mode="area").view(b, c, 3, cfg.vision.image_size, -1)
        full = torch.zeros(b, cfg.max_cameras, 3, cfg.vision.image_size, cfg.vision.image_size)
        full[:, :c] = imgs
        image_mask = torch.zeros(b, cfg.max_cameras, dtype=torch.bool)
        image_mask[:, :c] = True
        toks, masks = [], []
        for i, st in zip(idx, states):
            options = self.paraphrases[self.episode_of[i]]
            text = prompt_text(cfg.arch, options[rng.integers(len(options))], st)
            t, m = self.tokenizer.encode(text, cfg.max_text_tokens)
            toks.append(t)
            masks.append(m)
        batch = Batch(full, image_mask, torch.from_numpy(np.stack(toks)), torch.from_numpy(np.stack(masks)),
                      torch.from_numpy(states))
        return batch, torch.from_numpy(actions.astype(np.float32))


def _lr_at(step: int, tc: TrainConfig, elapsed: float = 0.0) -> float:
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    p = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    if tc.max_seconds > 0:
        p = max(p, elapsed / tc.max_seconds)
    return tc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def _save_train_state(out: Path, model, opt, step: int, cfg: ModelConfig, tc: TrainConfig, history) -> None:
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    scalars = {"step": step, "model_config": cfg.to_dict(), "train_config": vars(tc), "history": history,
               "param_names": [n for n, _ in model.named_parameters()]}
    names = dict(enumerate(n for n, _ in model.named_parameters()))
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt/{names[i]}/{k}"] = v.detach().cpu().contiguous()
    with atomic_directory(out / "train_state") as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        atomic_write_json(tmp / "state.json", scalars)


def _load_train_state(out: Path, model, opt) -> tuple[int, list]:
    d = out / "train_state"
    meta = json.loads((d / "state.json").read_text())
    tensors = load_file(str(d / "state.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
    sd = opt.state_dict()
    index = {n: i for i, n in enumerate(meta["param_names"])}
    for key, v in tensors.items():
        if key.startswith("opt/"):
            name, field = key[4:].rsplit("/", 1)
            sd["state"].setdefault(index[name], {})[field] = v
    opt.load_state_dict(sd)
    return int(meta["step"]), list(meta["history"])


def train(demos: str | Path, out: str | Path, model_cfg: ModelConfig, tc: TrainConfig,
          progress: bool = True) -> dict:
    """Train and write a complete model directory to `out` (resuming if a train_state exists)."""
    torch.set_num_threads(tc.threads)
    out = Path(out)
    data = DemoDataset(demos, model_cfg)
    model_cfg.state_mean, model_cfg.state_std = data.state_mean.tolist(), data.state_std.tolist()
    model_cfg.action_mean, model_cfg.action_std = data.action_mean.tolist(), data.action_std.tolist()
    device = torch.device(tc.device)
    model = build_model(model_cfg, seed=tc.seed)
    if tc.init:
        from .checkpoint import load_state_into, verify_manifest
        verify_manifest(Path(tc.init))
        load_state_into(model, tc.init)
    model = model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95))
    step, history = 0, []
    if (out / "train_state" / "state.json").is_file():
        step, history = _load_train_state(out, model, opt)
    rng = np.random.default_rng(tc.seed + step)
    gen = torch.Generator().manual_seed(tc.seed + step)
    bar = tqdm(total=tc.steps, initial=step, desc="train", disable=not progress, unit="step")
    t0, running = time.time(), None
    while step < tc.steps and not (tc.max_seconds > 0 and time.time() - t0 > tc.max_seconds):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, tc, time.time() - t0)
        batch, actions = data.batch(data.sample(rng, tc.batch_size), rng, tc.shift_pixels)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model.flow_loss(batch.to(device), actions.to(device), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        if step % 50 == 0:
            history.append({"step": step, "loss": running, "seconds": time.time() - t0})
        if step % tc.save_every == 0:
            _save_train_state(out, model, opt, step, model_cfg, tc, history)
    bar.close()
    _save_train_state(out, model, opt, step, model_cfg, tc, history)
    model.eval()
    save_model_dir(out / "policy", model_cfg, {k: v.cpu() for k, v in model.state_dict().items()},
                   extra_files={"training.json": {"train_config": vars(tc), "history": history,
                                                  "demos": str(demos), "episodes": data.num_episodes,
                                                  "samples": len(data)}})
    return {"steps": step, "final_loss": running, "policy": str(out / "policy")}


def cmd_train(args: argparse.Namespace) -> int:
    cfg = preset(args.preset)
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                     save_every=args.save_every, device=args.device, init=args.init or "",
                     max_seconds=args.max_seconds)
    result = train(args.demos, args.out, cfg, tc)
    print(json.dumps(result, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="flow-matching behaviour cloning on demo shards (resumable)")
    p.add_argument("--demos", required=True, help="folder of demo shards (quantvla sim demos)")
    p.add_argument("--out", required=True, help="run folder: train_state/ and the final policy/")
    p.add_argument("--preset", default="mt10", choices=PRESETS)
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=TrainConfig.save_every)
    p.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast)")
    p.add_argument("--init", help="start from this model directory (fine-tune)")
    p.add_argument("--max-seconds", type=float, default=0.0, help="wall-clock budget (0 = none)")
    p.set_defaults(func=cmd_train)

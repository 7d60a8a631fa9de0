"""Renaming a foreign checkpoint's tensors onto our module names, and saying what differs.

A format is described by ordered regex rules: the first rule whose pattern matches a key decides
its fate (renamed, or ignored because the tensor is never used at inference, e.g. a tied
lm_head). Keys no rule matches are "unknown". After mapping, the tensors are compared with the
model built from the derived config: every unknown key, missing key and shape mismatch is listed
in one error, so a user sees the whole difference at once instead of the first symptom.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..checkpoint import CheckpointError

LIST_LIMIT = 12


@dataclass(frozen=True)
class Rule:
    """`pattern` (full match) -> `target` (re.sub template); target None = known but unused."""

    pattern: str
    target: str | None

    def apply(self, key: str) -> tuple[bool, str | None]:
        m = re.fullmatch(self.pattern, key)
        if not m:
            return False, None
        return True, (None if self.target is None else m.expand(self.target))


@dataclass
class MappedTensors:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # our name -> tensor
    source_of: dict[str, str] = field(default_factory=dict)  # our name -> checkpoint key
    ignored: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


def _listing(title: str, items: list[str]) -> str:
    more = f" ... and {len(items) - LIST_LIMIT} more" if len(items) > LIST_LIMIT else ""
    return f"{title} ({len(items)}): " + ", ".join(items[:LIST_LIMIT]) + more


def map_keys(
    tensors: dict[str, torch.Tensor], rules: list[Rule], original: dict[str, str] | None = None
) -> MappedTensors:
    """`original`: key -> its name in the file, where a prefix was stripped before mapping."""
    out = MappedTensors()
    name = (lambda k: original.get(k, k)) if original else (lambda k: k)  # noqa: E731
    for key in sorted(tensors):
        for rule in rules:
            matched, target = rule.apply(key)
            if not matched:
                continue
            if target is None:
                out.ignored.append(name(key))
            elif target in out.tensors:
                raise CheckpointError(
                    f"checkpoint keys {out.source_of[target]!r} and {name(key)!r} both map "
                    f"to {target!r}: the file mixes two naming schemes"
                )
            else:
                out.tensors[target] = tensors[key]
                out.source_of[target] = name(key)
            break
        else:
            out.unknown.append(name(key))
    return out


def check_mapping(model: nn.Module, mapped: MappedTensors, source: str, fmt: str) -> None:
    """Raise CheckpointError listing unknown keys, missing tensors and shape mismatches."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapped.tensors))
    extra = sorted(set(mapped.tensors) - set(expected))
    shapes = [
        f"{mapped.source_of[k]}: file {tuple(mapped.tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(mapped.tensors))
        if tuple(mapped.tensors[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if mapped.unknown:
        problems.append(_listing("unknown keys (no rule of this format matches them)", mapped.unknown))
    if extra:
        problems.append(
            _listing("keys with no place in the model built from config.json", [mapped.source_of[k] for k in extra])
        )
    if missing:
        problems.append(_listing("missing tensors (model parameters the file does not provide)", missing))
    if shapes:
        problems.append(_listing("shape mismatches", shapes))
    if problems:
        raise CheckpointError(
            f"{source}: does not match a {fmt} checkpoint of the configured size: " + " | ".join(problems)
        )


def load_mapped(model: nn.Module, mapped: MappedTensors, source: str, fmt: str) -> None:
    """Check, then load; a model built on the meta device takes the file's tensors as they are
    (no random initialisation of billions of parameters first)."""
    check_mapping(model, mapped, source, fmt)
    on_meta = any(p.is_meta for p in model.parameters())
    expected = model.state_dict()
    state = {k: (v if on_meta else v.to(expected[k].dtype)) for k, v in mapped.tensors.items()}
    model.load_state_dict(state, strict=True, assign=on_meta)


def strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop `prefix` where present (LeRobot saves the policy's inner module as `model.`);
    also returns stripped -> original names so errors quote the file's own keys."""
    out, original = {}, {}
    for k, v in tensors.items():
        short = k[len(prefix) :] if k.startswith(prefix) else k
        out[short], original[short] = v, k
    return out, original


def need(tensors: dict[str, torch.Tensor], key: str, source: str, fmt: str) -> torch.Tensor:
    """A tensor the config is derived from; its absence means the file is not this format."""
    if key not in tensors:
        raise CheckpointError(
            f"{source}: missing tensor {key!r}, which every {fmt} checkpoint has; "
            "the file is another format or truncated"
        )
    return tensors[key]


def count_layers(tensors: dict[str, torch.Tensor], prefix: str) -> int:
    """Number of `prefix.N.` layers present (N contiguous from 0)."""
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in tensors if (m := pat.match(k))}
    n = len(found)
    if found and found != set(range(n)):
        raise CheckpointError(f"layers under {prefix!r} are not numbered 0..{n - 1}: got {sorted(found)}")
    return n

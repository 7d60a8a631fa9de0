"""ArchSpec: what the quantizer needs to know about a model, as data.

- ``rules``: (regex searched in a linear's qualified name, role), first match wins. Roles:
  ``vision``, ``llm`` (the language / VLM backbone), ``dit_attn`` (action-head attention
  projections), ``dit_mlp`` (action-head MLP), ``float`` (everything else). A layout names the
  roles that become integer.
- ``attention``: the attention modules with their q / o projections, heads and head_dim, and
  whether they belong to the action head (ATM and OHB targets) or the backbone.
- ``fold_groups``: optional declared (norm, linears) folds. Folds are always PROVEN from a
  traced forward (tracing.py); a declared group that the trace cannot prove stays exact.

Built-in specs: pi0, pi0.5, GR00T N1.5, SmolVLA (``ArchSpec.builtin``); any HF-style decoder
(Llama, Qwen2/3, Gemma 1/2/3, SmolLM, the project's own blocks) from the module tree
(``ArchSpec.generic``), optionally told which sub-trees are backbone / action head / vision.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from . import layout as L

ROLE_NAMES = ("vision", "llm", "dit_attn", "dit_mlp", "float")
_ROLE_ALIAS = {"backbone": "llm", "action_attn": "dit_attn", "action_mlp": "dit_mlp"}

_ATTN_CHILDREN = (("q_proj", "k_proj", "v_proj", "o_proj"), ("to_q", "to_k", "to_v", "to_out.0"))
_MLP_NAMES = ("mlp", "ff", "feed_forward", "ffn")


@dataclass
class AttentionSpec:
    """One attention module: ATM folds alpha into ``q_proj`` rows, OHB scales ``o_proj``."""

    name: str
    q_proj: str
    o_proj: str
    heads: int | None = None
    head_dim: int | None = None
    part: str = "action"  # "action" or "backbone"
    q_norm: bool = False  # a per-head query norm would undo the ATM scale: ATM is skipped

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ArchSpec:
    name: str
    rules: list[tuple[str, str]]
    attention: list[AttentionSpec] = field(default_factory=list)
    mlp_out: list[str] = field(default_factory=list)  # action-head MLP output linears (OHB on MLP)
    fold_groups: list[tuple[str, tuple[str, ...]]] | None = None

    def __post_init__(self) -> None:
        self.rules = [(p, _ROLE_ALIAS.get(r, r)) for p, r in self.rules]
        bad = [r for _, r in self.rules if r not in ROLE_NAMES]
        if bad:
            raise ValueError(f"unknown roles {bad}; accepted: {', '.join(ROLE_NAMES)} (or {', '.join(_ROLE_ALIAS)})")

    def role(self, name: str) -> str:
        for pat, role in self.rules:
            if re.search(pat, name):
                return role
        return "float"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "rules": [list(r) for r in self.rules],
            "attention": [a.to_dict() for a in self.attention],
            "mlp_out": list(self.mlp_out),
            "fold_groups": None if self.fold_groups is None else [[n, list(m)] for n, m in self.fold_groups],
        }

    # ---- constructors ----
    @classmethod
    def builtin(cls, model: nn.Module, arch: str | None = None) -> "ArchSpec":
        """pi0 / pi05 / groot / smolvla from the project's layout tables (names as openpi,
        LeRobot, NVIDIA and the reference models spell them)."""
        arch = L.check_arch(arch or L.detect_arch(model))
        mods = dict(model.named_modules())
        rules = (
            [(r"(^|\.)lm_head$", "float")]
            + [(p, r) for p, r in L.RULES[arch] if p != r".*"]
            + [(r"(^|\.)(vision_tower|vision_model)\.", "vision"), (r".*", "float")]
        )
        attn = []
        for part, (pat, qc, oc) in (("backbone", L.BACKBONE_ATTENTION[arch]), ("action", L.ACTION_ATTENTION[arch])):
            for n, m in mods.items():
                if re.search(pat, n):
                    attn.append(_attention_spec(n, m, qc, oc, part))
        mlp_out = [n for n in mods if re.search(L.ACTION_MLP_OUT[arch], n)]
        return cls(arch, rules, attn, mlp_out)

    @classmethod
    def generic(
        cls,
        model: nn.Module,
        *,
        backbone: str | tuple[str, ...] | None = None,
        action: str | tuple[str, ...] | None = None,
        vision: str | tuple[str, ...] | None = None,
        name: str = "generic",
    ) -> "ArchSpec":
        """From the module tree: every block with an attention child (q/k/v/o or to_q/k/v/out)
        and an MLP child. ``action`` / ``backbone`` / ``vision``: module-name prefixes of the
        sub-trees (strings or tuples). Blocks outside ``action`` and ``vision`` are backbone (``llm``)
        unless ``backbone`` is given, then only blocks under it are."""

        def prefixes(p):
            return () if p is None else (p,) if isinstance(p, str) else tuple(p)

        act, bb, vis = prefixes(action), prefixes(backbone), prefixes(vision)

        def under(n, pre):
            return any(n == p or n.startswith(p + ".") for p in pre)

        mods = dict(model.named_modules())
        rules: list[tuple[str, str]] = [(r"(^|\.)lm_head$", "float")]
        attn: list[AttentionSpec] = []
        mlp_out: list[str] = []
        for n, m in mods.items():
            a_name, a_mod, kids = _attention_child(m)
            mlp_name = next((c for c in _MLP_NAMES if isinstance(getattr(m, c, None), nn.Module)), None)
            if a_mod is None or mlp_name is None:
                continue
            full_a = f"{n}.{a_name}" if n else a_name
            full_mlp = f"{n}.{mlp_name}" if n else mlp_name
            if under(n, vis):
                continue
            part = "action" if under(n, act) else "backbone" if (under(n, bb) or not bb) else None
            if part is None:
                continue
            attn.append(_attention_spec(full_a, a_mod, kids[0], kids[3], part))
            mlp_lin = [f"{full_mlp}.{c}" for c, cm in mods[full_mlp].named_modules() if isinstance(cm, nn.Linear)]
            if part == "action":
                rules.append((rf"^{re.escape(full_a)}\.", "dit_attn"))
                rules.append((rf"^{re.escape(full_mlp)}\.", "dit_mlp"))
                if mlp_lin:
                    mlp_out.append(mlp_lin[-1])
            else:
                rules.append((rf"^{re.escape(full_a)}\.", "llm"))
                rules.append((rf"^{re.escape(full_mlp)}\.", "llm"))
        for p in vis:
            rules.append((rf"^{re.escape(p)}\.", "vision"))
        rules.append((r".*", "float"))
        return cls(name, rules, attn, mlp_out)

    @classmethod
    def for_model(cls, model: nn.Module) -> "ArchSpec":
        """Built-in spec when the model is one of the known VLAs, else the generic one."""
        try:
            return cls.builtin(model)
        except ValueError:
            return cls.generic(model)


def _attention_child(m: nn.Module):
    for c, cm in m.named_children():
        for kids in _ATTN_CHILDREN:
            sub = dict(cm.named_modules())
            if all(isinstance(sub.get(k), nn.Linear) for k in kids):
                return c, cm, kids
    return None, None, None


def _attention_spec(name: str, m: nn.Module, q_child: str, o_child: str, part: str) -> AttentionSpec:
    sub = dict(m.named_modules())
    q = sub.get(q_child)
    cfg = getattr(m, "config", None)
    head_dim = getattr(m, "head_dim", None) or getattr(cfg, "head_dim", None)
    heads = getattr(m, "heads", None) or getattr(m, "num_heads", None) or getattr(cfg, "num_attention_heads", None)
    if isinstance(q, nn.Linear):
        if heads is None and head_dim:
            heads = q.out_features // head_dim
        if head_dim is None and heads:
            head_dim = q.out_features // heads
    return AttentionSpec(
        name,
        f"{name}.{q_child}",
        f"{name}.{o_child}",
        int(heads) if heads else None,
        int(head_dim) if head_dim else None,
        part,
        isinstance(getattr(m, "q_norm", None), nn.Module),
    )

"""A model's quantization layout as a table: every linear with its role and precision (and,
on request, every other module that holds weights), as `quantvla layout` prints it.

The plan is either what a named layout would do (``layout.plan_model``) or what an artifact
recorded in its quantization.json (``recorded_entries``); the table reads the same for both.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from . import layout as L
from .config import SCHEMES


def recorded_entries(model: nn.Module, recorded: list[dict[str, Any]]) -> list[L.LayoutEntry]:
    """The layout an artifact recorded (quantization.json's "layout" list), as LayoutEntry rows
    with the shapes of ``model``'s linears."""
    out = []
    for e in recorded:
        linear = model.get_submodule(e["name"])
        out.append(L.LayoutEntry(e["name"], e["role"], e["integer"], linear.in_features, linear.out_features))
    return out


def layout_table(
    model: nn.Module, arch: str, layout: str, scheme: str, entries: list[L.LayoutEntry], other_modules: bool = False
) -> dict[str, Any]:
    """{"arch", "layout", "scheme", "modules": one row per linear (name, role, precision,
    [in, out]), "other_modules": with ``other_modules``, every other module holding weights
    (norms, embeddings, per-embodiment MLPs; all float), else []}."""
    w, a = SCHEMES[scheme]
    prec = f"w{w}a{a or 16}"
    rows = [
        {
            "name": e.name,
            "role": e.role,
            "precision": prec if e.integer else "float",
            "shape": [e.in_features, e.out_features],
        }
        for e in entries
    ]
    others = []
    if other_modules:
        linear = {e.name for e in entries}
        others = [
            {"name": n, "role": type(m).__name__, "precision": "float", "shape": None}
            for n, m in model.named_modules()
            if n not in linear and any(True for _ in m.parameters(recurse=False))
        ]
    return {"arch": arch, "layout": layout, "scheme": scheme, "modules": rows, "other_modules": others}


def render_layout_table(table: dict[str, Any]) -> str:
    """The table as text: a header, one line per module, and the integer share of the linears."""
    rows, others, lay = table["modules"], table["other_modules"], table["layout"]
    width = max(len(r["name"]) for r in rows) if rows else 10
    lines = [
        f"layout {lay} ({', '.join(L.LAYOUTS[lay]) or 'nothing'} integer), scheme {table['scheme']}, "
        f"arch {table['arch']}",
        f"{'module':<{width}}  {'role':<9} {'precision':<9} in x out",
    ]
    for r in rows:
        lines.append(f"{r['name']:<{width}}  {r['role']:<9} {r['precision']:<9} {r['shape'][0]} x {r['shape'][1]}")
    n_int = sum(r["precision"] != "float" for r in rows)
    params_int = sum(r["shape"][0] * r["shape"][1] for r in rows if r["precision"] != "float")
    params_all = sum(r["shape"][0] * r["shape"][1] for r in rows)
    for r in others:
        lines.append(f"{r['name']:<{width}}  {r['role']:<9} float")
    lines.append("")
    lines.append(f"{n_int} of {len(rows)} linears integer ({params_int / max(params_all, 1):.1%} of linear weights)")
    return "\n".join(lines)

"""`quantvla layout`'s pieces as a library: the model structure, the layout table and the
memory estimate from the layout plan (checked against the quantizer's own memory report)."""

from __future__ import annotations

import pytest
from torch import nn

from quantvla_core import Policy
from quantvla_core.memory_accounting import format_estimate, memory_estimate, model_summary
from quantvla_core.models import build_model
from quantvla_core.policy import model_structure
from quantvla_core.quant import layout as L
from quantvla_core.quant.layout_table import layout_table, recorded_entries, render_layout_table
from quantvla_core.quant.quantize import QuantConfig, quantize
from quantvla_core.quant.report import memory_report

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8"])
def test_memory_estimate_equals_the_memory_report_of_the_same_quantization(scheme):
    """The estimate from shapes (meta device) and the report of a real quantization without
    stored transforms count the same bytes, whole model and quantized part."""
    policy = Policy.load("tiny", dtype="fp32")
    qc = QuantConfig(scheme=scheme, layout="quantvla", transforms=(), atm=False, ohb=False, calib_samples=2)
    result = quantize(policy, qc, "synthetic", progress=False)
    rep = memory_report(result.policy.model, policy.model)
    model, arch, meta = model_structure("tiny")
    assert meta is None and next(model.parameters()).is_meta
    entries = L.plan_model(model, arch, "quantvla")
    est = memory_estimate(model, entries, scheme)
    assert sum(r["fp16"] for r in est.values()) == rep["model_fp16_bytes"]
    assert sum(r["quantized"] for r in est.values()) == rep["model_bytes"]
    assert est["vision"]["quantized"] == est["vision"]["fp16"]  # no integer layer there
    assert all(isinstance(model.get_submodule(e.name), nn.Linear) for e in entries)  # model left as it was
    text = format_estimate(est, scheme).splitlines()
    assert text[1].split() == ["component", "FP16", scheme, "ratio"] and text[-1].startswith("total")


def test_layout_table_of_an_artifact_reads_its_recorded_layout(tmp_path):
    policy = Policy.load("tiny", dtype="fp32")
    qc = QuantConfig(scheme="w8a8", layout="llm", atm=False, ohb=False, calib_samples=2)
    quantize(policy, qc, "synthetic", progress=False).save(tmp_path / "art")
    model, arch, meta = model_structure(tmp_path / "art")
    assert meta["scheme"] == "w8a8"
    entries = recorded_entries(model, meta["layout"])
    planned = L.plan_model(model, arch, "llm")
    assert [(e.name, e.integer, e.in_features) for e in entries] == [
        (e.name, e.integer, e.in_features) for e in planned
    ]
    table = layout_table(model, arch, "llm", "w8a8", entries, other_modules=True)
    prec = {r["name"]: r["precision"] for r in table["modules"]}
    assert {p for n, p in prec.items() if "language_model" in n and n.endswith("q_proj")} == {"w8a8"}
    assert {p for n, p in prec.items() if "gemma_expert" in n} == {"float"}
    assert table["other_modules"] and all(r["precision"] == "float" for r in table["other_modules"])
    text = render_layout_table(table)
    n_int = sum(e.integer for e in entries)
    assert f"{n_int} of {len(entries)} linears integer" in text
    assert text.splitlines()[0].startswith("layout llm (llm integer), scheme w8a8")


def test_model_structure_refuses_what_it_cannot_read_and_summary_counts_a_preset():
    with pytest.raises(ValueError, match="neither 'default'.*a preset"):
        model_structure("no-such-model")
    s = model_summary("tiny")
    params = sum(p.numel() for p in build_model(Policy.load("tiny").config, device="meta").parameters())
    assert s["total_params"] == params and s["total_bytes"] == 4 * params  # fp32, random init
    assert s["scheme"] == "fp32 (random init)"

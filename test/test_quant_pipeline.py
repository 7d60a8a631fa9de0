"""End to end on the `tiny` reference model: backends, quantize(), artifacts, calibration sources, CLI."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from quantvla_core import Observation, Policy
from quantvla_core.checkpoint import CheckpointError
from quantvla_core.quant.artifact import load_quantized
from quantvla_core.quant.calibration import load_observations
from quantvla_core.quant.qlinear import QuantLinear
from quantvla_core.quant.quantize import QuantConfig, quantize
from quantvla_core.quant.transforms import build_transform

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _obs(seed=0, cameras=1):
    rng = np.random.default_rng(seed)
    return Observation(
        images=[rng.integers(0, 255, (40, 52, 3), dtype=np.uint8) for _ in range(cameras)],
        instruction="pick up the cup",
        state=rng.normal(size=4).astype(np.float32),
    )


# ---- backends ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "w_bits,a_bits,group,k", [(8, 8, None, 128), (4, 8, 128, 256), (4, 8, None, 96), (4, 4, 128, 256), (4, 4, None, 64)]
)
@pytest.mark.parametrize("with_transform", [False, True])
def test_cpu_backend_equals_reference_on_integer_math(w_bits, a_bits, group, k, with_transform):
    import quantvla_kernels as qk

    torch.manual_seed(k + w_bits + a_bits)
    lin = nn.Linear(k, 40)
    x = torch.randn(20, k) * (torch.rand(k) * 5 + 0.1)
    t = build_transform(("smooth", "permute", "rotate"), [lin.weight], x.abs().amax(0)) if with_transform else None
    ql = QuantLinear.from_linear(lin, w_bits=w_bits, a_bits=a_bits, group_size=group, transform=t)
    # the kernel's activation codes are the reference quantizer's codes
    q_ref, s_ref = ql.quantize_input(x, torch.float32)
    if with_transform and a_bits == 4 and ((k % 128) // 2) % ql.rotation_block:
        # packing groups would split a rotation block: QuantLinear rotates before the kernel
        q_k, s_k = qk.quantize_per_token(ql.input_transform().apply(x), bits=4, backend="cpu")
    else:
        q_k, s_k = qk.quantize_per_token(
            x, bits=a_bits, inv_smooth=ql.inv_smooth, perm=ql.perm, rotation=ql.rotation, backend="cpu"
        )
    if a_bits == 4:
        q_k = qk.unpack_int4(q_k)
    assert torch.equal(q_k, q_ref)
    torch.testing.assert_close(s_k, s_ref, rtol=1e-6, atol=0)
    # integer GEMM + fp32 epilogue == float64 oracle up to fp32 rounding
    ql.backend = "cpu"
    y_cpu = ql(x)
    y_ref = ql.forward_reference(x)
    torch.testing.assert_close(y_cpu.double(), y_ref, rtol=1e-5, atol=1e-5 * float(y_ref.abs().max()))
    # "auto" follows the kernels' dispatch, including their backend_scope
    ql.backend = None
    with qk.backend_scope("reference"):
        y_scoped = ql(x)
    torch.testing.assert_close(y_scoped.double(), y_ref, rtol=1e-5, atol=1e-5 * float(y_ref.abs().max()))


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="triton backend needs CUDA or TRITON_INTERPRET=1",
)
def test_triton_backend_matches_reference():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(5)
    lin = nn.Linear(256, 64)
    x = torch.randn(8, 256)
    t = build_transform(("smooth", "rotate"), [lin.weight], x.abs().amax(0))
    for w_bits, a_bits in ((8, 8), (4, 8)):
        ql = QuantLinear.from_linear(
            lin, w_bits=w_bits, a_bits=a_bits, group_size=128 if w_bits == 4 else None, transform=t
        ).to(dev)
        y_ref = ql.forward_reference(x.to(dev))
        ql.backend = "triton"
        y = ql(x.to(dev))
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4 * float(y_ref.abs().max()))


# ---- quantize() + artifact ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_policy():
    return Policy.load("tiny", dtype="fp32")


@pytest.fixture(scope="module")
def w4a8_artifact(tiny_policy, tmp_path_factory):
    qc = QuantConfig(scheme="w4a8", calib_samples=6, batch_size=4, transforms=("smooth", "rotate"))
    result = quantize(tiny_policy, qc, "synthetic", progress=False)
    out = tmp_path_factory.mktemp("art") / "tiny-w4a8"
    result.save(out)
    return result, out


def test_quantize_reports_memory_fidelity_and_factors(w4a8_artifact, tiny_policy):
    result, _ = w4a8_artifact
    rep = result.report
    n_int = sum(isinstance(m, QuantLinear) for m in result.model.modules())
    assert n_int == rep["memory"]["quantized_layers"] == sum(e["integer"] for e in result.meta["layout"]) > 0
    # layout: backbone all linears + expert MLPs integer, expert attention projections float
    for name, m in result.model.named_modules():
        if name.endswith(("self_attn.q_proj", "self_attn.o_proj")) and "gemma_expert" in name:
            assert isinstance(m, nn.Linear)
        if name.endswith("mlp.down_proj") or ("language_model" in name and name.endswith("self_attn.k_proj")):
            assert isinstance(m, QuantLinear) and m.w_bits == 4 and m.a_bits == 8
    assert rep["memory"]["quantized_components_ratio"] < 0.32
    assert rep["memory"]["model_bytes"] < rep["memory"]["model_fp16_bytes"]
    assert rep["fidelity"]["cosine_mean"] > 0.99 and rep["fidelity"]["samples"] >= 1
    assert set(rep["layer_errors"]) == {e["name"] for e in result.meta["layout"] if e["integer"]}
    assert all(0 <= v < 0.5 for v in rep["layer_errors"].values())
    alphas = [a for v in result.meta["alpha"].values() for a in v]
    assert len(alphas) == 2 * 4 and all(0.7 <= a <= 1.4 for a in alphas)  # 2 expert layers x 4 heads
    assert len(result.meta["beta"]) == 2 and all(0.74 <= b <= 1.35 for b in result.meta["beta"].values())
    # the teacher is untouched
    assert not any(isinstance(m, QuantLinear) for m in tiny_policy.model.modules())


def test_artifact_round_trip_through_policy_load(w4a8_artifact):
    result, out = w4a8_artifact
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "quantization.json",
        "report.json",
        "report.png",
        "manifest.json",
    } <= names
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == names - {"manifest.json"}
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["alpha"] == result.meta["alpha"] and meta["beta"] == result.meta["beta"]
    loaded = Policy.load(out, dtype="fp32")
    assert loaded.scheme == "w4a8"
    with pytest.raises(ValueError, match="already quantized"):
        quantize(loaded, QuantConfig(), "synthetic", progress=False)
    obs = _obs(1)
    a_mem = result.policy.predict(obs, seed=3).actions
    a_disk = loaded.predict(obs, seed=3).actions
    np.testing.assert_array_equal(a_disk, a_mem)
    sd_mem, sd_disk = result.model.state_dict(), loaded.model.state_dict()
    assert all(torch.equal(sd_mem[k], sd_disk[k]) for k in sd_mem)


def test_tampered_or_truncated_artifact_is_refused_clearly(w4a8_artifact, tmp_path):
    from quantvla_core.checkpoint import write_manifest
    from quantvla_core.models import build_model

    _, out = w4a8_artifact
    cfg = Policy.load(out).config
    # one flipped byte in the weights
    bad = tmp_path / "flipped"
    shutil.copytree(out, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        Policy.load(bad)
    # truncated weights, manifest re-written to match (so the safetensors reader must catch it)
    trunc = tmp_path / "truncated"
    shutil.copytree(out, trunc)
    raw = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(raw[: len(raw) // 3])
    write_manifest(trunc)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_quantized(build_model(cfg, seed=None), trunc)
    # quantization.json naming a module the model does not have
    wrong = tmp_path / "wrong"
    shutil.copytree(out, wrong)
    meta = json.loads((wrong / "quantization.json").read_text())
    spec = next(iter(meta["modules"].values()))
    meta["modules"]["no.such.layer"] = spec
    (wrong / "quantization.json").write_text(json.dumps(meta))
    write_manifest(wrong)
    with pytest.raises(CheckpointError, match="no.such.layer"):
        load_quantized(build_model(cfg, seed=None), wrong)
    # missing file listed in the manifest
    gone = tmp_path / "gone"
    shutil.copytree(out, gone)
    (gone / "quantization.json").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_quantized(build_model(cfg, seed=None), gone)


def test_quant_config_rejects_bad_values_clearly():
    with pytest.raises(ValueError, match="accepted: w8a8"):
        QuantConfig(scheme="w3a8")
    with pytest.raises(ValueError, match="accepted"):
        QuantConfig(layout="backbone")
    with pytest.raises(ValueError, match="accepted: smooth"):
        QuantConfig(transforms=("magic",))
    qc = QuantConfig(scheme="w8a8", transforms=("smooth", "rotate"), atm=False)
    assert QuantConfig.from_dict(json.loads(json.dumps(qc.to_dict()))) == qc


def test_weight_only_and_static_schemes_run(tiny_policy):
    for qc in (
        QuantConfig(scheme="w8a16", atm=False, ohb=False, calib_samples=3),
        QuantConfig(scheme="w8a8", activation="static", atm=False, ohb=False, calib_samples=3),
    ):
        r = quantize(tiny_policy, qc, "synthetic", progress=False)
        assert r.report["fidelity"]["cosine_mean"] > 0.99, qc.scheme
        ql = next(m for m in r.model.modules() if isinstance(m, QuantLinear))
        assert (ql.a_bits is None) == (qc.scheme == "w8a16")
        assert (ql.act_scale is not None) == (qc.activation == "static")


# ---- calibration sources -----------------------------------------------------------------------
HEADER = "builtin_interfaces/Time stamp\nstring frame_id\n"
TIME = "int32 sec\nuint32 nanosec\n"
SEP = "=" * 80 + "\n"
IMAGE_DEF = (
    "std_msgs/Header header\nuint32 height\nuint32 width\nstring encoding\nuint8 is_bigendian\n"
    "uint32 step\nuint8[] data\n"
    + SEP
    + "MSG: std_msgs/Header\n"
    + HEADER
    + SEP
    + "MSG: builtin_interfaces/Time\n"
    + TIME
)
JOINT_DEF = (
    "std_msgs/Header header\nstring[] name\nfloat64[] position\nfloat64[] velocity\nfloat64[] effort\n"
    + SEP
    + "MSG: std_msgs/Header\n"
    + HEADER
    + SEP
    + "MSG: builtin_interfaces/Time\n"
    + TIME
)


def _write_bag(path, frames=5):
    from mcap_ros2.writer import Writer

    rng = np.random.default_rng(0)
    images = []
    with open(path, "wb") as f:
        w = Writer(f)
        s_img = w.register_msgdef("sensor_msgs/msg/Image", IMAGE_DEF)
        s_txt = w.register_msgdef("std_msgs/msg/String", "string data\n")
        s_js = w.register_msgdef("sensor_msgs/msg/JointState", JOINT_DEF)
        t0 = 1_700_000_000_000_000_000
        hdr = lambda t: {"stamp": {"sec": t // 10**9, "nanosec": t % 10**9}, "frame_id": "cam"}  # noqa: E731
        # a frame before any instruction/state must be skipped
        img0 = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        w.write_message(
            "/camera/image_raw",
            s_img,
            {
                "header": hdr(t0),
                "height": 24,
                "width": 32,
                "encoding": "rgb8",
                "is_bigendian": 0,
                "step": 96,
                "data": img0.tobytes(),
            },
            t0,
        )
        w.write_message("/instruction", s_txt, {"data": "open the drawer"}, t0 + 1)
        for i in range(frames):
            t = t0 + (i + 1) * 100_000_000
            w.write_message(
                "/joint_states",
                s_js,
                {
                    "header": hdr(t),
                    "name": ["j0", "j1", "j2"],
                    "position": [0.1 * i, -0.2, 0.3],
                    "velocity": [],
                    "effort": [],
                },
                t,
            )
            img = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
            bgr = np.ascontiguousarray(img[..., ::-1])
            w.write_message(
                "/camera/image_raw",
                s_img,
                {
                    "header": hdr(t + 1),
                    "height": 24,
                    "width": 32,
                    "encoding": "bgr8",
                    "is_bigendian": 0,
                    "step": 96,
                    "data": bgr.tobytes(),
                },
                t + 1,
            )
            images.append(img)
        w.finish()
    return images


def test_mcap_recording_calibrates(tmp_path, tiny_policy):
    bag = tmp_path / "robot.mcap"
    images = _write_bag(bag, frames=5)
    obs = load_observations(bag, tiny_policy.config)
    assert len(obs) == 5
    for i, o in enumerate(obs):
        np.testing.assert_array_equal(o.images[0], images[i])  # bgr8 converted to RGB
        assert o.instruction == "open the drawer"
        np.testing.assert_allclose(o.state, [0.1 * i, -0.2, 0.3, 0.0], atol=1e-6)  # padded to state_dim
    r = quantize(tiny_policy, QuantConfig(scheme="w8a8", calib_samples=4, heldout_fraction=0.2), bag, progress=False)
    assert r.meta["calibration"]["samples"] == 4 and r.meta["calibration"]["heldout"] == 1
    assert r.report["fidelity"]["cosine_mean"] > 0.99
    quick = quantize(
        tiny_policy,
        QuantConfig(scheme="w4a8", calib_samples=2, atm=False, ohb=False),
        bag,
        progress=False,
        report=False,
    )
    quick.save(tmp_path / "quick")  # no report: the artifact still loads
    assert not (tmp_path / "quick" / "report.json").exists()
    assert Policy.load(tmp_path / "quick").scheme == "w4a8"
    # a bag without a joint-state topic is refused with what was found and what is needed
    from mcap_ros2.writer import Writer

    lone = tmp_path / "lone.mcap"
    with open(lone, "wb") as f:
        w = Writer(f)
        w.write_message("/instruction", w.register_msgdef("std_msgs/msg/String", "string data\n"), {"data": "x"}, 1)
        w.finish()
    with pytest.raises(ValueError, match="JointState"):
        load_observations(lone, tiny_policy.config)


def test_folder_calibration_source(tmp_path, tiny_policy):
    import cv2

    rng = np.random.default_rng(1)
    lines = []
    for i in range(3):
        img = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / f"f{i}.png"), img[..., ::-1])
        lines.append(json.dumps({"images": [f"f{i}.png"], "instruction": f"task {i}", "state": [i, 0, 0, 1]}))
    (tmp_path / "observations.jsonl").write_text("\n".join(lines) + "\n")
    obs = load_observations(tmp_path, tiny_policy.config)
    assert [o.instruction for o in obs] == ["task 0", "task 1", "task 2"]
    assert obs[2].images[0].shape == (30, 40, 3) and obs[2].state[0] == 2
    (tmp_path / "observations.jsonl").write_text(
        lines[0] + "\n" + '{"images": ["nope.png"], "instruction": "x", "state": [0, 0, 0, 0]}\n'
    )
    with pytest.raises(ValueError, match=r"observations.jsonl:2: cannot read image"):
        load_observations(tmp_path, tiny_policy.config)
    with pytest.raises(ValueError, match="accepted: synthetic"):
        load_observations(tmp_path / "missing", tiny_policy.config)


# ---- CLI ---------------------------------------------------------------------------------------------
def test_layout_cli_lists_every_linear_with_precision(capsys):
    from quantvla_core.cli import main
    from quantvla_core.config import preset
    from quantvla_core.models import build_model

    assert main(["layout", "tiny-groot", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["modules"]
    model = build_model(preset("tiny-groot"), device="meta")
    assert [r["name"] for r in rows] == [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    prec = {r["name"]: r["precision"] for r in rows}
    assert prec["action_head.model.transformer_blocks.0.ff.net.2"] == "w4a8"
    assert prec["action_head.model.transformer_blocks.0.attn1.to_q"] == "float"
    assert prec["backbone.eagle_model.language_model.model.layers.0.mlp.up_proj"] == "w4a8"
    assert prec["action_head.model.transformer_blocks.0.norm1.linear"] == "float"
    assert main(["layout", "pi05-3b", "--layout", "dit-all", "--scheme", "w8a8"]) == 0
    text = capsys.readouterr().out
    lines = {ln.split()[0]: ln.split()[1:3] for ln in text.splitlines() if ln.startswith("paligemma_with_expert")}
    assert lines["paligemma_with_expert.gemma_expert.model.layers.17.self_attn.q_proj"] == ["dit_attn", "w8a8"]
    assert lines["paligemma_with_expert.paligemma.model.language_model.layers.0.mlp.up_proj"] == ["llm", "float"]
    assert lines["paligemma_with_expert.gemma_expert.model.layers.0.input_layernorm.dense"] == ["float", "float"]


def test_quantize_cli_writes_artifact_and_report(tmp_path, capsys):
    from quantvla_core.cli import main

    out = tmp_path / "art"
    assert (
        main(
            [
                "quantize",
                "tiny",
                "--scheme",
                "w8a8",
                "--samples",
                "3",
                "--no-atm",
                "--no-ohb",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "quantized components" in text and "action fidelity" in text
    assert Policy.load(out).scheme == "w8a8"
    assert main(["report", str(out)]) == 0
    assert "whole model" in capsys.readouterr().out
    assert (
        main(
            [
                "quantize",
                "tiny",
                "--scheme",
                "w8a8",
                "--calib",
                str(tmp_path / "nothing"),
                "--out",
                str(tmp_path / "x"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "accepted: synthetic" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_ablate_cli_prints_both_tables_and_json(tmp_path, capsys):
    from quantvla_core.cli import main

    out = tmp_path / "ablate.json"
    assert (
        main(
            [
                "ablate",
                "tiny",
                "--schemes",
                "w8a8",
                "--layouts",
                "llm,dit-mlp",
                "--variants",
                "none,atm+ohb",
                "--samples",
                "3",
                "--out",
                str(out),
                "--no-progress",
                "--save-dir",
                str(tmp_path / "arts"),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "Table 1" in text and "Table 2" in text and "quantvla eval --sim mt10" in text
    assert Policy.load(tmp_path / "arts" / "w8a8_llm-dit-mlp_atm-ohb").quant_meta["config"]["atm"] is True
    rows = json.loads(out.read_text())["rows"]
    got = {(r["scheme"], r["layout"], r["variant"]) for r in rows}
    assert got == {
        ("w8a8", "llm", "none"),
        ("w8a8", "dit-mlp", "none"),
        ("w8a8", "llm+dit-mlp", "none"),
        ("w8a8", "llm+dit-mlp", "atm+ohb"),
    }
    assert all(0.9 < r["cosine_mean"] <= 1.0 + 1e-9 and r["memory_ratio"] < 0.6 for r in rows)
    assert main(["ablate", "tiny", "--layouts", "llm,everything", "--no-progress"]) == 2
    assert "accepted" in capsys.readouterr().err


def test_smolvla_cross_attention_kv_are_not_folded_into_the_norm():
    """SmolVLA's odd expert layers re-project cached keys with k/v_proj: those must not share
    the input norm's smoothing (different width and input), yet q/k/v of self layers do."""
    from conftest import tiny_smolvla_config
    from quantvla_core.models import build_model

    cfg = tiny_smolvla_config()
    policy = Policy(build_model(cfg), cfg, name="tiny-smolvla", dtype="fp32")
    # a fixed strength: the per-group search may choose no smoothing for a group
    r = quantize(
        policy,
        QuantConfig(scheme="w8a8", layout="llm+dit-all", calib_samples=4, smooth_search=False),
        "synthetic",
        progress=False,
    )
    mods = dict(r.model.named_modules())
    cross_k = mods["vlm_with_expert.lm_expert.layers.1.self_attn.k_proj"]
    self_k = mods["vlm_with_expert.lm_expert.layers.0.self_attn.k_proj"]
    assert isinstance(cross_k, QuantLinear) and cross_k.inv_smooth is not None  # smoothing in the op
    assert isinstance(self_k, QuantLinear) and self_k.inv_smooth is None  # folded into input_layernorm
    assert r.report["fidelity"]["cosine_mean"] > 0.999
    assert len(r.meta["alpha"]) == 2


def test_real_checkpoint_keeps_its_io_through_quantization(tmp_path):
    """A LeRobot pi0.5 directory (written in the real key layout by the loader tests' helpers)
    quantizes into an artifact that keeps its tokenizer, prompt format and normalisation."""
    import test_loaders as loaders_tests  # the loader tests write the real key layout
    from quantvla_core.loaders import ExternalIO

    sp = tmp_path / "sp"
    sp.mkdir()
    import sentencepiece as spm

    (sp / "corpus.txt").write_text(loaders_tests.CORPUS + "".join(f"{i} " for i in range(300)) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(sp / "corpus.txt"),
        model_prefix=str(sp / "tok"),
        vocab_size=loaders_tests.VOCAB,
        model_type="bpe",
        character_coverage=1.0,
        pad_id=loaders_tests.PAD_ID,
        eos_id=loaders_tests.EOS_ID,
        bos_id=loaders_tests.BOS_ID,
        unk_id=loaders_tests.UNK_ID,
        user_defined_symbols=["\n"],
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        hard_vocab_limit=False,
        split_digits=True,
        minloglevel=2,
    )
    ckpt = loaders_tests.write_lerobot(
        tmp_path / "ckpt", "pi05", loaders_tests.planted_state("pi05"), tokenizer=sp / "tok.model"
    )
    teacher = Policy.load(ckpt)
    assert isinstance(teacher.io, ExternalIO) and teacher.state_dim == loaders_tests.ROBOT_STATE
    r = quantize(teacher, QuantConfig(scheme="w8a8", calib_samples=3), "synthetic", progress=False)
    assert isinstance(r.policy.io, ExternalIO)
    out = tmp_path / "art"
    r.save(out)
    (ckpt / "tokenizer.model").unlink()  # the artifact carries its own copy
    back = Policy.load(out)
    assert isinstance(back.io, ExternalIO) and back.scheme == "w8a8" and back.io.format == "lerobot/pi05"
    obs = Observation(loaders_tests.frames(1), "push the button", np.array([0.2, -1.0, 1.0]))
    a_mem, a_disk = r.policy.predict(obs, seed=1).actions, back.predict(obs, seed=1).actions
    np.testing.assert_array_equal(a_disk, a_mem)
    assert a_disk.shape == (loaders_tests.HORIZON, loaders_tests.ROBOT_ACTION)
    a_fp = teacher.predict(obs, seed=1).actions
    assert float(np.abs(a_disk - a_fp).max()) < 0.05 * float(np.abs(a_fp).max()) + 1e-3


def test_smooth_strength_sweep_keeps_the_best_held_out_fidelity(tmp_path, capsys):
    """'auto' quantizes once per strength, keeps the highest held-out cosine, records the sweep,
    and equals a plain quantization at the kept strength."""
    from quantvla_core.cli import main
    from quantvla_core.quant.quantize import sweep_smooth_strength

    policy = Policy.load("tiny")
    qc = QuantConfig(scheme="w4a4", calib_samples=4, atm=False, ohb=False)
    best, rows = sweep_smooth_strength(policy, qc, "synthetic", grid=(0.2, 0.9), progress=False)
    assert [r["smooth_strength"] for r in rows] == [0.2, 0.9]
    top = max(rows, key=lambda r: (r["cosine_mean"], r["cosine_min"]))
    assert best.meta["config"]["smooth_strength"] == top["smooth_strength"]
    assert best.report["smooth_strength_sweep"] == rows
    again = quantize(
        policy,
        QuantConfig(
            scheme="w4a4",
            calib_samples=4,
            atm=False,
            ohb=False,
            smooth_search=False,
            smooth_strength=top["smooth_strength"],
        ),
        "synthetic",
        progress=False,
    )
    assert again.report["fidelity"]["cosine_mean"] == pytest.approx(top["cosine_mean"], abs=1e-12)
    with pytest.raises(ValueError, match="needs the 'smooth' transform"):
        sweep_smooth_strength(policy, QuantConfig(transforms=("rotate",)), "synthetic", progress=False)
    out = tmp_path / "auto"
    assert (
        main(
            [
                "quantize",
                "tiny",
                "--scheme",
                "w8a8",
                "--samples",
                "3",
                "--no-atm",
                "--no-ohb",
                "--smooth-strength",
                "auto",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "<- kept" in capsys.readouterr().out
    meta = json.loads((out / "quantization.json").read_text())
    assert [r["smooth_strength"] for r in meta["smooth_strength_sweep"]] == [0.15, 0.3, 0.5]
    with pytest.raises(SystemExit):
        main(["quantize", "tiny", "--smooth-strength", "1.5", "--out", str(tmp_path / "y")])
    assert "accepted a number in (0, 1] or 'auto'" in capsys.readouterr().err

"""The committed default policies are the weights docs/default-policy.md describes, byte for byte.

quantvla_core/assets/SHA256SUMS lists every file of both policy directories in `sha256sum`
format (`cd quantvla_core/assets && sha256sum -c SHA256SUMS` checks them without Python). The
history is never rewritten, so every re-commit of the weights stays in every clone for good
(~21 MB each); a changed, added or removed asset file therefore fails here until SHA256SUMS and
the doc are updated on purpose, in the same commit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from quantvla_core.checkpoint import verify_manifest
from quantvla_core.fileio import sha256_file

ASSETS = Path(__file__).resolve().parents[1] / "quantvla_core" / "assets"
SUMS = "SHA256SUMS"
WHAT_TO_DO = (
    "The default weights are re-committed only with a reason (docs/default-policy.md, section "
    "'Changing the committed weights'). If the change was not meant: `git checkout -- "
    "quantvla_core/assets`. If it was: regenerate the checksums with `cd quantvla_core/assets && "
    "sha256sum default_policy/* default_policy_w4a8/* > SHA256SUMS` and update docs/default-policy.md "
    "(what changed, why, the exact commands, the new results), all in the same commit."
)


def read_sums(path: Path) -> dict[str, str]:
    """name -> sha256 from a `sha256sum` output file."""
    sums = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name:
            raise ValueError(f"{path}:{n}: not a sha256sum line ('<64 hex digits>  <file>'): {line!r}")
        sums[name] = digest
    return sums


def asset_problems(assets: Path) -> list[str]:
    """Every difference between the files under `assets` and its SHA256SUMS, one line each."""
    listed = read_sums(assets / SUMS)
    present = {p.relative_to(assets).as_posix(): p for p in sorted(assets.rglob("*")) if p.is_file() and p.name != SUMS}
    problems = []
    for name in sorted(set(listed) | set(present)):
        if name not in present:
            problems.append(f"{name}: listed in {SUMS} but missing")
        elif name not in listed:
            problems.append(f"{name}: a file {SUMS} does not list")
        else:
            actual = sha256_file(present[name])
            if actual != listed[name]:
                problems.append(f"{name}: sha256 {actual[:12]}..., {SUMS} has {listed[name][:12]}...")
    return problems


def test_committed_assets_match_their_checksums():
    problems = asset_problems(ASSETS)
    assert not problems, (
        "quantvla_core/assets differs from its SHA256SUMS:\n  " + "\n  ".join(problems) + "\n" + WHAT_TO_DO
    )


def test_each_policy_manifest_agrees_with_the_checksums():
    """manifest.json (what Policy.load verifies) and SHA256SUMS describe the same bytes."""
    listed = read_sums(ASSETS / SUMS)
    for policy in ("default_policy", "default_policy_w4a8"):
        manifest = verify_manifest(ASSETS / policy)
        for name, digest in manifest["files"].items():
            assert listed[f"{policy}/{name}"] == digest, f"{policy}/{name}"


def test_a_changed_added_or_removed_asset_is_reported(tmp_path):
    """The check itself: one changed byte, a new file and a missing file are each named."""
    assets = tmp_path / "assets"
    shutil.copytree(ASSETS, assets, ignore=lambda d, names: [n for n in names if n == "model.safetensors"])
    kept = read_sums(ASSETS / SUMS)
    (assets / SUMS).write_text("".join(f"{d}  {n}\n" for n, d in kept.items() if not n.endswith("model.safetensors")))
    assert asset_problems(assets) == []
    cfg = assets / "default_policy" / "config.json"
    cfg.write_bytes(cfg.read_bytes().replace(b"mt10", b"mt11", 1))
    (assets / "default_policy" / "model-v2.safetensors").write_bytes(b"\0" * 8)
    (assets / "default_policy_w4a8" / "report.png").unlink()
    problems = asset_problems(assets)
    assert len(problems) == 3
    assert problems[0].startswith("default_policy/config.json: sha256 ")
    assert problems[1] == "default_policy/model-v2.safetensors: a file SHA256SUMS does not list"
    assert problems[2] == "default_policy_w4a8/report.png: listed in SHA256SUMS but missing"

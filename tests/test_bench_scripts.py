"""The bench scripts' own plumbing that runs on any machine (the GPU runs themselves are in bench/README.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def git(*args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, check=True).stdout


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs the repository's git history")
def test_a_variant_is_another_commits_pgolf_imported_before_the_installed_one(tmp_path):
    """bench/variant.sh REV gives REV's stages/ as a package `pgolf` that PYTHONPATH puts ahead of the installed
    checkout, so one device call can time two commits (issue 16's ratios within one call)."""
    env = {**os.environ, "VARIANT_DIR": str(tmp_path)}
    name = subprocess.run(["bash", "bench/variant.sh", "HEAD"], cwd=REPO, env=env, capture_output=True, text=True,
                          check=True).stdout.strip()
    variant = tmp_path / name
    info = json.loads((variant / "variant.json").read_text())
    assert info["commit"] == git("rev-parse", "HEAD").decode().strip() and info["variant"] == name
    assert (variant / "pgolf" / "nn" / "model.py").read_bytes() == git("show", "HEAD:stages/nn/model.py")
    imported = subprocess.run([sys.executable, "-c", "import pgolf.nn.model as m; print(m.__file__)"], cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(variant)}, capture_output=True, text=True, check=True)
    assert Path(imported.stdout.strip()) == variant / "pgolf" / "nn" / "model.py"
    refused = subprocess.run(["bash", "bench/variant.sh", "no-such-rev"], cwd=REPO, env=env, capture_output=True)
    assert refused.returncode != 0


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs the repository's git history")
def test_a_candidate_patch_changes_only_the_variants_stages(tmp_path):
    """bench/variant.sh REV PATCH: a candidate kept as a patch (bench/candidates/) is applied to the variant's
    stages/ alone; its tests and bench lines stay out, and the checkout is untouched."""
    patch = tmp_path / "candidate.patch"
    patch.write_text("""diff --git a/stages/nn/names.py b/stages/nn/names.py
--- a/stages/nn/names.py
+++ b/stages/nn/names.py
@@ -1 +1,2 @@
+# a candidate's change
 """ + git("show", "HEAD:stages/nn/names.py").decode().splitlines()[0] + """
diff --git a/tests/test_model.py b/tests/test_model.py
--- a/tests/test_model.py
+++ b/tests/test_model.py
@@ -1 +1,2 @@
+# a test's change, not the variant's
 """ + git("show", "HEAD:tests/test_model.py").decode().splitlines()[0] + "\n")
    before = git("status", "--porcelain")
    env = {**os.environ, "VARIANT_DIR": str(tmp_path / "variants")}
    name = subprocess.run(["bash", "bench/variant.sh", "HEAD", str(patch)], cwd=REPO, env=env, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert name.endswith("-candidate")
    variant = tmp_path / "variants" / name
    assert (variant / "pgolf" / "nn" / "names.py").read_text().startswith("# a candidate's change\n")
    assert not (variant / "tests").exists() and not (variant / "pgolf" / "tests").exists()
    assert json.loads((variant / "variant.json").read_text())["patch"] == str(patch)
    assert git("status", "--porcelain") == before  # the checkout's own files are as they were

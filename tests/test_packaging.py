"""The wheel a user installs from PyPI / napari hub works and is discovered by napari."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(*args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: build with the setuptools already installed (no network needed).
    _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO))
    return out


def test_wheel_and_sdist_pass_twine_check(dists):
    wheels, sdists = list(dists.glob("*.whl")), list(dists.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    _run(sys.executable, "-m", "twine", "check", "--strict", *map(str, wheels + sdists))
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "napari_feddp/napari.yaml" in names
    assert "napari_feddp/data/CMU-1-Small-Region.svs" in names
    assert "napari_feddp/data/models/feddp-nuclei.safetensors" in names
    assert "napari_feddp/data/models/feddp-nuclei.json" in names
    assert zipfile.ZipFile(wheels[0]).getinfo("napari_feddp/data/models/feddp-nuclei.safetensors").file_size < 10e6
    # MoNuSeg is CC BY-NC-SA: it must never ship in the wheel.
    assert not [n for n in names if "TCGA-" in n or "monuseg" in n.lower()]


def test_installed_wheel_is_discovered_by_napari(dists, tmp_path):
    env_dir = tmp_path / "fresh-venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    fresh_site = Path(
        subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                text=True).strip()
    )
    # Reuse this environment's third-party packages (napari, torch, ...) without
    # re-downloading them; the plugin itself comes only from the wheel.
    (fresh_site / "_feddp_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next(dists.glob("*.whl"))
    _run(str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel))
    script = textwrap.dedent(
        f"""
        import napari_feddp, npe2
        from pathlib import Path
        assert Path(napari_feddp.__file__).is_relative_to({str(fresh_site)!r}), napari_feddp.__file__
        pm = npe2.PluginManager.instance()
        pm.discover()
        manifest = pm.get_manifest("napari-feddp")
        c = manifest.contributions
        assert any("*.svs" in r.filename_patterns for r in c.readers), c.readers
        assert any("labels" in str(w.layer_types) for w in c.writers), c.writers
        assert [s.key for s in c.sample_data] == ["cmu1_small_region"], c.sample_data
        sample = Path(napari_feddp.__file__).parent / "data" / "CMU-1-Small-Region.svs"
        layers = npe2.read([str(sample)], plugin_name="napari-feddp", stack=False)
        assert len(layers) == 1 and len(layers[0][0]) == 3, layers
        print("OK", len(c.readers), len(c.writers), len(c.sample_data))
        """
    )
    result = _run(str(python), "-c", script, cwd=str(tmp_path))
    assert "OK 1 1 1" in result.stdout

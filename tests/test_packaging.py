"""The core stays free of Qt and napari; the manifest resolves; the wheel carries its data."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CORE = ["paintseg", "paintseg.config", "paintseg.model", "paintseg.tiling", "paintseg.io",
        "paintseg.inference", "paintseg.normalize", "paintseg.devices", "paintseg.cli",
        "paintseg.errors", "paintseg.training", "paintseg.postprocess", "paintseg.metrics",
        "paintseg.batch", "paintseg._napari._layers"]


def test_core_imports_without_qt_or_napari():
    code = (
        "import sys, json\n"
        + "".join(f"import {m}\n" for m in CORE)
        + "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('napari', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'qtpy', 'magicgui', 'vispy')]\n"
        "print(json.dumps(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_every_python_name_in_manifest_resolves():
    manifest = yaml.safe_load((ROOT / "napari.yaml").read_text())
    names = [c["python_name"] for c in manifest["contributions"]["commands"]]
    assert names
    for name in names:
        module, attr = name.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), name


def test_npe2_finds_and_validates_the_installed_manifest():
    from npe2 import PluginManifest

    pm = PluginManifest.from_distribution("napari-paintseg")
    assert pm.name == "napari-paintseg"
    proc = subprocess.run([sys.executable, "-m", "npe2", "validate", "napari-paintseg"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "valid" in proc.stdout + proc.stderr


def test_sample_data_functions_return_real_images():
    from paintseg._napari._sample_data import nuclei_2d, nuclei_3d

    (img2, meta2, kind2), = nuclei_2d()
    (img3, meta3, kind3), = nuclei_3d()
    assert img2.shape == (512, 512) and kind2 == "image" and img2.std() > 0
    assert img3.shape == (60, 256, 256) and kind3 == "image"


def test_no_repository_file_over_5mb():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    for name in tracked.stdout.split():
        path = ROOT / name
        if path.is_file() and not path.is_symlink():
            assert path.stat().st_size < 5_000_000, name


@pytest.mark.slow
def test_wheel_contains_manifest_and_sample_data(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
         str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("napari_paintseg-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        manifest = zf.read("paintseg/napari.yaml").decode()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        eps = zf.read(entry_points).decode()
    assert "name: napari-paintseg" in manifest  # the file itself, not a link
    assert {"paintseg/sample_data/nuclei2d.tif", "paintseg/sample_data/nuclei3d.tif",
            "paintseg/sample_data/README.md", "paintseg/models/nuclei.pt"} <= names
    assert "napari-paintseg = paintseg:napari.yaml" in eps
    assert "paintseg = paintseg.cli:main" in eps
    # npe2 can read the manifest as packaged
    from npe2 import PluginManifest

    extracted = tmp_path / "napari.yaml"
    extracted.write_text(manifest)
    assert PluginManifest.from_file(extracted).name == "napari-paintseg"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = readme.split("```bash")
    commands = [b.split("```")[0].strip() for b in blocks[1:]]
    test_cmd = next(c for c in commands if "pytest" in c)
    assert test_cmd in ci.splitlines()
    assert "torch==2.13.0" in test_cmd  # pip never chooses torch by itself
    main_job = next(c for c in commands if "paintseg segment" in c)
    assert "sample_data/" in main_job and "torch==2.13.0" in main_job


def test_the_package_manifest_is_a_copy_of_the_top_level_one():
    """``src/paintseg/napari.yaml`` is a plain file (a symlink becomes a text file in a Windows
    checkout and the plugin fails to load), identical to the top-level manifest a reader sees."""
    package = ROOT / "src" / "paintseg" / "napari.yaml"
    assert not package.is_symlink()
    assert package.read_bytes() == (ROOT / "napari.yaml").read_bytes()


def test_no_symlinks_in_the_repository():
    """A Windows checkout turns a symlink into a text file holding its target: the plugin's
    manifest or sample data would then be missing."""
    listing = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True)
    if listing.returncode != 0:
        pytest.skip("not a git checkout")
    links = [line.split("\t", 1)[1] for line in listing.stdout.splitlines()
             if line.startswith("120000 ")]
    assert links == []
    assert (ROOT / "src" / "paintseg" / "sample_data" / "nuclei2d.tif").is_file()


def test_the_readme_quotes_the_starter_object_size_that_info_prints(capsys):
    """The object size a user relies on comes from the checkpoint: ``paintseg info nuclei``
    prints it and the README quotes the same figure."""
    from paintseg.cli import main

    assert main(["info", "nuclei"]) == 0
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("object diameter: about "))
    size = int(line.split("about ")[1].split(" px")[0])
    assert 20 < size < 60
    readme = (ROOT / "README.md").read_text()
    assert f"(`nuclei`: about {size} px across" in readme


def test_the_readme_synopsis_names_every_option_and_choice():
    """The README's command synopsis is checked against ``cli.build_parser()``: every option
    of every subcommand, and every choice of an option with choices, appears in it."""
    import argparse

    from paintseg.cli import build_parser

    readme = (ROOT / "README.md").read_text()
    synopsis = readme[readme.index("## Command line"):].split("```text")[1].split("```")[0]
    commands = next(a for a in build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) <= {line.split()[1] for line in synopsis.splitlines()
                             if line.startswith("paintseg ")}
    for name, parser in commands.items():
        for action in parser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert option in synopsis, f"paintseg {name} {option}"
            if action.option_strings and action.choices and not isinstance(action.choices, range):
                for choice in action.choices:
                    where = f"paintseg {name} {action.option_strings[0]} {choice}"
                    assert str(choice) in synopsis, where

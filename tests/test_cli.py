"""The paintseg command: real runs on the sample, and one clear message per bad input."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import tifffile

from paintseg.cli import main
from paintseg.config import ModelConfig
from paintseg.inference import segment
from paintseg.io import read_image
from paintseg.model import load_model, new_model, save_model


@pytest.fixture
def model_file(tmp_path):
    return save_model(new_model(ModelConfig(depth=3, base_features=8), seed=0), tmp_path / "m.pt")


def test_segment_2d_and_3d_with_probabilities(tmp_path, model_file, nuclei2d_path, nuclei3d_path,
                                              capsys):
    out = tmp_path / "out"
    rc = main(["segment", str(nuclei2d_path), str(nuclei3d_path), "--model", str(model_file),
               "--out", str(out), "--probabilities"])
    assert rc == 0
    lab2 = tifffile.TiffFile(out / "nuclei2d_labels.tif")
    assert lab2.series[0].shape == (512, 512) and lab2.series[0].dtype == np.uint8
    lab3 = tifffile.imread(out / "nuclei3d_labels.tif")
    assert lab3.shape == (60, 256, 256)
    probs = tifffile.imread(out / "nuclei2d_probabilities.tif")
    assert probs.shape == (2, 512, 512) and probs.dtype == np.float32
    # same result as the library call (GUI and CLI share segment())
    ref = segment(read_image(nuclei2d_path), load_model(model_file))
    np.testing.assert_array_equal(tifffile.imread(out / "nuclei2d_labels.tif"), ref.labels)
    assert sorted(p.name for p in out.iterdir()) == [
        "nuclei2d_labels.tif", "nuclei2d_probabilities.tif",
        "nuclei3d_labels.tif", "nuclei3d_probabilities.tif",
    ]
    err = capsys.readouterr().err
    assert "device cpu" in err and "wrote" in err
    # existing outputs are kept unless --overwrite
    rc = main(["segment", str(nuclei2d_path), "--model", str(model_file), "--out", str(out)])
    assert rc == 0 and "skipped" in capsys.readouterr().err
    # even quiet, a rerun says that it left the old labels (one line, not one per file)
    rc = main(["segment", str(nuclei2d_path), str(nuclei3d_path), "--model", str(model_file),
               "--out", str(out), "--probabilities", "-q"])
    err = capsys.readouterr().err
    assert rc == 0 and "2 of 2 skipped" in err and "--overwrite" in err and err.count("\n") == 1


def test_tiled_cli_matches_untiled_in_exact_mode(tmp_path, model_file, nuclei2d_path):
    main(["segment", str(nuclei2d_path), "--model", str(model_file), "--out", str(tmp_path / "a"),
          "--tile", "auto", "--tile-mode", "exact", "-q"])
    main(["segment", str(nuclei2d_path), "--model", str(model_file), "--out", str(tmp_path / "b"),
          "--tile", "64", "--tile-mode", "exact", "-q"])
    a = tifffile.imread(tmp_path / "a" / "nuclei2d_labels.tif")
    b = tifffile.imread(tmp_path / "b" / "nuclei2d_labels.tif")
    assert (a == b).mean() > 0.9999


def _bad_inputs(tmp, sample):
    warnings.simplefilter("ignore")
    raw = sample.read_bytes()
    files = {}
    files["missing"] = (tmp / "missing.tif", "file not found")
    (tmp / "notatiff.tif").write_text("hello")
    files["not a TIFF"] = (tmp / "notatiff.tif", "not a TIFF file")
    (tmp / "corrupt.tif").write_bytes(raw[:8] + bytes(range(256)) * 40)
    files["corrupt"] = (tmp / "corrupt.tif", "corrupt TIFF")
    (tmp / "truncated.tif").write_bytes(raw[: len(raw) // 2])
    files["truncated"] = (tmp / "truncated.tif", "truncated TIFF")
    tifffile.imwrite(tmp / "empty.tif", np.zeros((0, 8), np.uint8))
    files["empty"] = (tmp / "empty.tif", "empty image")
    a = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    a[3, 3] = np.nan
    tifffile.imwrite(tmp / "nan.tif", a)
    files["NaN"] = (tmp / "nan.tif", "NaN")
    tifffile.imwrite(tmp / "rgb.tif", np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    files["channels"] = (tmp / "rgb.tif", r"3 channel\(s\).*model expects 1")
    return files


def test_each_bad_input_one_message_nothing_written(tmp_path, model_file, nuclei2d_path):
    out = tmp_path / "out"
    for name, (path, message) in _bad_inputs(tmp_path, nuclei2d_path).items():
        proc = subprocess.run(
            [sys.executable, "-m", "paintseg.cli", "segment", str(path), "--model",
             str(model_file), "--out", str(out)],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode != 0, name
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1, (name, proc.stderr)
        assert str(path.name) in errors[0], (name, errors)
        import re

        assert re.search(message, errors[0]), (name, errors[0])
        assert "Traceback" not in proc.stderr
        assert list(out.iterdir()) == [], name


def test_model_errors(tmp_path, nuclei2d_path, nuclei3d_path):
    out = tmp_path / "out"
    m3 = save_model(new_model(ModelConfig(dims=3, depth=1, base_features=2), seed=0),
                    tmp_path / "m3.pt")
    assert main(["segment", str(nuclei2d_path), "--model", str(m3), "--out", str(out), "-q"]) != 0
    assert list(out.iterdir()) == []
    image = str(nuclei2d_path)
    assert main(["segment", image, "--model", image, "--out", str(out), "-q"]) == 2
    missing = str(tmp_path / "no.pt")
    assert main(["segment", image, "--model", missing, "--out", str(out), "-q"]) == 2
    # a 3D model does run on a 3D stack
    assert main(["segment", str(nuclei3d_path), "--model", str(m3), "--out", str(out), "-q",
                 "--tile", "64"]) == 0


def test_unwritable_output(tmp_path, model_file, nuclei2d_path, capsys):
    (tmp_path / "file").write_text("")
    rc = main(["segment", str(nuclei2d_path), "--model", str(model_file), "--out",
               str(tmp_path / "file" / "out")])
    assert rc == 2
    assert "cannot create output folder" in capsys.readouterr().err


def test_batch_goes_on_past_a_bad_file(tmp_path, model_file, nuclei2d_path):
    (tmp_path / "bad.tif").write_text("nope")
    rc = main(["segment", str(tmp_path / "bad.tif"), str(nuclei2d_path), "--model", str(model_file),
               "--out", str(tmp_path / "o"), "-q"])
    assert rc == 1
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["nuclei2d_labels.tif"]


def test_device_choice_errors(tmp_path, model_file, nuclei2d_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc = main(["segment", str(nuclei2d_path), "--model", str(model_file), "--out",
               str(tmp_path), "--device", "cuda"])
    assert rc == 2 and "no CUDA support" in capsys.readouterr().err


def test_info(model_file, capsys):
    assert main(["info", str(model_file)]) == 0
    out = capsys.readouterr().out
    assert "2D U-Net" in out and "parameters" in out
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "device (auto): " in out and "bundled models" in out and "nuclei:" in out
    assert "; U-Nets in " in out


def test_segment_says_and_takes_its_precision(tmp_path, nuclei2d_path, capsys):
    """``--precision``: the run names the type its U-Nets ran in; float32 and bfloat16
    labels of the starter agree on >= 99.9 % of pixels; exact tiling is float32 under auto."""
    from paintseg.devices import cpu_has_bf16_units

    labels = {}
    for precision in ("float32", "bfloat16"):
        out = tmp_path / precision
        assert main(["segment", str(nuclei2d_path), "--model", "nuclei", "--out", str(out),
                     "--device", "cpu", "--precision", precision, "--output", "semantic"]) == 0
        assert f"; U-Nets in {precision}\n" in capsys.readouterr().err
        labels[precision] = tifffile.imread(out / "nuclei2d_labels.tif")
    assert np.mean(labels["float32"] == labels["bfloat16"]) >= 0.999
    assert main(["segment", str(nuclei2d_path), "--model", "nuclei", "--out",
                 str(tmp_path / "auto"), "--device", "cpu"]) == 0
    auto = "bfloat16" if cpu_has_bf16_units() else "float32"
    assert f"; U-Nets in {auto}\n" in capsys.readouterr().err
    assert main(["segment", str(nuclei2d_path), "--model", "nuclei", "--out",
                 str(tmp_path / "exact"), "--device", "cpu", "--tile-mode", "exact"]) == 0
    assert "; U-Nets in float32\n" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["segment", str(nuclei2d_path), "--model", "nuclei", "--out", str(tmp_path),
              "--precision", "half"])
    assert "invalid choice: 'half'" in capsys.readouterr().err


def test_a_closed_output_pipe_ends_quietly(monkeypatch):
    """``paintseg info | head -1``: when what reads the output goes away, the command stops
    without a traceback (here the reading end of a pipe is closed before it writes)."""
    import io
    import os

    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    out = io.TextIOWrapper(io.FileIO(write_fd, "w"), line_buffering=True)
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["info"]) == 2
    out.write("nothing is raised once stdout goes nowhere\n")
    out.close()


def test_new_model_warns(tmp_path, nuclei2d_path, capsys):
    assert main(["segment", str(nuclei2d_path), "--model", "new", "--out", str(tmp_path)]) == 0
    assert "UNTRAINED" in capsys.readouterr().err


def test_bundled_nuclei_model_gives_instances_and_overlay(tmp_path, nuclei2d_path, capsys):
    from paintseg.metrics import instance_scores

    out = tmp_path / "out"
    rc = main(["segment", str(nuclei2d_path), "--model", "nuclei", "--out", str(out), "--overlay"])
    assert rc == 0, capsys.readouterr().err
    labels = tifffile.imread(out / "nuclei2d_labels.tif")
    gt = tifffile.imread(nuclei2d_path.parent / "nuclei2d_instances.tif")
    scores = instance_scores(labels, gt)
    assert scores["n_pred"] > 60  # numbered nuclei, not two classes
    assert scores["f1"][0] > 0.6  # (trained on this image: a smoke test, not an evaluation)
    from PIL import Image

    png = np.asarray(Image.open(out / "nuclei2d_overlay.png"))
    assert png.shape == (512, 512, 3) and (png[..., 0] == 255).any()
    # semantic output on request
    rc = main(["segment", str(nuclei2d_path), "--model", "nuclei", "--out", str(tmp_path / "s"),
               "--output", "semantic", "-q"])
    assert rc == 0
    assert set(np.unique(tifffile.imread(tmp_path / "s" / "nuclei2d_labels.tif"))) <= {0, 2, 3}


def test_unknown_model_name_lists_bundled(tmp_path, nuclei2d_path, capsys):
    assert main(["segment", str(nuclei2d_path), "--model", "mitochondria",
                 "--out", str(tmp_path)]) == 2
    assert "bundled models: nuclei" in capsys.readouterr().err

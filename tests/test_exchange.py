"""BioImage.IO model packages: export, bioimageio's own test, import (issue 40)."""

from __future__ import annotations

import io
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

pytest.importorskip("bioimageio.core")

from paintseg.cli import main  # noqa: E402
from paintseg.config import TileConfig  # noqa: E402
from paintseg.errors import CheckpointError, InputError  # noqa: E402
from paintseg.exchange import (  # noqa: E402
    bundled_sample,
    check_package,
    export_package,
    is_package,
    load_package,
)
from paintseg.inference import segment  # noqa: E402
from paintseg.model import load_model, save_model  # noqa: E402

SAMPLE2D = bundled_sample(2)


def _sample() -> np.ndarray:
    return tifffile.imread(SAMPLE2D)[None]


@pytest.fixture(scope="module")
def starter_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The starter exported (and tested by bioimageio.core) with the network cut off: any
    attempt to reach it fails the export."""
    import socket

    tried: list[str] = []

    def refuse(*args, **kwargs):
        tried.append(repr(args[:2]))
        raise OSError("no network in this test")

    out = tmp_path_factory.mktemp("pkg") / "nuclei-starter.zip"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "getaddrinfo", refuse)
        mp.setattr(socket.socket, "connect", refuse)
        export_package(load_model("nuclei"), out, sample=_sample(),
                       sample_name=SAMPLE2D.name, authors=["A. Biologist"],
                       cite=["10.1038/s41592-020-01018-x"])
        load_package(out)
    assert not tried, tried
    return out


def test_the_starter_exports_a_package_that_passes_bioimageio_test(starter_package: Path):
    assert is_package(starter_package)
    summary = check_package(starter_package)
    assert summary.status == "passed", summary.format()
    names = set(zipfile.ZipFile(starter_package).namelist())
    assert {"weights_torchscript.pt", "weights_state_dict.pt", "weights.onnx",
            "paintseg_network.py", "test_input.npy", "test_output.npy", "cover.png",
            "README.md"} <= names
    # bioimageio's test ran each of the three weight formats on the test input
    tested = " ".join(d.name for d in summary.details if d.status == "passed")
    for fmt in ("pytorch_state_dict", "torchscript", "onnx"):
        assert f"Reproduce test outputs from test inputs ({fmt})" in tested, fmt
    rdf = zipfile.ZipFile(starter_package).read("rdf.yaml").decode()
    for text in ("scale_range", "min_percentile: 1.0", "max_percentile: 99.8", "halo: 104",
                 "min: 216", "step: 8", "ExportedUNet", "A. Biologist",
                 "10.1038/s41592-020-01018-x", "background", "boundary"):
        assert text in rdf, text


def test_the_torchscript_reproduces_paintsegs_probabilities(starter_package: Path):
    zf = zipfile.ZipFile(starter_package)
    x = np.load(io.BytesIO(zf.read("test_input.npy")))  # (1, 1, y, x), raw intensities
    scripted = torch.jit.load(io.BytesIO(zf.read("weights_torchscript.pt")))
    lo, hi = np.percentile(x, (1.0, 99.8))
    with torch.no_grad():
        theirs = scripted(torch.from_numpy((x - lo) / (hi - lo + 1e-6)).float()).numpy()[0]
    ours = segment(x[0, 0], load_model("nuclei"), axes="YX", device="cpu",
                   tiles=TileConfig(precision="float32"),  # TorchScript runs in float32
                   return_probabilities=True).probabilities
    assert theirs.shape == ours.shape
    assert np.abs(theirs - ours).max() < 1e-4


def test_a_package_round_trips_to_the_same_labels_and_model(starter_package: Path,
                                                            tmp_path: Path):
    back = load_package(starter_package)
    orig = load_model("nuclei")
    assert back.class_names == orig.class_names and back.config == orig.config
    assert back.provenance["bioimageio"]["authors"] == ["A. Biologist"]
    assert "licence: CC-BY-4.0" in back.describe()
    for d, m in (("pkg", str(starter_package)), ("pt", "nuclei")):
        assert main(["segment", str(SAMPLE2D), "--model", m, "--out", str(tmp_path / d),
                     "-q"]) == 0
    a = tifffile.imread(tmp_path / "pkg" / "nuclei2d_labels.tif")
    b = tifffile.imread(tmp_path / "pt" / "nuclei2d_labels.tif")
    assert a.max() > 50 and np.array_equal(a, b)
    # a package saved back as a checkpoint is the same network
    save_model(back, tmp_path / "again.pt")
    again = load_model(tmp_path / "again.pt")
    for k, t in orig.network.state_dict().items():
        assert torch.equal(t, again.network.state_dict()[k])


def test_a_freshly_trained_3d_model_exports_and_fine_tunes_from_its_package(tmp_path: Path,
                                                                           without_onnx):
    # (a 3D model's ONNX weights: benchmarks/exchange.py)
    stack = tifffile.imread(bundled_sample(3))[:32, :96, :96]
    truth = tifffile.imread(bundled_sample(3).with_name("nuclei3d_labels.tif"))[:32, :96, :96]
    strokes = np.zeros(truth.shape, np.uint8)
    strokes[::4][truth[::4] > 0] = 2
    strokes[::4][(truth[::4] == 0) & (np.arange(96)[None, None, :] % 7 == 0)] = 1
    tifffile.imwrite(tmp_path / "img.tif", stack)
    tifffile.imwrite(tmp_path / "strokes.tif", strokes)
    assert main(["train", str(tmp_path / "img.tif"), str(tmp_path / "strokes.tif"),
                 "--dims", "3", "--time-budget", "4", "--out", str(tmp_path / "m.pt"),
                 "--device", "cpu", "-q"]) == 0
    assert main(["export", str(tmp_path / "m.pt"), "--out", str(tmp_path / "m3d.zip"),
                 "--sample", str(tmp_path / "img.tif"), "--name", "nuclei 3d test"]) == 0
    # export ran bioimageio's test before writing (rc 0); the written zip is re-read below
    rdf = zipfile.ZipFile(tmp_path / "m3d.zip").read("rdf.yaml").decode()
    assert "id: z" in rdf and "halo: 8" in rdf  # one pooling cell along z (3D)
    assert "weights_torchscript.pt" in zipfile.ZipFile(tmp_path / "m3d.zip").namelist()

    def written(run: str, what: str) -> np.ndarray:
        return tifffile.imread(tmp_path / run / f"img_{what}.tif")

    for d, m in (("pkg", tmp_path / "m3d.zip"), ("pt", tmp_path / "m.pt")):
        assert main(["segment", str(tmp_path / "img.tif"), "--model", str(m), "--out",
                     str(tmp_path / d), "--probabilities", "--precision", "float32",
                     "-q"]) == 0
    assert np.array_equal(written("pkg", "labels"), written("pt", "labels"))
    # the same package as another tool would hold it (TorchScript, no paintseg record) runs
    # as a foreign 3D network with the same labels: bczyx, its scale_range, its halo
    import yaml

    foreign = tmp_path / "foreign3d.zip"
    with zipfile.ZipFile(tmp_path / "m3d.zip") as src, zipfile.ZipFile(foreign, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "rdf.yaml":
                rdf = yaml.safe_load(data)
                del rdf["config"]["paintseg"], rdf["weights"]["pytorch_state_dict"]
                for w in rdf["weights"].values():
                    if w:  # (formats not written are null)
                        w.pop("parent", None)
                data = yaml.safe_dump(rdf).encode()
            dst.writestr(item, data)
    other = load_model(foreign)
    assert other.provenance["bioimageio"]["foreign"] and other.config.dims == 3
    assert main(["segment", str(tmp_path / "img.tif"), "--model", str(foreign), "--out",
                 str(tmp_path / "foreign"), "--probabilities", "--precision", "float32",
                 "-q"]) == 0
    # TorchScript and eager float32 sums differ in the last bit (1e-7): the probabilities agree,
    # and a voxel whose probability lies within that of the snap's confidence bar or of a tie
    # may go the other way (seen once in CI on a model of a 4 s run); the runs compared are
    # the CLI's own, their probabilities written beside the labels
    assert np.abs(written("foreign", "probabilities") - written("pt", "probabilities")).max() < 1e-5
    agree = np.mean(written("foreign", "labels") == written("pt", "labels"))
    assert agree >= 0.999, agree
    # --init accepts the package and continues its network
    assert main(["train", str(tmp_path / "img.tif"), str(tmp_path / "strokes.tif"),
                 "--init", str(tmp_path / "m3d.zip"), "--time-budget", "3", "--out",
                 str(tmp_path / "m2.pt"), "--device", "cpu", "-q"]) == 0
    m2 = load_model(tmp_path / "m2.pt")
    assert len(m2.provenance["training"]) == 2
    # the package shows the images by name, without their folders
    assert m2.provenance["training"][0]["images"] == ["img.tif with labels strokes.tif"]
    assert m2.provenance["training"][1]["images"] == [
        f"{tmp_path / 'img.tif'} with labels {tmp_path / 'strokes.tif'}"]
    readme = zipfile.ZipFile(tmp_path / "m3d.zip").read("README.md").decode()
    assert "img.tif with labels" in readme and "## Validation" in readme
    assert m2.provenance["bioimageio"]["name"] == "nuclei 3d test"


# ------------------------------------------------------------- another tool's package

_OTHER_ARCH = textwrap.dedent('''
    import torch
    from torch import nn


    class TinyUNet(nn.Module):
        """A plain two-level U-Net, as another tool would ship it."""

        def __init__(self, in_channels=1, classes=2, base=4):
            super().__init__()
            self.enc = nn.Sequential(nn.Conv2d(in_channels, base, 3, padding=1), nn.ReLU())
            self.down = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(base, 2 * base, 3, padding=1),
                                      nn.ReLU())
            self.up = nn.ConvTranspose2d(2 * base, base, 2, stride=2)
            self.out = nn.Conv2d(2 * base, classes, 1)

        def forward(self, x):
            a = self.enc(x)
            return torch.softmax(self.out(torch.cat([a, self.up(self.down(a))], 1)), 1)
''')


def _other_package(folder: Path, *, weights: str = "pytorch_state_dict",
                   scaling: str = "scale_range") -> Path:
    """A package written the way another tool writes one: bioimageio.spec's builders around
    a small plain U-Net, percentiles 2-98 (or mean and standard deviation), per-class
    probabilities."""
    import importlib.util

    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as v

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny_unet.py").write_text(_OTHER_ARCH)
    spec = importlib.util.spec_from_file_location("tiny_unet", folder / "tiny_unet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(3)
    net = mod.TinyUNet(in_channels=1, classes=3).eval()
    x = tifffile.imread(SAMPLE2D)[128:256, 64:192].astype(np.float32)[None, None]
    if scaling == "scale_range":
        lo, hi = np.percentile(x, (2.0, 98.0))
        xn = (x - lo) / (hi - lo + 1e-6)
        pre = v.ScaleRangeDescr(kwargs=v.ScaleRangeKwargs(
            axes=[v.AxisId("y"), v.AxisId("x")], min_percentile=2.0, max_percentile=98.0))
    else:
        xn = (x - x.mean()) / (x.std() + 1e-5)
        pre = v.ZeroMeanUnitVarianceDescr(kwargs=v.ZeroMeanUnitVarianceKwargs(
            axes=[v.AxisId("y"), v.AxisId("x")], eps=1e-5))
    with torch.no_grad():
        y = net(torch.from_numpy(xn).float()).numpy()
    np.save(folder / "in.npy", x)
    np.save(folder / "out.npy", y)
    torch.save(net.state_dict(), folder / "w.pt")
    torch.jit.trace(net, torch.from_numpy(x)).save(str(folder / "w_ts.pt"))
    (folder / "tf.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)  # stands in for TF weights
    (folder / "README.md").write_text("# other tool\n")
    tv = v.Version(torch.__version__.split("+")[0])
    if weights == "pytorch_state_dict":
        w = v.WeightsDescr(pytorch_state_dict=v.PytorchStateDictWeightsDescr(
            source=folder / "w.pt", pytorch_version=tv,
            architecture=v.ArchitectureFromFileDescr(
                source=folder / "tiny_unet.py", callable=v.Identifier("TinyUNet"),
                kwargs={"in_channels": 1, "classes": 3})))
    elif weights == "torchscript":
        w = v.WeightsDescr(torchscript=v.TorchscriptWeightsDescr(source=folder / "w_ts.pt",
                                                                  pytorch_version=tv))
    elif weights == "both":
        w = v.WeightsDescr(
            torchscript=v.TorchscriptWeightsDescr(source=folder / "w_ts.pt",
                                                  pytorch_version=tv,
                                                  parent="pytorch_state_dict"),
            pytorch_state_dict=v.PytorchStateDictWeightsDescr(
                source=folder / "w.pt", pytorch_version=tv,
                architecture=v.ArchitectureFromFileDescr(
                    source=folder / "tiny_unet.py", callable=v.Identifier("TinyUNet"),
                    kwargs={"in_channels": 1, "classes": 3})))
    else:
        w = v.WeightsDescr(tensorflow_saved_model_bundle=v.TensorflowSavedModelBundleWeightsDescr(
            source=folder / "tf.zip", tensorflow_version=v.Version("2.15")))
    descr = v.ModelDescr(
        name="Other tool tiny U-Net", description="three classes",
        authors=[v.Author(name="Other Tool")], cite=[v.CiteEntry(text="x", doi=v.Doi(
            "10.1007/978-3-319-24574-4_28"))], license="MIT",
        documentation=v.FileDescr(source=folder / "README.md"),
        inputs=[v.InputTensorDescr(
            id=v.TensorId("input0"), test_tensor=v.FileDescr(source=folder / "in.npy"),
            axes=[v.BatchAxis(), v.ChannelAxis(channel_names=[v.Identifier("c")]),
                  *(v.SpaceInputAxis(id=v.AxisId(a), size=v.ParameterizedSize(min=16, step=2))
                    for a in "yx")],
            preprocessing=[pre])],
        outputs=[v.OutputTensorDescr(
            id=v.TensorId("output0"), test_tensor=v.FileDescr(source=folder / "out.npy"),
            axes=[v.BatchAxis(), v.ChannelAxis(channel_names=[
                v.Identifier(n) for n in ("rest", "cell", "edge")]),
                *(v.SpaceOutputAxisWithHalo(id=v.AxisId(a), halo=4, size=v.SizeReference(
                    tensor_id=v.TensorId("input0"), axis_id=v.AxisId(a))) for a in "yx")])],
        weights=w)
    out = folder / f"other_{weights}_{scaling}.zip"
    save_bioimageio_package(descr, output_path=out)
    return out


@pytest.mark.parametrize("weights", ["pytorch_state_dict", "torchscript"])
def test_another_tools_package_segments_through_paintseg(tmp_path: Path, weights: str):
    pkg = _other_package(tmp_path / "src", weights=weights)
    model = load_model(pkg)
    assert model.class_names == ("rest", "cell", "edge")
    assert model.normalization.low == 2.0 and model.normalization.high == 98.0
    from paintseg.inference import resolve_tiles

    tiled = resolve_tiles((512, 512), model, TileConfig(tile=128))
    assert tiled.halo == 4  # the package's declared halo
    x = np.load(tmp_path / "src" / "in.npy")
    want = np.load(tmp_path / "src" / "out.npy")[0]
    got = segment(x[0, 0], model, axes="YX", device="cpu", return_probabilities=True,
                  tiles=TileConfig(precision="float32"))  # as the package's own output
    assert np.abs(got.probabilities - want).max() < 1e-4
    tifffile.imwrite(tmp_path / "img.tif", x[0, 0])
    assert main(["segment", str(tmp_path / "img.tif"), "--model", str(pkg), "--out",
                 str(tmp_path / "out"), "-q"]) == 0
    labels = tifffile.imread(tmp_path / "out" / "img_labels.tif")
    # no snap on another tool's network: the labels are its arg-max (rest = background, 0)
    assert np.array_equal(labels, np.array([0, 2, 3])[want.argmax(0)])
    assert "another tool's network" in model.describe() and "Other Tool" in model.describe()
    with pytest.raises(CheckpointError, match="another tool's BioImage.IO package"):
        save_model(model, tmp_path / "x.pt")


def test_unsupported_and_damaged_packages_get_one_clear_error(tmp_path: Path, capsys):
    tf = _other_package(tmp_path / "tf", weights="tensorflow")
    with pytest.raises(CheckpointError, match="tensorflow_saved_model_bundle weights.*"
                                              "TorchScript or pytorch_state_dict"):
        load_model(tf)
    good = _other_package(tmp_path / "ok", weights="torchscript")
    broken = tmp_path / "broken.zip"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="broken.zip is not a BioImage.IO model package"):
        load_model(broken)
    img = tmp_path / "img.tif"
    tifffile.imwrite(img, np.zeros((64, 64), np.uint8))
    for pkg in (tf, broken):
        assert main(["segment", str(img), "--model", str(pkg), "--out",
                     str(tmp_path / "o"), "-q"]) != 0
        err = capsys.readouterr().err
        assert err.count("error") == 1 and pkg.name in err
    assert not (tmp_path / "o" / "img_labels.tif").exists()


def test_paintsegs_unet_in_a_rewritten_package_still_loads_as_paintsegs(starter_package: Path,
                                                                        tmp_path: Path):
    import yaml

    rewritten = tmp_path / "rewritten.zip"
    with zipfile.ZipFile(starter_package) as src, zipfile.ZipFile(rewritten, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "rdf.yaml":
                rdf = yaml.safe_load(data)
                del rdf["config"]["paintseg"]  # another tool kept only the spec's fields
                rdf["outputs"][0]["axes"][1]["channel_names"] = ["bg", "nucleus", "rim"]
                data = yaml.safe_dump(rdf).encode()
            dst.writestr(item, data)
    model = load_model(rewritten)
    orig = load_model("nuclei")
    assert type(model.network) is type(orig.network) and model.config == orig.config
    assert model.class_names == ("bg", "nucleus", "rim")
    assert (model.normalization.low, model.normalization.high) == (1.0, 99.8)
    for k, t in orig.network.state_dict().items():
        assert torch.equal(t, model.network.state_dict()[k])
    from paintseg.training.data import check_channels

    check_channels(model, 1)  # a paintseg U-Net: it continues training


def test_without_the_extra_the_core_works_and_says_what_to_install(tmp_path: Path,
                                                                   starter_package: Path):
    import subprocess
    import sys

    code = textwrap.dedent(f'''
        import sys
        sys.modules["bioimageio"] = None  # as if the extra were not installed
        from paintseg.cli import main
        from paintseg.model import load_model
        load_model("nuclei")
        try:
            load_model({str(starter_package)!r})
        except Exception as exc:
            print("LOAD:", exc)
        main(["export", "nuclei", "--out", {str(tmp_path / "x.zip")!r}])
    ''')
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    hint = 'pip install "napari-paintseg[bioimageio]"'
    assert hint in run.stdout and hint in run.stderr, (run.stdout, run.stderr)
    assert not (tmp_path / "x.zip").exists()


def test_another_tools_state_dict_unet_fine_tunes_into_a_package(tmp_path: Path, capsys):
    pkg = _other_package(tmp_path / "src", weights="both")
    x = np.load(tmp_path / "src" / "in.npy")[0, 0]
    truth = tifffile.imread(SAMPLE2D.with_name("nuclei2d_instances.tif"))[128:256, 64:192] > 0
    strokes = np.zeros(truth.shape, np.uint8)
    strokes[::3, ::3] = np.where(truth[::3, ::3], 2, 1)  # rest and cell; edge not painted
    tifffile.imwrite(tmp_path / "img.tif", x)
    tifffile.imwrite(tmp_path / "strokes.tif", strokes)
    args = ["train", str(tmp_path / "img.tif"), str(tmp_path / "strokes.tif"), "--init",
            str(pkg), "--steps", "100", "--learning-rate", "0.01", "--device", "cpu", "-q"]
    assert main(args + ["--out", str(tmp_path / "tuned.pt")]) == 2
    assert "write a BioImage.IO package instead" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "tuned.zip")]) == 0
    assert check_package(tmp_path / "tuned.zip").status == "passed"
    before, after = load_model(pkg), load_model(tmp_path / "tuned.zip")
    assert after.class_names == before.class_names and "another tool's" in after.describe()
    assert after.provenance["training"][0]["steps"] == 100  # the record travels
    # the fine-tuned package holds its architecture only: it exports again as it is
    assert main(["export", str(tmp_path / "tuned.zip"), "--out", str(tmp_path / "again.zip"),
                 "--sample", str(tmp_path / "img.tif"), "--name", "tuned again"]) == 0
    assert load_model(tmp_path / "again.zip").provenance["bioimageio"]["name"] == "tuned again"

    def cell_iou(model):
        labels = segment(x, model, axes="YX", device="cpu").labels
        return ((labels == 2) & truth).sum() / ((labels == 2) | truth).sum()

    assert cell_iou(after) > cell_iou(before) + 0.2, (cell_iou(before), cell_iou(after))
    # TorchScript alone does not train; a class the network lacks cannot be painted
    from paintseg.training.data import check_channels

    with pytest.raises(InputError, match="TorchScript weights only"):
        check_channels(load_model(_other_package(tmp_path / "ts", weights="torchscript")), 1)
    strokes[0, :4] = 4
    tifffile.imwrite(tmp_path / "strokes4.tif", strokes)
    assert main(["train", str(tmp_path / "img.tif"), str(tmp_path / "strokes4.tif"), "--init",
                 str(pkg), "--steps", "1", "--out", str(tmp_path / "x.zip"), "-q"]) == 2
    assert "paint only those" in capsys.readouterr().err and not (tmp_path / "x.zip").exists()


def test_a_package_that_cannot_be_written_after_training_loses_nothing(tmp_path: Path,
                                                                        capsys, monkeypatch,
                                                                        without_onnx):
    import paintseg.exchange
    from paintseg.errors import ConfigError

    def failing(descr, *, what):
        raise ConfigError(f"{what}: the package fails bioimageio's test: (simulated)")

    monkeypatch.setattr(paintseg.exchange, "_check", failing)
    img = tifffile.imread(SAMPLE2D)[:192, :192]
    truth = tifffile.imread(SAMPLE2D.with_name("nuclei2d_instances.tif"))[:192, :192] > 0
    strokes = np.zeros(truth.shape, np.uint8)
    strokes[::4, ::4] = np.where(truth[::4, ::4], 2, 1)
    tifffile.imwrite(tmp_path / "img.tif", img)
    tifffile.imwrite(tmp_path / "s.tif", strokes)
    (tmp_path / "m.pt").write_bytes(b"someone else's file")
    assert main(["train", str(tmp_path / "img.tif"), str(tmp_path / "s.tif"), "--steps", "3",
                 "--out", str(tmp_path / "m.zip"), "--device", "cpu", "-q"]) == 2
    err = capsys.readouterr().err
    assert "fails bioimageio's test: (simulated)" in err and "m-1.pt" in err
    assert not (tmp_path / "m.zip").exists()
    assert not list(tmp_path.glob("*partial*"))  # nothing half-written either
    assert (tmp_path / "m.pt").read_bytes() == b"someone else's file"
    assert load_model(tmp_path / "m-1.pt").provenance["training"][0]["steps"] == 3


def test_another_tools_package_with_mean_and_std_scaling(tmp_path: Path):
    pkg = _other_package(tmp_path / "src", weights="torchscript",
                         scaling="zero_mean_unit_variance")
    assert check_package(pkg).status == "passed"  # bioimageio's own reading of it
    model = load_model(pkg)
    assert model.normalization.mode == "mean_std" and model.normalization.eps == 1e-5
    assert "mean and standard deviation" in model.describe()
    x = np.load(tmp_path / "src" / "in.npy")
    want = np.load(tmp_path / "src" / "out.npy")[0]
    got = segment(x[0, 0], model, axes="YX", device="cpu", return_probabilities=True,
                  tiles=TileConfig(precision="float32"))  # as the package's own output
    assert np.abs(got.probabilities - want).max() < 1e-4


def test_a_network_with_standardised_weights_travels_in_its_package(tmp_path: Path):
    """The one U-Net a new model trains from 3 or more classes of strokes standardises its
    weights (``norm="weight"``): its package passes bioimageio's test in every weight format
    written and loads back to the same probabilities."""
    from paintseg.config import ModelConfig
    from paintseg.model import new_model

    cfg = ModelConfig(dims=2, depth=2, base_features=4, classes=3, norm="weight",
                      features=(1.0, 2.0), activation="leaky_relu")
    model = new_model(cfg, seed=0)
    notes: list[str] = []
    out = export_package(model, tmp_path / "ws.zip", sample=_sample(), notes=notes)
    names = zipfile.ZipFile(out).namelist()
    assert "weights_torchscript.pt" in names and "weights.onnx" in names, notes
    back = load_package(out)
    assert back.config.norm == "weight"
    img = _sample()[0, :96, :96]
    a, b = (segment(img, m, axes="YX", device="cpu", return_probabilities=True).probabilities
            for m in (model, back))
    np.testing.assert_allclose(a, b, atol=1e-5)

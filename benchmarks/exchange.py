"""BioImage.IO packages of the models users have: export time, size, and how exactly each
weight format reproduces paintseg.

For the bundled ``nuclei`` starter, a 2D fast-preset model trained from strokes on the sample
nuclei image for ``--seconds`` (three U-Nets behind the filter bank), and a 3D fast-preset
model trained from dots on two planes of the sample cells3d stack: the export's time
(:func:`paintseg.exchange.export_package` with bioimageio.core's test of every weight
format), the package's size, the largest difference between paintseg's probabilities and
each exported format's on the test input (state dict through the architecture source,
TorchScript, ONNX Runtime), and whether ``paintseg segment`` with the package gives the same
labels as with the checkpoint on the whole sample.

Usage::

    python benchmarks/exchange.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import tifffile
import torch

from paintseg.config import SegmentSettings, TrainConfig
from paintseg.exchange import bundled_sample, export_package
from paintseg.inference import segment_labels
from paintseg.model import load_model, save_model
from paintseg.training import iter_train, prepare_training


def trained(image: np.ndarray, strokes: np.ndarray, *, dims: int, seconds: float):
    data, model = prepare_training([(image, strokes)], base=None, dims=dims, in_channels=1,
                                   seed=0)
    for _ in iter_train(model, data, TrainConfig(time_budget=seconds, seed=0), device="cpu"):
        pass
    return model


def models(seconds: float):
    yield "nuclei starter", load_model("nuclei"), tifffile.imread(bundled_sample(2))
    img = tifffile.imread(bundled_sample(2))
    truth = tifffile.imread(bundled_sample(2).with_name("nuclei2d_instances.tif")) > 0
    strokes = np.zeros(img.shape, np.uint8)
    strokes[::16, ::16] = np.where(truth[::16, ::16], 2, 1)
    yield "2D fast, strokes", trained(img, strokes, dims=2, seconds=seconds), img
    stack = tifffile.imread(bundled_sample(3))
    truth3 = tifffile.imread(bundled_sample(3).with_name("nuclei3d_labels.tif")) > 0
    dots = np.zeros(stack.shape, np.uint8)
    for z in (20, 40):
        dots[z, ::8, ::8] = np.where(truth3[z, ::8, ::8], 2, 1)
    yield "3D fast, dots", trained(stack, dots, dims=3, seconds=seconds), stack


def formats(pkg: Path) -> dict[str, float]:
    """Largest |difference| of each weight format's output from the package's test output
    (paintseg's own probabilities) on the normalised test input."""
    import onnxruntime

    from paintseg.network import ExportedUNet

    zf = zipfile.ZipFile(pkg)
    x = np.load(io.BytesIO(zf.read("test_input.npy")))
    want = np.load(io.BytesIO(zf.read("test_output.npy")))
    import yaml

    rdf = yaml.safe_load(zf.read("rdf.yaml"))
    scale = rdf["inputs"][0]["preprocessing"][1]["kwargs"]
    axes = tuple(range(2, x.ndim))
    lo = np.percentile(x, scale["min_percentile"], axis=axes, keepdims=True)
    hi = np.percentile(x, scale["max_percentile"], axis=axes, keepdims=True)
    xn = ((x - lo) / (hi - lo + float(scale["eps"]))).astype(np.float32)
    out = {}
    kwargs = rdf["weights"]["pytorch_state_dict"]["architecture"]["kwargs"]
    net = ExportedUNet(**kwargs)
    net.load_state_dict(torch.load(io.BytesIO(zf.read("weights_state_dict.pt")),
                                   weights_only=True))
    with torch.inference_mode():
        out["state dict"] = net.eval()(torch.from_numpy(xn)).numpy()
        ts = torch.jit.load(io.BytesIO(zf.read("weights_torchscript.pt")))
        out["torchscript"] = ts(torch.from_numpy(xn)).numpy()
    if "weights.onnx" in zf.namelist():
        sess = onnxruntime.InferenceSession(zf.read("weights.onnx"),
                                            providers=["CPUExecutionProvider"])
        out["onnx"] = sess.run(None, {sess.get_inputs()[0].name: xn})[0]
    return {k: float(np.abs(v - want).max()) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0, help="training budget")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"{'model':<18} {'export+test':>11} {'size':>7}  max |diff| from paintseg: "
          f"state dict / TorchScript / ONNX   labels equal")
    for name, model, image in models(args.seconds):
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            sample = image[None]  # (C, *spatial)
            t0 = time.perf_counter()
            export_package(model, d / "m.zip", sample=sample, sample_name="sample")
            seconds = time.perf_counter() - t0
            diffs = formats(d / "m.zip")
            save_model(model, d / "m.pt")
            axes = "YX" if image.ndim == 2 else "ZYX"
            s = SegmentSettings(axes=axes)
            a = segment_labels(image, load_model(d / "m.zip"), s, device="cpu").labels
            b = segment_labels(image, load_model(d / "m.pt"), s, device="cpu").labels
            same = float((a == b).mean())
            size = (d / "m.zip").stat().st_size / 1e6
            print(f"{name:<18} {seconds:>9.1f} s {size:>5.1f} MB  "
                  + " / ".join(f"{diffs.get(k, float('nan')):.1e}"
                               for k in ("state dict", "torchscript", "onnx"))
                  + f"   {same:.4%}")


if __name__ == "__main__":
    main()

"""U-Net shapes, receptive field, checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle

import numpy as np
import pytest
import tifffile
import torch

from paintseg.config import ModelConfig, NormConfig, TileConfig, from_json, to_json
from paintseg.devices import flush_denormals
from paintseg.errors import CheckpointError
from paintseg.inference import segment
from paintseg.model import (
    UNet,
    exact_halo,
    load_model,
    new_model,
    receptive_field,
    save_model,
)


@pytest.mark.parametrize("dims,shape", [(2, (37, 50)), (2, (1, 1)), (3, (5, 9, 17))])
@pytest.mark.parametrize("norm", ["layer", "batch", "group", "none", "weight"])
def test_any_size_forward(dims, shape, norm):
    cfg = ModelConfig(dims=dims, depth=2, base_features=4, classes=3, norm=norm)
    net = UNet(cfg).eval()
    with torch.no_grad():
        y = net(torch.zeros(2, 1, *shape))
    assert y.shape == (2, 3, *shape)


def test_upsample_variant_and_channels():
    cfg = ModelConfig(dims=2, in_channels=3, depth=2, base_features=4, upsampling="upsample")
    y = UNet(cfg)(torch.zeros(1, 3, 20, 20))
    assert y.shape == (1, 2, 20, 20)
    with pytest.raises(ValueError, match="expected 3 channels"):
        UNet(cfg)(torch.zeros(1, 1, 20, 20))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_receptive_field_bounds_gradient_support(depth):
    """The computed receptive field contains every input pixel that influences an output."""
    cfg = ModelConfig(dims=2, depth=depth, base_features=4)
    net = UNet(cfg).eval()
    size = 2 * receptive_field(cfg) + 16
    x = torch.randn(1, 1, size, size, requires_grad=True)
    c = size // 2
    net(x)[0, 1, c, c].backward()
    ys, xs = np.nonzero(x.grad[0, 0].abs().numpy() > 0)
    extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
    assert extent <= receptive_field(cfg)
    assert max(abs(ys - c).max(), abs(xs - c).max()) <= exact_halo(cfg)
    # and the bound is not loose by more than the pooling asymmetry
    assert extent >= receptive_field(cfg) - 2 * cfg.align


def test_config_json_round_trip():
    cfg = ModelConfig(dims=3, in_channels=2, classes=4, depth=3, base_features=8, norm="group")
    assert from_json(ModelConfig, to_json(cfg)) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig fields: colour"):
        from_json(ModelConfig, '{"colour": 1}')
    with pytest.raises(ValueError, match="dims must be between 2 and 3"):
        ModelConfig(dims=4)


def test_bad_settings_raise_the_users_error_type():
    """Settings errors are PaintsegErrors (the CLI and napari show their message as is) and
    stay ValueErrors for callers that catch those."""
    from paintseg.config import TrainConfig
    from paintseg.errors import ConfigError, PaintsegError

    for make in (lambda: ModelConfig(norm="instance"), lambda: TileConfig(mode="fast"),
                 lambda: TrainConfig(time_budget=-1.0), lambda: ModelConfig(depth=9),
                 lambda: from_json(TileConfig, '{"tyle": 64}')):
        with pytest.raises(ConfigError) as info:
            make()
        assert isinstance(info.value, PaintsegError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("kwargs,message", [
    ({"output": "objects"}, "output must be auto, semantic or instances, got 'objects'"),
    ({"min_size": -1}, r"min_size \(the minimum object size\) must be >= 0, got -1"),
    ({"snap": 2.5}, r"snap \(pixels\) must be an integer, got 2.5"),
    ({"diameter": 0.0}, "the object diameter must be a positive number, got 0.0"),
    ({"diameter": float("nan")}, "the object diameter must be a positive number, got nan"),
    ({"background_class": -1}, "background_class must be >= 0, got -1"),
    ({"axes": "ZQX"}, "axes must be distinct letters of TZCYX, got 'ZQX'"),
    ({"format": "png"}, "format must be 'tiff' or 'zarr', got 'png'"),
    ({"tiles": {"tile": 0}}, "tile must be >= 1, got 0"),
])
def test_segment_settings_check_themselves_once(kwargs, message):
    """One settings object from the GUI and the CLI to the core: each bad value is refused
    when the settings are built, naming the setting and the value."""
    from paintseg.config import SegmentSettings
    from paintseg.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        SegmentSettings(**kwargs)


def test_segment_settings_round_trip_and_replace():
    from paintseg.config import SegmentSettings
    from paintseg.errors import ConfigError

    s = SegmentSettings(output="instances", diameter=20.0, tiles=TileConfig(tile=64))
    assert from_json(SegmentSettings, to_json(s)) == s  # tiles come back as a TileConfig
    assert s.replace(snap=0).snap == 0 and s.replace(snap=0).tiles == s.tiles
    assert SegmentSettings(axes="zyx").axes == "zyx"  # read as io.parse_axes reads it
    assert SegmentSettings(axes="YXS").axes == "YXS"
    with pytest.raises(ConfigError, match="unknown SegmentSettings fields: snapp"):
        s.replace(snapp=0)
    with pytest.raises(ConfigError, match="snap"):
        s.replace(snap=-1)


def test_the_cli_refuses_bad_segment_settings_before_any_file(tmp_path, capsys):
    from paintseg.cli import main

    img = tmp_path / "in.tif"
    tifffile.imwrite(img, np.zeros((32, 32), np.uint8))
    assert main(["segment", str(img), "--model", "nuclei", "--out", str(tmp_path / "o"),
                 "--min-size", "-3"]) != 0
    assert "min_size (the minimum object size) must be >= 0, got -3" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.parametrize("dims,shape", [(2, (1, 1, 40, 33)), (3, (1, 1, 12, 20, 17))])
def test_derivative_gain_scales_only_the_derivative_channels(dims, shape):
    from paintseg.network import FilterBank

    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    plain = FilterBank(1, (1.0, 2.0), dims)(x)
    damped = FilterBank(1, (1.0, 2.0), dims, derivative_gain=0.25)(x)
    for i in range(plain.shape[1]):  # raw, then per scale: smooth + 4 derivative channels
        factor = 1.0 if i == 0 or (i - 1) % 5 == 0 else 0.25
        torch.testing.assert_close(damped[:, i], plain[:, i] * factor)
        assert plain[:, i].abs().max() > 1e-3  # every channel responds, so the check bites


@pytest.mark.parametrize("dims", [2, 3])
def test_the_whole_bank_through_shared_transforms_equals_direct_convolutions(dims,
                                                                           nuclei3d_path):
    """On the CPU one transform of each pass's input serves all the kernels applied to it
    (the derivatives of three orders): every channel of the bank is what one direct
    convolution per kernel gives, on the real cells3d stack."""
    from paintseg.network import FilterBank

    stack = tifffile.imread(nuclei3d_path).astype(np.float32)
    stack /= stack.max()
    x = torch.from_numpy(stack[20:36, 40:90, 60:120] if dims == 3 else stack[30])
    x = x[None, None]
    fb = FilterBank(1, (1.0, 2.0, 4.0), dims)
    shared = fb(x)
    fb._along_each = lambda t, ks, axis: [fb._along(t, k, axis, fft=False) for k in ks]
    direct = fb(x)
    torch.testing.assert_close(shared, direct, atol=2e-5, rtol=1e-4)
    assert all(direct[:, i].std() > 1e-4 for i in range(direct.shape[1]))


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_filter_bank_fft_and_direct_convolution_agree(axis, sigma):
    """The CPU takes the FFT for every kernel, other devices a direct convolution for short
    ones: both paths give the same numbers along every axis of a 3D patch."""
    from paintseg.network import FilterBank, _gaussian_kernels

    fb = FilterBank(1, (sigma,), 3)
    x = torch.rand((2, 1, 40, 37, 45), generator=torch.Generator().manual_seed(1))
    for k in _gaussian_kernels(sigma)[:3]:  # the Gaussian, its first and second derivatives
        fft = fb._along(x, k, axis, fft=True)
        direct = fb._along(x, k, axis, fft=False)
        assert fft.shape[2 + axis] == x.shape[2 + axis] - k.numel() + 1  # valid part only
        torch.testing.assert_close(fft, direct, atol=2e-6, rtol=1e-5)
        assert direct.abs().max() > 1e-2


def test_feature_memo_gives_the_same_features_and_forgets_the_oldest():
    from paintseg.network import FeatureMemo, FilterBank

    fb = FilterBank(1, (1.0, 2.0), 2)
    gen = torch.Generator().manual_seed(2)
    a, b = (torch.rand((1, 1, 48, 40), generator=gen) for _ in range(2))
    plain = {id(t): fb(t) for t in (a, b)}
    one = plain[id(a)].numel() * 4
    fb.memo = FeatureMemo(max_bytes=2 * one)  # room for two outputs
    for t in (a, b, a, a.clone()):
        torch.testing.assert_close(fb(t), plain[id(a) if t is not b else id(b)], rtol=0, atol=0)
    assert (fb.memo.hits, fb.memo.misses) == (2, 2)  # a, b filtered; a and its copy found
    b_shifted = b.clone()
    b_shifted[0, 0, 0, 0] += 1e-3  # one pixel differs: filtered anew
    fb(b_shifted)  # a third output: the least recently used (b) goes
    assert fb.memo.misses == 3
    fb(b)
    assert fb.memo.misses == 4  # b was forgotten; now a goes, the oldest
    fb(b_shifted)
    assert fb.memo.hits == 3
    fb(a)
    assert fb.memo.misses == 5
    small = FeatureMemo(max_bytes=one - 1)  # an output larger than the memo is not kept
    fb.memo = small
    fb(a)
    fb(a)
    assert (small.hits, small.misses) == (0, 2)


@pytest.mark.parametrize("classes", [1, 2, 5])
@pytest.mark.parametrize("dim", [0, 1])
def test_class_argmax_is_torch_argmax(classes, dim):
    from paintseg.model import class_argmax

    gen = torch.Generator().manual_seed(classes)
    shape = [3, 17, 19]
    shape.insert(dim, classes)
    scores = torch.rand(shape, generator=gen)
    scores = torch.round(scores * 4) / 4  # many ties: the first class of a tie wins
    assert torch.equal(class_argmax(scores, dim), scores.argmax(dim))


def test_derivative_gain_travels_with_the_checkpoint(tmp_path, nuclei2d):
    cfg = ModelConfig(depth=2, base_features=4, features=(1.0, 4.0), derivative_gain=0.1)
    model = new_model(cfg, seed=0)
    loaded = load_model(save_model(model, tmp_path / "m.pt"))
    assert loaded.config.derivative_gain == 0.1
    assert "derivative channels x0.1" in loaded.describe()
    a = segment(nuclei2d, model, return_probabilities=True).probabilities
    b = segment(nuclei2d, loaded, return_probabilities=True).probabilities
    np.testing.assert_array_equal(a, b)
    ungained = new_model(ModelConfig(depth=2, base_features=4, features=(1.0, 4.0)), seed=0)
    b = segment(nuclei2d, ungained, return_probabilities=True).probabilities
    assert np.abs(a - b).max() > 1e-3  # the same weights see other features
    # a config written before the option existed reads as gain 1
    old = {k: v for k, v in json.loads(to_json(cfg)).items() if k != "derivative_gain"}
    assert from_json(ModelConfig, old).derivative_gain == 1.0
    with pytest.raises(ValueError, match="derivative_gain must be > 0"):
        ModelConfig(derivative_gain=0)


def test_leaky_relu_travels_with_the_checkpoint_and_old_ones_stay_relu(tmp_path, nuclei2d):
    cfg = ModelConfig(depth=2, base_features=4, norm="none", features=(1.0,),
                      activation="leaky_relu")
    model = new_model(cfg, seed=0)
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in model.network.modules())
    loaded = load_model(save_model(model, tmp_path / "m.pt"))
    assert loaded.config.activation == "leaky_relu" and "leaky ReLU" in loaded.describe()
    a = segment(nuclei2d, model, return_probabilities=True).probabilities
    b = segment(nuclei2d, loaded, return_probabilities=True).probabilities
    np.testing.assert_array_equal(a, b)
    # the same weights behind ReLUs give another result: the activation is really used
    relu = new_model(dataclasses.replace(cfg, activation="relu"), seed=0)
    relu.network.load_state_dict(model.network.state_dict())
    b = segment(nuclei2d, relu, return_probabilities=True).probabilities
    assert np.abs(a - b).max() > 1e-4
    # a config written before the option existed is a ReLU network
    old = {k: v for k, v in json.loads(to_json(cfg)).items() if k != "activation"}
    assert from_json(ModelConfig, old).activation == "relu"
    with pytest.raises(ValueError, match="activation must be one of"):
        ModelConfig(activation="gelu")


def test_flush_denormals_restores_the_default():
    tiny = torch.tensor([1e-42], dtype=torch.float32)  # a denormal float
    with flush_denormals():
        flushed = (tiny * 1.0).item()
    assert (tiny * 1.0).item() != 0.0  # restored on leaving
    if torch.set_flush_denormal(False):  # the CPU supports it: inside, denormals were zero
        assert flushed == 0.0
    with flush_denormals():
        with flush_denormals():  # inference inside training
            pass
        still = (tiny * 1.0).item()
    if torch.set_flush_denormal(False):
        assert still == 0.0  # the inner block left the outer one flushing


def test_checkpoint_round_trip_identical_predictions(tmp_path, nuclei2d):
    model = new_model(ModelConfig(depth=3, base_features=8, classes=3), seed=1,
                      class_values=(1, 2, 5), class_names=("bg", "nucleus", "edge"),
                      normalization=NormConfig(low=2, high=99))
    path = save_model(model, tmp_path / "m.pt")
    assert not [p for p in os.listdir(tmp_path) if p != "m.pt"]  # no temp file left
    loaded = load_model(path)
    assert loaded.config == model.config
    assert loaded.class_values == (1, 2, 5) and loaded.class_names == ("bg", "nucleus", "edge")
    assert loaded.normalization == NormConfig(low=2, high=99)
    assert loaded.provenance["torch"] == torch.__version__
    a = segment(nuclei2d, model, return_probabilities=True)
    b = segment(nuclei2d, loaded, return_probabilities=True)
    np.testing.assert_array_equal(a.probabilities, b.probabilities)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert set(np.unique(a.labels)) <= {0, 2, 5}


def test_checkpoint_refusals(tmp_path):
    model = new_model(ModelConfig(depth=1, base_features=2), seed=0)
    good = save_model(model, tmp_path / "good.pt")
    data = good.read_bytes()
    cases = {}
    cases["missing"] = (tmp_path / "nope.pt", "does not exist")
    (tmp_path / "text.pt").write_text("not a model")
    cases["text"] = (tmp_path / "text.pt", "not a paintseg checkpoint")
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (tmp_path / "trunc.pt", "not a paintseg checkpoint|damaged")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    cases["foreign"] = (tmp_path / "foreign.pt", "not a paintseg checkpoint")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(tmp_path / "evil.pt", "wb") as fh:
        torch.save({"format": "paintseg-checkpoint", "x": Evil()}, fh, pickle_protocol=2)
    cases["code"] = (tmp_path / "evil.pt", "holds code|cannot be read")
    cases["folder"] = (tmp_path, "is a folder")
    for name, (path, message) in cases.items():
        with pytest.raises(CheckpointError, match=message) as info:
            load_model(path)
        assert str(path) in str(info.value), name
    assert not (tmp_path / "pwned").exists()
    assert pickle  # the pickle module is what weights_only protects against


def test_checkpoint_mismatch_messages(tmp_path):
    path = save_model(new_model(ModelConfig(depth=1, base_features=2), seed=0), tmp_path / "m.pt")
    with pytest.raises(CheckpointError,
                       match=r"expects images with 1 channel\(s\) but the image has 3"):
        load_model(path, in_channels=3)
    with pytest.raises(CheckpointError, match="is a 2D model but a 3D model is needed"):
        load_model(path, dims=3)


def test_save_into_missing_folder(tmp_path):
    model = new_model(ModelConfig(depth=1, base_features=2), seed=0)
    with pytest.raises(CheckpointError, match="does not exist"):
        save_model(model, tmp_path / "no" / "m.pt")


def test_seeded_init_is_reproducible():
    cfg = ModelConfig(depth=2, base_features=4)
    a, b = new_model(cfg, seed=5), new_model(cfg, seed=5)
    for (ka, va), (_kb, vb) in zip(a.network.state_dict().items(), b.network.state_dict().items()):
        assert torch.equal(va, vb), ka


def test_group_norm_is_not_tile_exact(nuclei2d):
    """Why layer norm is the default: group norm statistics depend on the tile."""
    model = new_model(ModelConfig(depth=2, base_features=8, norm="group"), seed=0)
    whole = segment(nuclei2d, model, tiles=TileConfig(tile=4096, mode="exact"),
                    return_probabilities=True)
    tiled = segment(nuclei2d, model, tiles=TileConfig(tile=64, mode="exact"),
                    return_probabilities=True)
    assert np.abs(whole.probabilities - tiled.probabilities).max() > 1e-3


def test_members_average_their_probabilities_and_round_trip(tmp_path):
    cfg = ModelConfig(dims=2, depth=2, base_features=4, classes=3, features=(1.0,), members=3)
    model = new_model(cfg, seed=0)
    x = torch.rand(2, 1, 23, 30, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        each = model.network.member_logits(x)
        out = model.network(x)
    assert each.shape == (3, 2, 3, 23, 30) and out.shape == (2, 3, 23, 30)
    torch.testing.assert_close(torch.softmax(out, 1), torch.softmax(each, 2).mean(0))
    assert not torch.allclose(each[0], each[1])  # each member starts from weights of its own
    back = load_model(save_model(model, tmp_path / "m.pt"))
    assert back.config.members == 3
    with torch.no_grad():
        torch.testing.assert_close(back.network(x), out)
    assert back.describe().startswith("3 averaged 2D U-Nets, 1 input channel(s), 3 classes")
    with pytest.raises(ValueError, match="members must be between 1 and 16, got 0"):
        ModelConfig(members=0)


def test_one_member_keeps_the_parameter_names_of_earlier_checkpoints():
    starter = load_model("nuclei")  # saved before networks had members; loaded strictly
    keys = set(starter.network.state_dict())
    assert starter.config.members == 1
    assert "head.weight" in keys and not any(k.startswith("extra_members") for k in keys)


@pytest.mark.parametrize("dims,shape,members,norm", [
    (2, (37, 50), 3, "none"), (3, (5, 9, 17), 1, "none"), (2, (37, 50), 1, "weight")])
def test_channels_last_on_the_cpu_gives_the_same_logits(tmp_path, dims, shape, members, norm):
    cfg = ModelConfig(dims=dims, depth=2, base_features=4, classes=3, norm=norm,
                      features=(1.0, 2.0), members=members)
    model = new_model(cfg, seed=0)
    net = model.network.eval()
    x = torch.rand(2, 1, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = net(x)
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    assert net.to_device("cpu") is net
    assert net.down[0][0].weight.is_contiguous(memory_format=fmt)
    assert not net.down[0][0].weight.is_contiguous()
    with torch.no_grad():
        after = net(x)
    assert after.is_contiguous()  # logits in the default layout for the code downstream
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    # a checkpoint saved from the channels-last network loads and predicts the same
    back = load_model(save_model(model, tmp_path / "m.pt"))
    with torch.no_grad():
        torch.testing.assert_close(back.network.eval()(x), before, rtol=1e-4, atol=1e-5)


def test_networks_with_norm_layers_keep_the_default_layout_on_the_cpu():
    net = UNet(ModelConfig(dims=2, depth=2, base_features=4, classes=2, norm="layer"))
    net.to_device("cpu")
    assert net.down[0][0].weight.is_contiguous()


def test_normalisation_modes_in_checkpoints(tmp_path):
    """Percentile models write the fields older paintseg versions read; a mean/std model
    (another tool's scaling, rebuilt as a paintseg U-Net) keeps its mode and eps, and its
    images are scaled to zero mean and unit variance."""
    m = new_model(ModelConfig(dims=2, depth=1, base_features=4), seed=0)
    save_model(m, tmp_path / "p.pt")
    meta = json.loads(torch.load(tmp_path / "p.pt", weights_only=True)["metadata"])
    assert set(meta["normalization"]) == {"low", "high", "max_samples"}
    m.normalization = NormConfig(mode="mean_std", eps=1e-3)
    save_model(m, tmp_path / "z.pt")
    back = load_model(tmp_path / "z.pt")
    assert back.normalization == NormConfig(mode="mean_std", eps=1e-3)
    from paintseg.normalize import channel_scaling, percentile_range

    img = np.random.default_rng(0).normal(300.0, 20.0, (1, 64, 64)).astype(np.float32)
    lo, inv = channel_scaling(*percentile_range(img, back.normalization), img.ndim)
    z = (img - lo) * inv
    assert abs(float(z.mean())) < 1e-3 and abs(float(z.std()) - 1) < 1e-3
    with pytest.raises(Exception, match="mode must be percentile or mean_std"):
        NormConfig(mode="zscore")


_HEAP = """
import ctypes, sys
import numpy as np
if sys.argv[1] == "keep":
    from paintseg.devices import keep_freed_memory
    assert keep_freed_memory()
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
from paintseg.devices import glibc
libc = glibc()
libc.mallinfo2.restype = Info
a = np.ones(64 * 2**20, np.uint8)  # a forward pass's activation
mapped = libc.mallinfo2().hblkhd  # bytes in blocks mapped apart from the heap
del a
print(mapped, libc.mallinfo2().fordblks)  # and the free bytes the heap keeps
"""


def test_freed_memory_is_kept_for_the_next_allocation():
    """By default glibc maps a 64 MB block apart from its heap and returns it to the kernel
    when it is freed (the next one is mapped and zeroed again); once paintseg has kept freed
    memory (its first segmentation or training does), the block comes from the heap and
    stays there, free, for the next."""
    import subprocess
    import sys

    from paintseg.devices import glibc

    libc = glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("the allocator is tuned on Linux with glibc only (mallinfo2: 2.33+)")
    seen = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", _HEAP, mode], capture_output=True,
                             text=True, check=True).stdout
        seen[mode] = [int(v) for v in out.split()]
    block = 64 * 2**20
    assert seen["default"][0] >= block and seen["default"][1] < block, seen
    assert seen["keep"][0] < block and seen["keep"][1] >= block, seen


@pytest.mark.parametrize("dims", [2, 3])
def test_standardised_weights_are_scale_free(dims):
    """``norm="weight"``: each 3x3 convolution uses its weights centred and scaled to unit
    sum of squares per output channel, times its gain, so scaling or shifting the stored
    weights changes nothing (tiling stays exact: test_tiling)."""
    cfg = ModelConfig(dims=dims, depth=2, base_features=4, classes=3, norm="weight",
                      features=(1.0, 2.0))
    net = new_model(cfg, seed=0).network.eval()
    shape = (70, 90) if dims == 2 else (12, 20, 26)
    x = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = net(x)
        conv = net.down[0][0]
        w = conv.weight.clone()
        conv.weight.mul_(7.0).add_(0.3)  # per output channel: scaled and shifted
        torch.testing.assert_close(net(x), before, rtol=1e-4, atol=1e-4)
        conv.weight.copy_(w)
        conv.gain.mul_(2.0)  # the gain is what sets the scale
        assert (net(x) - before).abs().max() > 1e-3
        conv.gain.div_(2.0)


def test_standardised_weights_keep_their_derivative_gain():
    cfg = ModelConfig(dims=2, depth=2, base_features=4, norm="weight", features=(1.0,),
                      derivative_gain=0.3)
    model = new_model(cfg, seed=0)
    with pytest.raises(ValueError, match="standardised weights"):
        model.network.set_derivative_gain(1.0)
    assert "8 base features" not in model.describe()
    assert "4 base features, standardised weights" in model.describe()

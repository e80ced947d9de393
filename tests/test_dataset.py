"""Tests of dataset.py: layouts, reading, the cache, bad inputs and the demo set (CPU, tiny data)."""
import functools
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import dataset  # noqa: E402
import demo  # noqa: E402
import utils  # noqa: E402
from utils import InputError  # noqa: E402


def config(data_dir, **overrides):
    return {**utils.constants(), "DATA_DIR": str(data_dir), "IMAGE_SIZE": 32, "BATCH_SIZE": 4, **overrides}


def brain(path, size=(64, 64), seed=0, fmt=None):
    """A grey ellipse with a bright random blob on black, like a tiny slice."""
    rng = np.random.default_rng(seed)
    w, h = size
    im = Image.new("L", size)
    d = ImageDraw.Draw(im)
    d.ellipse([w * 0.15, h * 0.1, w * 0.85, h * 0.9], fill=120)
    x, y = rng.integers(w // 3, 2 * w // 3), rng.integers(h // 3, 2 * h // 3)
    d.ellipse([x - w // 8, y - h // 8, x + w // 8, y + h // 8], fill=int(rng.integers(180, 255)))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im.save(path, fmt)


def make_oasis(root, counts=(12, 4, 4)):
    for split, n in zip(("train", "validate", "test"), counts):
        for i in range(n):
            brain(root / f"keras_png_slices_{split}" / f"case_{i:03d}_slice_0.nii.png", seed=i)
            mask = Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 4 * 85).astype(np.uint8))
            os.makedirs(root / f"keras_png_slices_seg_{split}", exist_ok=True)
            for j in range(3):  # more masks than images: any mask read would change the counts
                mask.save(root / f"keras_png_slices_seg_{split}" / f"seg_{i:03d}_slice_{j}.nii.png")
    return root


def make_adni(root, counts=((3, 2), (2, 1))):
    for split, (n_ad, n_nc) in zip(("train", "test"), counts):
        for cls, n in (("AD", n_ad), ("NC", n_nc)):
            for i in range(n):
                brain(root / split / cls / f"{i}_78.jpeg", size=(256, 240), seed=i, fmt="JPEG")
    return root


def make_folder(root, n):
    for i in range(n):
        brain(root / f"sub{i % 3}" / f"img_{i:02d}.png", seed=i)
    return root


def one_line(e):
    return "\n" not in str(e.value) and str(e.value).strip()


# ---------------------------------------------------------------- layouts
def test_oasis_layout_skips_masks(tmp_path):
    d = dataset.load_data(config(make_oasis(tmp_path / "data" / "keras_png_slices_data").parent))
    assert (d.layout, len(d.train), len(d.val), d.classes) == ("oasis", 12, 4, [])
    assert d.train.shape == (12, 1, 32, 32) and d.train.dtype == torch.uint8 and d.val.dtype == torch.uint8
    assert d.train_labels is None and d.val_labels is None and d.train.float().std() > 10
    assert d.sizes == {"64x64": 16} and len(d.fingerprint) >= 8 and "oasis" in d.summary()
    assert "\n" not in d.summary()


def test_oasis_train_on_test_and_direct_paths(tmp_path):
    root = make_oasis(tmp_path / "a" / "b" / "keras_png_slices_data")
    assert len(dataset.load_data(config(tmp_path, OASIS_TRAIN_ON_TEST=True)).train) == 16
    d = dataset.load_data(config(root))
    assert (d.layout, d.root, len(d.train), len(d.val)) == ("oasis", str(root), 12, 4)


def test_adni_layout(tmp_path):
    root = make_adni(tmp_path / "AD_NC")
    for folder in (tmp_path, root):
        d = dataset.load_data(config(folder))
        assert (d.layout, len(d.train), len(d.val), d.classes) == ("adni", 5, 3, ["AD", "NC"])
        assert d.train_labels.tolist() == [0, 0, 0, 1, 1] and d.val_labels.tolist() == [0, 0, 1]
        assert d.train_labels.dtype == torch.int64 and d.sizes == {"256x240": 8}


def test_folder_layout_split(tmp_path):
    make_folder(tmp_path, 40)
    (tmp_path / "notes.txt").write_text("not an image")
    make_folder(tmp_path / ".hidden", 3)
    make_folder(tmp_path / "keras_png_slices_seg_train", 3)
    a, b = dataset.load_data(config(tmp_path)), dataset.load_data(config(tmp_path))
    assert (a.layout, len(a.train), len(a.val)) == ("folder", 38, 2)
    assert torch.equal(a.val, b.val) and a.train_labels is None
    c = dataset.load_data(config(tmp_path, SEED=1))
    assert len(c.val) == 2 and not torch.equal(a.val, c.val)


def test_single_image_folder(tmp_path):
    brain(tmp_path / "x.png")
    d = dataset.load_data(config(tmp_path))
    assert (len(d.train), len(d.val)) == (1, 0) and d.val.shape == (0, 1, 32, 32)


# ---------------------------------------------------------------- reading
def test_non_square_is_padded_not_stretched(tmp_path):
    Image.new("L", (32, 64), 255).save(tmp_path / "tall.png")
    a = dataset.read_folder(str(tmp_path), 32)[0, 0].float()
    assert a[:, :6].max() < 10 and a[:, -6:].max() < 10  # black bands left and right
    assert a[:, 10:22].min() > 245 and a[0, 10:22].min() > 245  # white centre from top to bottom


def test_image_modes_and_sizes(tmp_path):
    Image.new("RGB", (40, 40), (255, 0, 0)).save(tmp_path / "a_rgb.png")
    rgba = Image.new("RGBA", (64, 64), (255, 255, 255, 0))
    ImageDraw.Draw(rgba).rectangle([16, 16, 47, 47], fill=(255, 255, 255, 255))
    rgba.save(tmp_path / "b_rgba.png")
    Image.new("L", (50, 50), 200).convert("P").save(tmp_path / "c_pal.png")
    a16 = np.zeros((64, 64), np.uint16)
    a16[16:48, 16:48] = 1000
    Image.fromarray(a16).save(tmp_path / "d_16bit.png")
    Image.new("1", (30, 30), 1).save(tmp_path / "e_bw.bmp")
    Image.new("L", (128, 96), 90).save(tmp_path / "f_big.tif")
    x = dataset.read_folder(str(tmp_path), 32)
    assert x.shape == (6, 1, 32, 32) and x.dtype == torch.uint8
    rgb, rgba, pal, b16, bw, big = x[:, 0].float()
    assert 60 < rgb.mean() < 90  # red's luma, about 76
    assert rgba[0, 0] == 0 and rgba[16, 16] > 245  # transparent is black
    assert abs(pal[16, 16] - 200) < 2 and b16[16, 16] == 255 and b16[0, 0] == 0 and bw.min() > 245
    assert big[0, 16] == 0 and abs(big[16, 16] - 90) < 2  # 128x96 padded top and bottom


def png16(path, a):
    """An H x W x C uint16 array as a 16-bit PNG (gray, gray+alpha, RGB, RGBA), written by hand: PIL cannot."""
    h, w, c = a.shape
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in a)  # filter type 0 on every row
    chunk = lambda kind, d: struct.pack(">I", len(d)) + kind + d + struct.pack(">I", zlib.crc32(kind + d))  # noqa
    head = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(raw)) +
                     chunk(b"IEND", b""))


def test_16_bit_colour_images_keep_their_full_range(tmp_path):
    """16-bit RGB and RGBA TIFFs (12-bit data here) and 16-bit RGB and gray+alpha PNGs read as their 16-bit grayscale
    twin does, scaled by their maximum (PIL alone keeps their high bytes: near black)."""
    tifffile = pytest.importorskip("tifffile")
    ramp = np.zeros((48, 48), np.uint16)
    ramp[8:40, 8:40] = np.linspace(400, 4000, 32).round().astype(np.uint16)  # 12-bit data
    Image.fromarray(ramp).save(tmp_path / "a_gray16.png")
    rgb, opaque = np.stack([ramp] * 3, -1), np.full((48, 48, 1), 65535, np.uint16)
    tifffile.imwrite(tmp_path / "b_rgb16.tif", rgb, photometric="rgb")
    tifffile.imwrite(tmp_path / "c_rgba16.tif", np.concatenate([rgb, opaque], -1), photometric="rgb",
                     extrasamples=["unassalpha"])
    tifffile.imwrite(tmp_path / "d_planar16.tif", rgb.transpose(2, 0, 1), photometric="rgb", planarconfig="separate")
    png16(tmp_path / "e_rgb16.png", rgb)
    png16(tmp_path / "f_gray_alpha16.png", np.concatenate([ramp[..., None], opaque], -1))
    half = np.concatenate([rgb, opaque], -1)
    half[:, :24, 3] = 0  # transparent on the left: black
    tifffile.imwrite(tmp_path / "g_half_transparent16.tif", half, photometric="rgb", extrasamples=["unassalpha"])
    x, names = dataset.read_folder(str(tmp_path), 32, with_names=True)
    x = x[:, 0].int()
    assert len(x) == 7 and x[0].max() == 255
    for image, name in zip(x[1:6], names[1:6]):
        assert (image - x[0]).abs().max() <= 1, name
    assert x[6][:, :13].max() == 0 and (x[6][:, 19:] - x[0][:, 19:]).abs().max() <= 1


def test_read_folder_sorted_and_errors(tmp_path):
    for i, v in enumerate((10, 20, 30)):
        Image.new("L", (8, 8), v).save(tmp_path / f"{2 - i}.png")
    x = dataset.read_folder(str(tmp_path), 8)
    assert x[:, 0, 0, 0].tolist() == [30, 20, 10]
    assert dataset.read_folder(str(tmp_path / "1.png"), 8).shape == (1, 1, 8, 8)
    with pytest.raises(InputError) as e:
        dataset.read_folder(str(tmp_path / "missing"), 8)
    assert one_line(e)


def test_a_missing_input_path_is_said_not_to_exist(tmp_path):
    for path in (tmp_path / "missing.png", tmp_path / "missing"):
        with pytest.raises(InputError) as e:
            dataset.read_folder(str(path), 8)
        assert one_line(e) and str(e.value).startswith(f"{path} does not exist"), str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError) as e:
        dataset.read_folder(str(tmp_path / "empty"), 8)
    assert one_line(e) and "no readable images" in str(e.value)


def test_cache_reused_then_rebuilt(tmp_path, monkeypatch):
    make_folder(tmp_path, 6)
    first = dataset.load_data(config(tmp_path))
    calls = []
    decode = dataset.decode_image
    monkeypatch.setattr(dataset, "decode_image", lambda p, s: calls.append(p) or decode(p, s))
    again = dataset.load_data(config(tmp_path))
    assert calls == [] and torch.equal(first.train, again.train) and first.fingerprint == again.fingerprint
    Image.new("L", (64, 64), 255).save(tmp_path / "sub0" / "img_00.png")
    changed = dataset.load_data(config(tmp_path))
    assert len(calls) == 6 and changed.fingerprint != first.fingerprint
    assert len(os.listdir(tmp_path / ".cache")) == 1  # the stale cache was removed
    assert dataset.load_data(config(tmp_path, IMAGE_SIZE=16)).train.shape[-1] == 16


def test_corrupt_cache_rebuilt_and_fallback_folder(tmp_path, monkeypatch):
    make_folder(tmp_path / "data", 4)
    dataset.load_data(config(tmp_path / "data"))
    (cache,) = (tmp_path / "data" / ".cache").iterdir()
    cache.write_bytes(b"garbage")
    assert len(dataset.load_data(config(tmp_path / "data")).train) == 3
    for f in (tmp_path / "data" / ".cache").iterdir():
        f.unlink()
    (tmp_path / "data" / ".cache").rmdir()
    (tmp_path / "data" / ".cache").write_text("a file where the cache folder would go")  # not writable
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    d = dataset.load_data(config(tmp_path / "data"))
    assert d.cache == str(tmp_path / "home" / ".cache" / "brain-ddpm") and os.listdir(d.cache)


# ---------------------------------------------------------------- bad inputs
def empty_folder(path):
    for f in path.iterdir():
        f.unlink()
    return path


@pytest.mark.parametrize("case, expected", [
    ("missing", "is not a folder"), ("empty", "no images"), ("only_masks", "only segmentation masks"),
    ("oasis_only_masks", "no keras_png_slices_train folder"), ("no_validate", "no keras_png_slices_validate"),
    ("empty_validate", "keras_png_slices_validate holds no images"), ("no_adni_test", "no test/AD folder"),
    ("empty_adni_test", "test holds no images")])
def test_bad_layouts_one_line_error(tmp_path, case, expected):
    if case == "empty":
        (tmp_path / "README.md").write_text("nothing here")
    elif case == "only_masks":
        for s in ("train", "validate"):
            brain(tmp_path / f"keras_png_slices_seg_{s}" / "seg_000_slice_0.nii.png")
    elif case == "oasis_only_masks":
        make_oasis(tmp_path / "keras_png_slices_data")
        for s in ("train", "validate", "test"):
            empty_folder(tmp_path / "keras_png_slices_data" / f"keras_png_slices_{s}").rmdir()
    elif case in ("no_validate", "empty_validate"):
        make_oasis(tmp_path / "keras_png_slices_data")
        v = empty_folder(tmp_path / "keras_png_slices_data" / "keras_png_slices_validate")
        if case == "no_validate":
            v.rmdir()
    elif case in ("no_adni_test", "empty_adni_test"):
        make_adni(tmp_path / "AD_NC", counts=((2, 2), (0, 0)))
        if case == "empty_adni_test":
            for c in ("AD", "NC"):
                os.makedirs(tmp_path / "AD_NC" / "test" / c)
    with pytest.raises(InputError) as e:
        dataset.load_data(config(tmp_path / "nope" if case == "missing" else tmp_path))
    assert one_line(e) and expected in str(e.value), str(e.value)


def test_bad_files_skipped_with_warnings(tmp_path, capsys, monkeypatch):
    make_folder(tmp_path, 4)
    good = (tmp_path / "sub0" / "img_00.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "noise.JPEG").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "text.png").write_text("hello")
    with open(os.path.join(os.fsencode(tmp_path), b"bad\xffname.png"), "wb") as f:
        f.write(b"\x89PNG not really")
    os.symlink(tmp_path, tmp_path / "loop")  # a folder loop
    os.symlink("self.png", tmp_path / "self.png")  # a file link loop
    big = tmp_path / "huge.png"
    Image.new("L", (300, 300)).save(big)
    monkeypatch.setattr(dataset, "MAX_PIXELS", 200 * 200)
    d = dataset.load_data(config(tmp_path))
    assert len(d.train) + len(d.val) == 4
    err = capsys.readouterr().err
    for name in ("truncated.png", "empty.jpg", "noise.JPEG", "text.png", "bad\ufffdname.png", "self.png", "huge.png"):
        assert f"warning: skipping {tmp_path / name}" in err, name
    for f in (tmp_path / "sub0").iterdir():
        f.write_bytes(b"")
    for sub in ("sub1", "sub2"):
        for f in (tmp_path / sub).iterdir():
            f.unlink()
    with pytest.raises(InputError) as e:
        dataset.load_data(config(tmp_path))
    assert one_line(e) and "could be read" in str(e.value)


def test_fewer_images_than_batch(tmp_path, capsys):
    d = dataset.load_data(config(make_folder(tmp_path, 3), BATCH_SIZE=64))
    assert len(d.train) == 2 and "notice: only 2 training images" in capsys.readouterr().out


def test_command_line(tmp_path):
    make_oasis(tmp_path / "keras_png_slices_data")
    run = lambda *a: subprocess.run([sys.executable, "dataset.py", *a], cwd=REPO, capture_output=True, text=True,
                                    timeout=120)
    ok = run(str(tmp_path), "--image-size", "32")
    assert ok.returncode == 0, ok.stderr
    assert "oasis" in ok.stdout and "12 train" in ok.stdout and "4 val" in ok.stdout
    bad = run(str(tmp_path / "missing"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- the demo
def test_demo_looks_like_brains(tmp_path):
    demo.build_demo(str(tmp_path), n_train=24, n_val=4, n_test=4)
    base = tmp_path / "keras_png_slices_data"
    assert (tmp_path / "DONE").exists() and len(os.listdir(base / "keras_png_slices_train")) == 24
    assert sorted(os.listdir(base / "keras_png_slices_seg_validate"))[0] == "seg_002_slice_0.nii.png"  # cases go on
    x = dataset.read_folder(str(base / "keras_png_slices_train"), 256)[:, 0].float()
    assert x.shape == (24, 256, 256)
    assert x[:, :8, :8].max() == 0 and x[:, -8:, -8:].max() == 0  # black corners
    fg = (x > 20).float().mean((1, 2))
    assert 0.1 < fg.min() and fg.max() < 0.7 and 0.25 < fg.mean() < 0.5
    diff = (x[:, None] - x[None]).abs().mean((2, 3))
    assert diff[~torch.eye(24, dtype=torch.bool)].min() > 3  # no two slices alike
    seg = np.array(Image.open(base / "keras_png_slices_seg_train" / "seg_001_slice_16.nii.png"))
    assert sorted(np.unique(seg)) == [0, 85, 170, 255]
    img = np.array(Image.open(base / "keras_png_slices_train" / "case_001_slice_16.nii.png"))
    assert ((seg > 0) == (img > 0)).mean() > 0.97  # the masks cover the brain


def test_default_data_dir_builds_demo_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    os.makedirs("data")
    (tmp_path / "data" / "README.md").write_text("put data here")
    build = functools.partial(demo.build_demo, n_train=40, n_val=4, n_test=4, size=64)
    monkeypatch.setattr(demo, "build_demo", build)
    d = dataset.load_data(config("data"))
    assert (d.layout, len(d.train), len(d.val)) == ("demo", 40, 4)
    assert "building the demo set" in capsys.readouterr().out
    monkeypatch.setattr(demo, "build_demo", lambda *a, **k: pytest.fail("rebuilt the demo"))
    assert len(dataset.load_data(config("data/", OASIS_TRAIN_ON_TEST=True)).train) == 44
    with pytest.raises(InputError):  # another DATA_DIR never gets a demo
        dataset.load_data(config(tmp_path / "other"))
    make_folder(tmp_path / "data" / "mine", 5)  # real data wins over the demo
    d = dataset.load_data(config("data"))
    assert (d.layout, len(d.train) + len(d.val)) == ("folder", 5)
    os.remove("data/demo/DONE")  # half-built: rebuilt
    monkeypatch.setattr(demo, "build_demo", build)
    shutil.rmtree(tmp_path / "data" / "mine")
    assert dataset.load_data(config("data")).layout == "demo" and os.path.exists("data/demo/DONE")

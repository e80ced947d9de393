"""Tests of volumes.py and the volumes layout of dataset.py, on tiny synthetic scans written with nibabel and on
the MNI template (CPU, a few seconds)."""
import os
import shutil
import struct
import subprocess
import sys

import nibabel
import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import dataset  # noqa: E402
import demo  # noqa: E402
import utils  # noqa: E402
import volumes  # noqa: E402
from utils import InputError  # noqa: E402

SIZE = 32


def config(data_dir, **overrides):
    return {**utils.constants(), "DATA_DIR": str(data_dir), "IMAGE_SIZE": SIZE, "BATCH_SIZE": 4, **overrides}


def head(zooms=(1.0, 1.0, 1.0), fov=(40, 48, 36)):
    """A RAS voxel array: an ellipsoid 'brain' with smooth texture and a bright marker front, right and up of its
    centre, sampled with voxels of zooms mm over a fov in mm: the same head whatever the voxel size."""
    x, y, z = np.meshgrid(*[(np.arange(round(f / d)) - (round(f / d) - 1) / 2) * d for f, d in zip(fov, zooms)],
                          indexing="ij")
    inside = (x / 14) ** 2 + (y / 18) ** 2 + (z / 13) ** 2 < 1
    vol = inside * (100 + 40 * np.sin(x / 5) * np.cos(y / 7) + 2 * z)
    vol[(x - 7) ** 2 + (y - 10) ** 2 + (z - 3) ** 2 < 9] = 250
    return vol.round()


def save(vol, path, affine=None, kind=nibabel.Nifti1Image, dtype=np.int16):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nibabel.save(kind(vol.astype(dtype), np.eye(4) if affine is None else affine), str(path))
    return path


def slices(path):
    return volumes.read_scan(str(path), SIZE)


def make_scans(folder, names):
    for i, name in enumerate(names):
        save(head(fov=(40 + 2 * (i % 3), 48, 36)), folder / name)
    return folder


# ---------------------------------------------------------------- orientation, aspect, intensity
def test_orientation_is_the_projects_display(tmp_path):
    images, positions, desc, notice = slices(save(head(), tmp_path / "ras.nii.gz"))
    assert images.dtype == torch.uint8 and images.shape[1:] == (SIZE, SIZE) and notice is None
    assert desc == "40x48x36 1x1x1 mm" and positions.min() >= 0 and positions.max() <= 1
    assert torch.all(positions[1:] > positions[:-1])  # bottom to top
    ys, xs = np.nonzero((images.amax(0) > 200).numpy())  # the marker: anterior (up), right (image left: radiological)
    assert len(ys) and ys.mean() < SIZE / 2 - 3 and xs.mean() < SIZE / 2 - 3
    assert images[:, :2].max() == 0 and images[:, :, :2].max() == 0  # dark background


def test_same_head_stored_any_way_gives_the_same_slices(tmp_path):
    vol = head()
    n = np.array(vol.shape) - 1
    reference = slices(save(vol, tmp_path / "ras.nii.gz"))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:2, 3] = n[:2]  # same world position for every voxel
    permuted = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)  # axes stored z, x, y
    las = np.diag([-1.0, 1.0, 1.0, 1.0])
    las[0, 3] = n[0]
    for path in (save(vol[::-1, ::-1], tmp_path / "lps.nii.gz", lps), save(vol.transpose(2, 0, 1), tmp_path /
                 "zxy.nii", permuted), save(vol[::-1], tmp_path / "las.hdr", las, nibabel.AnalyzeImage),
                 save(vol, tmp_path / "fs.mgz", kind=nibabel.MGHImage, dtype=np.float32)):
        got = slices(path)
        assert torch.equal(got[0], reference[0]) and torch.equal(got[1], reference[1]), path


def test_anisotropic_voxels_keep_the_aspect_and_pad(tmp_path):
    iso = slices(save(head(fov=(48, 40, 36)), tmp_path / "iso.nii.gz"))[0]
    aniso = save(head((1.0, 2.0, 1.5), fov=(48, 40, 36)), tmp_path / "aniso.nii.gz", np.diag([1, 2, 1.5, 1]))
    coarse = slices(aniso)[0]
    for images in (iso, coarse):
        mid = images[len(images) // 2].float()
        assert mid[:2].max() == 0 and mid[-2:].max() == 0  # 48 x 40 mm: padded top and bottom, not stretched
        ys, xs = np.nonzero((mid > 30).numpy())
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert abs(h / w - 36 / 28) < 0.15, (h, w)  # the brain is 36 mm front to back, 28 mm across
    assert (iso[len(iso) // 2].float() - coarse[len(coarse) // 2].float()).abs().mean() < 12


def test_intensity_is_robust_and_dtype_free(tmp_path):
    vol = head()
    ref = slices(save(vol, tmp_path / "u8.nii.gz", dtype=np.uint8))[0]
    assert ref.max() == 255 and ref.float().mean() > 20
    for i, (scaled, dtype) in enumerate(((vol * 10, np.int16), (vol * 0.37, np.float32), (vol - 50.5, np.float32))):
        scaled[vol == 0] = 0  # the background stays zero (and black) even when the tissue goes negative
        got = slices(save(scaled, tmp_path / f"s{i}.nii.gz", dtype=dtype))[0]
        assert got.shape == ref.shape and (got.int() - ref.int()).abs().max() <= 1
    spiky = vol.astype(np.float32)
    spiky[vol == 0] = np.where(np.arange((vol == 0).sum()) % 3 == 0, np.nan, np.inf)  # NaN and inf: background
    spiky[20, 24, 18] = 1e9  # one hot voxel is clipped away by the percentiles
    got = slices(save(spiky, tmp_path / "spiky.nii.gz", dtype=np.float32))[0]
    assert got.shape == ref.shape and (got.int() - ref.int()).abs().float().mean() < 1


def stored(vol, path, dtype, kind=nibabel.Nifti1Image):
    """vol saved as another tool would store it: float32 or float64 as they are, uint8 rounded, int16 scaled by
    scl_slope and scl_inter (nibabel picks them, as SPM does)."""
    img = kind(vol.astype(np.float64 if dtype == np.float64 else np.float32), np.eye(4))
    img.set_data_dtype(dtype)
    nibabel.save(img, str(path))
    return path


def test_scans_as_other_tools_write_them(tmp_path):
    """float32, float64, scaled int16 and uint8 scans, 3-D and X x Y x Z x 1 (FSL, ANTs), as .nii, .nii.gz, Analyze
    and MGZ (always stored 4-D), all read as the same slices."""
    vol = head()
    reference = slices(save(vol, tmp_path / "ref.nii.gz", dtype=np.float32))
    paths = [stored(v, tmp_path / f"{np.dtype(t).name}_{v.ndim}d{ext}", t) for t in (np.float32, np.float64, np.int16,
             np.uint8) for v in (vol, vol[..., None]) for ext in (".nii", ".nii.gz")]
    paths += [stored(v[::-1], tmp_path / f"analyze_{v.ndim}d.hdr", np.float32, nibabel.AnalyzeImage)  # read as LAS
              for v in (vol, vol[..., None])] + [stored(vol, tmp_path / "freesurfer.mgz", np.float32, nibabel.MGHImage)]
    assert nibabel.load(str(tmp_path / "int16_4d.nii")).dataobj.slope != 1  # really scaled
    for path in paths:
        images, positions, desc, notice = slices(path)
        assert desc == "40x48x36 1x1x1 mm" and notice is None, path
        assert torch.equal(positions, reference[1]) and (images.int() - reference[0].int()).abs().max() <= 1, path


def test_nibabels_own_test_scans(tmp_path):
    from nibabel.testing import data_path
    images, _, desc, notice = slices(os.path.join(data_path, "anatomical.nii"))  # big-endian int16, 3-D
    assert desc == "33x41x25 2x2x2 mm" and notice is None and len(images) > 5 and images.max() == 255
    images, _, desc, notice = slices(os.path.join(data_path, "example4d.nii.gz"))  # int16, 4-D
    assert desc.startswith("128x96x24 ") and "holds 2 volumes" in notice and images.max() > 200


def test_slice_choice_and_positions(tmp_path, monkeypatch):
    path = save(head(), tmp_path / "h.nii.gz")
    images, positions, _, _ = slices(path)
    assert 12 <= len(images) <= 30 and positions[0] > 0.05 and positions[-1] < 0.95  # the big slices only
    monkeypatch.setattr(volumes, "SLICE_MIN_AREA", 0.0)
    everything = slices(path)[1]
    assert everything[0] == 0 and everything[-1] == 1 and len(everything) > len(images)
    monkeypatch.setattr(volumes, "SLICE_BAND", (0.4, 0.6))
    band = slices(path)[1]
    assert 0 < len(band) < len(images) and band.min() >= 0.4 and band.max() <= 0.6


# ---------------------------------------------------------------- the volumes layout
def test_subject_split_never_leaks(tmp_path, monkeypatch):
    names = [f"sub-0{i}/ses-{j}/anat/sub-0{i}_ses-{j}_T1w.nii.gz" for i in range(1, 5) for j in (1, 2)]
    names += [f"OAS1_000{i}_MR{j}_mpr.nii.gz" for i in range(1, 3) for j in (1, 2)] + ["plain_a.nii", "plain_b.nii"]
    make_scans(tmp_path / "scans", names)
    monkeypatch.setattr(dataset, "VAL_SUBJECTS", 0.5)
    d = dataset.load_data(config(tmp_path))
    assert d.layout == "volumes" and d.root == str(tmp_path / "scans") and len(d.scans) == 14 and d.classes == []
    train, val = ({s.subject for s in d.scans if s.split == x} for x in ("train", "val"))
    assert len(train) == len(val) == 4 and not train & val and "OAS1_0001" in train | val
    for split, images, positions in (("train", d.train, d.train_positions), ("val", d.val, d.val_positions)):
        read = [slices(s.path) for s in d.scans if s.split == split]  # the split holds exactly its scans' slices
        assert torch.equal(images[:, 0], torch.cat([r[0] for r in read]))
        assert torch.equal(positions, torch.cat([r[1] for r in read])) and positions.dtype == torch.float32
    again = dataset.load_data(config(tmp_path))
    assert again.scans == d.scans and torch.equal(again.val_positions, d.val_positions)
    assert {s.subject for s in dataset.load_data(config(tmp_path, SEED=3)).scans if s.split == "val"} != val


def test_split_and_class_folders(tmp_path, capsys):
    for split, n in (("train", 3), ("validate", 1), ("test", 2)):
        for cls in ("NC", "AD"):
            make_scans(tmp_path / split / cls, [f"{cls}_{split}_{i}.nii.gz" for i in range(n)])
    d = dataset.load_data(config(tmp_path))
    assert (d.layout, d.classes, len(d.scans)) == ("volumes", ["AD", "NC"], 8)
    assert [s.split for s in d.scans].count("val") == 2 and "not reading the 4 scans" in capsys.readouterr().out
    assert d.train_labels.dtype == torch.int64 and len(d.train_labels) == len(d.train) == len(d.train_positions)
    assert d.train_labels[0] == 0 and d.train_labels[-1] == 1 and set(d.val_labels.tolist()) == {0, 1}
    shutil.rmtree(tmp_path / "validate")  # test is the held-out split when there is no val
    d = dataset.load_data(config(tmp_path))
    assert [s.split for s in d.scans].count("val") == 4 and all("test" in s.path for s in d.scans if s.split == "val")
    shutil.rmtree(tmp_path / "test")  # train alone: subjects held out from it, one of each class
    d = dataset.load_data(config(tmp_path))
    held = [s for s in d.scans if s.split == "val"]
    assert sorted(os.path.basename(s.path)[:2] for s in held) == ["AD", "NC"] and d.classes == ["AD", "NC"]
    shutil.move(tmp_path / "train", tmp_path / "val")
    with pytest.raises(InputError) as e:
        dataset.load_data(config(tmp_path))
    assert "no train folder" in str(e.value) and "\n" not in str(e.value)


def test_subject_folders_are_not_classes(tmp_path):
    make_scans(tmp_path, [f"sub-0{i}/anat/sub-0{i}_T1w.nii.gz" for i in range(3)])
    d = dataset.load_data(config(tmp_path))
    assert d.classes == [] and d.train_labels is None and len(d.scans) == 3


def test_cache_keeps_positions_and_watches_the_image_file(tmp_path, monkeypatch):
    vol = head()
    save(vol, tmp_path / "a.nii.gz")
    save(vol[::-1], tmp_path / "b.hdr", np.diag([-1.0, 1, 1, 1]), nibabel.AnalyzeImage)
    first = dataset.load_data(config(tmp_path))
    monkeypatch.setattr(volumes, "read_scan", lambda *a: pytest.fail("decoded again"))
    again = dataset.load_data(config(tmp_path))
    assert torch.equal(again.train, first.train) and torch.equal(again.train_positions, first.train_positions)
    assert again.fingerprint == first.fingerprint and again.scans == first.scans
    monkeypatch.undo()
    save(vol[::-1] * 0.5, tmp_path / "b.hdr", np.diag([-1.0, 1, 1, 1]), nibabel.AnalyzeImage)
    os.utime(tmp_path / "b.hdr", ns=(0, 0))  # only the .img changed
    assert dataset.load_data(config(tmp_path)).fingerprint != first.fingerprint
    monkeypatch.setattr(volumes, "SLICE_MIN_AREA", 0.1)  # the slicing settings are part of the key
    assert len(dataset.load_data(config(tmp_path)).train) > len(first.train)


def test_bad_scans_named_and_skipped(tmp_path, capsys):
    vol = head()
    make_scans(tmp_path, ["good_0.nii.gz", "good_1.nii.gz"])
    good = (tmp_path / "good_0.nii.gz").read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "corrupt.nii.gz").write_bytes(good[:400] + bytes(1000) + good[1400:])
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    (tmp_path / "noise.nii").write_bytes(np.random.default_rng(0).bytes(4000))
    save(vol[:, :, 18], tmp_path / "flat.nii.gz")
    save(vol[:, :, 18:19], tmp_path / "one_slice.nii.gz")
    save(np.stack([vol, vol * 0.5], -1), tmp_path / "four_d.nii.gz")
    save(vol, tmp_path / "no_image.hdr", kind=nibabel.AnalyzeImage)
    os.remove(tmp_path / "no_image.img")
    save(np.zeros_like(vol), tmp_path / "blank.nii.gz")
    for name, size in (("zero_voxel.nii", 0.0), ("nan_voxel.nii", float("nan"))):
        raw = bytearray(save(vol, tmp_path / name).read_bytes())
        raw[80:84] = struct.pack("<f", size)  # pixdim[1], the first voxel size
        (tmp_path / name).write_bytes(raw)
    d = dataset.load_data(config(tmp_path))
    out, err = capsys.readouterr()
    assert len(d.scans) == 3 and "four_d.nii.gz holds 2 volumes (40x48x36x2): reading the first" in out
    reasons = {"truncated.nii.gz": "not a readable scan: Compressed file ended", "corrupt.nii.gz": "not a readable",
               "empty.nii.gz": "empty file", "noise.nii": "not a readable scan",
               "flat.nii.gz": "2-D scan", "one_slice.nii.gz": "2-D scan", "no_image.hdr": "without its image",
               "blank.nii.gz": "zero", "zero_voxel.nii": "zero or NaN voxel size", "nan_voxel.nii": "NaN voxel"}
    lines = err.splitlines()
    for name, reason in reasons.items():
        (line,) = [x for x in lines if f"warning: skipping {tmp_path / name} (" in x]
        assert reason in line, line
    assert len(lines) == len(reasons)
    for name in ("good_0.nii.gz", "good_1.nii.gz", "four_d.nii.gz"):
        os.remove(tmp_path / name)
    with pytest.raises(InputError) as e:
        dataset.load_data(config(tmp_path))
    assert "none of the 10 scans" in str(e.value) and "\n" not in str(e.value)


def test_mni_template_as_a_one_scan_set(tmp_path):
    import nilearn
    os.makedirs(tmp_path / "mni")
    shutil.copy(os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data", demo.TEMPLATE.format("t1")),
                tmp_path / "mni")
    d = dataset.load_data(config(tmp_path, IMAGE_SIZE=64))
    assert (d.layout, len(d.val), len(d.scans), d.sizes) == ("volumes", 0, 1, {"197x233x189 1x1x1 mm": 1})
    assert 60 < len(d.train) < 130 and d.train_positions.min() > 0.1 and d.train_positions.max() < 0.95
    # laid out as demo.py's _template, nose up: the middle slice, cropped to the brain, matches the template's
    # middle slice, and not flipped up-down (the symmetric template cannot tell left from right: the marker
    # of test_orientation_is_the_projects_display does)
    vol, _ = demo._template(64)
    ref = vol[len(vol) // 2, 0]
    mine = d.train[int((d.train_positions - 0.5).abs().argmin()), 0].float()
    ys, xs = np.nonzero((mine > 20).numpy())
    mine = torch.nn.functional.interpolate(mine[None, None, ys.min():ys.max() + 1, xs.min():xs.max() + 1],
                                           size=ref.shape, mode="bilinear")[0, 0]
    score = lambda a: np.corrcoef(a.flatten().numpy(), ref.flatten().numpy())[0, 1]  # noqa: E731
    assert score(mine) > 0.85 and score(mine) > score(mine.flip(0)) + 0.05


def test_command_line_describes_and_previews(tmp_path):
    make_scans(tmp_path / "scans", [f"s{i}.nii.gz" for i in range(5)])
    out = tmp_path / "preview.png"
    r = subprocess.run([sys.executable, "dataset.py", str(tmp_path / "scans"), "--image-size", "32", "--preview",
                        str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "volumes" in r.stdout and "scans   5: 4 train (4 subjects), 1 val (1 subjects)" in r.stdout
    assert "slices kept per scan" in r.stdout and "40x48x36 1x1x1 mm" in r.stdout
    im = np.array(Image.open(out))
    assert im.shape == (4 * 34 + 2, 8 * 34 + 2) and im[2:34, 2:34].max() > 50 and im.max() == 255  # 4 scans x 8 slices


def test_preview_of_an_image_folder(tmp_path):
    for i in range(10):
        Image.fromarray(np.full((16, 16), 20 * i + 10, np.uint8)).save(tmp_path / f"{i}.png")
    d = dataset.load_data(config(tmp_path))
    dataset.save_preview(d, str(tmp_path / "out" / "preview.png"))
    im = np.array(Image.open(tmp_path / "out" / "preview.png"))
    assert im.shape == (2 * 34 + 2, 8 * 34 + 2) and abs(int(im[10, 10]) - int(d.train[0, 0, 0, 0])) <= 1

"""Finds and reads the data: OASIS PNG slices, ADNI AD/NC slices, any folder of images, a folder of NIfTI, Analyze
or MGZ scans (sliced by volumes.py), or the demo (demo.py).

Every image is decoded once into a uint8 cache (<root>/.cache/*.pt). `python dataset.py [DIR]` shows what it finds.
"""
import hashlib
import os
import re
import sys
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

import demo as demo_sets
import utils
import volumes
import cohorts
from cohorts import ADNI_CLASSES, ADNI_NAME, ADNI_SPLITS, OASIS, SLICE_NAME, SUBJECT_ID, subject_of
from utils import InputError, show_path

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # files read as images (any case)
MAX_PIXELS = 64_000_000  # larger images are refused as possible decompression bombs
VAL_FRACTION = 0.05  # held-out share of a plain image folder whose names carry no subject id
SEARCH_DEPTH = 3  # folder levels under DATA_DIR searched for an OASIS or ADNI layout
FALLBACK_CACHE = "~/.cache/brain-ddpm"  # cache folder when the data folder is not writable
VOLUME_SPLITS = {"train": "train", "val": "val", "validate": "val", "test": "test"}  # scan split folders (any case)
VAL_SUBJECTS = 0.1  # held-out share of subjects: scans without split folders, images named by subject id
PREVIEW_SIDE = 8  # the --preview contact sheet is PREVIEW_SIDE x PREVIEW_SIDE images

Image.MAX_IMAGE_PIXELS = MAX_PIXELS
warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse, do not just warn


class Scan(NamedTuple):
    """One scan of a volumes folder, as read."""
    path: str
    subject: str  # its subject id (SUBJECT_ID) or, without one, its own name: a subject's scans share a split
    split: str  # 'train' | 'val'
    slices: int  # slices kept; the split's images hold them in this order, bottom to top
    label: int | None = None  # its class, where the data has classes


@dataclass
class Data:
    """A dataset in memory: uint8 N x 1 x S x S splits, with labels where the layout has classes."""
    layout: str  # 'oasis' | 'adni' | 'folder' | 'volumes' | 'demo'
    root: str  # the folder that was read
    train: torch.Tensor
    val: torch.Tensor
    train_labels: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None
    classes: list = field(default_factory=list)
    train_positions: torch.Tensor | None = None  # slice position in [0, 1], bottom to top, where the layout has it
    val_positions: torch.Tensor | None = None
    fingerprint: str = ""  # hash of the file lists (names, sizes, mtimes) and the image size
    cache: str = ""
    sizes: dict = field(default_factory=dict)  # original image sizes found, 'WxH' (scans 'XxYxZ AxBxC mm'): count
    scans: list = field(default_factory=list)  # volumes: the Scans read, train ones first
    val_names: list = field(default_factory=list)  # each held-out image's file under root (a scan's: FILE:K)
    train_names: list = field(default_factory=list)  # each training image's, likewise
    labels_report: str = ""  # with a label table (LABELS): how its rows matched the files
    covariate_names: list = field(default_factory=list)  # COVARIATES: the table's columns, in order
    train_covariates: torch.Tensor | None = None  # COVARIATES: N x K values (NaN: not given for that image)
    val_covariates: torch.Tensor | None = None

    def summary(self):
        s = self.train.shape[-1]
        found = ", ".join(f"{k} ({v})" for k, v in Counter(self.sizes).most_common(3))
        classes = f", classes {'/'.join(self.classes)}" if self.classes else ""
        scans = f" from {len(self.scans)} scans" if self.scans else ""
        return (f"{self.layout} data in {show_path(self.root)}: {len(self.train)} train / {len(self.val)} val images"
                f"{scans} of {found} read at {s}x{s}{classes}; cache {show_path(self.cache)}")


# ---------------------------------------------------------------- reading images
def _scaled(a):
    """A float array as an 8-bit grayscale image, scaled by its maximum (negative values black)."""
    a = np.clip(a, 0, None)
    return Image.fromarray((a * (255 / max(a.max(), 1e-8))).round().astype(np.uint8))


def _deep(im):
    """Whether im is a PNG or TIFF of two or more 16-bit channels, of which PIL reads only the high bytes."""
    if len(im.getbands()) < 2:
        return False
    if im.format == "TIFF":
        return set(im.tag_v2.get(258, (8,))) == {16}  # BitsPerSample
    return im.format == "PNG" and bool(im.tile) and ";16" in str(im.tile[0].args)  # e.g. rawmode RGB;16B


def _deep_luma(path, im):
    """A 16-bit PNG or TIFF of two or more channels (gray or RGB, then alpha) as float32 luma, black where
    transparent, decoded by torchvision or tifffile at its full depth."""
    if im.format == "PNG":
        from torchvision.io import ImageReadMode, decode_png, read_file
        a = decode_png(read_file(path), ImageReadMode.UNCHANGED).permute(1, 2, 0).float().numpy()
    else:
        import tifffile
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            a = np.moveaxis(page.asarray(), page.axes.index("S"), -1).astype(np.float32)  # S: the samples' axis
    colour = a[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32) if a.shape[-1] >= 3 else a[..., 0]  # as PIL's L
    return colour * (a[..., -1] / 65535) if a.shape[-1] in (2, 4) else colour


def _gray(im, path):
    """An 8-bit grayscale copy: black where transparent, 16-bit and float images scaled by their maximum."""
    if _deep(im):
        return _scaled(_deep_luma(path, im))
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _scaled(np.asarray(im, dtype=np.float32))
    if "A" in im.getbands() or "transparency" in im.info:
        im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im.convert("RGBA"))
    return im.convert("L")


def pad_to_square(im):
    """A PIL image padded to a centred black square (never stretched): how every image enters the frame."""
    w, h = im.size
    if w == h:
        return im
    square = Image.new(im.mode, (max(w, h),) * 2)
    square.paste(im, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return square


def decode_image(path, size):
    """One file as a size x size uint8 array (grayscale, padded to a centred black square, resized) and its (w, h)."""
    if os.path.getsize(path) == 0:
        raise ValueError("empty file")
    with Image.open(path) as im:
        w, h = im.size
        if w * h > MAX_PIXELS:
            raise ValueError(f"{w}x{h} is over the {MAX_PIXELS} pixel limit")
        im = pad_to_square(_gray(im, path))
    if im.size != (size, size):
        im = im.resize((size, size), Image.LANCZOS)  # antialiased
    return np.asarray(im), (w, h)


def list_images(folder, exclude=(), exts=IMAGE_EXTS):
    """Image files (or other exts) under folder, sorted, skipping hidden folders, OASIS masks and exclude."""
    found, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:  # a symlink back into visited folders: no loops, no duplicates
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = [d for d in dirs if not d.startswith((".", OASIS + "seg")) and os.path.join(top, d) not in exclude]
        found += [os.path.join(top, f) for f in files if f.lower().endswith(exts) and not f.startswith(".")]
    return sorted(found)


def decode_all(paths, size):
    """Decode paths with a thread pool: (uint8 N x 1 x S x S, kept indices, sizes found, skip messages)."""
    def one(p):
        try:
            return decode_image(p, size)
        except Exception as e:  # unreadable, corrupt, truncated or too large: skipped
            reason = "not an image PIL can read" if isinstance(e, UnidentifiedImageError) else str(e).splitlines()[0]
            return f"{show_path(p)} ({reason or type(e).__name__})"
    with ThreadPoolExecutor(utils.io_threads()) as pool:
        results = list(pool.map(one, paths))
    keep = [i for i, r in enumerate(results) if not isinstance(r, str)]
    images = torch.from_numpy(np.stack([results[i][0] for i in keep])[:, None]) if keep else \
        torch.empty(0, 1, size, size, dtype=torch.uint8)
    sizes = dict(Counter("{}x{}".format(*results[i][1]) for i in keep))
    return images, keep, sizes, [r for r in results if isinstance(r, str)]


def read_folder(path, image_size, with_names=False):
    """All images in a folder (recursive, sorted by path) or one image file, as uint8 N x 1 x S x S; with_names, also
    the paths they came from."""
    if not os.path.exists(path):
        raise InputError(f"{show_path(path)} does not exist: check the path, and pass an image or a folder of images")
    paths = [path] if os.path.isfile(path) else list_images(path) if os.path.isdir(path) else []
    images, keep, _, skipped = decode_all(paths, image_size)
    for msg in skipped:
        print(f"warning: skipping {msg}", file=sys.stderr)
    if not len(images):
        raise InputError(f"no readable images ({', '.join(IMAGE_EXTS)}) in {show_path(path)}: pass a folder of images")
    return (images, [paths[i] for i in keep]) if with_names else images


# ---------------------------------------------------------------- the cache
def _read_cache(path, size):
    try:
        c = torch.load(path, weights_only=True)
        ok = c["images"].dtype == torch.uint8 and tuple(c["images"].shape[1:]) == (1, size, size)
        return c if ok and ("files" in c or len(c["names"]) == len(c["images"])) else None  # scans, or images
    except Exception:  # missing or corrupt: rebuilt
        return None


def _load_split(root, layout, split, paths, size):
    """Images of one split and the names (paths under root) of the files they came from, from the cache, decoding
    and caching them when the files changed."""
    entries = []
    for p in paths:
        try:
            st = [os.stat(p)] + [os.stat(f) for f in [volumes.image_of(p)] if f and os.path.exists(f)]  # Analyze .img
            entries.append((p, sum(s.st_size for s in st), max(s.st_mtime_ns for s in st)))
        except OSError as e:  # broken link, link loop, vanished
            print(f"warning: skipping {show_path(p)} ({e.strerror})", file=sys.stderr)
    h = hashlib.sha1(str(size).encode() + (volumes.settings() if layout == "volumes" else b""))
    for p, n, t in entries:
        h.update(os.fsencode(os.path.relpath(p, root)) + f"\0{n}\0{t}\n".encode())
    key = h.hexdigest()[:12]
    name = f"{layout}_{split}_{size}_{key}.pt"
    dirs = [os.path.join(root, ".cache"), os.path.expanduser(FALLBACK_CACHE)]
    for d in dirs:
        if (c := _read_cache(os.path.join(d, name), size)) is not None:
            break
    else:
        if layout == "volumes":
            c = _read_scans(root, [e[0] for e in entries], size)
        else:
            images, keep, sizes, skipped = decode_all([e[0] for e in entries], size)
            names = [os.fsencode(os.path.relpath(entries[i][0], root)).decode("utf-8", "surrogateescape")
                     for i in keep]
            c = {"images": images, "names": names, "sizes": sizes, "skipped": skipped}
        d = _save_cache(c, dirs, name, f"{layout}_{split}_{size}_")
    for msg in c.get("notices", ()):
        print(f"notice: {msg}")
    for msg in c["skipped"]:
        print(f"warning: skipping {msg}", file=sys.stderr)
    return c, key, d


def _read_scans(root, paths, size):
    """A split of scans as a cache record: their slices with positions, and the slices kept per file."""
    images, positions, counts, sizes, skipped, notices = volumes.read_scans(paths, size, utils.io_threads())
    return {"images": images, "positions": positions, "counts": counts, "sizes": sizes, "skipped": skipped,
            "notices": notices, "files": [os.path.relpath(p, root) for p in paths]}


def _save_cache(c, dirs, name, stale):
    """Write c atomically into the first writable folder of dirs, removing older caches of the split there."""
    for d in dirs:
        tmp = os.path.join(d, f"{name}.tmp{os.getpid()}")
        try:
            os.makedirs(d, exist_ok=True)
            torch.save(c, tmp)
            os.replace(tmp, os.path.join(d, name))
            for f in os.listdir(d):
                if f.startswith(stale) and f.endswith(".pt") and f != name:
                    os.remove(os.path.join(d, f))
            return d
        except OSError:
            if os.path.exists(tmp):
                os.remove(tmp)
    print(f"warning: could not write a cache in {' or '.join(map(show_path, dirs))}; decoding again next time",
          file=sys.stderr)
    return "none"


# ---------------------------------------------------------------- layouts
def _subdirs(d, exclude):
    try:
        return sorted(e.path for e in os.scandir(d) if e.is_dir() and e.path not in exclude
                      and not e.name.startswith((".", OASIS + "seg")))
    except OSError:
        return []


def find_layout(folder, exclude=()):
    """('oasis' | 'adni' | 'bids' | 'volumes' | 'folder', root): the first OASIS, ADNI or BIDS layout up to
    SEARCH_DEPTH levels down (ADNI's split/class folders holding scans and no images: volumes), else the folder
    holding all the scans."""
    level = [folder]
    for _ in range(SEARCH_DEPTH + 1):
        for d in level:
            name = os.path.basename(os.path.normpath(d))
            if os.path.isfile(os.path.join(d, "dataset_description.json")):
                return "bids", d
            if name == OASIS + "data" or os.path.isdir(os.path.join(d, OASIS + "train")):
                return "oasis", d
            if name == "AD_NC" or any(os.path.isdir(os.path.join(d, s, c)) for s in ADNI_SPLITS
                                      for c in ADNI_CLASSES):
                scans_only = not list_images(d, exclude) and list_images(d, exclude, volumes.SCAN_EXTS)
                return ("volumes" if scans_only else "adni"), d
        level = [s for d in level for s in _subdirs(d, exclude)]
    scans = list_images(folder, exclude, volumes.SCAN_EXTS)
    if not scans:
        return "folder", folder
    parts = os.path.relpath(os.path.commonpath([os.path.dirname(p) for p in scans]), folder).split(os.sep)
    parts = parts[:next((i for i, p in enumerate(parts) if p.lower() in VOLUME_SPLITS), len(parts))]
    return "volumes", os.path.normpath(os.path.join(folder, *parts))  # the deepest folder above all scans and splits


def _volume_splits(root, exclude, bids_suffix=None):
    """({split: paths}, classes, {path under root: class index}) of a folder of scans: 'train' and 'val' (else 'test')
    from its split folders, or 'all'; classes from the folders below them (two or more, not named like subjects). Of
    a BIDS dataset (bids_suffix given), its raw anat scans of that suffix only."""
    scans = list_images(root, exclude, volumes.SCAN_EXTS)
    if bids_suffix:
        scans = cohorts.bids_scans(scans, root, bids_suffix)
    parts = [os.path.relpath(p, root).split(os.sep) for p in scans]
    split_of = [VOLUME_SPLITS.get(q[0].lower()) if len(q) > 1 else None for q in parts]
    found = set(split_of) - {None}
    if found and "train" not in found:
        raise InputError(f"the scans in {show_path(root)} have {'/'.join(sorted(found))} folders but no train folder: "
                        f"add one, or put all the scans in one folder")
    held = "val" if "val" in found else "test" if "test" in found else None
    use = {"train": "train", held: "val"} if held else {"train": "all"} if found else {None: "all"}
    chosen = [(p, q[1:] if found else q, use[s]) for p, q, s in zip(scans, parts, split_of) if s in use]
    if len(chosen) < len(scans):
        print(f"notice: not reading the {len(scans) - len(chosen)} scans outside the "
              f"{' and '.join(k for k in use if k)} folders of {show_path(root)}")
    names = {q[0] for _, q, _ in chosen}
    is_classes = len(names) > 1 and all(len(q) > 1 and not re.search(SUBJECT_ID, q[0]) for _, q, _ in chosen)
    classes = sorted(names) if is_classes else []
    splits = {}
    for p, _, s in chosen:
        splits.setdefault(s, []).append(p)
    return splits, classes, {os.path.relpath(p, root): classes.index(q[0]) for p, q, _ in chosen} if classes else {}


def _split_files(layout, root, cfg, exclude):
    """{split: paths}; InputError when a split folder is missing or holds no images."""
    if layout == "folder":
        paths = list_images(root, exclude)
        return {"all": paths} if paths else {}
    if layout == "oasis":
        folders = {s: [OASIS + s] for s in ["train", "validate"] + ["test"] * cfg["OASIS_TRAIN_ON_TEST"]}
    else:
        folders = {s: [os.path.join(s, c) for c in ADNI_CLASSES] for s in ADNI_SPLITS}
    splits = {}
    for s, parts in folders.items():
        paths = []
        for d in parts:
            if not os.path.isdir(os.path.join(root, d)):
                raise InputError(f"the {layout.upper()} layout in {show_path(root)} has no {d} folder: add it, or point "
                                f"--data-dir at a complete copy")
            paths += list_images(os.path.join(root, d))
        if not paths:
            raise InputError(f"{show_path(os.path.join(root, OASIS + s if layout == 'oasis' else s))} holds no images "
                            f"({', '.join(IMAGE_EXTS)}): add them, or point --data-dir at a complete copy")
        splits[s] = paths
    return splits


def slice_positions(names, layout):
    """Each slice's position in [0, 1], bottom to top: the rank of its number K among its subject's slices, from
    OASIS `case_NNN_slice_K` or ADNI `SUBJECT_K` names (`..._slice_K` in a plain folder); (None, first name without
    one) when a name carries no position."""
    pattern = SLICE_NAME if layout in ("oasis", "folder") else ADNI_NAME
    found = {}
    for i, name in enumerate(names):
        stem = os.path.basename(name).split(".")[0]
        if not (m := pattern.fullmatch(stem)):
            return None, name
        found.setdefault((os.path.dirname(name), m[1]), []).append((int(m[2]), i))
    positions = torch.full((len(names),), 0.5)
    for slices in found.values():
        for rank, (_, i) in enumerate(sorted(slices)):
            positions[i] = rank / (len(slices) - 1) if len(slices) > 1 else 0.5
    return positions, None


def class_labels(train_names, val_names, layout):
    """(class names, train labels, held-out labels): ADNI's AD/NC, or a plain folder's first-level sub-folders (the
    ImageFolder convention); ([], None, None) when the images are not all in class folders."""
    folder = lambda name: name.split(os.sep)[1 if layout == "adni" else 0] if os.sep in name else None  # noqa: E731
    train, val = [folder(n) for n in train_names], [folder(n) for n in val_names]
    if layout == "oasis" or None in train + val:
        return [], None, None
    classes = list(ADNI_CLASSES) if layout == "adni" else sorted(set(train + val))
    return (classes, *(torch.tensor([classes.index(c) for c in f], dtype=torch.long) for f in (train, val)))


def _locate(cfg):
    """(layout name or None, folder to search, folders to leave out), building the demo where it is due: the
    labelled (AD/NC, with ages) one when CONDITION asks for classes or COVARIATES for any, the OASIS-like one
    otherwise."""
    folder = cfg["DATA_DIR"]
    if os.path.normpath(folder) != os.path.normpath(utils.DATA_DIR):
        return None, folder, set()
    demos = {name: os.path.join(folder, name) for name in ("demo", "demo_labelled")}
    if os.path.isdir(folder) and any(not e.startswith(".") and e != "README.md" and e not in demos
                                     for e in os.listdir(folder)):
        return None, folder, set(demos.values())  # real data in the default folder: never a demo
    labelled = utils.conditions_of(cfg)[0] or bool(utils.covariates_of(cfg))  # the labelled demo has the ages
    demo = demos["demo_labelled" if labelled else "demo"]
    if not demo_sets.is_built(demo, labelled):  # a half-built demo, or one from before the labelled demo's truth
        try:
            (demo_sets.build_labelled_demo if labelled else demo_sets.build_demo)(demo)
        except OSError as e:
            raise InputError(f"could not build the demo in {show_path(demo)} ({e.strerror or e}): make {show_path(folder)} "
                            f"writable or pass --data-dir PATH") from None
    return "demo", os.path.join(demo, "AD_NC" if labelled else OASIS + "data"), set()


def _folder_held_out(names, label_of, classes, seed):
    """Which images of a plain folder are held out: whole subjects (VAL_SUBJECTS of each class) where the names carry
    subject ids, else a seeded VAL_FRACTION of the images, at least one when there are two."""
    subjects = [subject_of(n) for n in names]
    if any(re.search(SUBJECT_ID, n) for n in names):
        of = {}
        for n, u in zip(names, subjects):
            of.setdefault(u, label_of.get(n))
        held = cohorts.held_out(of, VAL_SUBJECTS, seed, classes)
        return torch.tensor([u in held for u in subjects], dtype=torch.bool)
    n_val = max(1, round(VAL_FRACTION * len(names))) if len(names) >= 2 else 0
    held = torch.zeros(len(names), dtype=torch.bool)
    held[torch.randperm(len(names), generator=torch.Generator().manual_seed(seed))[:n_val]] = True
    return held


def _volume_data(root, got, classes, label_of, seed):
    """Data of a folder of scans: its split folders, or a seeded share of its subjects held out (never slices)."""
    scans, val = [], []
    for s, c in got.items():  # 'all', or 'train' and 'val'
        subjects = [subject_of(f) for f in c["files"]]
        of = {u: label_of.get(f) for f, u, n in reversed(list(zip(c["files"], subjects, c["counts"]))) if n}
        held = cohorts.held_out(of, VAL_SUBJECTS, seed, classes) if s == "all" else set()
        in_val = [s == "val" or u in held for u in subjects]
        val.append(torch.tensor(in_val, dtype=torch.bool).repeat_interleave(c["counts"]))
        scans += [Scan(os.path.join(root, f), u, "val" if v else "train", n, label_of.get(f))
                  for f, u, v, n in zip(c["files"], subjects, in_val, c["counts"].tolist()) if n]
    val = torch.cat(val)
    images, positions = (torch.cat([c[k] for c in got.values()]) for k in ("images", "positions"))
    labels = torch.cat([torch.tensor([label_of[f] for f in c["files"]], dtype=torch.long)
                        .repeat_interleave(c["counts"]) for c in got.values()]) if classes else None
    names = [f"{f}:{k}" for c in got.values() for f, n in zip(c["files"], c["counts"].tolist()) for k in range(n)]
    return Data("volumes", root, images[~val], images[val], labels[~val] if classes else None,
                labels[val] if classes else None, classes, positions[~val], positions[val],
                scans=sorted(scans, key=lambda x: x.split == "val"),
                val_names=[n for n, v in zip(names, val.tolist()) if v],
                train_names=[n for n, v in zip(names, val.tolist()) if not v])


def load_data(cfg):
    """Find the dataset under cfg['DATA_DIR'] (or build the demo there), read it (cached) and split it."""
    size = cfg["IMAGE_SIZE"]
    name, folder, exclude = _locate(cfg)
    if not os.path.isdir(folder):
        raise InputError(f"DATA_DIR {show_path(folder)} is not a folder: put OASIS (keras_png_slices_data), ADNI (AD_NC), "
                        f"any images or scans there, or pass --data-dir PATH")
    layout, root = find_layout(folder, exclude)
    bids, layout = layout == "bids", "volumes" if layout == "bids" else layout
    label_of, classes = {}, []
    if layout == "volumes":
        splits, classes, label_of = _volume_splits(root, exclude, cfg["BIDS_SUFFIX"] if bids else None)
    else:
        splits = _split_files(layout, root, cfg, exclude)
    table = cohorts.table_for(cfg, root, bids, layout)
    labels_by_table = table is not None and bool(table.label_column) and layout != "adni"
    if labels_by_table:
        splits, classes, label_of, matching = cohorts.labels_from(table, splits, root)
    if not splits:
        masks = any(d.startswith(OASIS + "seg") for _, dirs, _ in os.walk(folder) for d in dirs)
        raise InputError(f"DATA_DIR {show_path(folder)} holds " + ("only segmentation masks (keras_png_slices_seg_*), "
                        "never trained on" if masks else f"no images ({', '.join(IMAGE_EXTS)}) or scans "
                        f"({', '.join(volumes.SCAN_EXTS)})") + ": put OASIS, ADNI, any images or scans there, "
                        "or pass --data-dir PATH")
    got, keys, sizes, cache = {}, [], Counter(), None
    for s, paths in splits.items():
        c, key, where = _load_split(root, layout, s, paths, size)
        if not len(c["images"]):
            raise InputError(f"none of the {len(paths)} {'scans' if layout == 'volumes' else 'images'} of the {s} "
                            f"split in {show_path(root)} could be read")
        got[s], cache = c, cache or where
        keys.append(key)
        sizes.update(c["sizes"])
    if layout == "oasis":
        parts = [got[s] for s in ("train", "test") if s in got]
        train = (torch.cat([c["images"] for c in parts]), sum((c["names"] for c in parts), []))
        val = got["validate"]["images"], got["validate"]["names"]
    elif layout == "adni":
        train, val = ((got[s]["images"], got[s]["names"]) for s in ADNI_SPLITS)
    elif layout == "folder":
        images, names = got["all"]["images"], got["all"]["names"]
        held = _folder_held_out(names, label_of, classes, cfg["SEED"])
        train, val = ((images[m], [n for n, v in zip(names, m.tolist()) if v]) for m in (~held, held))
    if layout == "volumes":
        data, unnamed = _volume_data(root, got, classes, label_of, cfg["SEED"]), None
    else:
        data = Data(name or layout, root, train[0], val[0], val_names=list(val[1]), train_names=list(train[1]))
        unnamed = conditions_from_names(data, layout, train[1], val[1],
                                        utils.conditions_of(cfg)[0] and not labels_by_table)
        if labels_by_table:
            data.classes, data.train_labels, data.val_labels = classes, *(torch.tensor(
                [label_of[n] for n in names], dtype=torch.long) for names in (train[1], val[1]))
    if utils.covariates_of(cfg):
        add_covariates(data, table)
    check_conditions(data, cfg, unnamed)
    if table is not None:
        keys.append(table.digest)
        data.labels_report = "\n".join(filter(None, [matching.report(table) if labels_by_table else "",
                                                     data.labels_report]))
    data.fingerprint, data.cache, data.sizes = hashlib.sha1("".join(keys).encode()).hexdigest()[:12], cache, dict(sizes)
    if len(data.train) < cfg["BATCH_SIZE"]:
        print(f"notice: only {len(data.train)} training images, fewer than BATCH_SIZE {cfg['BATCH_SIZE']}: "
              f"training will use smaller batches")
    return data


def save_preview(data, path):
    """A contact sheet of training images as the model sees them: of scans, one row per scan (up to PREVIEW_SIDE,
    evenly picked), its slices bottom to top; otherwise PREVIEW_SIDE squared images evenly spread."""
    n = PREVIEW_SIDE
    if data.scans:
        counts = torch.tensor([s.slices for s in data.scans if s.split == "train"])
        starts = counts.cumsum(0) - counts
        rows = torch.linspace(0, len(counts) - 1, min(n, len(counts))).round().long().tolist()
        idx = torch.cat([starts[r] + torch.linspace(0, counts[r].item() - 1, n).round().long() for r in rows])
    else:
        idx = torch.linspace(0, len(data.train) - 1, min(n * n, len(data.train))).round().long()
    utils.save_png(data.train[idx].float() / 127.5 - 1, path, nrow=n)


def conditions_from_names(data, layout, train_names, val_names, wants_class):
    """Fill in the classes (ADNI's, or a plain folder's when class conditioning asks for them) and the slice
    positions that the files' names carry; returns the first name without a position, or None."""
    if layout == "adni" or wants_class:
        data.classes, data.train_labels, data.val_labels = class_labels(train_names, val_names, layout)
    (train, unnamed), (val, unnamed_val) = (slice_positions(names, layout) for names in (train_names, val_names))
    if unnamed is None and unnamed_val is None:
        data.train_positions, data.val_positions = train, val
    return unnamed or unnamed_val


def add_covariates(data, table):
    """The covariates of every image from the table (a scan's slices share its file's rows), and how they matched."""
    file_of = lambda name: name.rsplit(":", 1)[0] if data.layout == "volumes" else name  # noqa: E731  FILE:K
    values, covered = cohorts.covariates_of_files(table, [file_of(n) for n in data.train_names + data.val_names])
    data.covariate_names, data.labels_report = list(table.covariates), covered.report(table)
    data.train_covariates, data.val_covariates = values[:len(data.train)], values[len(data.train):]
    cohorts.check_covered(table, data.train_covariates)


def check_conditions(data, cfg, unnamed):
    """A InputError when CONDITION asks for classes, or slice positions, that the data lacks (unnamed: a file whose
    name carries no position)."""
    wants_class, wants_slice = utils.conditions_of(cfg)
    if wants_class and len(data.classes) < 2:
        raise InputError(f"class conditioning needs images in two or more class folders (ADNI's AD_NC/train/AD and "
                        f"NC, or one sub-folder per class), but {show_path(data.root)} has "
                        f"{'only ' + data.classes[0] if data.classes else 'none'}: use --condition "
                        f"{'slice' if wants_slice else 'none'}, or sort the images into class folders")
    if wants_slice and data.train_positions is None:
        raise InputError(f"slice conditioning needs each file's slice number in its name (OASIS case_NNN_slice_K, "
                        f"ADNI SUBJECT_K), but {show_path(os.path.join(data.root, unnamed))} has none: use "
                        f"--condition {'class' if wants_class else 'none'}, or rename the files")


def main():
    parser = utils.build_parser("Show what dataset.py finds in a data folder.")
    parser.add_argument("dir", nargs="?", help="the data folder (default: DATA_DIR)")
    parser.add_argument("--preview", nargs="?", const="", metavar="PNG", help="also write a contact sheet of "
                        "training images as the model sees them (default: OUTPUT_DIR/preview.png)")
    cfg, args = utils.parse_settings(parser)
    cfg["DATA_DIR"] = args.dir or cfg["DATA_DIR"]
    d = load_data(cfg)
    print(f"layout  {d.layout} in {show_path(d.root)}")
    print(f"splits  {len(d.train)} train, {len(d.val)} val" + (", classes " + ", ".join(
        f"{c} ({int((d.train_labels == i).sum())} train, {int((d.val_labels == i).sum())} val)"
        for i, c in enumerate(d.classes)) if d.classes else ""))
    if d.scans:
        kept = sorted(s.slices for s in d.scans)
        print(f"scans   {len(d.scans)}: " + ", ".join(f"{sum(s.split == x for s in d.scans)} {x} "
              f"({len({s.subject for s in d.scans if s.split == x})} subjects)" for x in ("train", "val"))
              + f"; {kept[0]}-{kept[-1]} slices kept per scan (median {kept[len(kept) // 2]})")
        if d.classes:
            print("        " + ", ".join(f"{c}: " + " / ".join(f"{sum(s.label == i and s.split == x for s in d.scans)} "
                                                                  f"{x}" for x in ("train", "val"))
                                         for i, c in enumerate(d.classes)) + " scans")
    if d.labels_report:
        print(d.labels_report)
    print(f"images  {', '.join(f'{k} ({v})' for k, v in d.sizes.items())} found, read at {d.train.shape[-1]}px")
    print(f"cache   {show_path(d.cache)} (fingerprint {d.fingerprint})")
    if args.preview is not None:
        path = args.preview or os.path.join(cfg["OUTPUT_DIR"], "preview.png")
        save_preview(d, path)
        print(f"preview {show_path(path)}: " + (f"a row per training scan (up to {PREVIEW_SIDE}), slices bottom to top"
                                             if d.scans else "training images, evenly spread"))


if __name__ == "__main__":
    utils.run_main(main)

"""Finds and reads the data: OASIS PNG slices, ADNI AD/NC slices, any folder of images, or the demo (demo.py).

Every image is decoded once into a uint8 cache (<root>/.cache/*.pt). `python dataset.py [DIR]` shows what it finds.
"""
import hashlib
import os
import sys
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

import utils
from utils import UserError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # files read as images (any case)
MAX_PIXELS = 64_000_000  # larger images are refused as possible decompression bombs
VAL_FRACTION = 0.05  # held-out share of a plain image folder
SEARCH_DEPTH = 3  # folder levels under DATA_DIR searched for an OASIS or ADNI layout
WORKERS = min(8, os.cpu_count() or 1)  # threads decoding and writing images
OASIS = "keras_png_slices_"  # OASIS folders: keras_png_slices_{train,validate,test}, masks in ..._seg_*
ADNI_SPLITS = ("train", "test")  # ADNI split folders: train, and test used as the held-out split
ADNI_CLASSES = ["AD", "NC"]  # ADNI class folders in each split; the list index is the label
FALLBACK_CACHE = "~/.cache/brain-ddpm"  # cache folder when the data folder is not writable

Image.MAX_IMAGE_PIXELS = MAX_PIXELS
warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse, do not just warn


@dataclass
class Data:
    """A dataset in memory: uint8 N x 1 x S x S splits, with labels where the layout has classes."""
    layout: str  # 'oasis' | 'adni' | 'folder' | 'demo'
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
    sizes: dict = field(default_factory=dict)  # original image sizes found, 'WxH': count

    def summary(self):
        s = self.train.shape[-1]
        found = ", ".join(f"{k} ({v})" for k, v in Counter(self.sizes).most_common(3))
        classes = f", classes {'/'.join(self.classes)}" if self.classes else ""
        return (f"{self.layout} data in {_show(self.root)}: {len(self.train)} train / {len(self.val)} val images "
                f"of {found} read at {s}x{s}{classes}; cache {_show(self.cache)}")


# ---------------------------------------------------------------- reading images
def _show(path):
    """A path that prints anywhere, whatever bytes its name holds."""
    return os.fsencode(path).decode("utf-8", "replace")


def _gray(im):
    """An 8-bit grayscale copy: black where transparent, 16-bit and float images scaled by their maximum."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.clip(np.asarray(im, dtype=np.float32), 0, None)
        return Image.fromarray((a * (255 / max(a.max(), 1e-8))).round().astype(np.uint8))
    if "A" in im.getbands() or "transparency" in im.info:
        im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im.convert("RGBA"))
    return im.convert("L")


def decode_image(path, size):
    """One file as a size x size uint8 array (grayscale, padded to a centred black square, resized) and its (w, h)."""
    if os.path.getsize(path) == 0:
        raise ValueError("empty file")
    with Image.open(path) as im:
        w, h = im.size
        if w * h > MAX_PIXELS:
            raise ValueError(f"{w}x{h} is over the {MAX_PIXELS} pixel limit")
        im = _gray(im)
    if w != h:
        square = Image.new("L", (max(w, h),) * 2)
        square.paste(im, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
        im = square
    if im.size != (size, size):
        im = im.resize((size, size), Image.LANCZOS)  # antialiased
    return np.asarray(im), (w, h)


def list_images(folder, exclude=()):
    """Image files under folder, sorted, skipping hidden folders, OASIS masks and the paths in exclude."""
    found, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:  # a symlink back into visited folders: no loops, no duplicates
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = [d for d in dirs if not d.startswith((".", OASIS + "seg")) and os.path.join(top, d) not in exclude]
        found += [os.path.join(top, f) for f in files if f.lower().endswith(IMAGE_EXTS) and not f.startswith(".")]
    return sorted(found)


def _decode_all(paths, size):
    """Decode paths with a thread pool: (uint8 N x 1 x S x S, kept indices, sizes found, skip messages)."""
    def one(p):
        try:
            return decode_image(p, size)
        except Exception as e:  # unreadable, corrupt, truncated or too large: skipped
            reason = "not an image PIL can read" if isinstance(e, UnidentifiedImageError) else str(e).splitlines()[0]
            return f"{_show(p)} ({reason or type(e).__name__})"
    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(one, paths))
    keep = [i for i, r in enumerate(results) if not isinstance(r, str)]
    images = torch.from_numpy(np.stack([results[i][0] for i in keep])[:, None]) if keep else \
        torch.empty(0, 1, size, size, dtype=torch.uint8)
    sizes = dict(Counter("{}x{}".format(*results[i][1]) for i in keep))
    return images, keep, sizes, [r for r in results if isinstance(r, str)]


def read_folder(path, image_size):
    """All images in a folder (recursive, sorted by path) or one image file, as uint8 N x 1 x S x S."""
    paths = [path] if os.path.isfile(path) else list_images(path) if os.path.isdir(path) else []
    images, _, _, skipped = _decode_all(paths, image_size)
    for msg in skipped:
        print(f"warning: skipping {msg}", file=sys.stderr)
    if not len(images):
        raise UserError(f"no readable images ({', '.join(IMAGE_EXTS)}) in {_show(path)}: pass a folder of images")
    return images


# ---------------------------------------------------------------- the cache
def _read_cache(path, size):
    try:
        c = torch.load(path, weights_only=True)
        ok = c["images"].dtype == torch.uint8 and tuple(c["images"].shape[1:]) == (1, size, size)
        return c if ok else None
    except Exception:  # missing or corrupt: rebuilt
        return None


def _load_split(root, layout, split, paths, labels, size):
    """Images (and labels) of one split from the cache, decoding and caching them when the files changed."""
    entries = []
    for p, label in zip(paths, labels):
        try:
            st = os.stat(p)
            entries.append((p, label, st.st_size, st.st_mtime_ns))
        except OSError as e:  # broken link, link loop, vanished
            print(f"warning: skipping {_show(p)} ({e.strerror})", file=sys.stderr)
    h = hashlib.sha1(str(size).encode())
    for p, label, n, t in entries:
        h.update(os.fsencode(os.path.relpath(p, root)) + f"\0{label}\0{n}\0{t}\n".encode())
    key = h.hexdigest()[:12]
    name = f"{layout}_{split}_{size}_{key}.pt"
    dirs = [os.path.join(root, ".cache"), os.path.expanduser(FALLBACK_CACHE)]
    for d in dirs:
        if (c := _read_cache(os.path.join(d, name), size)) is not None:
            break
    else:
        images, keep, sizes, skipped = _decode_all([e[0] for e in entries], size)
        kept = None if labels[0] is None else torch.tensor([entries[i][1] for i in keep], dtype=torch.long)
        c = {"images": images, "labels": kept, "sizes": sizes, "skipped": skipped}
        d = _save_cache(c, dirs, name, f"{layout}_{split}_{size}_")
    for msg in c["skipped"]:
        print(f"warning: skipping {msg}", file=sys.stderr)
    return c, key, d


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
    print(f"warning: could not write a cache in {' or '.join(map(_show, dirs))}; decoding again next time",
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
    """('oasis' | 'adni' | 'folder', root): the first OASIS or ADNI layout up to SEARCH_DEPTH levels down."""
    level = [folder]
    for _ in range(SEARCH_DEPTH + 1):
        for d in level:
            name = os.path.basename(os.path.normpath(d))
            if name == OASIS + "data" or os.path.isdir(os.path.join(d, OASIS + "train")):
                return "oasis", d
            if name == "AD_NC" or any(os.path.isdir(os.path.join(d, s, c)) for s in ADNI_SPLITS
                                      for c in ADNI_CLASSES):
                return "adni", d
        level = [s for d in level for s in _subdirs(d, exclude)]
    return "folder", folder


def _split_files(layout, root, cfg, exclude):
    """{split: (paths, labels)}; UserError when a split folder is missing or holds no images."""
    if layout == "folder":
        paths = list_images(root, exclude)
        return {"all": (paths, [None] * len(paths))} if paths else {}
    if layout == "oasis":
        folders = {s: [(OASIS + s, None)] for s in ["train", "validate"] + ["test"] * cfg["OASIS_TRAIN_ON_TEST"]}
    else:
        folders = {s: [(os.path.join(s, c), i) for i, c in enumerate(ADNI_CLASSES)] for s in ADNI_SPLITS}
    splits = {}
    for s, parts in folders.items():
        paths, labels = [], []
        for d, label in parts:
            if not os.path.isdir(os.path.join(root, d)):
                raise UserError(f"the {layout.upper()} layout in {_show(root)} has no {d} folder: add it, or point "
                                f"--data-dir at a complete copy")
            found = list_images(os.path.join(root, d))
            paths, labels = paths + found, labels + [label] * len(found)
        if not paths:
            raise UserError(f"{_show(os.path.join(root, OASIS + s if layout == 'oasis' else s))} holds no images "
                            f"({', '.join(IMAGE_EXTS)}): add them, or point --data-dir at a complete copy")
        splits[s] = (paths, labels)
    return splits


def _locate(cfg):
    """(layout name or None, folder to search, folders to leave out), building the demo where it is due."""
    folder = cfg["DATA_DIR"]
    demo = os.path.join(folder, "demo")
    if os.path.normpath(folder) != os.path.normpath(utils.DATA_DIR):
        return None, folder, set()
    if os.path.isdir(folder) and any(not e.startswith(".") and e not in ("README.md", "demo")
                                     for e in os.listdir(folder)):
        return None, folder, {demo}  # real data in the default folder: never the demo
    if not os.path.isfile(os.path.join(demo, "DONE")):  # DONE is written last: a half-built demo is rebuilt
        try:
            import demo as demo_set  # imports this module: loaded only when a demo is due
            demo_set.build_demo(demo)
        except OSError as e:
            raise UserError(f"could not build the demo in {_show(demo)} ({e.strerror or e}): make {_show(folder)} "
                            f"writable or pass --data-dir PATH") from None
    return "demo", os.path.join(demo, OASIS + "data"), set()


def load_data(cfg):
    """Find the dataset under cfg['DATA_DIR'] (or build the demo there), read it (cached) and split it."""
    if (size := cfg["IMAGE_SIZE"]) <= 0:
        raise UserError(f"IMAGE_SIZE must be positive, got {size}: use --image-size 128")
    name, folder, exclude = _locate(cfg)
    if not os.path.isdir(folder):
        raise UserError(f"DATA_DIR {_show(folder)} is not a folder: put OASIS (keras_png_slices_data), ADNI (AD_NC) "
                        f"or any images there, or pass --data-dir PATH")
    layout, root = find_layout(folder, exclude)
    splits = _split_files(layout, root, cfg, exclude)
    if not splits:
        masks = any(d.startswith(OASIS + "seg") for _, dirs, _ in os.walk(folder) for d in dirs)
        raise UserError(f"DATA_DIR {_show(folder)} holds " + ("only segmentation masks (keras_png_slices_seg_*), "
                        "never trained on" if masks else f"no images ({', '.join(IMAGE_EXTS)})")
                        + ": put OASIS, ADNI or any images there, or pass --data-dir PATH")
    got, keys, sizes, cache = {}, [], Counter(), None
    for s, (paths, labels) in splits.items():
        c, key, where = _load_split(root, layout, s, paths, labels, size)
        if not len(c["images"]):
            raise UserError(f"none of the {len(paths)} images of the {s} split in {_show(root)} could be read")
        got[s], cache = c, cache or where
        keys.append(key)
        sizes.update(c["sizes"])
    if layout == "oasis":
        train = torch.cat([got[s]["images"] for s in ("train", "test") if s in got])
        data = Data(name or layout, root, train, got["validate"]["images"])
    elif layout == "adni":
        tr, te = got["train"], got["test"]
        data = Data(layout, root, tr["images"], te["images"], tr["labels"], te["labels"], list(ADNI_CLASSES))
    else:  # a seeded 95/5 split, at least one held-out image when there are two
        images = got["all"]["images"]
        n_val = max(1, round(VAL_FRACTION * len(images))) if len(images) >= 2 else 0
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg["SEED"]))
        data = Data(layout, root, images[perm[n_val:].sort().values], images[perm[:n_val].sort().values])
    data.fingerprint, data.cache, data.sizes = hashlib.sha1("".join(keys).encode()).hexdigest()[:12], cache, dict(sizes)
    if len(data.train) < cfg["BATCH_SIZE"]:
        print(f"notice: only {len(data.train)} training images, fewer than BATCH_SIZE {cfg['BATCH_SIZE']}: "
              f"training will use smaller batches")
    return data


def main():
    parser = utils.build_parser("Show what dataset.py finds in a data folder.")
    parser.add_argument("dir", nargs="?", help="the data folder (default: DATA_DIR)")
    args = parser.parse_args()
    cfg = utils.config_from_args(args)
    cfg["DATA_DIR"] = args.dir or cfg["DATA_DIR"]
    d = load_data(cfg)
    print(f"layout  {d.layout} in {_show(d.root)}")
    print(f"splits  {len(d.train)} train, {len(d.val)} val" + (", classes " + ", ".join(
        f"{c} ({int((d.train_labels == i).sum())} train, {int((d.val_labels == i).sum())} val)"
        for i, c in enumerate(d.classes)) if d.classes else ""))
    print(f"images  {', '.join(f'{k} ({v})' for k, v in d.sizes.items())} found, read at {d.train.shape[-1]}px")
    print(f"cache   {_show(d.cache)} (fingerprint {d.fingerprint})")

if __name__ == "__main__":
    utils.run(main)

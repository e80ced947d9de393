"""The labelled demo's truth read back beside its held-out slices (demo.py writes it where dataset.py never reads):
each 'AD' slice without its disease and where the disease is, and each held-out slice years on."""
import os

import torch

import dataset
import demo


def truth_folder(data):
    """Where the labelled demo keeps its truth: beside the AD_NC folder of data."""
    return os.path.join(os.path.dirname(os.path.normpath(data.root)), demo.TRUTH)


def read_truth(data):
    """The labelled demo's truth for its held-out 'AD' slices (demo.py): (their indices in data.val, the whole-disease
    twins, their masks, the local-atrophy twins, their masks; twins uint8 N x 1 x S x S, masks bool), or None where the
    data has none. The masks are made as demo.py makes its full-size ones, at this size (demo.changed)."""
    folder = truth_folder(data)
    if not all(os.path.isdir(os.path.join(folder, kind)) for kind in ("healthy", "local_healthy")):
        return None
    found = [(i, os.path.basename(n)) for i, n in enumerate(data.val_names)
             if os.path.isfile(os.path.join(folder, "healthy", os.path.basename(n)))]
    if not found:
        return None
    index = torch.tensor([i for i, _ in found])
    whole, local = (dataset.decode_all([os.path.join(folder, kind, n) for _, n in found], data.val.shape[-1])[0]
                    for kind in ("healthy", "local_healthy"))
    images = data.val[index]
    return index, whole, demo.changed(images, whole, local), local, demo.changed(images, local)


def read_future(data, years):
    """The labelled demo's held-out slices `years` on (demo.FUTURE_YEARS): (their indices in data.val, the future
    slices uint8 N x 1 x S x S), or None where the data has none."""
    folder = os.path.join(truth_folder(data), f"future_{years}")
    found = [(i, os.path.join(folder, os.path.basename(n))) for i, n in enumerate(data.val_names)]
    found = [(i, path) for i, path in found if os.path.isfile(path)]
    if not found:
        return None
    return torch.tensor([i for i, _ in found]), dataset.decode_all([path for _, path in found], data.val.shape[-1])[0]

"""What real cohorts look like on disk: the OASIS and ADNI folder and file names, and the subject ids that paths
carry. dataset.py reads these layouts and demo.py writes them."""
import re

OASIS = "keras_png_slices_"  # OASIS folders: keras_png_slices_{train,validate,test}, masks in ..._seg_*
ADNI_SPLITS = ("train", "test")  # ADNI split folders: train, and test used as the held-out split
ADNI_CLASSES = ["AD", "NC"]  # ADNI class folders in each split; the list index is the label
SLICE_NAME = re.compile(r"(.+)_slice_(\d+)")  # OASIS file names: case_NNN_slice_K (the demo's too)
ADNI_NAME = re.compile(r"(.+)_(\d+)")  # ADNI file names: SUBJECT_K
SUBJECT_ID = r"sub-[A-Za-z0-9]+|OAS\d_\d{4}|\d{3}_S_\d{4}"  # BIDS, OASIS, ADNI subject ids: their scans stay together


def subject_of(path):
    """The subject id in a path (SUBJECT_ID), or the path itself."""
    m = re.search(SUBJECT_ID, path)
    return m.group(0) if m else path

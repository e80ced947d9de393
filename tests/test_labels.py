"""Labels from the tables cohorts come with: an ADNI download with its collection CSV (and ADNIMERGE), OASIS-1 with
its cross-sectional CSV, a BIDS dataset with participants.tsv; matching by image, session and subject id, label
maps, three classes, and bad tables (CPU, tiny synthetic scans)."""
import json
import os
from collections import Counter

import nibabel
import numpy as np
import pytest
import torch

from conftest import TINY, run_script

import cohorts
import dataset
import utils
from utils import InputError

CLASS_LEVEL = {"NC": 300, "MCI": 600, "AD": 900}  # the scans' brightness by true class: the classes can be learned


def write_scan(path, level, seed, fmt="nifti"):
    """A tiny head: an ellipsoid of the given brightness with some texture, 16 x 16 x 10 voxels."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:10, :16, :16].astype(float)
    inside = ((x - 7.5) / 6) ** 2 + ((y - 7.5) / 7) ** 2 + ((z - 4.5) / 5) ** 2 < 1
    volume = (inside * (level + 100 * rng.random((10, 16, 16)))).transpose(2, 1, 0).astype(np.int16)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = (nibabel.AnalyzeImage if fmt == "analyze" else nibabel.Nifti1Image)(volume, np.eye(4))
    nibabel.save(image, path)


def write_table(path, columns, rows, delimiter=","):
    with open(path, "w") as f:
        f.write(delimiter.join(columns) + "\n" + "".join(delimiter.join(map(str, r)) + "\n" for r in rows))
    return str(path)


ADNI_GROUPS = {"002_S_0295": "CN", "002_S_0413": "CN", "003_S_0907": "SMC", "005_S_0221": "EMCI", "006_S_0498": "LMCI",
               "007_S_0070": "MCI", "011_S_0003": "AD", "011_S_0010": "AD", "012_S_0637": "AD"}
ADNI_MAP = "CN=NC,SMC=NC,EMCI=MCI,LMCI=MCI,MCI=MCI,AD=AD,Dementia=AD"


def adni_tree(root):
    """ADNI's download layout, ADNI/SUBJECT/MPRAGE/DATE/S.../ADNI_..._I<id>.nii, and its collection CSV: one image a
    subject, a converter (003_S_1000: CN at screening, AD two years on, one image each), and a subject (009_S_0751)
    whose rows disagree and whose file has lost its image id."""
    rows, image = [], 10000
    subjects = {**ADNI_GROUPS, "003_S_1000": ["CN", "AD"], "009_S_0751": ["MCI", "AD"]}
    for subject, groups in subjects.items():
        for visit, group in enumerate([groups] if isinstance(groups, str) else groups):
            image += 1
            name = f"ADNI_{subject}_MR_MPRAGE_br_raw_2006041819371309{visit}_1_S{image - 5000}_I{image}.nii"
            if subject == "009_S_0751":
                name = f"scan_{visit}.nii"  # renamed: no image id left
            true = {"CN": "NC", "SMC": "NC", "AD": "AD"}.get(group, "MCI")
            write_scan(os.path.join(root, "ADNI", subject, "MPRAGE", f"2006-04-1{visit}", f"S{image - 5000}", name),
                       CLASS_LEVEL[true], image)
            rows.append([f"I{image}", subject, group, "M", 75, ["sc", "m24"][visit], "MRI"])
    table = write_table(os.path.join(root, "ADNI1_collection.csv"),
                        ["Image Data ID", "Subject", "Group", "Sex", "Age", "Visit", "Modality"], rows)
    return os.path.join(root, "ADNI"), table


def oasis_tree(root):
    """OASIS-1's layout, OAS1_XXXX_MR1/PROCESSED/MPRAGE/T88_111/..._t88_masked_gfc.hdr/.img (Analyze), and its
    cross-sectional CSV: CDR 0, 0.5, 1, 2, blank for the young subjects."""
    cdrs = ["0", "0", "0", "0.5", "0.5", "0.5", "1", "2", "1", "", ""]
    rows = []
    for i, cdr in enumerate(cdrs, start=1):
        session = f"OAS1_{i:04d}_MR1"
        level = CLASS_LEVEL[{"0": "NC", "0.5": "MCI"}.get(cdr, "AD")] if cdr else 500
        write_scan(os.path.join(root, "disc1", session, "PROCESSED", "MPRAGE", "T88_111",
                                f"{session}_mpr_n4_anon_111_t88_masked_gfc.hdr"), level, i, fmt="analyze")
        rows.append([session, "F", "R", 20 if not cdr else 74, cdr])
    table = write_table(os.path.join(root, "oasis_cross-sectional.csv"), ["ID", "M/F", "Hand", "Age", "CDR"], rows)
    return root, table


def bids_tree(root):
    """A BIDS dataset: sub-*/ses-*/anat/*_T1w.nii.gz with a T2w and a functional run beside them that must not be
    read, derivatives/ that must not be read, and participants.tsv giving each participant's group."""
    groups = {"sub-01": "CN", "sub-02": "CN", "sub-03": "CN", "sub-04": "MCI", "sub-05": "MCI", "sub-06": "MCI",
              "sub-07": "AD", "sub-08": "AD", "sub-09": "AD"}
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "dataset_description.json"), "w") as f:
        json.dump({"Name": "test", "BIDSVersion": "1.8.0"}, f)
    for k, (subject, group) in enumerate(groups.items()):
        level = CLASS_LEVEL[{"CN": "NC"}.get(group, group)]
        for session in ("ses-01", "ses-02") if k % 2 == 0 else ("ses-01",):
            anat = os.path.join(root, subject, session, "anat")
            write_scan(os.path.join(anat, f"{subject}_{session}_T1w.nii.gz"), level, k)
            write_scan(os.path.join(anat, f"{subject}_{session}_T2w.nii.gz"), 100, k)
        write_scan(os.path.join(root, subject, "ses-01", "func", f"{subject}_ses-01_task-rest_bold.nii.gz"), 100, k)
        write_scan(os.path.join(root, "derivatives", "prep", subject, "anat", f"{subject}_desc-brain_T1w.nii.gz"),
                   100, k)
    write_table(os.path.join(root, "participants.tsv"), ["participant_id", "age", "group"],
                [[s, 70, g] for s, g in groups.items()], delimiter="\t")
    return str(root)


def config(data_dir, **overrides):
    return {**utils.constants(), "DATA_DIR": str(data_dir), "IMAGE_SIZE": 16, "BATCH_SIZE": 4,
            "CONDITION": "class", **overrides}


def scans_by_class(data):
    return {c: sorted(os.path.basename(s.path) for s in data.scans if s.label == i) for i, c in enumerate(data.classes)}


def test_adni_images_are_labelled_by_their_image_ids(tmp_path, capsys):
    scans, table = adni_tree(tmp_path)
    data = dataset.load_data(config(scans, LABELS=table, LABEL_MAP=ADNI_MAP))
    assert data.classes == ["AD", "MCI", "NC"]
    by_class = scans_by_class(data)
    converter = sorted(n for n in sum(by_class.values(), []) if "003_S_1000" in n)
    assert len(converter) == 2 and converter[0] in by_class["NC"] and converter[1] in by_class["AD"]  # each its own
    assert sum(map(len, by_class.values())) == 11 and not any("scan_" in n for n in sum(by_class.values(), []))
    err = capsys.readouterr().err
    assert "skipping 009_S_0751: its rows" in err and "give different classes" in err
    assert {s.label for s in data.scans if s.split == "val"} == {0, 1, 2}  # every class is held out
    assert "11 files by image id" in data.labels_report


def test_adnimerge_rows_label_subjects(tmp_path):
    """ADNIMERGE gives a diagnosis per subject and visit (PTID, VISCODE, DX): the files are labelled by subject; a
    subject diagnosed CN then Dementia whose files carry nothing finer is left out."""
    scans, _ = adni_tree(tmp_path)
    rows = [[s, "bl", {"CN": "CN", "SMC": "CN", "AD": "Dementia"}.get(g, "MCI")] for s, g in ADNI_GROUPS.items()]
    rows += [["003_S_1000", "bl", "CN"], ["003_S_1000", "m24", "Dementia"], ["009_S_0751", "bl", "MCI"]]
    table = write_table(tmp_path / "ADNIMERGE.csv", ["PTID", "VISCODE", "DX"], rows)
    data = dataset.load_data(config(scans, LABELS=table, LABEL_MAP="CN=NC,MCI=MCI,Dementia=AD"))
    by_class = scans_by_class(data)
    assert not any("003_S_1000" in n for n in sum(by_class.values(), []))  # in conflict: skipped
    assert sorted(n.split("_")[1] + "_S_" + n.split("_")[3] for n in by_class["AD"]) == ["011_S_0003", "011_S_0010",
                                                                                     "012_S_0637"]
    assert len(by_class["MCI"]) == 5  # EMCI, LMCI, MCI, and 009_S_0751's two files (one row: no conflict)
    assert "files by subject id" in data.labels_report


def test_oasis_sessions_are_labelled_by_cdr_and_blanks_left_out(tmp_path, capsys):
    root, table = oasis_tree(tmp_path)
    data = dataset.load_data(config(root, LABELS=table, LABEL_MAP="0=NC,0.5=MCI,1=AD,2=AD"))
    assert data.classes == ["AD", "MCI", "NC"]
    assert {c: len(n) for c, n in scans_by_class(data).items()} == {"AD": 3, "MCI": 3, "NC": 3}
    assert "2 unlabelled (blank, or not in --label-map)" in capsys.readouterr().out
    assert "9 files by session id" in data.labels_report
    two = dataset.load_data(config(root, LABELS=table, LABEL_MAP="0=NC,0.5=AD,1=AD,2=AD"))
    assert two.classes == ["AD", "NC"]


def test_bids_reads_raw_t1w_scans_and_participants_tsv(tmp_path):
    root = bids_tree(tmp_path)
    data = dataset.load_data(config(root, LABEL_MAP="CN=NC,MCI=MCI,AD=AD"))
    assert data.layout == "volumes" and data.classes == ["AD", "MCI", "NC"]
    names = [os.path.relpath(s.path, root) for s in data.scans]
    assert len(names) == 14 and all(n.endswith("_T1w.nii.gz") and "derivatives" not in n for n in names)
    for subject in {s.subject for s in data.scans}:  # both sessions of a subject on one side of the split
        assert len({s.split for s in data.scans if s.subject == subject}) == 1
    assert {s.label for s in data.scans if s.split == "val"} == {0, 1, 2}
    unlabelled = dataset.load_data(config(root, CONDITION="none"))  # no classes asked for: no table needed
    assert len(unlabelled.scans) == 14 and unlabelled.classes == []


def test_dataset_py_reports_the_matching(tmp_path):
    scans, table = adni_tree(tmp_path)
    r = run_script("dataset.py", scans, "--labels", table, "--label-map", ADNI_MAP, "--image-size", "16")
    assert r.returncode == 0, r.stderr
    assert "11 files by image id" in r.stdout and "2 files not in the table" not in r.stdout
    assert "1 subjects with rows that disagree, skipped: 009_S_0751" in r.stdout
    assert "AD: " in r.stdout and " scans" in r.stdout


@pytest.mark.parametrize("case, expected", [
    ("no match", "no file matches"), ("no column", "has no label column"),
    ("one class", "labels the files with 1 class (NC)"), ("not a table", "is not a CSV or TSV table"),
    ("bad map", "--label-map CN: give VALUE=CLASS pairs"), ("header only", "holds no rows"),
    ("empty class", "--label-map CN=,AD=AD: CN maps to no class")])
def test_bad_tables_get_one_line_before_training(tmp_path, case, expected):
    scans, table = adni_tree(tmp_path)
    flags = {"LABELS": table, "LABEL_MAP": ADNI_MAP}
    if case == "no match":
        flags["LABELS"] = write_table(tmp_path / "other.csv", ["Subject", "Group"], [["099_S_9999", "AD"]])
    elif case == "no column":
        flags["LABELS"] = write_table(tmp_path / "other.csv", ["Subject", "Sex"], [["002_S_0295", "M"]])
    elif case == "one class":
        flags["LABEL_MAP"] = "CN=NC"
    elif case == "not a table":
        (tmp_path / "notes.txt").write_bytes(b"\x00\x01\x02 binary")
        flags["LABELS"] = str(tmp_path / "notes.txt")
    elif case == "header only":
        flags["LABELS"] = write_table(tmp_path / "other.csv", ["Subject", "Group"], [])
    elif case == "empty class":
        flags["LABEL_MAP"] = "CN=,AD=AD"
    else:
        flags["LABEL_MAP"] = "CN"
    with pytest.raises(InputError) as e:
        dataset.load_data(config(scans, **flags))
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)
    if case == "no match":
        assert "I10001" in str(e.value) or "002_S_0295" in str(e.value)  # an id from the files, beside the table's
        assert "099_S_9999" in str(e.value)
    if case == "no column":
        assert "Subject, Sex" in str(e.value)  # its columns, listed


def test_image_slices_named_by_subject_keep_their_subjects_together(tmp_path, capsys):
    """A folder of slices named by ADNI subject id with a table of labels: whole subjects are held out, one of each
    class that has two or more; a class of one subject, which cannot be held out, is named."""
    from PIL import Image
    groups = {f"{100 + i:03d}_S_{1000 + i:04d}": "NC" if i < 6 else "AD" if i < 11 else "MCI" for i in range(12)}
    os.makedirs(tmp_path / "slices")
    for subject, group in groups.items():
        for z in range(6):
            Image.fromarray(np.full((16, 16), CLASS_LEVEL[group] // 4 + z, np.uint8)).save(
                tmp_path / "slices" / f"ADNI_{subject}_slice_{z}.png")
    table = write_table(tmp_path / "groups.csv", ["Subject", "Group"], list(groups.items()))
    data = dataset.load_data(config(tmp_path / "slices", LABELS=table))
    assert data.layout == "folder" and data.classes == ["AD", "MCI", "NC"] and len(data.train) + len(data.val) == 72
    held = {cohorts.subject_of(n) for n in data.val_names}
    assert len(data.val) == 6 * len(held) and data.val_labels.unique().tolist() == [0, 2]  # whole subjects: AD, NC
    assert "notice: MCI has only one subject (111_S_1011)" in capsys.readouterr().out


def test_a_class_of_one_scanned_subject_is_named(tmp_path, capsys):
    root, table = oasis_tree(tmp_path)
    data = dataset.load_data(config(root, LABELS=table, LABEL_MAP="0=NC,0.5=MCI,1=AD,2=severe"))
    assert data.classes == ["AD", "MCI", "NC", "severe"] and 3 not in data.val_labels.tolist()
    assert "notice: severe has only one subject (OAS1_0008)" in capsys.readouterr().out


def test_tables_as_spreadsheets_save_them(tmp_path, capsys):
    """A TSV saved as .csv, a semicolon-separated CSV (European Excel), a Latin-1 CSV and a UTF-8 one with a byte-order
    mark label the files as the plain CSV does, each said in a notice where it is not what its name says."""
    scans, table = adni_tree(tmp_path)
    reference = scans_by_class(dataset.load_data(config(scans, LABELS=table, LABEL_MAP=ADNI_MAP)))
    text = open(table).read().replace("Modality", "Modalité")
    variants = {"tabs.csv": (text.replace(",", "\t"), "utf-8", "as a tab-separated table"),
                "semicolons.csv": (text.replace(",", ";"), "utf-8", "as a semicolon-separated table"),
                "latin1.csv": (text, "latin-1", "is not UTF-8: read as Latin-1"), "bom.csv": (text, "utf-8-sig", None)}
    capsys.readouterr()
    for name, (content, encoding, notice) in variants.items():
        (tmp_path / name).write_bytes(content.encode(encoding))
        data = dataset.load_data(config(scans, LABELS=str(tmp_path / name), LABEL_MAP=ADNI_MAP))
        assert scans_by_class(data) == reference, name
        out = capsys.readouterr().out
        said = [line for line in out.splitlines() if "notice: reading" in line or "not UTF-8" in line]
        assert len(said) == bool(notice) and all(notice in line and str(tmp_path / name) in line for line in said), out


def test_ids_found_in_paths_and_tables():
    path = "ADNI/002_S_0295/MPRAGE/2006-04-18/S13408/ADNI_002_S_0295_MR_MPRAGE_br_raw_1_S13408_I13722.nii"
    assert ("image", "13722") in cohorts.ids_in_path(path) and ("subject", "002_S_0295") in cohorts.ids_in_path(path)
    assert ("session", "sub-01_ses-02") in cohorts.ids_in_path("sub-01/ses-02/anat/sub-01_ses-02_T1w.nii.gz")
    assert cohorts.ids_in_table("OAS1_0001_MR1") == [("session", "OAS1_0001_MR1"), ("subject", "OAS1_0001")]
    assert cohorts.ids_in_table("I13722") == [("image", "13722")]
    assert cohorts.subject_of(path) == "002_S_0295" and cohorts.subject_of("scans/a_12.png") == "scans/a_12.png"
    assert cohorts.ids_in_table(" scan_12 ") == [("name", "scan_12")] and cohorts.ids_in_table(" ") == []
    assert {("name", "data"), ("name", "AD")} <= set(cohorts.ids_in_path("data\\AD\\img_001.png"))  # Windows folders
    assert cohorts.ids_in_path("slices/img_001.png")[-2:] == [("name", "slices"), ("name", "img_001")]


def test_a_table_s_columns_are_found_by_name_or_as_told(tmp_path):
    """Excel's byte-order mark and the columns' case aside."""
    path = tmp_path / "labels.csv"
    path.write_text("subject,GROUP,Age\n002_S_0295,CN,75\n", encoding="utf-8-sig")
    table = cohorts.read_table(str(path))
    assert (table.id_columns, table.label_column, table.rows) == (["subject"], "GROUP", [([("subject", "002_S_0295")],
                                                                                       "CN")])
    assert cohorts.read_table(str(path), label_column="age").rows == [([("subject", "002_S_0295")], "75")]


@pytest.mark.parametrize("text, said", [
    (None, "no label table at"), ("", "holds no rows: add a row for each scan or subject"),
    ("Sex,Group\nM,CN\n", "has no id column (Image Data ID, Subject, PTID, ID, participant_id, subject_id)"),
    ("Subject,Sex\n1,M\n", "has no label column (Group, DX, DX_bl, diagnosis, group, CDR)")])
def test_a_table_without_what_it_needs_says_what(tmp_path, text, said):
    path = tmp_path / "labels.csv"
    if text is not None:
        path.write_text(text)
    with pytest.raises(InputError) as e:
        cohorts.read_table(str(path))
    assert said in str(e.value), str(e.value)


def test_bids_scans_with_or_without_sessions_wherever_the_dataset_lies():
    """Only the folders inside the dataset count: one kept under a folder called code/ is read all the same."""
    root = os.path.join(os.sep, "home", "code", "study")
    scans = [os.path.join(root, *p) for p in (("sub-01", "anat", "sub-01_T1w.nii.gz"),
                                              ("sub-02", "ses-01", "anat", "sub-02_ses-01_T1w.nii"))]
    others = [os.path.join(root, *p) for p in (("derivatives", "prep", "sub-01", "anat", "sub-01_T1w.nii.gz"),
                                               ("sub-01", "anat", "sub-01_T2w.nii.gz"), ("sub-01_T1w.nii.gz",),
                                               ("sub-01", "func", "sub-01_task-rest_T1w.nii.gz"))]
    assert cohorts.bids_scans(others + scans, root, "T1w") == scans


def test_files_match_rows_finest_id_first():
    table = cohorts.Table("t.csv", ["Image Data ID", "Subject"], "Group", rows=[
        ([("image", "1")], "AD"), ([("image", "2")], "NC"), ([("subject", "009_S_0751")], "AD"),
        ([("subject", "009_S_0751")], "NC"), ([("image", "3")], "NC")])
    files = ["ADNI/002_S_0295/a_I1.nii", "ADNI/other/unknown.nii", "ADNI/002_S_0413/b_I2.nii", "ADNI/009_S_0751/c.nii"]
    matching = cohorts.match_files(files, table)
    assert matching.labels == {files[0]: "AD", files[2]: "NC"} and matching.by_level == Counter(image=2)
    assert matching.unmatched == [files[1]] and matching.conflicts == ["009_S_0751"] and matching.unused_rows == 1


@pytest.mark.parametrize("row, said", [
    (("image", "99999"), "ids like I10001, the table ids like I99999 (ID)"),
    (("subject", "099_S_9999"), "ids like 002_S_0295, the table ids like 099_S_9999 (ID)")])
def test_no_match_shows_an_id_of_each_side_as_the_tables_write_it(row, said):
    with pytest.raises(InputError) as e:
        cohorts.match_files(["ADNI/002_S_0295/a_I10001.nii"], cohorts.Table("t.csv", ["ID"], "Group", [([row], "AD")]))
    assert f"the files carry {said}" in str(e.value), str(e.value)


def test_the_matching_report_names_a_few_files_of_each_kind():
    table = cohorts.Table("labels.csv", ["Subject"], "Group", rows=[([], "AD")] * 10)
    matching = cohorts.Matching({"a": "AD", "b": "NC"}, Counter(image=1, subject=1), ["u"], ["x1", "x2", "x3", "x4"],
                                ["s1", "s2", "s3"], 7)
    assert matching.report(table).splitlines() == [
        "labels  labels.csv, column Group: 1 files by image id, 1 files by subject id",
        "        1 files unlabelled (blank, or not in --label-map): skipped",
        "        4 files not in the table, skipped: x1, x2, x3, ...",
        "        3 subjects with rows that disagree, skipped: s1, s2, s3",
        "        7 of 10 table rows matched no file"]


def test_three_classes_train_and_get_a_row_each(tmp_path):
    """The whole path on a BIDS dataset with CN, MCI and AD participants: train.py, then predict.py's conditions.png,
    a row a class."""
    root, out = bids_tree(tmp_path / "bids"), str(tmp_path / "out")
    flags = ["--data-dir", root, "--output-dir", out, "--condition", "class", "--label-map", "CN=NC,MCI=MCI,AD=AD",
             *TINY, "--image-size", "16", "--attn-resolutions", "8", "--epochs", "2"]
    r = run_script("train.py", *flags)
    assert r.returncode == 0 and "classes AD/MCI/NC" in r.stdout, r.stderr
    r = run_script("predict.py", "--output-dir", out, "--compile", "false", "--num-samples", "3", "--no-metrics")
    assert r.returncode == 0, r.stderr
    assert os.path.exists(os.path.join(out, "predict", "conditions.png"))
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["classes"] == ["AD", "MCI", "NC"]


def test_covariates_come_from_the_oasis_csv_and_participants_tsv_as_they_are_written(tmp_path):
    root, table = oasis_tree(tmp_path / "oasis")
    data = dataset.load_data(config(root, LABELS=table, LABEL_MAP="0=NC,0.5=MCI,1=AD,2=AD", COVARIATES="Age,M/F"))
    values = torch.cat([data.train_covariates, data.val_covariates])
    assert len(values) == len(data.train) + len(data.val) and values[:, 0].eq(74).all() and values[:, 1].eq(1).all()
    assert "Age: " in data.labels_report and "M/F: " in data.labels_report
    bids = dataset.load_data(config(bids_tree(tmp_path / "bids"), LABEL_MAP="CN=NC,MCI=MCI,AD=AD", COVARIATES="age"))
    assert torch.cat([bids.train_covariates, bids.val_covariates]).eq(70).all()

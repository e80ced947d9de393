"""What real cohorts look like on disk: the OASIS and ADNI folder and file names, BIDS, the subject, session and image
ids that paths carry, and the tables of labels cohorts come with (ADNI's collection CSVs and ADNIMERGE, OASIS-1's
cross-sectional CSV, BIDS participants.tsv), matched to the files; and which subjects are held out. dataset.py reads
these layouts and demo.py writes them."""
import csv
import hashlib
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch

import utils
from utils import InputError, show_path

OASIS = "keras_png_slices_"  # OASIS folders: keras_png_slices_{train,validate,test}, masks in ..._seg_*
ADNI_SPLITS = ("train", "test")  # ADNI split folders: train, and test used as the held-out split
ADNI_CLASSES = ["AD", "NC"]  # ADNI class folders in each split; the list index is the label
SLICE_NAME = re.compile(r"(.+)_slice_(\d+)")  # OASIS file names: case_NNN_slice_K (the demo's too)
ADNI_NAME = re.compile(r"(.+)_(\d+)")  # ADNI file names: SUBJECT_K
SUBJECT_ID = r"sub-[A-Za-z0-9]+|OAS\d_\d{4}|\d{3}_S_\d{4}"  # BIDS, OASIS, ADNI subject ids: their scans stay together
SESSION_ID = r"OAS\d_\d{4}_MR\d+"  # OASIS sessions (BIDS ones are sub-X_ses-Y, from the path)
IMAGE_ID = r"(?<=_)I(\d+)(?=[._])"  # ADNI image ids in file names: ..._S13408_I13722.nii
BIDS_SKIP = ("derivatives", "sourcedata", "code", "stimuli")  # BIDS folders that hold no raw data to train on
ID_COLUMNS = ("Image Data ID", "Subject", "PTID", "ID", "participant_id", "subject_id")  # found by name, any case
LABEL_COLUMNS = ("Group", "DX", "DX_bl", "diagnosis", "group", "CDR")  # the first present is the label column
LEVELS = ("image", "session", "subject", "name")  # how a file matches a table row, finest first
DELIMITERS = {",": "comma", "\t": "tab", ";": "semicolon"}  # a table's: the one its header splits on most
SEX_VALUES = {"m": 0.0, "male": 0.0, "f": 1.0, "female": 1.0}  # a sex covariate's text values: M 0, F 1
SEX_COLUMNS = ("sex", "m/f", "ptgender", "gender")  # columns read as sex, whatever the covariate is called
AGE_RANGE = (0, 120)  # an age covariate outside this (years) is impossible: not given, and counted
YEARS_SINCE_BASELINE = "Years_bl"  # ADNIMERGE: an AGE covariate is AGE (at baseline) plus this, per visit row


def subject_of(path):
    """The subject id in a path (SUBJECT_ID), or the path itself."""
    m = re.search(SUBJECT_ID, path)
    return m.group(0) if m else path


def bids_scans(paths, root, suffix):
    """The raw anatomical scans of a BIDS dataset: sub-*/[ses-*/]anat/*_{suffix}.nii[.gz], nothing under
    derivatives/ or sourcedata/ and no other modality."""
    def wanted(path):
        parts = os.path.relpath(path, root).split(os.sep)
        return (len(parts) >= 3 and parts[-2] == "anat" and not set(parts) & set(BIDS_SKIP)
                and re.search(rf"_{re.escape(suffix)}\.nii(\.gz)?$", parts[-1]) is not None)
    return [p for p in paths if wanted(p)]


def _normal(value):
    """A table value as the project compares it: trimmed, and numbers written one way (0.50 -> 0.5, 1.0 -> 1)."""
    value = value.strip()
    try:
        return f"{float(value):g}"
    except ValueError:
        return value


def ids_in_table(value):
    """(level, key) pairs an id from a table stands for: an ADNI image id (I13722), an OASIS session (with its
    subject), a BIDS participant, an ADNI or OASIS subject, or any other name."""
    value = value.strip()
    if m := re.fullmatch(r"I(\d+)", value):
        return [("image", m[1])]
    if re.fullmatch(SESSION_ID, value):
        return [("session", value), ("subject", value[:9])]
    if re.fullmatch(SUBJECT_ID, value):
        return [("subject", value)]
    return [("name", value)] if value else []


def ids_in_path(path):
    """(level, key) pairs a data file's path carries: its ADNI image id, its session (OASIS, or BIDS sub-X_ses-Y),
    its subject, and its folder and file names."""
    name = os.path.basename(path)
    found = [("image", m) for m in re.findall(IMAGE_ID, name)]
    found += [("session", m) for m in re.findall(SESSION_ID, path)]
    bids = re.search(r"(sub-[A-Za-z0-9]+)[/\\_](ses-[A-Za-z0-9]+)", path)
    found += [("session", f"{bids[1]}_{bids[2]}")] if bids else []
    found += [("subject", m) for m in re.findall(SUBJECT_ID, path)]
    parts = path.replace("\\", "/").split("/")
    return found + [("name", p) for p in parts[:-1]] + [("name", name.split(".")[0])]


@dataclass
class Table:
    """A table of labels: each row's ids (level, key) and its class (None: blank, or left out by the map)."""
    path: str
    id_columns: list
    label_column: str
    rows: list = field(default_factory=list)  # [(ids, class or None)]
    digest: str = ""  # of the file and the settings that read it
    covariates: list = field(default_factory=list)  # the covariate columns read, as the table names them
    values: list = field(default_factory=list)  # per row, each covariate's value (NaN: blank, text or impossible)
    bad: Counter = field(default_factory=Counter)  # (covariate, 'blank' | 'text' | 'impossible'): rows


def _text(path):
    """A table's text: UTF-8 (with or without a byte-order mark), else Latin-1, said in a notice."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        print(f"notice: {show_path(path)} is not UTF-8: read as Latin-1")
        return raw.decode("latin-1")


def _delimiter(text, path):
    """The delimiter a table's header splits on into the most columns (its extension's on a tie), said in a notice
    where it is not the one its extension stands for."""
    expected = {".csv": ",", ".tsv": "\t"}.get(os.path.splitext(path)[1].lower())
    header = text.split("\n", 1)[0]
    found = max(DELIMITERS, key=lambda d: (len(next(csv.reader([header], delimiter=d), [])), d == expected))
    if expected and found != expected:
        print(f"notice: reading {show_path(path)} as a {DELIMITERS[found]}-separated table (its header splits on "
              f"{DELIMITERS[found]}s, not {DELIMITERS[expected]}s)")
    return found


def read_table(path, id_column="", label_column="", label_map="", covariates=(), labelled=True):
    """A CSV or TSV table of labels: its id columns and label column found by their usual names (or given), its values
    mapped to classes by label_map ('CN=NC,SMC=NC,Dementia=AD'; without one, the values are the classes); and the
    numeric covariate columns named (any case), read by covariate_value. Not labelled: the label column may be
    missing (the classes come from elsewhere)."""
    shown = show_path(path)
    if not os.path.isfile(path):
        raise InputError(f"no label table at {shown}: pass --labels FILE (a CSV or TSV)")
    text = _text(path)
    try:
        reader = csv.DictReader(text.splitlines(), delimiter=_delimiter(text, path))
        rows, columns = list(reader), reader.fieldnames or []
    except csv.Error:
        rows = None
    if rows is None or "\0" in text:  # NUL: a binary file
        raise InputError(f"{shown} is not a CSV or TSV table: pass a .csv or .tsv file of labels")
    if not rows:
        raise InputError(f"{shown} holds no rows" + (f", only its header ({', '.join(columns)})" if columns else "") +
                         ": add a row for each scan or subject, its id and its label")
    if len(columns) < 2:
        raise InputError(f"{shown} is not a CSV or TSV table (one column: {', '.join(columns) or 'none'}): pass a "
                         f".csv or .tsv file with an id column and a label column")
    find = lambda names: [c for name in names for c in columns if c.strip().lower() == name.lower()]  # noqa: E731
    ids = find([id_column]) if id_column else find(ID_COLUMNS)
    label = find([label_column]) if label_column else find(LABEL_COLUMNS)
    missing = [c for c in covariates if not find([c])]
    if missing:
        raise InputError(f"{shown} has no column {', '.join(missing)}; its columns: {', '.join(columns)} (check "
                         f"--covariates)")
    if not ids or (labelled and not label):
        wanted = f"column {id_column}" if id_column else "id column (" + ", ".join(ID_COLUMNS) + ")"
        if ids:
            wanted = f"column {label_column}" if label_column else "label column (" + ", ".join(
                LABEL_COLUMNS) + ")"
        raise InputError(f"{shown} has no {wanted}; its columns: {', '.join(columns)} (name one with --id-column or "
                         f"--label-column)")
    mapping = {}
    for pair in filter(None, label_map.split(",")):
        if "=" not in pair:
            raise InputError(f"--label-map {label_map}: give VALUE=CLASS pairs, e.g. CN=NC,EMCI=MCI,Dementia=AD")
        value, name = pair.split("=", 1)
        if not name.strip():
            raise InputError(f"--label-map {label_map}: {value} maps to no class; give a class after each '=', e.g. "
                             f"{value}=NC")
        mapping[_normal(value)] = name.strip()
    table = Table(path, ids, label[0] if label else "", covariates=[find([c])[0] for c in covariates])
    for row in rows:
        value = _normal(row.get(label[0]) or "") if label else ""
        name = mapping.get(value) if mapping else value or None
        table.rows.append(([key for column in ids for key in ids_in_table(row.get(column) or "")], name))
        read = [covariate_value(row, column, columns) for column in table.covariates]
        table.values.append(tuple(v for v, _ in read))
        table.bad.update((column, why) for column, (_, why) in zip(table.covariates, read) if why)
    table.digest = hashlib.sha1(text.encode() + repr((ids, label, sorted(mapping.items()), covariates)).encode()
                                ).hexdigest()[:12]
    return table


def covariate_value(row, column, columns):
    """A row's value of a covariate column and why it is not given (None where it is): numbers as they are, a sex
    column's M/F as 0/1 (SEX_VALUES), an age outside AGE_RANGE impossible; ADNIMERGE's AGE (at baseline) plus the
    row's Years_bl. ('blank', 'text' or 'impossible' with NaN where it cannot be read.)"""
    text = (row.get(column) or "").strip()
    if not text:
        return math.nan, "blank"
    if column.lower() in SEX_COLUMNS and text.lower() in SEX_VALUES:
        return SEX_VALUES[text.lower()], None
    try:
        value = float(text)
    except ValueError:
        return math.nan, "text"
    if column == "AGE" and YEARS_SINCE_BASELINE in columns:
        try:
            value += float(row[YEARS_SINCE_BASELINE])
        except ValueError:  # blank or text: the baseline age
            pass
    is_age = column.lower() in ("age", "age_at_scan", "ageatscan")
    if not math.isfinite(value) or (is_age and not AGE_RANGE[0] <= value <= AGE_RANGE[1]):
        return math.nan, "impossible"
    return value, None


@dataclass
class Matching:
    """What a table says of a list of files: the class of each file it labels, and how they were found."""
    labels: dict  # {file: class name}
    by_level: Counter  # files labelled at each of LEVELS
    unlabelled: list  # files whose rows are blank or left out by the map
    unmatched: list  # files no row names
    conflicts: list  # subjects whose rows disagree and whose files carry nothing finer
    unused_rows: int  # rows no file matched

    def report(self, table):
        """The matching in a few lines, for `python dataset.py DIR --labels FILE`."""
        few = lambda names: ", ".join(show_path(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")  # noqa
        lines = [f"labels  {show_path(table.path)}, column {table.label_column}: " + ", ".join(
            f"{self.by_level[level]} files by {level} id" for level in LEVELS if self.by_level[level])]
        if self.unlabelled:
            lines.append(f"        {len(self.unlabelled)} files unlabelled (blank, or not in --label-map): skipped")
        if self.unmatched:
            lines.append(f"        {len(self.unmatched)} files not in the table, skipped: {few(self.unmatched)}")
        if self.conflicts:
            lines.append(f"        {len(self.conflicts)} subjects with rows that disagree, skipped: {few(self.conflicts)}")
        lines.append(f"        {self.unused_rows} of {len(table.rows)} table rows matched no file")
        return "\n".join(lines)


def _row_index(table):
    """{(level, key): the rows that carry it}."""
    index = {}
    for row, (ids, _) in enumerate(table.rows):
        for key in ids:
            index.setdefault(key, []).append(row)
    return index


def rows_of(path, index):
    """(the finest level at which a file's ids name rows, those rows), or (None, [])."""
    found = ids_in_path(path)
    for level in LEVELS:
        rows = sorted({r for key in found if key[0] == level for r in index.get(key, [])})
        if rows:
            return level, rows
    return None, []


def match_files(files, table):
    """Each file's class from the table, matching finest first: the image id in its name, then its session, then its
    subject (whose rows must agree), then a folder or file name; the files left unlabelled and why."""
    index = _row_index(table)
    result, used = Matching({}, Counter(), [], [], [], 0), set()
    for path in files:
        level, rows = rows_of(path, index)
        if not rows:
            result.unmatched.append(path)
            continue
        used.update(rows)
        names = {table.rows[r][1] for r in rows} - {None}
        if len(names) > 1:
            result.conflicts.append(next(k for lv, k in ids_in_path(path) if lv == level))
        elif not names:
            result.unlabelled.append(path)
        else:
            result.labels[path], result.by_level[level] = names.pop(), result.by_level[level] + 1
    result.conflicts = sorted(set(result.conflicts))
    result.unused_rows = len(table.rows) - len(used)
    if not result.labels and not result.unlabelled and not result.conflicts:
        written = lambda key: f"I{key[1]}" if key[0] == "image" else key[1]  # noqa: E731  as the tables write it
        in_table = next((k for ids, _ in table.rows for k in ids), ("name", "none"))
        keys = ids_in_path(files[0]) if files else [("name", "none")]
        in_files = next((k for k in keys if k[0] == in_table[0]), keys[0])
        raise InputError(f"no file matches {show_path(table.path)}: the files carry ids like {written(in_files)}, the "
                         f"table ids like {written(in_table)} ({', '.join(table.id_columns)}): check --data-dir, or "
                         f"name the id column with --id-column")
    return result


def labels_from(table, splits, root):
    """The splits' files the table labels (the rest left out, said), their classes (sorted names) and
    {path under root: class index}, and the Matching."""
    files = [os.path.relpath(p, root) for paths in splits.values() for p in paths]
    matching = match_files(files, table)
    for subject in matching.conflicts:
        print(f"warning: skipping {subject}: its rows in {show_path(table.path)} give different classes and its "
              f"files carry no finer id", file=sys.stderr)
    skipped = len(files) - len(matching.labels)
    if skipped:
        print(f"notice: {skipped} of {len(files)} files left out: {len(matching.unlabelled)} unlabelled (blank, or not "
              f"in --label-map), {len(matching.unmatched)} not in the table, {len(matching.conflicts)} subjects in "
              f"conflict ({show_path(table.path)})")
    classes = sorted(set(matching.labels.values()))
    if len(classes) < 2:
        raise InputError(f"{show_path(table.path)} labels the files with {len(classes)} class "
                         f"({', '.join(classes) or 'none'}) in column {table.label_column}: class conditioning needs "
                         f"two or more; check --label-map or --label-column")
    kept = {s: [p for p in paths if os.path.relpath(p, root) in matching.labels] for s, paths in splits.items()}
    return ({s: p for s, p in kept.items() if p}, classes,
            {f: classes.index(c) for f, c in matching.labels.items()}, matching)


@dataclass
class Covered:
    """What a table's covariate columns give a list of files: how many files each gives a value, and why not."""
    given: Counter  # covariate: files given a value
    missing: Counter  # (covariate, why): files without one ('not in the table', 'blank or unreadable', 'rows disagree')

    def report(self, table):
        """The covariates' matching in a few lines (with the table's unreadable values), for dataset.py's report."""
        lines = [f"covariates {show_path(table.path)}:"]
        for name in table.covariates:
            why = ", ".join(f"{n} {reason}" for (c, reason), n in sorted(self.missing.items()) if c == name)
            bad = ", ".join(f"{n} {reason}" for (c, reason), n in sorted(table.bad.items()) if c == name)
            lines.append(f"        {name}: {self.given[name]} files given" + (f"; not given (trained as "
                         f"'not given'): {why}" if why else "") + (f"; table rows unread: {bad}" if bad else ""))
        return "\n".join(lines)


def covariates_of_files(table, files):
    """Each file's covariates (len(files) x K, NaN where not given), matched as match_files matches classes: a
    file's finest rows must agree on a value (a subject's visits differ in age: only finer ids give one), and how."""
    index, values = _row_index(table), torch.full((len(files), len(table.covariates)), math.nan)
    covered = Covered(Counter(), Counter())
    for i, path in enumerate(files):
        _, rows = rows_of(path, index)
        for j, name in enumerate(table.covariates):
            given = {v for r in rows if not math.isnan(v := table.values[r][j])}
            if len(given) == 1:
                values[i, j] = given.pop()
                covered.given[name] += 1
            else:
                why = "not in the table" if not rows else "rows disagree" if given else "blank or unreadable"
                covered.missing[name, why] += 1
    return values, covered


def table_for(cfg, root, bids, layout):
    """The table the classes or covariates come from: LABELS; else, where class conditioning or COVARIATES asks for
    one, a BIDS dataset's participants.tsv, or for COVARIATES the one table in the data folder. None: no table (the
    classes come from class folders)."""
    covariates = utils.covariates_of(cfg)
    path = cfg["LABELS"]
    if not path and bids and (utils.conditions_of(cfg)[0] or covariates):
        path = os.path.join(root, "participants.tsv") if os.path.isfile(os.path.join(root, "participants.tsv")) else ""
    if not path and covariates:
        path = table_in(root, covariates)
    if not path:
        return None
    if layout == "oasis" or (layout == "adni" and not covariates):
        raise InputError(f"--labels reads folders of scans or images whose names carry ADNI, OASIS or BIDS ids, not "
                         f"the {layout.upper()} slice layout in {show_path(root)}: leave --labels out")
    labelled = layout != "adni" and utils.conditions_of(cfg)[0]  # ADNI's classes are its folders
    return read_table(path, cfg["ID_COLUMN"], cfg["LABEL_COLUMN"], cfg["LABEL_MAP"], covariates, labelled)


def table_in(root, covariates):
    """The one CSV or TSV file in the data folder, which COVARIATES then reads (said in a notice)."""
    tables = sorted(e.path for e in os.scandir(root) if e.is_file() and e.name.lower().endswith((".csv", ".tsv")))
    if len(tables) != 1:
        raise InputError(f"--covariates {','.join(covariates)} reads a table of them, and {show_path(root)} holds "
                         f"{len(tables) or 'no'} CSV or TSV files" + (f" ({', '.join(map(os.path.basename, tables))})"
                                                                     if tables else "") + ": pass --labels FILE")
    print(f"notice: reading the covariates {', '.join(covariates)} from {show_path(tables[0])}")
    return tables[0]


def check_covered(table, train_values):
    """An InputError where a covariate has no value for any training image."""
    for name, column in zip(table.covariates, train_values.T):
        if column.isnan().all():
            raise InputError(f"no training image has a value of {name} in {show_path(table.path)}: check the table's "
                             f"ids against the files (python dataset.py DIR --labels FILE --covariates {name})")


def held_out(subjects, share, seed, classes):
    """A seeded share of the subjects ({subject: class index or None}) of each class, at least one of a class with two
    or more: every class is held out, and a class of one subject, which cannot be, is named."""
    held = set()
    for group in sorted(set(subjects.values()), key=str):
        names = sorted(u for u, c in subjects.items() if c == group)
        n = max(1, round(share * len(names))) if len(names) >= 2 else 0
        if not n and group is not None:
            print(f"notice: {classes[group]} has only one subject ({show_path(names[0])}): it cannot be held out, so "
                  f"the held-out split has no {classes[group]}; add {classes[group]} subjects to validate it")
        order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
        held |= {names[i] for i in order[:n]}
    return held

"""The counterfactual tables of docs/editing.md: one checkpoint, the labelled demo's held-out 'AD' slices made NC
in each cell DEPTH,GUIDANCE,MASK (MASK: none, auto, change or change@THRESHOLD, or a mask path), one JSON line of counterfactual.json's figures
per cell appended to ROWS. The model and the slices are loaded once; flags before `--` are edit.py's. Composition
(NULL_CYCLES null cycles) depends on the depth alone: it is measured in the first cell of each depth, once after.

    python docs/edit_table.py ROWS.jsonl --output-dir outputs --edit-steps 100 -- 1.0,2,none 1.0,3,change@0.7
    python docs/edit_table.py --summary seed0.jsonl seed1.jsonl seed2.jsonl    # the table: mean (min-max) by cell
"""
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import edit  # noqa: E402
import utils  # noqa: E402
from predict import load_heldout, open_checkpoint  # noqa: E402

NULL_CYCLES, CHANGE_THRESHOLD = edit.NULL_CYCLES, edit.CHANGE_THRESHOLD


COLUMNS = {  # the summary's columns: (heading, figure, reference figure or None)
    "probe reads NC": ("effectiveness", None),
    "to twin, in mask (input)": ("cf_to_twin_in_mask", "input_to_twin_in_mask"),
    "change outside (null)": ("cf_change_outside_mask", "null_change_outside_mask"),
    "brain area (twin)": ("cf_brain_area_change", "twin_brain_area_change"),
    "local: change outside (null)": ("local_cf_change_outside_mask", "local_null_change_outside_mask"),
    "round trip (null)": ("round_trip_change", "null_change"),
    "10 null cycles (one), first 8": ("null_10_cycles_change_first_8", "null_change_first_8"),
    "NC stays (null)": ("stay_change", "stay_null_change"),
}


def summary(paths):
    """A markdown table of the rows in paths: each figure's mean over the files (training seeds) with its range."""
    cells = {}
    for path in paths:
        for line in open(path):
            row = json.loads(line)
            cells.setdefault((row["cell"], row["edit_steps"]), []).append(row)
    print("| cell (depth, guidance, mask), edit steps | seeds | " + " | ".join(COLUMNS) + " |")
    print("| --- " * (len(COLUMNS) + 2) + "|")
    for (cell, steps), rows in cells.items():
        shown = []
        for figure, reference in COLUMNS.values():
            measured = [r for r in rows if figure in r]  # composition: in a depth's first cell only
            values = [r[figure] for r in measured]
            text = "" if not values else f"{sum(values) / len(values):.3f}" + (
                f" ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else "")
            if reference and values:
                text += f" [{sum(r[reference] for r in measured) / len(measured):.3f}]"
            shown.append(text)
        print(f"| {cell}, {steps} | {len(rows)} | " + " | ".join(shown) + " |")


def main():
    if sys.argv[1] == "--summary":
        return summary(sys.argv[2:])
    rows, argv = sys.argv[1], sys.argv[2:]
    flags, cells = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    settings, args = edit.parse_settings([*flags, "--to-label", "healthy"])
    sampling, _, step = open_checkpoint(settings, args, utils.get_device())
    data = load_heldout(sampling)
    target = edit.target_class("healthy", sampling.class_names)
    slices = edit.heldout_slices(data, target, edit.EDIT_SLICES)
    cycled = set()
    for cell in cells:
        depth, guidance, mask = cell.split(",")
        mask, _, threshold = mask.partition("@")
        edit.CHANGE_THRESHOLD = float(threshold or CHANGE_THRESHOLD)
        edit.NULL_CYCLES = 1 if depth in cycled else NULL_CYCLES
        cycled.add(depth)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            figures = edit.edit_and_score(sampling, slices, target, float(depth), float(guidance), None, data, out,
                                          mask)
        row = {"cell": cell, "mask": mask, "change_threshold": edit.CHANGE_THRESHOLD, "step": step, "training_seed": sampling.cfg["SEED"],
               "edit_steps": settings["EDIT_STEPS"], "seconds": round(time.perf_counter() - start, 1), **figures}
        with open(rows, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(cell, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)


if __name__ == "__main__":
    utils.run_main(main)

"""Checkpoint files, safely: written atomically (the last good one kept beside it), read without running code,
resumed from the previous one when the newest is damaged, and the leftovers of a killed writer cleaned up."""
import os
import re
import shutil
import warnings

import torch

import utils
from utils import InputError

# what a checkpoint must hold to be resumed from (best.pt, for one, has no optimizer)
RESUME_KEYS = ("model", "ema", "optimizer", "noise_rng", "cpu_rng", "step", "best_val", "history")


def save_checkpoint(state, path):
    """Write atomically: temporary file, fsync, then rename; the old file becomes NAME.prev.pt."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):  # keep the last good one, never leaving `path` missing
            _copy_replace(path, prev_path(path))
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise InputError(f"could not write {path} ({e.strerror}): free some disk space or choose another "
                        f"--output-dir; the previous checkpoint is untouched") from None


def prev_path(path):
    """Where save_checkpoint keeps the previous version of path: NAME.prev.pt."""
    return path[:-3] + ".prev.pt" if path.endswith(".pt") else path + ".prev"


def _copy_replace(src, dst):
    """Atomically make dst a copy of src (a hard link where the file system allows)."""
    if os.path.exists(dst) and os.path.samefile(src, dst):
        return  # one file already (killed between the renames): rename() onto its own hard link would do nothing
    tmp = f"{dst}.tmp{os.getpid()}"
    try:
        try:
            os.link(src, tmp)
        except OSError:  # file system without hard links
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _load_failure(e, path):
    """Why torch.load refused a file, in a few plain words."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch's message holds terminal colour codes
    if unsafe := re.search(r"Unsupported global: GLOBAL (\S+)", text):
        return f"it holds Python objects ({unsafe.group(1)}) that could run code, so it is never unpickled"
    if isinstance(e, OSError):
        return e.strerror or text
    return "empty file" if os.path.getsize(path) == 0 else "truncated or corrupt"


def load_checkpoint(path, advice="delete it or pass another --checkpoint"):
    """Load a checkpoint safely (weights_only=True: no code in it ever runs)."""
    if not os.path.isfile(path):
        raise InputError(f"no checkpoint at {path}: train first (python train.py) or pass --checkpoint PATH")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickles before refusing them: one line is enough
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"{path} is not a readable checkpoint ({_load_failure(e, path)})"
                        + (f": {advice}" if advice else "")) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise InputError(f"{path} is not a checkpoint of this project (no model or config in it)")
    if "CONDITION" not in state["config"]:  # written before CONDITION: CONDITIONAL=True meant class conditioning
        state["config"]["CONDITION"] = "class" if state["config"].pop("CONDITIONAL", False) else "none"
    state["config"].setdefault("PATCH_SIZE", 1)  # written before PATCH_SIZE: no pixels were folded
    state["config"] = {**utils.constants(), **state["config"]}  # settings added since it was written: their defaults
    return state


def check_writable(path):
    """Fail before any heavy work when the output folder can't be written."""
    try:
        os.makedirs(os.path.join(path, "samples"), exist_ok=True)
        probe = os.path.join(path, f".write_test{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise InputError(f"cannot write to OUTPUT_DIR {path!r} ({e.strerror}): pick another with --output-dir") from None


def remove_stale_temps(path):
    """Delete the half-written files (NAME.tmpPID, .write_testPID) of a run that was killed while writing them."""
    for name in os.listdir(path):
        if (m := re.fullmatch(r".+\.tmp(\d+)|\.write_test(\d+)", name)) and not _alive(int(m[1] or m[2])):
            os.remove(os.path.join(path, name))


def _alive(pid):
    """Whether process pid exists (and may still be writing its temporary file)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True


def load_resume_state(ckpt_path):
    """(state, path) to resume from: checkpoint.pt, or checkpoint.prev.pt where that one is missing or unusable.

    (None, None) when there is neither; a InputError pointing at --fresh when neither can be used.
    """
    prev, problems = prev_path(ckpt_path), []
    for path in (ckpt_path, prev):
        if not os.path.exists(path):
            continue
        try:
            state = load_checkpoint(path, advice="")
            if missing := [k for k in RESUME_KEYS if k not in state]:
                raise InputError(f"{path} cannot be resumed from (no {', '.join(missing)} in it)")
        except InputError as e:
            print(f"notice: {e}")
            problems.append(str(e))
            continue
        if path == prev:
            print(f"notice: resuming from the previous checkpoint, {prev}"
                  + ("" if problems else f" ({ckpt_path} is missing)"))
        return state, path
    if problems:
        if not os.path.exists(prev):
            problems.append(f"there is no {os.path.basename(prev)} to fall back on")
        raise InputError(f"cannot resume: {'; '.join(problems)}: start over with --fresh (or choose another "
                        f"--output-dir)")
    return None, None

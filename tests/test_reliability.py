"""Fault injection: kill -9 mid-training and mid-checkpoint, corrupt, missing and malicious checkpoints, an
unwritable output folder or a full disk, out-of-range settings, and hostile image folders (CPU, tiny model).

Every subprocess runs single-threaded: on a busy 2-core machine OpenMP threads that spin for a core another job
holds make a tiny run many times slower.
"""
import errno
import io
import os
import pickle
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY, run_script, write_blobs

import checkpoints
import dataset  # the repository is on sys.path (conftest)
import train
import utils
from utils import InputError

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
# the hostile images make PIL warn on its way to refusing them (dataset.py then skips them with its own warning)
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning",
                                        "ignore::UserWarning:PIL.TiffImagePlugin")


def script(name, *args, timeout=180):
    return run_script(name, *args, timeout=timeout, env=ENV)


def train_cmd(data, out, epochs, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--data-dir", data, "--output-dir", out,
            "--epochs", str(epochs), *TINY, *extra]


def one_error_line(r, *texts):
    """The run failed with exit 2 and exactly one 'error:' line on stderr, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for text in texts:
        assert text in lines[0], lines[0]
    return lines[0]


def single_line(e):
    msg = str(e.value)
    assert msg.strip() and "\n" not in msg and "\x1b" not in msg, msg
    return msg


def temp_files(folder):
    return [os.path.join(top, f) for top, _, files in os.walk(folder) for f in files
            if ".tmp" in f or f.startswith(".write_test")]


def step_of(path):
    return checkpoints.load_checkpoint(path)["step"]


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """OUTPUT_DIR of a 2-epoch tiny run: checkpoint.pt at step 8, checkpoint.prev.pt at step 6."""
    out = str(tmp_path_factory.mktemp("trained"))
    r = script("train.py", "--data-dir", tiny_data, "--output-dir", out, "--epochs", "2", "--checkpoint-every", "3",
               *TINY)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture
def run_copy(trained, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(trained, out)
    return out


# ---------------------------------------------------------------- 1. kill -9 during training
def wait_for(condition, proc, what, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None or condition(), f"train.py exited ({proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_sigkill_at_random_moments_then_resume(tiny_data, tmp_path):
    out = str(tmp_path / "out")
    ckpt = os.path.join(out, "checkpoint.pt")
    cmd = train_cmd(tiny_data, out, 10, "--checkpoint-every", "2")  # 38 images / batch 8: 4 steps an epoch, 40
    rng = random.Random(20240607)
    saved, interrupted, mid_write = [0], 0, 0
    for i in range(5):
        log = tmp_path / f"stdout_{i}.txt"
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=ENV)
        try:
            wait_for(lambda: "model:" in log.read_text() and os.path.exists(os.path.join(out, "log.csv")), proc,
                     "training started")
            time.sleep(rng.uniform(0.05, 0.5))
            if i % 2:  # every other kill lands while a checkpoint is being written, whenever the next one is
                deadline = time.time() + 1.5
                while not temp_files(out) and proc.poll() is None and time.time() < deadline:
                    time.sleep(0.001)
            interrupted += proc.poll() is None
        finally:
            proc.kill()
            proc.wait(timeout=60)
        mid_write += bool(temp_files(out))
        saved.append(step_of(ckpt) if os.path.exists(ckpt) else 0)  # whenever it exists, it is whole
        assert saved[-1] >= saved[-2], saved  # a restart never loses what was checkpointed
    assert interrupted == 5, f"only {interrupted} of 5 kills hit a running train.py ({saved})"

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert saved[-1] == 0 or f"resuming from {ckpt} at step {saved[-1]}" in r.stdout
    state = checkpoints.load_checkpoint(ckpt)
    assert state["step"] == 40 and [h["step"] for h in state["history"]][-1] == 40
    assert step_of(os.path.join(out, "checkpoint.prev.pt")) <= 40
    assert temp_files(out) == []
    logged = [int(line.split(",")[0]) for line in open(os.path.join(out, "log.csv")).read().splitlines()[1:]]
    assert logged == [h["step"] for h in state["history"]] == sorted(logged)  # no rows repeated by restarts
    print(f"checkpointed steps after each kill: {saved[1:]}; {mid_write} kills left a half-written file")


# A wrapper that runs train.py and SIGKILLs it at a chosen point of the Nth checkpoint.pt write:
#   write    half of the new checkpoint's bytes are in checkpoint.pt.tmpPID
#   link     the old checkpoint is hard-linked to checkpoint.prev.pt.tmpPID, not yet renamed to .prev.pt
#   rename   checkpoint.prev.pt is in place and the new file complete, not yet renamed to checkpoint.pt
KILLER = r"""
import io, os, runpy, signal, sys
import torch
where, nth = sys.argv[1], int(sys.argv[2])
sys.argv = sys.argv[3:]
calls = {"n": 0}
real_save, real_link, real_replace = torch.save, os.link, os.replace

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def save(obj, f, *a, **k):
    if str(getattr(f, "name", "")).endswith(".pt.tmp%d" % os.getpid()) and "checkpoint.pt" in f.name:
        calls["n"] += 1
        if where == "write" and calls["n"] == nth:
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            die()
    return real_save(obj, f, *a, **k)

def link(src, dst):
    real_link(src, dst)
    if where == "link" and calls["n"] == nth and "checkpoint.prev.pt" in dst:
        die()

def replace(src, dst):
    if where == "rename" and calls["n"] == nth and dst.endswith(os.sep + "checkpoint.pt"):
        die()
    real_replace(src, dst)

torch.save, os.link, os.replace = save, link, replace
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sigkill_inside_checkpoint_writes(tiny_data, tmp_path):
    out = str(tmp_path / "out")
    ckpt = os.path.join(out, "checkpoint.pt")
    cmd = train_cmd(tiny_data, out, 2, "--checkpoint-every", "2")[1:]  # 8 steps, checkpoints at 2, 4, 6, 8, 8
    expect = {"write": ["checkpoint.pt.tmp"], "link": ["checkpoint.prev.pt.tmp", "checkpoint.pt.tmp"],
              "rename": ["checkpoint.pt.tmp"]}
    for where, nth in (("write", 2), ("link", 1), ("rename", 1)):
        before = set(temp_files(out)) if os.path.isdir(out) else set()
        r = subprocess.run([sys.executable, "-c", KILLER, where, str(nth), *cmd], capture_output=True, text=True,
                           timeout=180, cwd=ROOT, env=ENV)
        assert r.returncode == -signal.SIGKILL, (where, r.stderr[-2000:])
        left = sorted(re.sub(r"\d+$", "", os.path.basename(p)) for p in set(temp_files(out)) - before)
        assert left == expect[where], (where, left)  # it really died mid-write
        assert step_of(ckpt) == 2, where  # the last complete checkpoint, intact
        if os.path.exists(os.path.join(out, "checkpoint.prev.pt")):
            assert step_of(os.path.join(out, "checkpoint.prev.pt")) == 2
    r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=180, cwd=ROOT, env=ENV)
    assert r.returncode == 0 and f"resuming from {ckpt} at step 2" in r.stdout, r.stderr[-2000:]
    assert step_of(ckpt) == 8 and temp_files(out) == []


def test_save_after_a_kill_between_the_renames(tmp_path):
    """checkpoint.prev.pt and checkpoint.pt one file (hard links): the next save still leaves no temporary file."""
    path = str(tmp_path / "checkpoint.pt")
    checkpoints.save_checkpoint({"model": {}, "config": {}, "step": 1}, path)
    os.link(path, str(tmp_path / "checkpoint.prev.pt"))
    checkpoints.save_checkpoint({"model": {}, "config": {}, "step": 2}, path)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.prev.pt", "checkpoint.pt"]
    assert step_of(path) == 2 and step_of(str(tmp_path / "checkpoint.prev.pt")) == 1


def test_the_previous_checkpoint_is_copied_where_hard_links_fail(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))
    monkeypatch.setattr(os, "link", no_links)  # a file system without hard links
    path = str(tmp_path / "checkpoint.pt")
    for step in (1, 2):
        checkpoints.save_checkpoint({"model": {}, "config": {}, "step": step}, path)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.prev.pt", "checkpoint.pt"]
    assert step_of(path) == 2 and step_of(str(tmp_path / "checkpoint.prev.pt")) == 1


# ---------------------------------------------------------------- 2. truncated, corrupt or missing checkpoints
def corrupt(path, how):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write({"truncated": data[: len(data) // 3], "garbage": random.Random(0).randbytes(5000),
                 "empty": b""}[how])


@pytest.mark.parametrize("how, reason", [("truncated", "truncated or corrupt"), ("garbage", "truncated or corrupt"),
                                         ("empty", "empty file")])
def test_unreadable_checkpoint_falls_back_to_prev(run_copy, how, reason, capsys):
    """One notice saying why (and no advice to delete it: the fallback is automatic), then one naming the fallback."""
    ckpt, prev = os.path.join(run_copy, "checkpoint.pt"), os.path.join(run_copy, "checkpoint.prev.pt")
    corrupt(ckpt, how)
    state, path = checkpoints.load_resume_state(ckpt)
    assert path == prev and state["step"] == 6
    assert capsys.readouterr().out.splitlines() == [f"notice: {ckpt} is not a readable checkpoint ({reason})",
                                                    f"notice: resuming from the previous checkpoint, {prev}"]


def test_missing_checkpoint_resumes_from_prev(run_copy, capsys):
    os.remove(os.path.join(run_copy, "checkpoint.pt"))  # as if killed between the two renames
    state, path = checkpoints.load_resume_state(os.path.join(run_copy, "checkpoint.pt"))
    assert path.endswith("checkpoint.prev.pt") and state["step"] == 6 and "is missing" in capsys.readouterr().out


@pytest.mark.parametrize("lacks", [["optimizer"], ["ema", "optimizer"]])
def test_checkpoint_without_optimizer_falls_back(run_copy, lacks, capsys):
    ckpt = os.path.join(run_copy, "checkpoint.pt")
    if lacks == ["optimizer"]:
        shutil.copy(os.path.join(run_copy, "best.pt"), ckpt)  # a mix-up
    else:
        state = checkpoints.load_checkpoint(ckpt)
        torch.save({k: v for k, v in state.items() if k not in lacks}, ckpt)
    assert checkpoints.load_resume_state(ckpt)[1].endswith("checkpoint.prev.pt")
    notice = f"notice: {ckpt} cannot be resumed from (no {', '.join(lacks)} in it)"
    assert capsys.readouterr().out.splitlines()[0] == notice


@pytest.mark.parametrize("prev", ["missing", "corrupt"])
def test_no_usable_checkpoint_asks_for_fresh(run_copy, prev):
    ckpt = os.path.join(run_copy, "checkpoint.pt")
    corrupt(ckpt, "truncated")
    if prev == "missing":
        os.remove(os.path.join(run_copy, "checkpoint.prev.pt"))
    else:
        corrupt(os.path.join(run_copy, "checkpoint.prev.pt"), "garbage")
    with pytest.raises(InputError) as e:
        checkpoints.load_resume_state(ckpt)
    msg = single_line(e)
    second = "there is no checkpoint.prev.pt to fall back on" if prev == "missing" else \
        f"{os.path.join(run_copy, 'checkpoint.prev.pt')} is not a readable checkpoint (truncated or corrupt)"
    assert f"cannot resume: {ckpt} is not a readable checkpoint (truncated or corrupt); {second}: start over with " \
           "--fresh" in msg


def test_the_previous_version_lies_beside_the_file():
    assert checkpoints.prev_path("run/checkpoint.pt") == "run/checkpoint.prev.pt"
    assert checkpoints.prev_path("run/model.ckpt") == "run/model.ckpt.prev"


def test_nothing_to_resume(tmp_path):
    assert checkpoints.load_resume_state(str(tmp_path / "checkpoint.pt")) == (None, None)


def test_train_survives_a_truncated_checkpoint_and_fresh_starts_over(run_copy, tiny_data):
    ckpt = os.path.join(run_copy, "checkpoint.pt")
    corrupt(ckpt, "truncated")
    args = ["--data-dir", tiny_data, "--output-dir", run_copy, *TINY]
    r = script("train.py", *args, "--epochs", "2")
    assert r.returncode == 0, r.stderr
    assert "is not a readable checkpoint (truncated or corrupt)" in r.stdout
    assert f"resuming from {run_copy}/checkpoint.prev.pt at step 6" in r.stdout
    assert step_of(ckpt) == 8  # trained on from step 6, then written whole

    corrupt(ckpt, "garbage")
    os.remove(os.path.join(run_copy, "checkpoint.prev.pt"))
    one_error_line(script("train.py", *args, "--epochs", "2"), "cannot resume", "--fresh")
    r = script("train.py", *args, "--epochs", "1", "--fresh")
    assert r.returncode == 0 and "resuming" not in r.stdout, r.stderr
    assert step_of(ckpt) == 4


# ---------------------------------------------------------------- 3. checkpoints never run code
class Payload:
    """Unpickling this runs func(*args)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def malicious(path, marker, writer):
    """A checkpoint-shaped pickle that creates marker when unpickled (torch.save, or plain pickle at a protocol)."""
    state = {"model": {"w": Payload(open, marker, "w")}, "config": {"x": Payload(os.system, f"touch {marker}")}}
    if writer == "torch":
        torch.save(state, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(state, f, protocol=int(writer[len("pickle"):]))
    return path


@pytest.mark.parametrize("writer", ["torch", "pickle2", "pickle5"])
def test_the_payload_is_real(tmp_path, writer):
    marker = str(tmp_path / "marker")
    path = malicious(str(tmp_path / "evil.pt"), marker, writer)
    if writer == "torch":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as f:
            pickle.load(f)
    assert os.path.exists(marker)  # so the tests below would notice if it ever ran


@pytest.mark.parametrize("writer, reason", [("torch", "could run code"), ("pickle2", "could run code"),
                                            ("pickle5", "truncated or corrupt")])  # refused before any global
def test_load_checkpoint_never_unpickles_code(tmp_path, writer, reason):
    marker = str(tmp_path / "marker")
    with pytest.raises(InputError) as e:
        checkpoints.load_checkpoint(malicious(str(tmp_path / "evil.pt"), marker, writer))
    assert reason in single_line(e) and not os.path.exists(marker)


@pytest.mark.parametrize("error, reason", [
    (RuntimeError("\x1b[1mWeights only load failed.\x1b[0m Unsupported global: GLOBAL \x1b[31mos.system\x1b[0m was "
                  "not an allowed global"),
     "it holds Python objects (os.system) that could run code, so it is never unpickled"),
    (OSError(errno.EIO, os.strerror(errno.EIO)), os.strerror(errno.EIO)), (OSError("gone"), "gone"),
    (b"", "empty file"), (b"PK\x03\x04half a zip", "truncated or corrupt")])
def test_why_a_checkpoint_is_refused_in_plain_words(tmp_path, monkeypatch, error, reason):
    """torch's reasons (or the file's bytes), terminal colour codes and errno prefixes stripped."""
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(error if isinstance(error, bytes) else b"something")

    def refuse(*args, **kwargs):
        raise error
    if not isinstance(error, bytes):
        monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(InputError) as e:
        checkpoints.load_checkpoint(str(path))
    assert single_line(e) == f"{path} is not a readable checkpoint ({reason}): delete it or pass another --checkpoint"


def test_scripts_refuse_a_malicious_checkpoint(tmp_path, tiny_data):
    marker = str(tmp_path / "marker")
    one_error_line(script("predict.py", "--checkpoint", malicious(str(tmp_path / "evil.pkl"), marker, "pickle5"),
                          "--output-dir", str(tmp_path / "p"), "--compile", "false"), "not a readable checkpoint")
    out = tmp_path / "run"
    out.mkdir()
    malicious(str(out / "checkpoint.pt"), marker, "torch")
    one_error_line(script("train.py", "--data-dir", tiny_data, "--output-dir", str(out), *TINY, "--epochs", "1"),
                   "could run code", "--fresh")
    assert not os.path.exists(marker)


# ---------------------------------------------------------------- 4. unwritable output, full disk
def test_unwritable_output_dir_fails_up_front(tmp_path):
    (tmp_path / "file.txt").write_text("a file, not a folder")
    r = script("train.py", "--data-dir", str(tmp_path / "no_data"), "--output-dir", str(tmp_path / "file.txt" / "out"),
               *TINY)
    one_error_line(r, "--output-dir", "file.txt")  # before the data is even looked for


@pytest.mark.parametrize("fails", ["save", "fsync", "rename"])
def test_failed_checkpoint_write_keeps_the_old_one(tmp_path, monkeypatch, fails):
    path = str(tmp_path / "checkpoint.pt")
    for v in (1.0, 2.0):
        checkpoints.save_checkpoint({"model": {"w": torch.full((64,), v)}, "config": {}}, path)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    assert sorted(before) == ["checkpoint.prev.pt", "checkpoint.pt"]

    def no_space(*args, **kwargs):
        if fails == "save":
            args[1].write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr({"save": torch, "fsync": os, "rename": os}[fails],
                        {"save": "save", "fsync": "fsync", "rename": "replace"}[fails], no_space)
    with pytest.raises(InputError) as e:
        checkpoints.save_checkpoint({"model": {"w": torch.full((64,), 3.0)}, "config": {}}, path)
    monkeypatch.undo()
    assert "No space left on device" in single_line(e) and "--output-dir" in str(e.value)
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before  # nothing else left behind


# ---------------------------------------------------------------- 5. settings out of range
@pytest.mark.parametrize("flags, expected", [
    ("--lr 0", "LR must be positive"), ("--lr -1", "LR must be positive"), ("--lr nan", "LR must be a finite"),
    ("--lr inf", "LR must be a finite"), ("--dropout nan", "DROPOUT must be a finite"),
    ("--batch-size 0", "BATCH_SIZE must be positive"), ("--image-size 0", "IMAGE_SIZE must be positive"),
    ("--image-size 36 --channel-mult 1,2,2,2", "not a multiple of 8"), ("--sampler euler", "unknown SAMPLER"),
    ("--beta-schedule foo", "unknown BETA_SCHEDULE"), ("--sample-steps 2000 --timesteps 1000", "more than TIMESTEPS"),
    ("--attn-resolutions 5", "ATTN_RESOLUTIONS has 5"), ("--ema-decay 1", "EMA_DECAY"),
    ("--adam-beta2 1", "ADAM_BETA2 must be in [0, 1)"), ("--lr-floor 1.5", "LR_FLOOR must be in [0, 1]"),
    ("--channel-mult 1,0", "CHANNEL_MULT must be positive"), ("--bf16 yes", "unknown BF16"),
    ("--patch-size 0", "PATCH_SIZE must be positive"),
    ("--patch-size 3", "not a multiple of 48"), ("--patch-size 2 --attn-resolutions 128", "ATTN_RESOLUTIONS has 128"),
    ("--step-spacing 0", "STEP_SPACING must be positive"), ("--step-spacing -2", "STEP_SPACING must be positive"),
    ("--ddim-eta 5", "DDIM_ETA must be in [0, 1]"), ("--ddim-eta -1", "DDIM_ETA must be in [0, 1]")])
def test_out_of_range_settings(flags, expected):
    with pytest.raises(InputError) as e:
        utils.parse_settings(utils.build_parser("test"), flags.split())
    assert expected in single_line(e)


@pytest.mark.parametrize("flags, expected", [
    ("--batch-size abc", "argument --batch-size: invalid int value: 'abc'"), ("--foo", "unrecognized arguments: --foo"),
    ("--lr fast", "invalid float value"), ("--channel-mult 1,x", "expected comma-separated integers"),
    ("--hflip maybe", "expected true or false")])
def test_badly_typed_flags(flags, expected, capsys):
    with pytest.raises(SystemExit) as e:
        utils.build_parser("test").parse_args(flags.split())
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.endswith(" (see --help)\n"), err
    assert expected in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flags, expected", [
    ("--lr 0", "LR must be positive"), ("--image-size 36 --channel-mult 1,2,2,2", "not a multiple of 8"),
    ("--foo 1", "unrecognized arguments"), ("--step-spacing -2", "STEP_SPACING must be positive")])
def test_train_refuses_bad_settings_before_any_work(tmp_path, flags, expected):
    out = tmp_path / "out"
    one_error_line(script("train.py", "--data-dir", str(tmp_path / "no_data"), "--output-dir", str(out),
                          *flags.split()), expected)
    assert not out.exists()  # refused before the output folder, the data or the model


# ---------------------------------------------------------------- 6. hostile image folders
MAGIC = {".png": b"\x89PNG\r\n\x1a\n", ".jpg": b"\xff\xd8\xff", ".jpeg": b"\xff\xd8\xff\xe0", ".bmp": b"BM",
         ".tif": b"II*\x00", ".tiff": b"MM\x00*"}


def png_claiming(path, width, height):
    """A valid 8x8 PNG whose header (CRC fixed) claims width x height: a decompression bomb's calling card."""
    buf = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buf, "PNG")
    b = bytearray(buf.getvalue())
    assert b[12:16] == b"IHDR"
    b[16:24] = struct.pack(">II", width, height)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    with open(path, "wb") as f:
        f.write(b)


def hostile_files(folder):
    """Files no reader may choke on, none of them a usable image; returns how many are warned about."""
    rng = random.Random(7)
    os.makedirs(os.path.join(folder, "sub"), exist_ok=True)
    n = 0
    for ext, magic in MAGIC.items():
        for name, data in (("random", rng.randbytes(3000)), ("magic", magic + rng.randbytes(rng.randint(0, 2000))),
                           ("zero", b""), ("header_only", magic)):
            with open(os.path.join(folder, f"{name}{ext.upper() if name == 'zero' else ext}"), "wb") as f:
                f.write(data)
            n += 1
    png_claiming(os.path.join(folder, "bomb.png"), 100_000, 100_000)  # PIL's own bomb check
    png_claiming(os.path.join(folder, "big.png"), 8_001, 8_000)  # just over MAX_PIXELS
    png_claiming(os.path.join(folder, "liar.png"), 2_000, 2_000)  # allowed size, but the pixels aren't there
    os.symlink("nowhere.png", os.path.join(folder, "dangling.png"))
    os.symlink("self.jpg", os.path.join(folder, "self.jpg"))  # a link loop
    os.mkfifo(os.path.join(folder, "pipe.png"))  # reading it would block forever
    os.symlink(folder, os.path.join(folder, "sub", "up"))  # a folder loop through a parent
    return n + 6


def valid_images(folder):
    """6 good images, one under a name that is not UTF-8 and one inside a folder named like an image."""
    write_blobs(os.path.join(folder, "good"), 4, seed=3)
    write_blobs(os.path.join(folder, "dir.png"), 1, seed=4)
    Image.new("L", (40, 30), 200).save(os.path.join(folder, "tmp.bmp"))
    os.rename(os.path.join(folder, "tmp.bmp"), os.path.join(os.fsencode(folder), b"\xff\xfe.bmp"))
    return 6


def config(data_dir, **overrides):
    return {**utils.constants(), "DATA_DIR": data_dir, "IMAGE_SIZE": 32, "BATCH_SIZE": 4, **overrides}


def test_hostile_folder_reads_exactly_the_good_images(tmp_path, capsys):
    folder = str(tmp_path / "data")
    bad, good = hostile_files(folder), valid_images(folder)
    d = dataset.load_data(config(folder))
    assert d.layout == "folder" and len(d.train) + len(d.val) == good  # no loop read twice, nothing bad kept
    assert d.sizes == {"32x32": 5, "40x30": 1}
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: skipping ")]
    assert len(warned) == bad, "\n".join(warned)
    for name in ("bomb.png", "big.png", "liar.png", "dangling.png", "self.jpg", "pipe.png", "zero.TIF"):
        assert any(f"{folder}/{name} (" in w for w in warned), name

    r = script("dataset.py", folder, "--image-size", "16", timeout=120)  # another size: decoded afresh
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert re.search(r"splits +(\d+) train, (\d+) val", r.stdout).groups() in (("5", "1"), ("6", "0"))
    assert r.stderr.count("warning: skipping ") == bad


def test_only_hostile_files_is_one_clear_error(tmp_path):
    folder = str(tmp_path / "data")
    hostile_files(folder)
    with pytest.raises(InputError) as e:
        dataset.load_data(config(folder))
    assert "could be read" in single_line(e)
    r = script("dataset.py", folder, "--image-size", "16", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0] and "could be read" in errors[0]


def test_mutated_images_are_read_or_skipped_never_fatal(tmp_path, capsys):
    """Seeded byte flips and cuts in valid PNG, JPEG, BMP and TIFF files: each file is either read or warned about."""
    rng, folder = random.Random(11), str(tmp_path / "data")
    os.makedirs(folder)
    pixels = Image.fromarray((np.random.default_rng(0).random((24, 24)) * 255).astype(np.uint8))
    n = 0
    for ext, fmt in ((".png", "PNG"), (".jpg", "JPEG"), (".bmp", "BMP"), (".tif", "TIFF")):
        buf = io.BytesIO()
        pixels.save(buf, fmt)
        for i in range(10):
            b = bytearray(buf.getvalue())
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            with open(os.path.join(folder, f"m{i}{ext}"), "wb") as f:
                f.write(b[: rng.randrange(len(b))] if i % 3 == 0 else b)
            n += 1
    try:
        d = dataset.load_data(config(folder))
        read = len(d.train) + len(d.val)
    except InputError:
        read = 0
    warned = capsys.readouterr().err.count("warning: skipping ")
    assert read + warned == n and warned > 0


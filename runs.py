"""The runs/ folders train.py writes: one owner at a time, files written whole, finished runs found.

    with owned("runs/dtd_vit_b16_arc", fresh=True):  # made if need be, and locked for this process
        save_atomic(checkpoint, "runs/dtd_vit_b16_arc/checkpoint.pth")
    finished("runs/dtd_vit_b16_arc", epochs=100)      # its adapters.pth record, if the run is done

A folder is locked with fcntl.flock on its .lock file: a second run on it is refused, and the kernel
releases the lock when its process ends, however it ends. Every file is written to a temporary file
of its own, flushed to the disk, then renamed: a stop, a full disk or a power loss leaves the old
file or the new one, never half of one. A mistake in the command, the data or the files raises
UserError, which train.py prints as one line, without a traceback.
"""

import contextlib
import fcntl
import io
import os
import tempfile
import time

import torch


class UserError(Exception):
    """A mistake in the command, the data or the files: reported as one line, no traceback."""


def flag(key):
    return "--" + key.replace("_", "-")


def fmt_time(seconds):
    return time.strftime("%H:%M:%S", time.gmtime(seconds))


@contextlib.contextmanager
def owned(folder, fresh):
    """Make `folder` if need be and hold its lock while the block runs. `fresh`: a new run, which
    must not overwrite one. A folder made here and left empty (the run was refused) is removed
    again."""
    made = not os.path.exists(folder)
    lock_path = os.path.join(folder, ".lock")
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(lock_path, "w")
    except OSError as e:
        raise UserError(
            f"--out {folder}: cannot write there ({e.strerror}); pass another --out"
        ) from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"{folder} is in use by another train.py that is still running: wait for it to "
                f"end, or pass another --out"
            ) from None
        if fresh and any(
            os.path.exists(os.path.join(folder, name))
            for name in ("checkpoint.pth", "adapters.pth", "folded.pth", "suite.json")
        ):
            raise UserError(
                f"{folder} already holds a run: continue it with --resume {folder}, or pass "
                f"another --out"
            )
        try:
            yield
        finally:
            if made and os.listdir(folder) == [".lock"]:
                os.remove(lock_path)
                os.rmdir(folder)


def save_atomic(obj, path):
    """Text, or what torch.save takes, written to a temporary file of its own in path's folder,
    flushed to the disk, then renamed to path. torch.save writes into memory first: a failed write
    to the disk then raises the system's own error (a full disk), not torch's."""
    if isinstance(obj, str):
        content = obj.encode()
    else:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        content = buffer.getbuffer()
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(
            ".tmp", os.path.basename(path) + ".", os.path.dirname(path)
        )
        with os.fdopen(handle, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        folder = os.open(os.path.dirname(path), os.O_RDONLY)
        os.fsync(folder)  # the rename too reaches the disk before the save counts as done
        os.close(folder)
    except BaseException as e:  # a full disk, or a stop mid-write: no temporary file is left
        if temporary and os.path.exists(temporary):
            os.remove(temporary)
        if not isinstance(e, OSError):
            raise
        raise UserError(
            f"could not write {path} ({e.strerror}); what was there is intact"
        ) from None


def read_saved(path, option, keys, what, settings):
    """A file train.py wrote, holding at least the entries `keys`, and in its "config" the entries
    `settings`; `what` names the kind expected."""
    if not os.path.isfile(path):
        raise UserError(f"{option} {path}: no such file")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).partition("\n")[0]
        raise UserError(
            f"{option} {path} is unreadable ({type(e).__name__}: {reason}): not a file of train.py"
        ) from None
    complete = isinstance(saved, dict) and set(keys) <= saved.keys()
    if not (
        complete and isinstance(saved["config"], dict) and set(settings) <= saved["config"].keys()
    ):
        raise UserError(f"{option} {path} lacks the settings train.py records: it is not {what}")
    return saved


def finished(out, epochs):
    """The settings and result of the run in `out` if it has finished: its adapters.pth, written
    last, is there, and folded.pth too where the run folds; and it was trained for `epochs`, if
    given (a run being extended has more). A folder that holds a checkpoint.pth goes to --resume,
    which reads the epochs from there."""
    adapters = os.path.join(out, "adapters.pth")
    if not os.path.exists(adapters):
        return None
    saved = read_saved(
        adapters, "--resume", ("config", "result"), "an adapters.pth", ("epochs", "folds")
    )
    if epochs is not None and saved["config"]["epochs"] != epochs:
        return None
    if saved["config"]["folds"] and not os.path.exists(os.path.join(out, "folded.pth")):
        return None  # lost since: --resume writes it again
    return {**saved["config"], "result": saved["result"]}

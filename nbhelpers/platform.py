"""Where we run (Kaggle, Colab, local), where files go, and which device and precision to use.

This is the one place that picks device, precision and torch.compile support. Nothing here has
side effects at import: TF32 flags and the like are set only when `select_runtime` is called.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import torch

# ----------------------------------------------------------------------------- front end (live notebook or headless)

NONINTERACTIVE_ENV = "NBHELPERS_NONINTERACTIVE"


def noninteractive_reason() -> str | None:
    """Why no live notebook front end is attached (so widgets would never update), or None when one is.

    None only inside a Jupyter kernel whose current request came with allow_stdin=True: JupyterLab, Notebook, Colab
    and VS Code send True; papermill and `jupyter nbconvert --execute` (nbclient) always send False.
    NBHELPERS_NONINTERACTIVE=1/true/yes forces headless.
    """
    if os.environ.get(NONINTERACTIVE_ENV, "").strip().lower() in ("1", "true", "yes"):
        return f"{NONINTERACTIVE_ENV}={os.environ[NONINTERACTIVE_ENV]}"
    kernel = _jupyter_kernel()
    if kernel is None:
        return "not running inside a Jupyter kernel"
    if not getattr(kernel, "_allow_stdin", True):
        return "the notebook is being executed headless (papermill / nbconvert)"
    return None


def widget_bars_freeze() -> bool:
    """True in a Jupyter kernel with no live front end (papermill, or NBHELPERS_NONINTERACTIVE set): a tqdm.auto
    widget bar would be saved as its first frame, a frozen "0%"."""
    return _jupyter_kernel() is not None and noninteractive_reason() is not None


def _jupyter_kernel():
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return getattr(get_ipython(), "kernel", None)


def progress_bar(*args, **kwargs):
    """A tqdm progress bar: the notebook widget with a live front end, plain text otherwise.

    A widget bar in a notebook executed headless (papermill) is saved as its first frame, a frozen "0%"; the text
    bar's saved output ends at its final state instead.
    """
    if noninteractive_reason() is None:
        from tqdm.auto import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm(*args, **kwargs)


# ----------------------------------------------------------------------------- platform + paths


def detect_platform() -> str:
    """Return "kaggle", "colab" or "local" (environment markers first, then well-known folders)."""
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") or Path("/kaggle/working").is_dir():
        return "kaggle"
    if os.environ.get("COLAB_RELEASE_TAG") or os.environ.get("COLAB_GPU") is not None:
        return "colab"
    if Path("/content").is_dir() and not Path("/kaggle").exists():
        return "colab"
    return "local"


@dataclass(frozen=True)
class Paths:
    """Default input and output folders for one notebook on the current platform."""

    platform: str  # "kaggle" | "colab" | "local"
    data_root: Path  # where inputs are searched (read-only on Kaggle)
    out_dir: Path  # where every output file is written


def default_paths(project: str, platform: str | None = None) -> Paths:
    """Pick DATA_ROOT and OUT_DIR so that no path is edited between platforms.

    Args:
        project: a short name for the notebook ("q1_vit", "q2_seg"); outputs go in a folder of that name.
        platform: override the detected platform (tests).
    Returns:
        Paths with absolute folders; nothing is created here.
    """
    platform = platform or detect_platform()
    if platform == "kaggle":
        return Paths(platform, Path("/kaggle/input"), Path("/kaggle/working/outputs") / project)
    if platform == "colab":
        # /content/drive is used when the user mounted Drive: outputs then survive a disconnect.
        base = Path("/content/drive/MyDrive") if Path("/content/drive/MyDrive").is_dir() else Path("/content")
        return Paths(platform, Path("/content/data"), base / "outputs" / project)
    return Paths(platform, Path.cwd() / "data", Path.cwd() / "outputs" / project)


def resolve_paths(project: str, data_root: str | os.PathLike | None, out_dir: str | os.PathLike | None) -> Paths:
    """Platform defaults with the user's DATA_ROOT / OUT_DIR (None = default) applied."""
    defaults = default_paths(project)
    return Paths(
        defaults.platform,
        Path(data_root).expanduser().resolve() if data_root else defaults.data_root,
        Path(out_dir).expanduser().resolve() if out_dir else defaults.out_dir,
    )


def ensure_writable_dir(path: str | os.PathLike, what: str = "OUT_DIR") -> Path:
    """Create `path` and check a file can be written there; raise a message naming the fix otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise PermissionError(
            f"{what}={str(path)!r} cannot be written ({error.strerror or error}). "
            f"Set {what} to a writable folder, e.g. /kaggle/working/outputs on Kaggle or /content/outputs on Colab."
        ) from error
    return path


def ordinary_file_mode(path: Path) -> int:
    """The mode an ordinary open(path, "w") would leave: the existing file's, else 0o666 minus the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        pass
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file through `write(file)` into a temp file beside `path`, fsync, then os.replace it into place.

    A crash or error mid-write leaves any previous file at `path` untouched and no temp file behind. The file gets
    the mode an ordinary write would give it (mkstemp's 0600 would hide it from other users of a shared drive).
    """
    path = Path(path)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temp_name, ordinary_file_mode(path))
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete temp files that `atomic_write` (`.<name>.*.tmp`) and link helpers (`.<name>.link.tmp`) left behind.

    Call only while holding the folder's RunLock: then no live writer owns them (a killed one left them).
    Returns:
        The removed paths.
    """
    folder = Path(folder)
    removed = []
    for temp in [*folder.glob(".*.tmp"), *folder.glob(".write_test_*")]:
        if temp.is_file():
            temp.unlink(missing_ok=True)
            removed.append(temp)
    return removed


class DiskFullError(OSError):
    """Not enough free space for an output file; the message says how much is needed and what was kept."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def check_free_space(folder: str | os.PathLike, needed_bytes: int, what: str) -> None:
    """Raise DiskFullError when `folder` has less than `needed_bytes` free (checked before hours of work)."""
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise DiskFullError(f"{folder} has {free / 1e6:,.0f} MB free but {what} needs about {needed_bytes / 1e6:,.0f} MB. "
                            "Free some space there or choose another OUT_DIR.")


# ----------------------------------------------------------------------------- one run per output folder


class RunLockedError(RuntimeError):
    """Another live run holds the output folder's lock."""


def process_is_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """A lock file `.run.lock` (host, PID, start time) held on a folder for a run's lifetime.

    A second run into the same folder gets RunLockedError naming the holder. A lock left by a dead process on
    this host is taken over; one from another host (e.g. another Colab session on a shared Drive) cannot be
    checked from here, so the message says how to remove it. A lock that holds no record (empty or cut short, as a
    full disk leaves it) is taken over once it is older than WRITE_SECONDS, the time a live run takes to fill it.
    A folder without MIN_FREE_BYTES free is refused with DiskFullError before anything is written.
    """

    NAME = ".run.lock"
    MIN_FREE_BYTES = 64 * 1024  # the lock and a run's first small files; checkpoints are checked later, by size
    WRITE_SECONDS = 5.0  # a new lock is created empty and filled at once: younger than this, it may still be filling

    def __init__(self, folder: str | os.PathLike, what: str = "OUT_DIR"):
        self.path = Path(folder) / self.NAME
        self.what = what
        self.owner = {"host": socket.gethostname(), "pid": os.getpid()}

    def __enter__(self) -> "RunLock":
        free = shutil.disk_usage(self.path.parent).free
        if free < self.MIN_FREE_BYTES:
            raise DiskFullError(self._full_message(f"has {free / 1024:,.0f} kB free"))
        for _ in range(3):  # a stale lock is moved away, then creation is retried
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, ordinary_file_mode(self.path))
            except FileExistsError:
                self._take_over_if_stale()
                continue
            self._fill(handle)
            return self
        raise RunLockedError(f"Could not take the lock {self.path}; another run keeps recreating it.")

    def _fill(self, handle: int) -> None:
        """Write the owner record into the new lock; if that fails (full disk), remove it so no later run is blocked."""
        record = json.dumps(self.owner | {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode()
        try:
            try:
                if os.write(handle, record) != len(record):
                    raise OSError(errno.ENOSPC, "short write")  # a regular file is written short only when it is full
            finally:
                os.close(handle)
        except OSError as error:
            self.path.unlink(missing_ok=True)
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(self._full_message("has no space left")) from None
            raise

    def _full_message(self, state: str) -> str:
        return (f"{self.what}={str(self.path.parent)!r} {state}: a run needs at least {self.MIN_FREE_BYTES // 1024} kB "
                f"there to start. Free some space there or choose another {self.what}; nothing was written.")

    def holder(self) -> dict:
        """The lock file's record ({} when it is gone, unreadable, or holds no record: empty or cut short)."""
        try:
            return _lock_record(self.path.read_bytes()) or {}
        except OSError:
            return {}

    def _take_over_if_stale(self) -> None:
        try:
            with open(self.path, "rb") as file:
                judged, content = os.fstat(file.fileno()), file.read()  # the file judged, and what it holds
        except FileNotFoundError:
            return  # released meanwhile: creation is retried
        except OSError:  # e.g. another user's lock on a shared drive: its holder is unknown, so it is kept
            judged, content = None, None
        holder = _lock_record(content) if content is not None else {}
        if holder is None:  # empty or cut short: a run that could not fill it, or one filling it right now
            age = time.time() - judged.st_mtime
            if age < self.WRITE_SECONDS:
                time.sleep(self.WRITE_SECONDS - age)
                return
            note = "an empty or unreadable lock (left by a run that could not write it, e.g. on a full disk)"
        elif holder.get("host") == self.owner["host"] and not process_is_alive(holder["pid"]):
            note = f"the lock of a run that is no longer running (PID {holder['pid']} on this host)"
        else:
            who = f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')}, started {holder.get('started', '?')}"
            raise RunLockedError(
                f"{self.what}={str(self.path.parent)!r} is in use by another run ({who}). Wait for it to finish, "
                f"choose another {self.what}, or, if that run is no longer running, delete {self.path}.")
        stale = self.path.with_name(f"{self.NAME}.stale-{os.getpid()}")
        try:
            os.replace(self.path, stale)  # atomic: of two runs taking over, one moves it and the other retries
        except FileNotFoundError:
            return
        if _file_identity(stale.stat()) != _file_identity(judged):
            self._put_back(stale)  # another run took it over first: what was moved is that run's live lock
            return
        stale.unlink(missing_ok=True)
        print(f"Took over {note}: {self.path}")

    def _put_back(self, moved: Path) -> None:
        """Return a live lock moved away by mistake; the retry then reads it and refuses. Should a third run have
        made a lock meanwhile, that one is kept and `moved` is dropped (three runs racing within milliseconds)."""
        try:
            os.link(moved, self.path)  # fails rather than replace a lock that is there
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links (FAT, some network drives)
            if not self.path.exists():
                os.replace(moved, self.path)
        moved.unlink(missing_ok=True)

    def __exit__(self, *exc_info) -> None:
        if self.holder().get("pid") == self.owner["pid"] and self.holder().get("host") == self.owner["host"]:
            self.path.unlink(missing_ok=True)


def _file_identity(status: os.stat_result) -> tuple:
    """What tells one lock file from another: a rename keeps all four, and a new file (even one that reuses the
    inode number of a deleted one) is written later."""
    return status.st_ino, status.st_dev, status.st_size, status.st_mtime_ns


def _lock_record(content: bytes) -> dict | None:
    """A lock file's {host, pid, started}, or None when the bytes hold no such record (empty, cut short, other data)."""
    try:
        record = json.loads(content)
    except ValueError:  # also UnicodeDecodeError
        return None
    valid = isinstance(record, dict) and isinstance(record.get("host"), str) and isinstance(record.get("pid"), int)
    return record if valid else None


# ----------------------------------------------------------------------------- stop requests


class StopSignals:
    """Turn SIGINT / SIGTERM into a request that a loop checks at its next step boundary.

    Kaggle sends SIGTERM before it ends a session; Ctrl-C and Jupyter's interrupt send SIGINT. A second SIGINT
    raises KeyboardInterrupt at once (for a loop that never reaches a boundary). Handlers are installed only in
    the main thread (elsewhere Python forbids it) and restored on exit.
    """

    EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}

    def __init__(self):
        self.received: int | None = None  # the first signal number seen
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class StopRequested(KeyboardInterrupt):
    """Raised after a SIGINT/SIGTERM stop was saved; `exit_code` is 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = StopSignals.EXIT_CODES.get(signum, 130)


# ----------------------------------------------------------------------------- device + precision


@dataclass(frozen=True)
class Runtime:
    """Device, precision and compile choices, made once by `select_runtime`."""

    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype; None = full fp32
    use_grad_scaler: bool  # True only for fp16 autocast
    compile: bool  # whether torch.compile is used
    description: str  # one human-readable line

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context for forward passes (a no-op context in fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def compile_supported(device: torch.device) -> bool:
    """torch.compile's default backend needs Triton on CUDA with compute capability >= 7.0; off on CPU."""
    if device.type != "cuda" or os.name == "nt":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device) >= (7, 0)


def _pick_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"DEVICE={device!r} is not a device name. Use None (auto), 'cpu', 'cuda', 'cuda:1' or 'mps'.") from error
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"DEVICE={device!r} but no CUDA GPU is visible. Use DEVICE=None (auto) or 'cpu'.")
    return chosen


def _pick_precision(device: torch.device, precision: str) -> torch.dtype | None:
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"precision={precision!r} is not one of 'auto', 'bf16', 'fp16', 'fp32'.")
    if precision == "fp32" or device.type not in ("cuda", "cpu", "mps"):
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type != "cuda":  # CPU autocast is slower than fp32 for these models
        return None
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 8:
        return torch.bfloat16
    if major == 7:  # T4, V100: fp16 tensor cores, no bf16
        return torch.float16
    return None  # P100 and older: no fast half precision path worth the risk


def available_memory(device: torch.device) -> int | None:
    """Bytes that new tensors on `device` can take now, or None where this cannot be told.

    CUDA: the device's free memory plus what PyTorch's cache holds unused. CPU and MPS (which shares the RAM):
    the RAM the kernel can hand out (MemAvailable), capped by a container's memory limit.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type not in ("cpu", "mps"):
        return None
    ram = None
    try:
        with open("/proc/meminfo") as file:
            fields = dict(line.split(":", 1) for line in file if ":" in line)
        ram = int(fields["MemAvailable"].split()[0]) * 1024  # in kB there
    except (OSError, KeyError, ValueError):
        with contextlib.suppress(OSError, ValueError, AttributeError):  # no /proc: free pages, where the OS reports them
            ram = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    room = _cgroup_room()
    return room if ram is None else ram if room is None else min(ram, room)


def _cgroup_room(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """A container's memory limit minus its use, page cache it may drop not counted; None when there is no limit.

    Kaggle and Docker limit a container below the machine's RAM, which is all /proc/meminfo shows.
    """
    layouts = [("memory.max", "memory.current", "inactive_file"),  # cgroup v2
               ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "total_inactive_file")]  # v1
    for limit_name, usage_name, cache_key in layouts:
        try:
            limit_text = (root / limit_name).read_text().strip()
            if limit_text == "max":
                return None
            limit, usage = int(limit_text), int((root / usage_name).read_text())
            stat = dict(line.split() for line in (root / limit_name).with_name("memory.stat").read_text().splitlines())
        except (OSError, ValueError):
            continue
        return None if limit >= 1 << 60 else max(0, limit - usage + int(stat.get(cache_key, 0)))  # v1: huge = none
    return None


_announced: set[tuple] = set()


def select_runtime(
    device: str | None = None, precision: str = "auto", compile: bool | None = None, verbose: bool = True
) -> Runtime:
    """Choose device, autocast dtype, grad scaling and torch.compile once; print the choice once.

    Args:
        device: "cuda", "cuda:1", "cpu", "mps" or None/"auto".
        precision: "auto" (bf16 on compute capability >= 8, fp16 + GradScaler on 7.x, fp32 otherwise),
            or "bf16" / "fp16" / "fp32" to force one.
        compile: None = on only where it works (CUDA with a Triton-supported GPU); True/False to force.
    Returns:
        A Runtime. TF32 matmuls are enabled here (not at import) on CUDA.
    """
    chosen = _pick_device(device)
    amp_dtype = _pick_precision(chosen, precision)
    can_compile = compile_supported(chosen)
    if compile and not can_compile:
        print(f"COMPILE=True ignored: torch.compile is not supported on {chosen} here (needs CUDA sm_70+ and Triton).")
    use_compile = can_compile if compile is None else bool(compile and can_compile)
    if chosen.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name(chosen)
    else:
        name = chosen.type
    precision_name = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}
    description = f"device {name} | precision {precision_name[amp_dtype]} | torch.compile {'on' if use_compile else 'off'}"
    runtime = Runtime(chosen, amp_dtype, amp_dtype == torch.float16, use_compile, description)
    key = (str(chosen), amp_dtype, use_compile)
    if verbose and key not in _announced:
        _announced.add(key)
        print(f"[nbhelpers] {detect_platform()}: {description} (torch {torch.__version__})")
    return runtime

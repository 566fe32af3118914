"""Platform detection, default paths, and the one place that picks device and precision."""
import json
import os
import socket
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nbhelpers import platform


def test_detects_kaggle_from_environment(monkeypatch):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert platform.detect_platform() == "kaggle"
    paths = platform.default_paths("q1_vit")
    assert paths.data_root == Path("/kaggle/input")
    assert paths.out_dir == Path("/kaggle/working/outputs/q1_vit")


def test_detects_colab_from_environment(monkeypatch):
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    monkeypatch.setattr(platform.Path, "is_dir", lambda self: False)
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-2026")
    assert platform.detect_platform() == "colab"
    assert str(platform.default_paths("q2_seg").out_dir).endswith("outputs/q2_seg")


def test_local_defaults_are_under_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    paths = platform.default_paths("q1_vit", platform="local")
    assert paths.data_root == tmp_path / "data"
    assert paths.out_dir == tmp_path / "outputs" / "q1_vit"


def test_user_paths_override_defaults(tmp_path):
    paths = platform.resolve_paths("q1_vit", tmp_path / "in", str(tmp_path / "out"))
    assert paths.data_root == tmp_path / "in" and paths.out_dir == tmp_path / "out"


def test_unwritable_out_dir_names_the_fix(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="OUT_DIR=.*writable folder"):
        platform.ensure_writable_dir(blocker / "sub")


def test_cpu_runtime_is_fp32_without_compile():
    runtime = platform.select_runtime("cpu")
    assert runtime.device.type == "cpu"
    assert runtime.amp_dtype is None and not runtime.use_grad_scaler and not runtime.compile
    with runtime.autocast():
        assert not torch.is_autocast_enabled()


@pytest.mark.parametrize("capability, expected", [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 5), torch.float16), ((6, 0), None)])
def test_precision_by_compute_capability(monkeypatch, capability, expected):
    # No GPU exists on the test machine: the capability query is the one thing mocked.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert platform._pick_precision(torch.device("cuda"), "auto") == expected


def test_forced_precision_and_bad_precision():
    assert platform._pick_precision(torch.device("cpu"), "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        platform._pick_precision(torch.device("cpu"), "fp8")


def test_cuda_request_without_gpu_is_explained(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU"):  # bad input: the CLIs exit 2
        platform.select_runtime("cuda")


def test_compile_is_off_on_cpu_even_when_asked(capsys):
    runtime = platform.select_runtime("cpu", compile=True)
    assert not runtime.compile
    assert "COMPILE=True ignored" in capsys.readouterr().out


def test_importing_sets_no_global_flags():
    import subprocess
    import sys

    code = "import torch; before = torch.backends.cuda.matmul.allow_tf32; import nbhelpers.platform, nbhelpers.vit.train; print(before == torch.backends.cuda.matmul.allow_tf32, torch.is_autocast_enabled())"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert output == ["True", "False"]


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o002, 0o664)])
def test_atomic_write_gives_new_files_the_mode_an_ordinary_write_would(tmp_path, umask, expected):
    previous = os.umask(umask)
    try:
        platform.atomic_write(tmp_path / "new.json", lambda file: file.write(b"{}"))
        with open(tmp_path / "ordinary.json", "w") as file:
            file.write("{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == expected
    assert stat.S_IMODE((tmp_path / "ordinary.json").stat().st_mode) == expected


def test_atomic_write_keeps_an_existing_files_mode(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"old")
    path.chmod(0o640)
    platform.atomic_write(path, lambda file: file.write(b"new"))
    assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == 0o640


def test_run_lock_names_the_holder_and_takes_over_only_a_dead_process(tmp_path, monkeypatch):
    lock = tmp_path / platform.RunLock.NAME
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "earlier"}))
    with pytest.raises(platform.RunLockedError, match=rf"in use by another run \(host {socket.gethostname()}, PID {os.getpid()}"):
        platform.RunLock(tmp_path).__enter__()
    lock.write_text(json.dumps({"host": "another-machine", "pid": 1, "started": "earlier"}))
    with pytest.raises(platform.RunLockedError, match="host another-machine.*if that run is no longer running, delete"):
        platform.RunLock(tmp_path).__enter__()  # another host's process cannot be checked from here
    monkeypatch.setattr(platform, "process_is_alive", lambda pid: False)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 99999999, "started": "earlier"}))
    with platform.RunLock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


@pytest.mark.parametrize("b_deletes_the_stale_lock", [False, True])  # True: B's new lock may reuse its inode number
def test_two_runs_taking_over_one_stale_lock_do_not_both_hold_it(tmp_path, monkeypatch, b_deletes_the_stale_lock):
    # Run A finds the lock of a dead run; before A moves it away, run B (alive: our parent process) has already
    # moved it and written its own. A must move B's live lock back and be refused, not delete it and run too.
    lock = tmp_path / platform.RunLock.NAME
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 99_999_999, "started": "earlier"}))  # no such PID
    live = {"host": socket.gethostname(), "pid": os.getppid(), "started": "now"}
    real_replace = os.replace

    def b_takes_over_first(source, target):
        if Path(source) == lock and not Path(target).name.startswith("b-"):
            real_replace(lock, tmp_path / "b-stale")
            if b_deletes_the_stale_lock:
                (tmp_path / "b-stale").unlink()
            (tmp_path / "b-new").write_text(json.dumps(live))
            real_replace(tmp_path / "b-new", lock)
            monkeypatch.setattr(platform.os, "replace", real_replace)  # only A's first move races
        return real_replace(source, target)

    monkeypatch.setattr(platform.os, "replace", b_takes_over_first)
    with pytest.raises(platform.RunLockedError, match=rf"PID {os.getppid()}"):
        platform.RunLock(tmp_path).__enter__()
    assert json.loads(lock.read_text()) == live
    assert {path.name for path in tmp_path.iterdir()} == {lock.name} | (set() if b_deletes_the_stale_lock else {"b-stale"})


def test_stale_temp_files_are_found_by_their_names(tmp_path):
    stale = [tmp_path / ".last.pt.abc.tmp", tmp_path / ".best.pt.link.tmp", tmp_path / ".write_test_123"]
    kept = [tmp_path / "last.pt", tmp_path / "notes.tmp", tmp_path / ".run.lock"]
    for path in stale + kept:
        path.write_bytes(b"x")
    assert sorted(platform.remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert all(path.exists() for path in kept) and not any(path.exists() for path in stale)


# ----------------------------------------------------------------------------- full disk and left-behind locks (issue 22)

TINY_RUN = ["--preset", "smoke", "--device", "cpu", "--no-plots", "--epochs", "1", "--batch-size", "32",
            "--set", "synthetic_train_size=128", "--set", "synthetic_test_size=64", "--set", "log_every=2"]


def error_lines(printed: str) -> list[str]:
    return [line for line in printed.splitlines() if line.startswith("error:")]


def lock_on_a_full_disk(monkeypatch) -> None:
    """The lock file is created (a full disk still has inodes) but its writes go to /dev/full, which fails them with ENOSPC.

    A disk cannot be filled on the test machine; /dev/full gives the real error at the real write.
    """
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    real_open = os.open

    def open_(path, flags, mode=0o777, *args, **kwargs):
        if Path(path).name != platform.RunLock.NAME:
            return real_open(path, flags, mode, *args, **kwargs)
        os.close(real_open(path, flags, mode))
        return real_open("/dev/full", os.O_WRONLY)

    monkeypatch.setattr(platform.os, "open", open_)


def test_no_space_for_the_lock_is_one_line_and_leaves_no_lock_behind(tmp_path, monkeypatch, capsys):
    from nbhelpers.vit.__main__ import main

    lock_on_a_full_disk(monkeypatch)
    with pytest.raises(platform.DiskFullError, match=r"OUT_DIR=.* has no space left: .*Free some space there or choose another OUT_DIR"):
        platform.RunLock(tmp_path).__enter__()
    assert not (tmp_path / platform.RunLock.NAME).exists()
    assert main(TINY_RUN + ["--out", str(tmp_path)]) == 2
    printed = capsys.readouterr()
    assert len(error_lines(printed.err)) == 1 and "has no space left" in printed.err and "Traceback" not in printed.err + printed.out
    assert not (tmp_path / platform.RunLock.NAME).exists()
    monkeypatch.undo()  # space was freed: the next run starts
    assert main(TINY_RUN + ["--out", str(tmp_path)]) == 0 and (tmp_path / "run_summary.json").exists()


def test_no_free_space_is_refused_before_the_lock_is_written(tmp_path, monkeypatch, capsys):
    from nbhelpers.vit.__main__ import main

    opened = []
    real_open = os.open
    monkeypatch.setattr(platform.os, "open", lambda path, *args, **kwargs: opened.append(path) or real_open(path, *args, **kwargs))
    # A disk cannot be filled here: the free-space query reports 0 bytes instead.
    monkeypatch.setattr(platform.shutil, "disk_usage", lambda path: SimpleNamespace(free=0))
    assert main(TINY_RUN + ["--out", str(tmp_path)]) == 2
    printed = capsys.readouterr()
    assert error_lines(printed.err) == [f"error: --out {str(tmp_path)!r} has 0 kB free: a run needs at least 64 kB there to start. "
                                        "Free some space there or choose another --out; nothing was written."], printed.err
    assert not any(Path(path).name == platform.RunLock.NAME for path in opened) and not list(tmp_path.iterdir())


@pytest.mark.parametrize("content", [b"", b'{"host": "gpu-box", "pi', b"\x00\x00\x00"])
def test_an_empty_or_cut_short_lock_left_behind_does_not_block_the_next_run(tmp_path, capsys, content):
    lock = tmp_path / platform.RunLock.NAME
    lock.write_bytes(content)
    os.utime(lock, (os.path.getmtime(lock) - 60,) * 2)  # left by an earlier session, not one filling it right now
    with platform.RunLock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "Took over an empty or unreadable lock" in capsys.readouterr().out and not lock.exists()


def test_an_empty_lock_left_by_a_failed_run_does_not_block_the_cli(tmp_path, capsys):
    from nbhelpers.vit.__main__ import main

    lock = tmp_path / platform.RunLock.NAME
    lock.write_bytes(b"")  # what a run that hit a full disk left before this fix
    os.utime(lock, (os.path.getmtime(lock) - 3600,) * 2)
    assert main(TINY_RUN + ["--out", str(tmp_path)]) == 0
    assert "Took over an empty or unreadable lock" in capsys.readouterr().out and not lock.exists()


def test_a_lock_still_being_filled_by_a_live_run_is_not_taken_over(tmp_path, monkeypatch):
    import threading

    monkeypatch.setattr(platform.RunLock, "WRITE_SECONDS", 1.0)
    lock = tmp_path / platform.RunLock.NAME
    lock.write_bytes(b"")  # a live run has just created it
    record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "now"})
    filler = threading.Timer(0.2, lock.write_text, [record])
    filler.start()
    try:
        with pytest.raises(platform.RunLockedError, match=rf"in use by another run \(host {socket.gethostname()}, PID {os.getpid()}"):
            platform.RunLock(tmp_path).__enter__()
    finally:
        filler.join()
    assert json.loads(lock.read_text())["started"] == "now"


# ----------------------------------------------------------------------------- free memory (issue 22: model size check)


def test_cpu_free_memory_is_what_the_kernel_reports(monkeypatch):
    free = platform.available_memory(torch.device("cpu"))
    if Path("/proc/meminfo").exists():
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        total = int(fields["MemTotal"].split()[0]) * 1024
        assert 0 < free <= total
    monkeypatch.setattr(platform, "_cgroup_room", lambda: 12345)  # a container with little room left caps it
    assert platform.available_memory(torch.device("cpu")) == 12345


@pytest.mark.parametrize("layout", ["v2", "v1"])
def test_a_containers_memory_limit_caps_the_free_memory(tmp_path, layout):
    # Kaggle and Docker limit a container below the machine's RAM; this test writes such a cgroup's files.
    files = {"v2": {"memory.max": "30000000000", "memory.current": "8000000000", "memory.stat": "anon 6000000000\ninactive_file 1000000000\n"},
             "v1": {"memory/memory.limit_in_bytes": "30000000000", "memory/memory.usage_in_bytes": "8000000000",
                    "memory/memory.stat": "cache 2000000000\ntotal_inactive_file 1000000000\n"}}[layout]
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert platform._cgroup_room(tmp_path) == 30_000_000_000 - 8_000_000_000 + 1_000_000_000
    (tmp_path / list(files)[0]).write_text("max\n" if layout == "v2" else str(2**63 - 4096))  # no limit set
    assert platform._cgroup_room(tmp_path) is None
    assert platform._cgroup_room(tmp_path / "nothing-here") is None

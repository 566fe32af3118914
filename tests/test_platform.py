"""Platform detection, default paths, and the one place that picks device and precision."""
from pathlib import Path

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

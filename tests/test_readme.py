"""The README's "Set up and run" commands, run as written on a fresh copy of the repository."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def setup_and_run_commands() -> list[str]:
    """The lines of the fenced bash block under the README's "## Set up and run" heading."""
    section = REPO.joinpath("README.md").read_text().split("## Set up and run", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def fresh_copy(target: Path) -> Path:
    """What a clone of this working tree holds: tracked files plus new files git does not ignore (no outputs/, data/)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes((REPO / name).read_bytes())
    return target


def test_readme_setup_and_run_commands_work_on_a_fresh_copy(tmp_path):
    """Install: the documented command is run with --dry-run --no-index --no-build-isolation, so pip resolves
    requirements.txt (including `-e .`) against what is installed but changes nothing: a real install from the copy
    would re-point the shared virtual environment's editable nbhelpers at this temporary folder. Run: the documented
    line exactly, through bash in the copy, with `-p PRESET fast` swapped for `-p PRESET smoke -p EPOCHS 1` (the
    smoke preset, one epoch, to keep the suite fast); nbhelpers is imported from the copy via PYTHONPATH."""
    install, run = setup_and_run_commands()
    assert install == "pip install -r requirements.txt"
    assert run.endswith(" -p PRESET fast")
    repo = fresh_copy(tmp_path / "repo")
    assert not (repo / "outputs").exists(), "a fresh clone has no outputs/ folder"
    env = os.environ | {"PYTHONPATH": str(repo), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    resolved = subprocess.run([sys.executable, "-m", *install.split(), "--dry-run", "--no-index", "--no-build-isolation"],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert resolved.returncode == 0, resolved.stdout[-2000:] + resolved.stderr[-2000:]
    smoke = run.removesuffix(" -p PRESET fast") + " -p PRESET smoke -p EPOCHS 1"
    done = subprocess.run(["bash", "-c", smoke], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert (repo / "outputs" / "q1_vit_cifar10.ipynb").stat().st_size > 0
    assert '"preset": "smoke"' in (repo / "outputs" / "q1_vit" / "run_summary.json").read_text()

"""A regular (non-editable) install works outside the clone: configs and demo data ship in the package,
and nothing looks for the clone's launch/ or configs/. Built with --no-deps into a venv that sees this
environment's packages, so torch is not downloaded again."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from helpers import REPO, cli_env


def test_a_wheel_install_trains_from_outside_the_clone(tmp_path):
    wheels, venv, work, source = (tmp_path / name for name in ("wheels", "venv", "work", "source"))
    # build from the tracked files only: a stale build/ of the clone must not leak into the wheel
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in tracked.stdout.splitlines():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        if not (REPO / name).is_symlink():
            shutil.copy2(REPO / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels)]
    subprocess.run([*build, str(source)], check=True, capture_output=True, timeout=300)
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300
    )
    python, spkdist = venv / "bin" / "python", venv / "bin" / "spkdist"
    [wheel] = wheels.glob("spkdist-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    for data in ("configs/boss.yaml", "configs/accelerate/ds_zero3.json", "demo/fsdd-recordings.tar.gz"):
        assert f"spkdist/{data}" in shipped, data
    pip = [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)]
    subprocess.run(pip, check=True, capture_output=True, timeout=300)
    work.mkdir()

    def run(*command: str) -> str:
        result = subprocess.run(
            command, cwd=work, capture_output=True, text=True, timeout=300, env=cli_env(PYTHONPATH="")
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return result.stdout

    location = run(str(python), "-c", "import spkdist; print(spkdist.__file__)")
    assert Path(location.strip()).is_relative_to(venv)  # the installed copy, not the clone's
    assert "boss.yaml" in run(str(spkdist), "configs") and str(venv) in run(str(spkdist), "configs")
    run(str(spkdist), "shard", "--demo", "--workers", "1")  # the demo recordings are package data
    overrides = [
        "data.shards=shards/fsdd-demo",
        "train.max_steps=2",
        "train.eval_every=2",
        "log.tracker=none",
    ]
    overrides += ["data.num_workers=0", "model.d_model=32", "model.n_heads=2", "model.ffn_dim=32"]
    run(str(spkdist), "train", "--config", "boss.yaml", *overrides)  # a bare name: the shipped recipe
    assert "valid accuracy" in run(
        str(python),
        "-m",
        "spkdist.train",
        "--config",
        "sample.yaml",
        *overrides,
        "train.output_dir=runs/sample",
    )

"""The console entry points (`pvt-train`, `pvt-evaluate`, ...) of an installed wheel run the scripts of `scripts/`."""

import ast
import configparser
import shutil
import subprocess
import sys
import zipfile

from script_launch import REPO, environment


def test_wheel_installs_every_script_as_a_command(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the working tree
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("modeling_pvt", "scripts"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode())
    commands = dict(entry_points["console_scripts"])
    assert {
        "pvt-train",
        "pvt-finetune",
        "pvt-evaluate",
        "pvt-train-segmentation",
        "pvt-train-detection",
        "pvt-push-to-hub",
    } <= set(commands)
    for command, target in commands.items():
        module, function = target.split(":")
        script = REPO / "scripts" / f"{module.rsplit('.', 1)[-1]}.py"
        assert f"{module.replace('.', '/')}.py" in names, command
        defined = {node.name for node in ast.parse(script.read_text()).body if isinstance(node, ast.FunctionDef)}
        assert function in defined, command
    assert {
        "modeling_pvt/hub/card_templates/trained.jinja",
        "modeling_pvt/metrics/mean_iou/mean_iou.py",
        "modeling_pvt/data/detection.py",
        "modeling_pvt/training/run.py",
        "modeling_pvt/cpu_acceleration.py",
    } <= names

    target = tmp_path / "installed"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=300)
    env = {**environment(), "PYTHONPATH": str(target)}
    result = subprocess.run([str(target / "bin" / "pvt-evaluate"), "--help"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage: pvt-evaluate") and "--model_name_or_path" in result.stdout

"""The README works as written: its Python blocks run, its commands name scripts, options and console commands
that exist and parse. A README that drifts from the code fails here."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from script_launch import environment, load_script

from modeling_pvt import PvtConfig, PvtForImageClassification, PvtImageProcessor

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
COMMANDS = [
    " ".join(line.split(" #")[0].strip() for line in command.split("\\\n"))
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
    for command in re.split(r"\n(?=\S)", block.strip())
    if not command.startswith("#")
]
SCRIPT_COMMANDS = [command for command in COMMANDS if re.search(r"scripts/\w+\.py", command)]
PARSERS = {
    "train": "parse_args",
    "train_segmentation": "parse_args",
    "train_detection": "parse_args",
    "eval_classification": "parse_args",
    "convert_original_checkpoint": "parse_args",
    "push_to_hub": "parse_args",
}


def test_the_readme_stays_short_and_has_its_sections():
    assert len(README.splitlines()) <= 350
    for anchor in re.findall(r"\]\(#([\w-]+)\)", README):
        headings = {
            re.sub(r"[^\w\- ]", "", line[3:]).strip().lower().replace(" ", "-") for line in README.splitlines()
        }
        assert anchor in headings, anchor
    for link in re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)", README):
        assert (REPO / link).is_file(), link


def make_digits_folder(folder: Path) -> None:
    """What the main command leaves in `pvt-digits/`, at toy width."""
    toy = {"hidden_sizes": [8, 16, 24, 32], "num_attention_heads": [1, 1, 1, 2], "depths": [1, 1, 1, 1]}
    labels = {index: str(index) for index in range(10)}
    PvtForImageClassification(PvtConfig(image_size=32, num_labels=10, id2label=labels, **toy)).save_pretrained(folder)
    PvtImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_blocks_run_as_written(index, tmp_path):
    make_digits_folder(tmp_path / "pvt-digits")
    result = subprocess.run(
        [sys.executable, "-c", PYTHON_BLOCKS[index]],
        cwd=tmp_path,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("command", SCRIPT_COMMANDS, ids=lambda command: command[:60])
def test_script_commands_name_options_the_script_takes(command):
    words = shlex.split(command)
    position = next(index for index, word in enumerate(words) if re.fullmatch(r"scripts/\w+\.py", word))
    name = Path(words[position]).stem
    assert (REPO / "scripts" / f"{name}.py").is_file()
    if name in PARSERS:
        getattr(load_script(name), PARSERS[name])(words[position + 1 :])


def test_console_commands_named_in_the_readme_are_installed():
    scripts = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])
    # commands appear as `.venv/bin/pvt-x ...` or `pvt-x`; folders as `pvt-x/` or after an option
    named = set(re.findall(r"(?:bin/|`)(pvt-[a-z-]*[a-z])(?=[`\s])", README))
    assert named and named <= scripts, named - scripts
    assert scripts <= named, scripts - named  # every installed command is one the README lists

"""Atomic checkpoints and exact resume.

A checkpoint holds the full accelerate state (model, optimizer, registered objects such as the scheduler, every
rank's random generators) and `TrainingProgress`, the position in the epoch. It is written to a hidden temporary
folder and renamed into place only when complete, so a crash mid-save never leaves a folder that looks resumable.
"""

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

logger = get_logger(__name__)

CHECKPOINTS_DIR_NAME = "checkpoints"
TRAINING_STATE_NAME = "training_state.json"
INTERRUPTED_MODEL_DIR_NAME = "interrupted_model"


@dataclass
class TrainingProgress:
    """Where a run is: optimizer steps done, the epoch it is in, and how many of that epoch's batches it consumed."""

    completed_steps: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def is_complete_checkpoint(folder: Path) -> bool:
    """Only a renamed-into-place checkpoint folder has its training-state record; temporaries start with '.'."""
    return folder.is_dir() and not folder.name.startswith(".") and (folder / TRAINING_STATE_NAME).is_file()


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `output_dir`, oldest first, as (completed steps, folder)."""
    checkpoints_dir = Path(output_dir) / CHECKPOINTS_DIR_NAME
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for folder in checkpoints_dir.iterdir():
        if is_complete_checkpoint(folder):
            state = json.loads((folder / TRAINING_STATE_NAME).read_text())
            found.append((state["completed_steps"], folder))
    return sorted(found)


def save_checkpoint(
    accelerator: Accelerator, output_dir: Path, name: str, progress: TrainingProgress, total_limit: int | None
) -> None:
    """Save the accelerate state (model, optimizer, registered objects, random generators of every rank) to
    `checkpoints/name` atomically: write `.name.tmp`, then rename it; keep the newest `total_limit`."""
    checkpoints_dir = Path(output_dir) / CHECKPOINTS_DIR_NAME
    final = checkpoints_dir / name
    temporary = checkpoints_dir / f".{name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)  # left by a crash during an earlier save
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / TRAINING_STATE_NAME).write_text(json.dumps(asdict(progress), indent=2) + "\n")
        _fsync_tree(temporary)
        if final.exists():  # same name again (e.g. re-running into the same folder): replace it
            stale = checkpoints_dir / f".{name}.stale"
            shutil.rmtree(stale, ignore_errors=True)
            final.rename(stale)
            shutil.rmtree(stale)
        temporary.rename(final)
        _fsync_tree(checkpoints_dir)
        if total_limit is not None:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
        logger.info(f"Saved checkpoint {final}")
    accelerator.wait_for_everyone()


def resolve_checkpoint(resume_from: str, output_dir: Path) -> Path:
    """The checkpoint folder `resume_from` names: a folder, or 'latest' (the newest complete one in `output_dir`)."""
    if resume_from == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise FileNotFoundError(
                f"No complete checkpoint under {Path(output_dir) / CHECKPOINTS_DIR_NAME} to resume from."
            )
        return checkpoints[-1][1]
    folder = Path(resume_from)
    if not is_complete_checkpoint(folder):
        raise FileNotFoundError(
            f"{folder} is not a complete checkpoint (no {TRAINING_STATE_NAME}; an interrupted save leaves only a "
            "hidden temporary folder). Pass another folder or 'latest'."
        )
    return folder


def load_checkpoint(accelerator: Accelerator, resume_from: str, output_dir: Path) -> TrainingProgress:
    """Restore the state saved by `save_checkpoint` (after `prepare` and `build_lr_scheduler`); where to go on."""
    checkpoint = resolve_checkpoint(resume_from, output_dir)
    accelerator.load_state(str(checkpoint))
    progress = TrainingProgress(**json.loads((checkpoint / TRAINING_STATE_NAME).read_text()))
    logger.info(
        f"Resumed from {checkpoint}: epoch {progress.epoch}, batch {progress.batches_in_epoch}, "
        f"step {progress.completed_steps}"
    )
    return progress


def save_interrupted_model(model: torch.nn.Module, processor, output_dir: Path) -> Path:
    """Keep the weights trained so far when the run fails; called by whichever rank caught the error."""
    final = Path(output_dir) / INTERRUPTED_MODEL_DIR_NAME
    temporary = Path(output_dir) / f".{INTERRUPTED_MODEL_DIR_NAME}.{os.getpid()}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    processor.save_pretrained(temporary)
    shutil.rmtree(final, ignore_errors=True)
    try:
        temporary.rename(final)
    except OSError:  # another rank got there first with the same (synchronised) weights
        shutil.rmtree(temporary, ignore_errors=True)
    return final


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer, in name order: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()

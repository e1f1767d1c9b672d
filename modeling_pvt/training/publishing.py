"""The end of a training run: save the model, evaluate it, write the results and the card, upload."""

from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object

from ..hub.results import RESULTS_FILE_NAME, write_results
from .checkpoints import CHECKPOINTS_DIR_NAME, INTERRUPTED_MODEL_DIR_NAME, weights_digest
from .launch import is_sharded
from .options import TrainingArguments

logger = get_logger(__name__)


def save_and_evaluate(
    accelerator: Accelerator, model: torch.nn.Module, processor, output_dir: Path, evaluate: Callable[[], dict]
) -> tuple[list[str], dict]:
    """Save the trained model first (`save_trained_model`: the per-rank digests), then run the final `evaluate()`;
    a failing evaluation says where the model is."""
    digests = save_trained_model(accelerator, model, processor, output_dir)
    try:
        return digests, evaluate()
    except BaseException:
        logger.error(f"The final evaluation failed; the trained model is saved in {output_dir}.")
        raise


def publish_run(accelerator: Accelerator, args: TrainingArguments, results: dict, card: str, script: str) -> None:
    """Main process: `all_results.json` and the model card into `args.output_dir`, then the upload when
    `--push_to_hub`; a failing push says where everything is saved."""
    if not accelerator.is_main_process:
        return
    output_dir = Path(args.output_dir)
    write_results(output_dir / RESULTS_FILE_NAME, results)
    (output_dir / "README.md").write_text(card)
    if args.push_to_hub:
        try:
            repo_id = push_output_dir(output_dir, args.hub_model_id, args.hub_token, args.hub_private_repo, script)
        except Exception:
            logger.error(f"Pushing to the Hub failed; the model and results are saved in {output_dir}.")
            raise
        logger.info(f"Pushed {output_dir} to {repo_id}")


def save_trained_model(accelerator: Accelerator, model: torch.nn.Module, processor, output_dir: Path) -> list[str]:
    """Save the model (from every rank's shard if sharded) and its processor; the per-rank weight digests (empty
    when sharded), which must all be equal: a difference is logged as a warning."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(
        output_dir,
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
        state_dict=accelerator.get_state_dict(model),
    )
    if accelerator.is_main_process:
        processor.save_pretrained(output_dir)
    digests = [] if is_sharded(accelerator) else gather_object([weights_digest(unwrapped)])
    if len(set(digests)) > 1:
        logger.warning(f"The ranks ended with different weights: {digests}")
    return digests


def push_output_dir(output_dir: Path, repo_id: str | None, token: str | None, private: bool, script: str) -> str:
    """Upload a training output folder to the Hub, without its checkpoints and hidden files; the repo id."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id or Path(output_dir).name, private=private or None, exist_ok=True).repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        commit_message=f"Upload PVT trained with modeling_pvt {script}",
        ignore_patterns=[f"{CHECKPOINTS_DIR_NAME}/*", f"{INTERRUPTED_MODEL_DIR_NAME}/*", ".*", "*/.*"],
    )
    return repo_id

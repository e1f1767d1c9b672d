#!/usr/bin/env python
"""Publish PVT checkpoints to the Hugging Face Hub (or to a local folder with `--dry_run`).

One checkpoint:

    python scripts/push_to_hub.py --model_dir converted/pvt-small --repo_id ORG/pvt-small

The four sizes, from a folder with the subfolders `pvt-tiny`, `pvt-small`, `pvt-medium`, `pvt-large`:

    python scripts/push_to_hub.py --sizes --checkpoints_dir converted --namespace ORG

The repo folder is assembled from what the checkpoint folder holds, through the package itself: the model is loaded
with `modeling_pvt` (every weight must be accounted for; pickled `.bin` weights are read with
`torch.load(weights_only=True)`) and written back with `save_pretrained`, which gives `config.json` with its
`auto_map`, `model.safetensors` and the Hub code files (`configuration_pvt.py`, `modeling_pvt.py`,
`cpu_acceleration.py`, `image_processing_pvt.py`); the image processor adds `preprocessor_config.json`.
`README.md` is the size's model card
(`modeling_pvt.hub.model_card`, as `scripts/make_model_cards.py` writes it), with the checkpoint's measured results
(`eval_results.json` / `all_results.json`, the schema of `modeling_pvt.hub.results`) when present; the size is the
`--size` given (in `--sizes` mode, the folder's) or the paper size whose ImageNet-1k classifier the config describes.
Other checkpoints keep the README.md of their folder (the training scripts write one), else get a short card from
the same renderer. No pickle file is ever published.

It is pushed as ONE commit (`create_repo(exist_ok=True)` + `create_commit`). Files whose content the Hub already
has are skipped by `huggingface_hub` itself (the Hub's preupload answer carries each remote file's hash), so pushing
an unchanged folder again makes no commit at all. The token comes from `HF_TOKEN` or `hf auth login` and is never
printed or written anywhere by this script.
"""

import argparse
import fnmatch
import json
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token

from modeling_pvt import PVT_PRESETS, PvtConfig, PvtForImageClassification, PvtImageProcessor
from modeling_pvt.hub.model_card import render_paper_size_card, render_trained_card
from modeling_pvt.hub.results import IMAGE_CLASSIFICATION, RESULTS_FILE_NAME, read_results

logger = logging.getLogger("push_to_hub")

HUB_CODE_FILES = ("configuration_pvt.py", "modeling_pvt.py", "cpu_acceleration.py", "image_processing_pvt.py")
REQUIRED_AUTO_MAP = ("AutoConfig", "AutoModelForImageClassification", "AutoImageProcessor")
# Results written by scripts/eval_classification.py (--output_file eval_results.json) and the training scripts
# (all_results.json); the latter wins.
RESULTS_FILES = ("eval_results.json", RESULTS_FILE_NAME)
# Remote files that would contradict a safetensors-only repo (or shadow model.safetensors) are deleted in the commit.
STALE_REMOTE_PATTERNS = (
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.pkl",
    "*.pickle",
    "*.bin.index.json",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
)
ARCHITECTURE_FIELDS = (
    "num_encoder_blocks",
    "depths",
    "hidden_sizes",
    "num_attention_heads",
    "sequence_reduction_ratios",
    "mlp_ratios",
    "patch_sizes",
    "strides",
)


class PublishError(RuntimeError):
    """A checkpoint folder or an argument that cannot be published as asked; the message says why."""


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit_id: str
    commit_url: str | None
    created_commit: bool
    deleted: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------- model card
def infer_size(config: PvtConfig) -> str | None:
    """The paper size whose ImageNet-1k classifier the config describes (None for any other model: a fine-tuned
    head on another label set must not get the ImageNet card)."""
    for size in PVT_PRESETS:
        preset = PvtConfig.from_preset(size)
        if all(getattr(config, name) == getattr(preset, name) for name in (*ARCHITECTURE_FIELDS, "num_labels")):
            return size
    return None


def read_checkpoint_results(model_dir: Path) -> dict | None:
    """The measured results stored next to the checkpoint (None when there are none)."""
    results: dict = {}
    for name in RESULTS_FILES:
        results.update(read_results(Path(model_dir) / name) or {})
    return results or None


def render_card(size: str | None, results: dict | None, repo_id: str, model_dir: Path | None = None) -> str:
    """The README.md of the repo: the paper size's card with the measured results; for any other checkpoint the card
    its folder has (the training scripts write one), else a short card of the same renderer."""
    try:
        if size is not None:
            return render_paper_size_card(size, results, repo_id)
        if model_dir is not None and (Path(model_dir) / "README.md").is_file():
            logger.info("Publishing the model card of %s as it is.", model_dir)
            return (Path(model_dir) / "README.md").read_text()
        return render_trained_card(
            repo_id=repo_id,
            task=IMAGE_CLASSIFICATION,
            title=repo_id.split("/")[-1],
            summary="A Pyramid Vision Transformer (PVT v1, [arXiv 2102.12122](https://arxiv.org/abs/2102.12122)) "
            "image classifier in the `transformers` format (weights in safetensors; the modelling code ships with the "
            "repo for `trust_remote_code=True`).",
            results=results,
            source="the run that produced the checkpoint",
        )
    except ValueError as error:
        raise PublishError(f"Cannot write the model card of {repo_id}: {error}") from error


# ------------------------------------------------------------------------------------------------------ assemble
def assemble_repo_folder(model_dir: Path, output_dir: Path, repo_id: str, size: str | None = None) -> list[str]:
    """Writes the Hub repo of the checkpoint in `model_dir` to `output_dir`; returns the files, relative to it."""
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    if not (model_dir / "config.json").is_file():
        raise PublishError(f"{model_dir} holds no config.json: expected a save_pretrained folder.")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise PublishError(f"{output_dir} is not empty: give a new or empty folder, so no stale file gets published.")

    weight_files = {path.name for path in model_dir.iterdir() if path.is_file()}
    if not weight_files & {"model.safetensors", "model.safetensors.index.json"}:
        if weight_files & {"pytorch_model.bin", "pytorch_model.bin.index.json"}:
            logger.warning(
                "%s has pickled weights only: reading them with torch.load(weights_only=True) and publishing them as "
                "model.safetensors.",
                model_dir,
            )
        else:
            raise PublishError(f"{model_dir} holds no model weights (model.safetensors or pytorch_model.bin).")

    model, loading_info = PvtForImageClassification.from_pretrained(
        model_dir, output_loading_info=True, weights_only=True
    )
    problems = {name: sorted(map(str, keys)) for name, keys in loading_info.items() if keys}
    if problems:
        raise PublishError(f"The weights in {model_dir} do not match the model: {problems}")

    checkpoint_size = infer_size(model.config)
    if size is None:
        size = checkpoint_size
    elif checkpoint_size != size:
        logger.warning(
            "The config in %s is not the PVT-%s architecture (it matches %s); the model card describes PVT-%s.",
            model_dir,
            size,
            f"PVT-{checkpoint_size}" if checkpoint_size else "no paper size",
            size,
        )

    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    if (model_dir / "preprocessor_config.json").is_file():
        image_processor = PvtImageProcessor.from_pretrained(model_dir)
    else:
        logger.warning("%s has no preprocessor_config.json: publishing the default PVT preprocessing.", model_dir)
        image_processor = PvtImageProcessor()
    image_processor.save_pretrained(output_dir)
    (output_dir / "README.md").write_text(render_card(size, read_checkpoint_results(model_dir), repo_id, model_dir))

    _check_repo_folder(output_dir)
    return sorted(path.relative_to(output_dir).as_posix() for path in output_dir.rglob("*") if path.is_file())


def _check_repo_folder(folder: Path) -> None:
    """The folder must load with stock transformers and with the Hub code, and hold no pickle file."""
    expected = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", *HUB_CODE_FILES)
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing:
        raise PublishError(f"The assembled repo misses {missing}; is modeling_pvt installed and importable?")
    auto_map = json.loads((folder / "config.json").read_text()).get("auto_map", {})
    auto_map.update(json.loads((folder / "preprocessor_config.json").read_text()).get("auto_map", {}))
    if absent := [name for name in REQUIRED_AUTO_MAP if name not in auto_map]:
        raise PublishError(f"The assembled repo's auto_map lacks {absent}: trust_remote_code would not find the code.")
    if pickles := [path.name for path in folder.rglob("*") if _is_stale_remote_file(path.name)]:
        raise PublishError(f"The assembled repo holds pickle or shard files {pickles}; refusing to publish them.")


def _is_stale_remote_file(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name, pattern) for pattern in STALE_REMOTE_PATTERNS)


# ---------------------------------------------------------------------------------------------------------- push
def require_token() -> None:
    """Stops early when no token is available (the token itself is left to huggingface_hub, never handled here)."""
    if get_token() is None:
        raise PublishError("No Hugging Face token found: set HF_TOKEN or run `hf auth login` first.")


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> PushResult:
    """Pushes the files of `folder` to `repo_id` in one commit (none when the Hub already has them all)."""
    require_token()
    api = HfApi()
    user = api.whoami()["name"]  # fails early, before any upload, on an invalid token
    revision = revision or "main"
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    print(f"{repo_url.repo_id}: pushing as {user}")
    if revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    head = api.repo_info(repo_id, revision=revision).sha

    local_files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    stale = [path for path in api.list_repo_files(repo_id, revision=revision) if _is_stale_remote_file(path)]
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in local_files]
    operations += [CommitOperationDelete(path_in_repo=path) for path in stale if path not in local_files]
    info = api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or f"Upload {repo_id.split('/')[-1]} (safetensors, config, code, model card)",
        revision=revision,
        parent_commit=head,  # refuse to commit over a change pushed meanwhile
    )
    created = info.oid != head
    return PushResult(repo_id, revision, info.oid, info.commit_url if created else None, created, stale)


def publish(
    model_dir: Path,
    repo_id: str,
    *,
    size: str | None = None,
    dry_run: bool = False,
    output_dir: Path | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> PushResult | None:
    """Assembles the repo of one checkpoint and pushes it (or only writes it to `output_dir` when `dry_run`)."""
    if dry_run:
        files = assemble_repo_folder(model_dir, output_dir, repo_id, size)
        print(f"[dry run] {repo_id}: wrote {len(files)} files to {output_dir}, pushed nothing: {', '.join(files)}")
        return None
    with tempfile.TemporaryDirectory(prefix="pvt-hub-") as scratch:
        folder = Path(output_dir) if output_dir is not None else Path(scratch) / "repo"
        files = assemble_repo_folder(model_dir, folder, repo_id, size)
        print(f"{repo_id}: assembled {', '.join(files)}")
        result = push_folder(folder, repo_id, private=private, revision=revision, commit_message=commit_message)
    if result.deleted:
        print(f"{repo_id}: removed stale remote files {', '.join(result.deleted)}")
    if result.created_commit:
        print(f"{repo_id}@{result.revision}: new commit {result.commit_id} ({result.commit_url})")
    else:
        print(f"{repo_id}@{result.revision}: already up to date at {result.commit_id}; no new commit")
    return result


# ----------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", type=Path, help="A save_pretrained folder (e.g. from the conversion script).")
    parser.add_argument("--repo_id", help="Target repo, ORG/NAME.")
    parser.add_argument(
        "--size", choices=list(PVT_PRESETS), help="Paper size of the card (default: inferred from the config)."
    )
    parser.add_argument(
        "--sizes",
        nargs="*",
        choices=list(PVT_PRESETS),
        help="Publish these sizes (all four if none given) from CHECKPOINTS_DIR/pvt-<size> to NAMESPACE/pvt-<size>.",
    )
    parser.add_argument("--checkpoints_dir", type=Path, help="With --sizes: the folder holding pvt-<size>/ folders.")
    parser.add_argument("--namespace", help="With --sizes: the user or organisation to publish under.")
    parser.add_argument("--private", action="store_true", help="Create the repo private (an existing repo is kept).")
    parser.add_argument("--revision", help="Branch to commit to (created from main if missing). Default: main.")
    parser.add_argument("--commit_message", help="Summary of the commit.")
    parser.add_argument("--dry_run", action="store_true", help="Only write the repo folder(s) to --output_dir.")
    parser.add_argument(
        "--output_dir",
        type=Path,
        help="Where to write the assembled repo (required with --dry_run; with --sizes, one subfolder per size).",
    )
    args = parser.parse_args(argv)
    if args.sizes is not None:
        if args.model_dir or args.repo_id or args.size:
            parser.error("--sizes takes --checkpoints_dir and --namespace, not --model_dir/--repo_id/--size.")
        if args.checkpoints_dir is None or args.namespace is None:
            parser.error("--sizes needs --checkpoints_dir and --namespace.")
        args.sizes = args.sizes or list(PVT_PRESETS)
    elif args.model_dir is None or args.repo_id is None:
        parser.error("give --model_dir and --repo_id (or --sizes with --checkpoints_dir and --namespace).")
    elif args.repo_id.count("/") != 1:
        parser.error(f"--repo_id must be ORG/NAME, got {args.repo_id!r}.")
    if args.dry_run and args.output_dir is None:
        parser.error("--dry_run needs --output_dir.")
    return args


def main(argv: list[str] | None = None) -> int:
    # Only this script's messages at INFO: the HTTP libraries would log every request.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    args = parse_args(argv)
    options = {
        "dry_run": args.dry_run,
        "private": args.private,
        "revision": args.revision,
        "commit_message": args.commit_message,
    }
    try:
        if not args.dry_run:
            require_token()  # before the minutes of loading and assembling, not after
        if args.sizes is None:
            publish(args.model_dir, args.repo_id, size=args.size, output_dir=args.output_dir, **options)
            return 0
        model_dirs = {size: args.checkpoints_dir / f"pvt-{size}" for size in args.sizes}
        if missing := [str(path) for path in model_dirs.values() if not path.is_dir()]:
            raise PublishError(f"Missing checkpoint folders {missing}: nothing was published.")
        for size, model_dir in model_dirs.items():
            output_dir = args.output_dir / f"pvt-{size}" if args.output_dir is not None else None
            publish(model_dir, f"{args.namespace}/pvt-{size}", size=size, output_dir=output_dir, **options)
    except PublishError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

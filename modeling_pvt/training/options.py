"""The options every Accelerate training script shares, as a dataclass, and the one way scripts parse theirs.

Names follow transformers' `TrainingArguments` and example scripts where they have one (`per_device_train_batch_size`,
`lr_scheduler_type`, `lr_scheduler_kwargs`, `dataloader_num_workers`, `torch_compile`, `torch_compile_backend`,
`push_to_hub`, ...). A field whose default is None and whose help says [recipe] takes its value from the task's recipe
(`apply_recipe`): the embedded default's recipe without a dataset, the paper's with one.
"""

import argparse
import dataclasses
import difflib
import inspect
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from huggingface_hub import constants
from transformers import HfArgumentParser, PreTrainedConfig

from .profiling import PROFILE_DIR_NAME, LoopClock

Arguments = TypeVar("Arguments")


class OptionError(ValueError):
    """An option names something that is not there: a model folder or Hub id, a config field. Like a `DataError`,
    it ends every process of a run with one line (`modeling_pvt.training.launch.stop_all_on_user_error`)."""


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class TrainingArguments:
    """The training loop's options (parsed by `transformers.HfArgumentParser`)."""

    _argument_group_name = "training"  # HfArgumentParser's --help section (a class attribute, not an option)

    output_dir: str | None = field(
        default=None, metadata=_help("Where the model, results and checkpoints go [recipe].")
    )
    per_device_train_batch_size: int | None = field(default=None, metadata=_help("Batch size per process [recipe]."))
    per_device_eval_batch_size: int | None = field(default=None, metadata=_help("Evaluation batch size [recipe]."))
    learning_rate: float | None = field(default=None, metadata=_help("Peak learning rate [recipe]."))
    weight_decay: float | None = field(default=None, metadata=_help("AdamW weight decay [recipe]."))
    num_train_epochs: int | None = field(default=None, metadata=_help("Epochs [recipe]."))
    max_train_steps: int | None = field(default=None, metadata=_help("Optimizer steps; overrides num_train_epochs."))
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str | None = field(default=None, metadata=_help("A transformers scheduler name [recipe]."))
    lr_scheduler_kwargs: str | None = field(
        default=None, metadata=_help("JSON object of the scheduler's own options, e.g. '{\"power\": 0.9}' [recipe].")
    )
    warmup_epochs: float | None = field(default=None, metadata=_help("Linear warm-up length in epochs [recipe]."))
    max_grad_norm: float | None = field(default=None, metadata=_help("Gradient clipping; none when unset [recipe]."))
    seed: int = 42
    dataloader_num_workers: int | None = field(
        default=None, metadata=_help("Data-loader worker processes per training process [recipe].")
    )
    checkpointing_steps: str | None = field(
        default=None, metadata=_help("Save the training state every N optimizer steps, or 'epoch'.")
    )
    checkpoints_total_limit: int | None = field(default=None, metadata=_help("Keep only the newest N checkpoints."))
    resume_from_checkpoint: str | None = field(
        default=None, metadata=_help("A checkpoint folder, or 'latest' in output_dir: continues bit-exactly.")
    )
    with_tracking: bool = field(default=False, metadata=_help("Log metrics to report_to."))
    report_to: str = field(default="tensorboard", metadata=_help("Tracker(s) for accelerate, or 'all'."))
    torch_compile: bool = field(
        default=False,
        metadata=_help(
            "Compile the model with torch.compile: one graph for training and one for evaluation, no recompilation "
            "afterwards (see modeling_pvt.training.launch.compile_model)."
        ),
    )
    torch_compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    profile_steps: int = field(
        default=0,
        metadata=_help(
            f"Profile N optimizer steps after the first {LoopClock.warmup_steps + 1} (torch.profiler, host and GPU) "
            f"and write a Chrome trace, the operators by time and where a step's time went to "
            f"OUTPUT_DIR/{PROFILE_DIR_NAME}/."
        ),
    )
    push_to_hub: bool = field(default=False, metadata=_help("Upload output_dir to the Hub at the end."))
    hub_model_id: str | None = field(default=None, metadata=_help("Repository id; default: output_dir's name."))
    hub_token: str | None = field(default=None, metadata=_help("Token; default: the logged-in one or HF_TOKEN."))
    hub_private_repo: bool = False

    def __post_init__(self):
        if self.checkpointing_steps is not None and self.checkpointing_steps != "epoch":
            if not str(self.checkpointing_steps).isdigit() or int(self.checkpointing_steps) < 1:
                raise ValueError(
                    f"--checkpointing_steps must be a positive integer or 'epoch', got {self.checkpointing_steps!r}."
                )
            self.checkpointing_steps = int(self.checkpointing_steps)
        if self.profile_steps < 0:
            raise ValueError(f"--profile_steps must be a whole number of steps (0 or more), got {self.profile_steps}.")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(
                f"--gradient_accumulation_steps must be 1 or more, got {self.gradient_accumulation_steps}."
            )

    @property
    def compile_backend(self) -> str | None:
        """The torch.compile backend, or None when the model runs eagerly."""
        return self.torch_compile_backend if self.torch_compile else None

    def scheduler_kwargs(self) -> dict:
        """`lr_scheduler_kwargs` as a dict."""
        return json.loads(self.lr_scheduler_kwargs) if self.lr_scheduler_kwargs else {}


def apply_recipe(arguments: Sequence, recipe: Mapping[str, object]) -> None:
    """Give every option of `arguments` (dataclass instances) that is still None its value in `recipe`; a recipe
    entry that names no option is a programming error."""
    unused = dict(recipe)
    for instance in arguments:
        for item in dataclasses.fields(instance):
            if item.name in unused:
                value = unused.pop(item.name)
                if getattr(instance, item.name) is None:
                    setattr(instance, item.name, value)
    if unused:
        raise KeyError(f"Recipe entries that name no option: {sorted(unused)}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` with each option's default, except where it is None or the text already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_arguments(
    dataclass_types: Sequence[type], argv: Sequence[str] | None = None, description: str | None = None, epilog=None
) -> tuple[HfArgumentParser, tuple]:
    """Parse `argv` into instances of `dataclass_types`; an invalid value ends with the parser's usage line and the
    reason, not a traceback. Returns the parser too, for the script's own cross-option checks (`parser.error`)."""
    parser = HfArgumentParser(dataclass_types, description=description, epilog=epilog, formatter_class=HelpFormatter)
    try:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:
        parser.error(str(error))
    return parser, tuple(parsed)


def parse_config_overrides(text: str | None, config_class: type[PreTrainedConfig]) -> dict:
    """`--config_overrides` (a JSON object) as a dict. Keys that `config_class` does not have are refused with an
    `OptionError` naming the nearest valid key: a config would store them silently and the model ignore them."""
    if not text:
        return {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as error:
        raise OptionError(f"--config_overrides {text!r} is not valid JSON: {error}.") from error
    if not isinstance(overrides, dict):
        raise OptionError(f"--config_overrides must be a JSON object of config fields, got {text!r}.")
    valid = set(config_class().to_dict()) | set(inspect.signature(config_class.__init__).parameters)
    valid -= {"self", "kwargs"}
    unknown = [key for key in overrides if key not in valid]
    if unknown:
        described = []
        for key in unknown:
            nearest = difflib.get_close_matches(key, sorted(valid), n=1)
            described.append(f"{key!r}" + (f" (did you mean {nearest[0]!r}?)" if nearest else ""))
        raise OptionError(f"--config_overrides: {config_class.__name__} has no field {', '.join(described)}.")
    return overrides


@contextmanager
def loading_pretrained(option: str, name_or_path: str) -> Iterator[None]:
    """`from_pretrained` calls in the block: a name that is neither a folder nor a Hub model id that could be loaded
    ends as one `OptionError` line instead of the Hub client's traceback."""
    try:
        yield
    except OSError as error:
        if Path(name_or_path).exists():
            raise
        if constants.HF_HUB_OFFLINE:  # the Hub client's reason would only say that it could not connect
            reason = " (HF_HUB_OFFLINE is set: only models in the cache load)"
        else:
            reason = ": " + str(error).splitlines()[0].rstrip(".")
        raise OptionError(
            f"{option} {name_or_path!r}: no such folder, and not a Hub model id that could be loaded{reason}."
        ) from error

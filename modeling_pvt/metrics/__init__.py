"""Evaluation metrics that ship with `modeling_pvt` as `evaluate` modules, so they load without the Hub."""

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent


def metric_path(name: str) -> Path:
    """The folder of the shipped metric module `name` (e.g. `"accuracy"`), for `evaluate.load`."""
    folder = METRICS_DIR / name
    if not (folder / f"{name}.py").is_file():
        available = sorted(path.name for path in METRICS_DIR.iterdir() if (path / f"{path.name}.py").is_file())
        raise ValueError(f"No metric named {name!r} ships with modeling_pvt; available: {available}.")
    return folder


def load_metric(name: str, **kwargs):
    """Load the shipped `evaluate` metric module `name` offline; `kwargs` go to `evaluate.load`."""
    import evaluate

    return evaluate.load(str(metric_path(name)), **kwargs)


__all__ = ["METRICS_DIR", "load_metric", "metric_path"]

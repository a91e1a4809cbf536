"""Commands for training and evaluation: train clip, eval, plot-metrics, shards.

`polymodal train clip`'s options are generated from `TrainConfig`'s fields (name, type,
help), so the config dataclass is the one place an option is defined.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from pathlib import Path

import typer

from polymodal.cli import JSON, MODEL, _console, _emit, _progress, app, command, say
from polymodal.train.config import TrainConfig

train_app = typer.Typer(help="Train a model (under torchrun too: torchrun ... -m polymodal train clip ...).",
                        no_args_is_help=True)
app.add_typer(train_app, name="train")


def _with_config_options(fn):
    """Give `fn(**kwargs)` one --option per TrainConfig field, each defaulting to None
    ("not given"), so explicit options override --config and nothing else does."""
    hints = typing.get_type_hints(TrainConfig)
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD]
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None -> X
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        flag = "--" + f.name.replace("_", "-")
        decls = [f"{flag}/--no-{f.name.replace('_', '-')}"] if hint is bool else [flag]
        option = typer.Option(None, *decls, help=f"{f.metadata.get('help', '')} [default: {f.default}]",
                              show_default=False)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=hint | None))
    fn.__signature__ = inspect.Signature(params)
    return fn


def recipe_path(name: str) -> Path:
    """A TrainConfig file: a path, or the name of a recipe shipped in polymodal/recipes/."""
    from importlib import resources

    if Path(name).is_file():
        return Path(name)
    shipped = Path(str(resources.files("polymodal") / "recipes" / f"{Path(name).stem}.json"))
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(f"{name}: no such TrainConfig file or recipe")


@command(name="clip", group=train_app)
@_with_config_options
def train_clip(
    out: Path = typer.Option(..., "--out", "-o", help="The run directory (resumed if it holds a checkpoint)."),
    config: str = typer.Option(None, "--config", "-c", help="A TrainConfig .json, or a recipe name "
                               "(default-clip); options given here override it."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    json_: bool = JSON,
    **options,
) -> None:
    """Train a CLIP contrastively on image-caption pairs (from scratch, or LiT with a frozen tower)."""
    from polymodal.train.trainer import train

    base = TrainConfig()
    if config is not None:
        base = TrainConfig.load(recipe_path(config))
    elif (out / "train_config.json").is_file():  # resuming: the run's own config
        base = TrainConfig.load(out / "train_config.json")
    cfg = base.replace(**{k: v for k, v in options.items() if v is not None})
    if not cfg.data:
        raise ValueError("--data: which image-caption data to train on (a folder or shards)")
    metrics = train(cfg, out, progress=progress and _progress())
    if json_:
        return _emit({"out": str(out), **metrics})
    typer.echo(f"trained {metrics.get('step')} steps, loss {metrics.get('loss', float('nan')):.4f} -> {out}")


@command(name="eval")
def evaluate(
    model: str = MODEL,
    data: Path = typer.Option(..., "--data", "-d", help="A folder with captions.jsonl (records may carry labels)."),
    split: str = typer.Option("test", "--split", help="Evaluate the records of this split ('' for all)."),
    label_key: str = typer.Option("category", "--label-key", help="The record field with the class label."),
    template: list[str] = typer.Option(None, "--template", help="Prompt templates, ensembled; repeatable."),
    where: list[str] = typer.Option(None, "--where", help="KEY=VALUE: only records with this field value; repeatable."),
    text_key: str = typer.Option(None, "--text-key", help="Query with this record field (e.g. name), not captions."),
    confusion: Path = typer.Option(None, "--confusion", help="Draw the confusion matrix to this PNG."),
    json_: bool = JSON,
) -> None:
    """Zero-shot classification accuracy and image<->text recall@1/5/10 on a held-out split."""
    import polymodal
    from polymodal.tasks.evaluate import TEMPLATES, evaluate_folder

    embedder = polymodal.load(model)
    filters = {}
    for item in where or []:
        if "=" not in item:
            raise ValueError(f"--where {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        filters[key] = value
    report = evaluate_folder(embedder, data, split=split or None, label_key=label_key,
                             templates=template or TEMPLATES, where=filters, text_key=text_key,
                             progress=_progress(), on_error=say)
    if confusion is not None and report.get("zero_shot"):
        from polymodal.viz import draw_similarity

        zs = report["zero_shot"]
        picture = draw_similarity(zs.confusion, zs.classes, zs.classes, None, "confusion (rows: true, cols: predicted)",
                                  fmt=".0f")
        confusion.parent.mkdir(parents=True, exist_ok=True)
        picture.save(confusion)
    doc = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in report.items()}
    if json_:
        return _emit(doc)
    console = _console()
    if report.get("zero_shot"):
        console.print(f"zero-shot accuracy ({label_key}): {report['zero_shot'].accuracy:.3f}")
    for k, v in report["retrieval"].items():
        console.print(f"{k}: {v:.3f}")


@command(name="plot-metrics")
def plot_metrics(
    run: Path = typer.Argument(..., help="A run directory (with metrics.jsonl), or the file itself."),
    out: Path = typer.Option(Path("curves.png"), "--out", "-o", help="The PNG to write."),
    key: list[str] = typer.Option(None, "--key", "-k", help="Metrics to plot (default: loss, lr, logit_scale)."),
    json_: bool = JSON,
) -> None:
    """Draw training curves from metrics.jsonl."""
    from polymodal.viz import draw_curves

    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no metrics logged yet")
    keys = key or [k for k in ("loss", "lr", "logit_scale") if k in rows[0]]
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_curves(rows, keys, title=str(run)).save(out)
    if json_:
        return _emit({"out": str(out), "steps": len(rows), "keys": keys})
    typer.echo(f"{len(rows)} points of {', '.join(keys)} -> {out}")


@command(name="shards")
def shards(
    src: Path = typer.Argument(..., help="A folder with captions.jsonl / .csv (or the captions file)."),
    out: Path = typer.Argument(..., help="The folder to write 000000.tar, 000001.tar, ... into."),
    per_shard: int = typer.Option(1000, "--per-shard", "-n", min=1, help="Samples (image-caption pairs) per shard."),
    seed: int = typer.Option(0, "--seed", help="Seeds the shuffle of samples across shards."),
    json_: bool = JSON,
) -> None:
    """Write WebDataset-style tar shards (key.png + key.txt) from a folder data set; a rerun completes a killed run."""
    from polymodal.data.shard_writer import write_shards

    written = write_shards(src, out, per_shard=per_shard, progress=_progress(), seed=seed)
    if json_:
        return _emit({"out": str(out), "shards": [str(p) for p in written]})
    typer.echo(f"{len(written)} shards -> {out}")

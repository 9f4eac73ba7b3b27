"""Helpers shared by the subcommands: argument types, model and data loading, output files.

Models and data are built-in names or the user's own, given as import paths of factories
(``--model mypkg.models:build --data mypkg.data:calibration_loader``, or ``file.py:build``):
each factory is called with no argument and returns the ``nn.Module`` / an iterable of
batches. The current directory is importable, as with ``python -m``.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from ..methods import METHODS, register_method
from ..models import MODEL_SPECS

#: --progress / --no-progress of every subcommand (the rule: :func:`woodfisher.progress.output_mode`).
PROGRESS_HELP = ("progress over every phase (default: a live line on a terminal, plain lines in a log or pipe for "
                 "phases over 1 s and every 30 s, off with TQDM_DISABLE=1; --progress: a line for every phase, "
                 "even with TQDM_DISABLE; --no-progress: none)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with each option's default appended, except where the help already says it
    (``(default: ...)``) or where there is none to show (None, a plain on/off flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is None or isinstance(
                action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line ``woodfisher: error: ... (see woodfisher CMD --help)``
    (exit code 2), like every other bad input of the CLI, instead of the whole usage block; its
    help lists the defaults (:class:`HelpFormatter`). Subparsers of a ``Parser`` are ``Parser`` too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"woodfisher: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(err) -> str:
    """The text of an error (or a message) on one line; the exception's type name when it has no text."""
    text = " ".join(str(err).split())
    return text if text else type(err).__name__


#: the library's function-valued options and the command line's flags that take them as import paths
FUNCTION_FLAGS = (("batch_adapter=", "--batch-adapter"), ("loss_fn=", "--loss"))


def cli_spelling(message: str) -> str:
    """What a message that suggests ``batch_adapter=...`` / ``loss_fn=...`` means on the command line ('' when it
    suggests neither): the function goes in a module of yours and the flag takes its import path."""
    flags = [flag for option, flag in FUNCTION_FLAGS if option in message]
    if not flags:
        return ""
    return (f" (on the command line: write it as a function in a module of yours and pass "
            f"{' / '.join(flag + ' MODULE:FUNCTION' for flag in flags)})")


def sparsity_type(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sparsity must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"sparsity must lie in [0, 1) (a fraction, e.g. 0.9), got {text}")
    return value


def sparsities_type(text: str) -> Union[float, Dict[str, float]]:
    """``prune --sparsity``: one fraction (``0.9``), or per-weight fractions as a JSON object
    (``'{"features.*": 0.9, "classifier": 0.5}'``) or ``name=fraction`` pairs joined by commas
    (``features.*=0.9,classifier=0.5``); keys as ``--modules`` takes names, values in [0, 1) (the API's
    ``sparsity`` dict, checked there)."""
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"sparsity: {text!r} is not a JSON object ({err})") from None
    elif "=" in text:
        value = {}
        for pair in text.split(","):
            key, sep, number = pair.partition("=")
            if not sep or not key.strip():
                raise argparse.ArgumentTypeError(f"sparsity: {pair!r} in {text!r} is not name=fraction")
            value[key.strip()] = number.strip()
    else:
        return sparsity_type(text)
    if not isinstance(value, dict) or not value:
        raise argparse.ArgumentTypeError(f"sparsity: {text!r} is no {{name: fraction}} object")
    out = {}
    for key, number in value.items():
        try:
            out[key] = float(number)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"sparsity[{key!r}] must be a number in [0, 1), got {number!r}") from None
        if not 0.0 <= out[key] < 1.0:
            raise argparse.ArgumentTypeError(f"sparsity[{key!r}] must lie in [0, 1) (a fraction), got {number}")
    return out


sparsities_type.takes_json_object = True  # a --config file may give the object itself


def _auto_or_positive(convert, what: str):
    """An argparse type: the string "auto", or ``convert(text)`` > 0."""
    def parse(text: str):
        if text == "auto":
            return "auto"
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number > 0 or 'auto', got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{what} must be > 0, got {text!r}")
        return value
    parse.__name__ = what.replace(" ", "_")
    return parse


damp_type = _auto_or_positive(float, "damp")
steps_type = _auto_or_positive(int, "num steps")


def block_size_type(text: str) -> Optional[Union[int, str]]:
    if text.lower() in ("layer", "none", "whole"):
        return None
    if text.lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"block size must be a positive int, 'auto' or 'layer', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"block size must be >= 1, got {value}")
    return value


def model_type(text: str) -> str:
    """A built-in model name or an import path ``package.module:factory`` / ``file.py:factory``."""
    if text in MODEL_SPECS or is_import_path(text):
        return text
    raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (built-in models: {', '.join(sorted(MODEL_SPECS))}; "
                                     "or your own as an import path 'package.module:factory' or 'file.py:factory')")


def method_type(text: str) -> str:
    """A registered method name, or the import path ``package.module:Class`` / ``file.py:Class`` of a
    :class:`woodfisher.methods.PruningMethod` (class or instance), registered by
    :func:`woodfisher.methods.register_method` and returned by its name."""
    if text in METHODS or not is_import_path(text):
        return text  # an unknown name: argparse's "invalid choice" lists the registered ones
    try:
        return register_method(load_object(text, "--method"), replace=True).name
    except (ValueError, FileNotFoundError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def is_import_path(text: Optional[str]) -> bool:
    return isinstance(text, str) and ":" in text


def add_model_args(p: argparse.ArgumentParser, checkpoint_help: str, *required_flags: Tuple[tuple, dict]) -> None:
    """The model and data flags; ``required_flags`` ((args, kwargs) of add_argument) join --model in the help
    group of required arguments, first in the usage line."""
    required = p.add_argument_group("required arguments (on the command line or in --config)")
    required.add_argument("--model", type=model_type, required=True, metavar="NAME|MODULE:FACTORY",
                          help=f"a built-in architecture ({', '.join(sorted(MODEL_SPECS))}) or your own: the import "
                               "path of a function that returns the nn.Module, e.g. mypkg.models:build or "
                               "models.py:build")
    for args, kwargs in required_flags:
        required.add_argument(*args, required=True, **kwargs)
    p.add_argument("--checkpoint", help=checkpoint_help + " (required for built-in models; optional for a "
                   "factory that loads its own weights)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow full unpickling of a checkpoint that weights_only loading refuses "
                        "(only for files you trust)")
    p.add_argument("--data", metavar="NAME|MODULE:FACTORY",
                   help="calibration data: a built-in dataset (mnist, cifar10, digits; default: the model's own) or "
                        "the import path of a function returning an iterable of batches, e.g. "
                        "mypkg.data:calibration_loader (tuples, dicts or tensors, see woodfisher.batches)")
    p.add_argument("--eval-data", metavar="MODULE:FACTORY",
                   help="held-out batches for your own model: import path of a function returning them; the mean "
                        "loss before and after is reported")
    p.add_argument("--loss", metavar="MODULE:FUNCTION",
                   help="import path of loss_fn(predictions, targets) (default: the model's own outputs.loss, "
                        "else cross-entropy)")
    p.add_argument("--batch-adapter", metavar="MODULE:FUNCTION",
                   help="import path of batch_adapter(loader item) -> woodfisher.Batch, for loaders the default "
                        "reading refuses as ambiguous")
    p.add_argument("--data-dir", help="directory with the dataset files (MNIST idx / CIFAR-10 python batches)")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="evaluate on a fixed random subset of this many test samples (default: all)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--input-shape", type=int, nargs="+", default=None, metavar="N",
                   help="one sample's shape, e.g. 3 32 32: the FLOPs columns of the sparsity table for your own "
                        "model (a built-in model's is known)")
    p.add_argument("--config", help="JSON file of option values (flags override it); it may name --model, "
                   "--data, ... too")


def require(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) is None:
            raise ValueError(f"--{name.replace('_', '-')} is required (on the command line or in --config)")


def load_object(path: str, flag: str) -> Any:
    """The object named by ``package.module:attr`` or ``path/to/file.py:attr`` (ValueError naming ``flag``)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{flag} {path!r}: expected an import path 'package.module:name' or 'file.py:name'")
    if module_name.endswith(".py") or os.sep in module_name:
        if not os.path.isfile(module_name):
            raise FileNotFoundError(f"{flag} {path!r}: file {module_name!r} not found")
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(module_name))[0],
                                                      module_name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:  # the console script does not add it
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"{flag} {path!r}: cannot import module {module_name!r} ({err})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{flag} {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def call_factory(path: str, flag: str) -> Any:
    """Call the function named by import path ``path`` with no arguments."""
    factory = load_object(path, flag)
    if not callable(factory):
        raise ValueError(f"{flag} {path!r} is a {type(factory).__name__}, not a function to call")
    return factory()


def load_model(args: argparse.Namespace):
    """(built-in ModelSpec or None, model on ``args.device``) for a built-in name or a factory import path."""
    from ..checkpoint import load_checkpoint

    require(args, "model")
    if is_import_path(args.model):
        model = call_factory(args.model, "--model")
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"--model {args.model!r} returned a {type(model).__name__}, not a torch.nn.Module")
        spec = None
    else:
        require(args, "checkpoint")
        spec = MODEL_SPECS[args.model]
        model = spec.factory()
    if args.checkpoint is not None:
        load_checkpoint(model, args.checkpoint, trust_pickle=args.trust_pickle)
    return spec, model.to(args.device)


def factory_loader(args: argparse.Namespace) -> Optional[Any]:
    """The batches of the --data factory (a fresh call), or None when --data is not an import path."""
    if not is_import_path(args.data):
        return None
    loader = call_factory(args.data, "--data")
    if loader is None or not hasattr(loader, "__iter__"):
        raise ValueError(f"--data {args.data!r} returned {type(loader).__name__}, not an iterable of batches")
    return loader


def user_functions(args: argparse.Namespace, spec) -> Dict[str, Any]:
    """loss_fn and batch_adapter from --loss / --batch-adapter (a built-in model's loss by default)."""
    out = {"loss_fn": spec.loss_fn if spec is not None else None, "batch_adapter": None}
    for key, flag in (("loss_fn", "--loss"), ("batch_adapter", "--batch-adapter")):
        path = getattr(args, flag[2:].replace("-", "_"))
        if path is not None:
            out[key] = load_object(path, flag)
            if not callable(out[key]):
                raise ValueError(f"{flag} {path!r} is not callable")
    return out


def dataset_name(args: argparse.Namespace, spec) -> Optional[str]:
    """The built-in dataset to use, or None when --data is a factory (or absent for a factory model)."""
    from ..data import DATA_SHAPES

    if is_import_path(args.data):
        return None
    if args.data is not None and args.data not in DATA_SHAPES:
        raise ValueError(f"--data {args.data!r} is neither a built-in dataset ({', '.join(sorted(DATA_SHAPES))}) "
                         "nor an import path 'package.module:factory'")
    if spec is None:
        return args.data
    data = args.data or spec.dataset
    if DATA_SHAPES[data] != spec.input_shape:
        raise ValueError(f"--data {data} (inputs {DATA_SHAPES[data]}) does not fit --model {args.model} "
                         f"(inputs {spec.input_shape})")
    return data


def evaluator(args: argparse.Namespace, data: Optional[str], functions: Dict[str, Any]):
    """(metric name, model -> value, test samples or None) for the before / after evaluation, or Nones.

    --eval-data: the held-out mean loss (a fresh loader per evaluation, so single-pass
    factories work); a built-in dataset at hand: the test accuracy.
    """
    if args.eval_data is not None:
        from ..tuning import heldout_loss

        def loss(model):
            return heldout_loss(model, call_factory(args.eval_data, "--eval-data"), functions["loss_fn"],
                                functions["batch_adapter"])
        return "loss", loss, None
    if data is not None and (data == "digits" or args.data_dir is not None):
        from ..data import evaluate

        test = test_set(args, data)
        return "accuracy", (lambda model: evaluate(model, test, device=args.device)), len(test)
    return None, None, None


def test_set(args: argparse.Namespace, data: str):
    from ..data import load_dataset, subset

    if args.eval_samples is not None and args.eval_samples < 1:
        raise ValueError(f"--eval-samples must be >= 1, got {args.eval_samples}")
    # fixed split and subset (seed 0): --seed only drives the pruning's sampling
    return subset(load_dataset(data, args.data_dir, "test"), args.eval_samples, seed=0)


def make_out_dir(out: str) -> None:
    """Check the ``--out`` folder before any work, so that a path that cannot be one fails in a second,
    not after the pruning or training. Nothing is created here: the folder is made when the outputs are
    written, so a run that fails (a wrong checkpoint, a bad option) leaves no empty folder behind.

    Raises:
        ValueError: ``out`` names a file, a parent of it is a file, or the nearest existing parent is not
            writable (naming ``--out`` and why).
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file; it must be a folder (created if missing)")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--out {out!r}: the folder cannot be created ({parent!r} is a file)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out!r}: the folder cannot be written ({parent!r} is not writable)")


def metric_values(metric: Optional[str], **values) -> dict:
    """``{"<metric>_<when>": value}`` for report.json; empty without a metric (no ``None_before`` keys)."""
    return {f"{metric}_{when}": value for when, value in values.items()} if metric else {}


def write_outputs(out: str, rows, report: Dict, title: str, model=None, masks=None) -> List[str]:
    """Write sparsity.md, report.json, layer_sparsity.png (without matplotlib: skipped with a note) and pruned.pt /
    masks.pt when given."""
    from ..checkpoint import save_state_dict
    from ..reports import format_table, plot_layer_sparsity, plots_available, skip_plots, write_json

    os.makedirs(out, exist_ok=True)
    files = []
    if model is not None:
        files.append(save_state_dict(model, os.path.join(out, "pruned.pt")))
    if masks is not None:
        torch.save({k: v.detach().cpu() for k, v in masks.items()}, os.path.join(out, "masks.pt"))
        files.append(os.path.join(out, "masks.pt"))
    with open(os.path.join(out, "sparsity.md"), "w") as f:
        f.write(format_table(rows, title=title))
    files += [os.path.join(out, "sparsity.md"), write_json(os.path.join(out, "report.json"), report)]
    if not plots_available():
        skip_plots(["layer_sparsity.png"])
        return files
    return files + [plot_layer_sparsity({title: rows}, os.path.join(out, "layer_sparsity.png"), title=title)]

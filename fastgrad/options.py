"""The training options every command shares (`fastgrad train` and the experiments), and the TrainConfig
they make."""
import argparse
import math

from .train import MODEL_DEFAULTS, MODELS, TrainConfig


# argument types: argparse names the option as the user can type it ("argument -l/--learning-rate: ...")
def positive_int(text):
    value = _parse(int, text, 'a positive integer')
    if value <= 0:
        raise argparse.ArgumentTypeError(f'must be a positive integer, not {text}')
    return value


def natural_int(text):
    value = _parse(int, text, 'an integer >= 0')
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be an integer >= 0, not {text}')
    return value


def positive_float(text):
    value = _parse(float, text, 'a positive finite number')
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f'must be a positive finite number, not {text}')
    return value


def momentum(text):
    value = _parse(float, text, 'a number in [0, 1)')
    if not 0 <= value < 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f'must be a number in [0, 1), not {text}')
    return value


def _parse(kind, text, says):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'must be {says}, not {text!r}') from None


def _per_model(setting):
    return '(default: ' + ', '.join(f'{d[setting]:g} for --model {m}' if isinstance(d[setting], float) else
                                    f'{d[setting]} for --model {m}' for m, d in MODEL_DEFAULTS.items()) + ')'


def add_training_options(parser, grid=False):
    """The options every training command shares (vugrad's names where vugrad had them); a grid (the
    sweep) takes its own lists of learning rates, momenta and epochs."""
    parser.add_argument('-D', '--dataset', choices=['synth', 'mnist'], default='synth')
    parser.add_argument('--model', choices=list(MODELS), default='mlp',
                        help='mlp (default), or lenet: LeNet-5 on 28x28 images (-D mnist)')
    parser.add_argument('-b', '--batch-size', type=positive_int, default=None, help=_per_model('batch_size'))
    if not grid:
        parser.add_argument('-e', '--epochs', type=positive_int, default=20)
        parser.add_argument('-l', '--learning-rate', dest='lr', type=positive_float, default=None,
                            help='the learning rate ' + _per_model('lr'))
        parser.add_argument('--momentum', type=momentum, default=0.9, help='SGD momentum (default 0.9)')
    parser.add_argument('--optimizer', choices=['sgd', 'adam'], default='sgd')
    parser.add_argument('--schedule', choices=['constant', 'step', 'cosine'], default=None,
                        help='learning rate per epoch: constant, step (x --gamma every --step-size epochs) or '
                             'cosine (from the learning rate down to 0 over the epochs) ' + _per_model('schedule'))
    parser.add_argument('--step-size', type=positive_int, metavar='N', help='epochs between two decays of --schedule step '
                        '(default: a third of the epochs)')
    parser.add_argument('--gamma', type=positive_float, default=0.1, help='the decay factor of --schedule step (default 0.1)')
    parser.add_argument('--hidden', type=positive_int, nargs='+', metavar='N',
                        help='hidden layer sizes (default: 4 x the input size, as vugrad)')
    parser.add_argument('--dtype', choices=['float32', 'float64'], default='float32')
    parser.add_argument('--seed', type=natural_int, default=0)
    parser.add_argument('--final', action='store_true', help='train on all 60k MNIST images, validate on the test set')
    parser.add_argument('--data-dir', help='a folder with the four IDX files (e.g. Fashion-MNIST)')
    parser.add_argument('--eager', action='store_true',
                        help='run each training step op by op in Python instead of as one compiled numba call')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar, even on a terminal')


def config_from(args, **overrides):
    fields = {f: getattr(args, f) for f in TrainConfig.__dataclass_fields__ if hasattr(args, f)}
    fields.update(overrides)
    return TrainConfig(**fields)


def positive(parser, args, *names):
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f'--{name.replace("_", "-")} must be positive')


def show_defaults(parser):
    """Adds '(default: ...)' to the help of every option of parser and its sub-commands that has a default
    worth showing and does not describe it already (argparse's ArgumentDefaultsHelpFormatter skips options
    without a help text and shows False for flags)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                show_defaults(sub)
        elif (action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS))
              and 'default' not in (action.help or '') and action.help != argparse.SUPPRESS):
            action.help = f'{action.help} (default: %(default)s)' if action.help else 'default: %(default)s'

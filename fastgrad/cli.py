"""The `fastgrad` command: `fastgrad train ...` (and `python -m fastgrad train ...`)."""
import argparse
import errno
import json
import os
import signal
import sys

from . import __version__
from .files import atomic_open, check_output_file, check_output_folder, folder_lock, remove_stale_temporaries
from .experiments import add_experiment_commands
from .options import add_training_options, config_from, positive, show_defaults
from .plots import plot_curves, plot_format
from .train import CHECKPOINT_FILE, TrainingDiverged, train


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one `fastgrad: ...` line (exit status 2) like every other error here."""

    def error(self, message):
        self.exit(2, f'fastgrad: {message} (see {self.prog} --help)\n')


def check_plot(path):
    check_output_file('--plot', path)
    try:
        plot_format(path)
    except ValueError as e:
        raise ValueError(f'--plot {path}: {e}') from None


def build_parser():
    parser = Parser(prog='fastgrad', description='fastgrad: a small, fast autodiff engine.')
    parser.add_argument('--version', action='version', version=f'fastgrad {__version__}')
    commands = parser.add_subparsers(dest='command', title='commands')

    p = commands.add_parser('train', help='train an MLP on synth or MNIST',
                            description='Train an MLP classifier, printing accuracy and loss per epoch.')
    add_training_options(p)
    p.add_argument('--activation', choices=['sigmoid', 'relu', 'tanh'], default='relu')
    p.add_argument('--log', metavar='FILE', help='write one JSON object per epoch to FILE')
    p.add_argument('--plot', metavar='FILE.png', help='plot validation accuracy and loss per epoch')
    p.add_argument('--checkpoint', metavar='DIR', help='save model, optimizer and RNG after every epoch')
    p.add_argument('--resume', action='store_true', help='continue from the last complete epoch in --checkpoint')
    p.set_defaults(run=run_train)

    add_experiment_commands(commands)
    show_defaults(parser)
    return parser


def write_json_lines(path, records):
    with atomic_open(path) as f:
        for record in records:
            f.write(json.dumps(record) + '\n')


def print_epoch(record):
    print(f'epoch {record["epoch"]:03}')
    print(f'       accuracy: {record["val_accuracy"]:.4f}')
    print(f'   running loss: {record["train_loss"]:.3e}', flush=True)


def run_train(parser, args):
    positive(parser, args, 'batch_size', 'epochs', 'lr', 'step_size', 'gamma')
    if args.resume and not args.checkpoint:
        parser.error('--resume needs --checkpoint DIR')
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error('--plot needs matplotlib: pip install "fastgrad[plot]"')
    config = config_from(args)
    if args.log:
        check_output_file('--log', args.log)
    if args.plot:
        check_plot(args.plot)
    if args.checkpoint:
        check_output_folder('--checkpoint', args.checkpoint)
        with folder_lock(args.checkpoint):  # a second run into the folder fails at once, naming this one
            remove_stale_temporaries(args.checkpoint)  # a kill -9 mid-write leaves one; no one else writes here
            return _run_train(args, config)
    return _run_train(args, config)


def _run_train(args, config):
    if args.resume and not os.path.exists(os.path.join(args.checkpoint, CHECKPOINT_FILE)):
        print(f'no checkpoint in {args.checkpoint} yet: starting from epoch 0', file=sys.stderr, flush=True)

    def on_epoch(record, history):
        _stop['saved_epoch'] = record['epoch'] if args.checkpoint else None
        print_epoch(record)
        if args.log:
            write_json_lines(args.log, history)

    summary = train(config, on_epoch=on_epoch, checkpoint=args.checkpoint, resume=args.resume,
                    progress=not args.no_progress and sys.stderr.isatty(), should_stop=stop_requested)
    if args.plot and summary['history']:
        plot_curves({config.activation: summary['history']}, args.plot,
                    title=f'{config.dataset}, {config.activation}')
    if args.log:
        write_json_lines(args.log, summary['history'])
    print(f'\nbest accuracy {summary["best_accuracy"]:.4f}, final accuracy {summary["final_accuracy"]:.4f}, '
          f'{summary["seconds"]:.3g} s training, {summary["samples_per_second"]:,.0f} samples/s')
    for what, path in (('log', args.log), ('plot', args.plot if summary['history'] else None),
                       ('checkpoint', args.checkpoint and os.path.join(args.checkpoint, CHECKPOINT_FILE))):
        if path:
            print(f'{what:>10}: {os.path.abspath(path)}')
    return 0


_stop = {'requested': False}


def _request_stop(signum, frame):
    """Ctrl-C or SIGTERM: stop at the end of the current step (an exception raised inside a numba kernel
    would surface as a SystemError); a second one stops at once."""
    if _stop['requested']:
        raise KeyboardInterrupt
    _stop['requested'] = True


def stop_requested():
    return _stop['requested']


def resume_hint(folder):
    """What an interrupted run left to resume from, for the line after 'interrupted'."""
    if not folder:
        return ''
    if not os.path.exists(os.path.join(folder, CHECKPOINT_FILE)):
        return ('; no epoch was saved (a checkpoint is written at the end of each epoch), so there is nothing '
                'to resume: run again from the start')
    saved = _stop.get('saved_epoch')
    what = f'holds epochs 0-{saved}' if saved is not None else 'holds the epochs saved before this run'
    return f'; {folder} {what}: resume with --resume --checkpoint {folder} (and the same other options)'


# the user's path or file is at fault (exit 2, as for bad arguments); others (a full disk) are exit 1
USER_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.EROFS}


def describe(e):
    """An OSError in one line, naming its file."""
    if e.filename is not None:
        return f'{e.filename}: {e.strerror or e}'
    return e.strerror or str(e)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    _stop['requested'], _stop['saved_epoch'] = False, None
    previous = {sig: signal.signal(sig, _request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return args.run(parser, args)
    except KeyboardInterrupt:
        print(f'\ninterrupted{resume_hint(getattr(args, "checkpoint", None))}', file=sys.stderr)
        return 130
    except TrainingDiverged as e:
        print(f'fastgrad: {e}', file=sys.stderr)
        return 1
    except ValueError as e:  # bad arguments, paths or files (named in the message), found before any work
        print(f'fastgrad: {e}', file=sys.stderr)
        return 2
    except OSError as e:
        print(f'fastgrad: {describe(e)}', file=sys.stderr)
        return 2 if isinstance(e, FileNotFoundError) or e.errno in USER_ERRNOS else 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

"""The course report's experiments as commands: `fastgrad experiment activations` and `... sweep`.

activations: the same MLP (same data, seed, initial weights, hyperparameters) trained with sigmoid and
with relu. sweep: one model per (lr, momentum, epochs), on Dask when it is installed (a local cluster, or
an existing one with --scheduler), one after another in-process otherwise. Every configuration is seeded,
so results do not depend on the number of workers or the order they finish in.
"""
import csv
import dataclasses
import itertools
import os
import sys
import time

from .files import atomic_open, check_output_file, check_output_folder
from .options import add_training_options, config_from, momentum, positive, positive_float, positive_int
from .plots import plot_curves
from .train import TrainingDiverged, train

ACTIVATIONS_COLUMNS = ['epoch', 'activation', 'val_accuracy', 'train_loss']
SWEEP_COLUMNS = ['lr', 'momentum', 'epochs', 'val_accuracy', 'train_loss', 'seconds', 'error']


def add_experiment_commands(commands):
    experiment = commands.add_parser('experiment', help="the course report's experiments",
                                     description="The course report's experiments.")
    kinds = experiment.add_subparsers(dest='experiment', title='experiments', required=True)

    p = kinds.add_parser('activations', help='sigmoid vs relu: accuracy and loss per epoch, CSV and figure')
    add_training_options(p)
    p.add_argument('--out', default='.', metavar='DIR', help='folder for activations.csv and activations.png')
    p.set_defaults(run=run_activations)

    p = kinds.add_parser('sweep', help='train one model per lr x momentum x epochs; CSV and Markdown table')
    add_training_options(p, grid=True)
    p.add_argument('--activation', choices=['sigmoid', 'relu', 'tanh'], default='relu')  # as train's
    p.add_argument('--lr', type=positive_float, nargs='+', required=True, metavar='L')
    p.add_argument('--momentum', type=momentum, nargs='+', required=True, metavar='M')
    p.add_argument('--epochs', type=positive_int, nargs='+', required=True, metavar='E')
    p.add_argument('--workers', type=positive_int, default=os.cpu_count(), help='Dask worker processes (local cluster)')
    p.add_argument('--scheduler', metavar='ADDRESS', help='submit to an existing Dask cluster instead')
    p.add_argument('--out', default='.', metavar='DIR', help='folder for sweep.csv and sweep.md')
    p.set_defaults(run=run_sweep)


def write_csv(path, columns, rows):
    with atomic_open(path, newline='') as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction='ignore')
        writer.writeheader()
        writer.writerows(rows)


# -- sigmoid vs relu
def still_epochs(history, digits=4):
    """Runs of epochs (first, last) over which the validation accuracy did not change."""
    runs, start = [], 0
    accuracies = [round(r['val_accuracy'], digits) for r in history]
    for k in range(1, len(accuracies) + 1):
        if k == len(accuracies) or accuracies[k] != accuracies[start]:
            if k - 1 > start:
                runs.append((history[start]['epoch'], history[k - 1]['epoch']))
            start = k
    return runs


def run_activations(parser, args):
    check_output_folder('--out', args.out)
    for name in ('activations.csv', 'activations.png'):
        check_output_file('--out', os.path.join(args.out, name))
    curves, rows = {}, []
    for activation in ('sigmoid', 'relu'):
        # one initialisation for both (Glorot, vugrad's), so that only the activation differs
        config = config_from(args, activation=activation, init='glorot')
        summary = train(config, progress=not args.no_progress and sys.stderr.isatty())
        curves[activation] = summary['history']
        rows += [dict(r, activation=activation) for r in summary['history']]
        print(f'{activation:>7}: final accuracy {summary["final_accuracy"]:.4f}, final running loss '
              f'{summary["history"][-1]["train_loss"]:.3e}', flush=True)
    write_csv(os.path.join(args.out, 'activations.csv'), ACTIVATIONS_COLUMNS, rows)
    plot_curves(curves, os.path.join(args.out, 'activations.png'),
                title=f'sigmoid vs relu, {args.dataset}, lr {args.lr}, momentum {args.momentum}')
    runs = still_epochs(curves['sigmoid'])
    if runs:
        print('sigmoid accuracy sat still over epochs ' + ', '.join(
            f'{a}-{b} (at {curves["sigmoid"][a]["val_accuracy"]:.4f})' for a, b in runs))
    else:
        print('sigmoid accuracy changed every epoch')
    print(f'wrote {os.path.join(args.out, "activations.csv")} and {os.path.join(args.out, "activations.png")}')
    return 0


# -- the hyperparameter sweep
def run_configuration(config):
    """Trains one configuration; failures come back as rows with an error, never as exceptions."""
    row = {'lr': config.lr, 'momentum': config.momentum, 'epochs': config.epochs}
    start = time.perf_counter()
    try:
        summary = train(config)
        row.update(val_accuracy=summary['final_accuracy'], train_loss=summary['history'][-1]['train_loss'], error='')
    except TrainingDiverged as e:
        row.update(val_accuracy=float('nan'), train_loss=float('nan'), error=str(e))
    except Exception as e:  # a sweep keeps going: the row says what went wrong
        row.update(val_accuracy=float('nan'), train_loss=float('nan'), error=f'{type(e).__name__}: {e}')
    row['seconds'] = time.perf_counter() - start
    return row


def sweep_configs(base, lrs, momenta, epochs):
    return [dataclasses.replace(base, lr=lr, momentum=m, epochs=e) for lr, m, e in itertools.product(lrs, momenta, epochs)]


def run_in_process(configs):
    for config in configs:
        yield run_configuration(config)


def run_on_dask(configs, workers, scheduler):
    from dask.distributed import Client, LocalCluster, as_completed
    cluster = None if scheduler else LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                  dashboard_address=None)
    client = connect(Client, scheduler) if scheduler else Client(cluster)
    try:
        futures = [client.submit(run_configuration, c, pure=False) for c in configs]
        for future in as_completed(futures):
            yield future.result()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


SCHEDULER_TIMEOUT = 5  # seconds to wait for an existing --scheduler to answer


def connect(Client, address, timeout=SCHEDULER_TIMEOUT):
    """A Dask client of the scheduler at `address`, or one ValueError naming the address: within `timeout`
    seconds, whatever answers there (nothing, or a server speaking another protocol)."""
    import logging
    quiet = [logging.getLogger(name) for name in ('distributed', 'distributed.comm', 'distributed.client',
                                                   'distributed.core')]
    levels = [logger.level for logger in quiet]
    for logger in quiet:  # distributed logs each failed attempt; the one line below says what happened
        logger.setLevel(logging.CRITICAL)
    try:
        return Client(address, timeout=timeout)
    except Exception as e:  # OSError, TimeoutError, ValueError, and MemoryError from a foreign protocol
        if isinstance(e, MemoryError):  # read a length from a server that speaks another protocol
            raise ValueError(f'--scheduler {address}: something answered, but not a Dask scheduler ({e})') from None
        why = f'{type(e).__name__}: {e}'.strip().rstrip(':')
        raise ValueError(f'--scheduler {address}: no Dask scheduler answered within {timeout} s ({why})') from None
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def sweep(configs, workers=1, scheduler=None, on_row=None):
    """Runs configs (on Dask when it is installed) and returns their rows in the order they finished."""
    try:
        import dask.distributed  # noqa: F401
        rows_iter = run_on_dask(configs, workers, scheduler)
    except ImportError:
        if scheduler:
            raise ValueError('--scheduler needs Dask: pip install "fastgrad[dask]"') from None
        print('Dask is not installed (pip install "fastgrad[dask]"): running the configurations one after '
              'another in this process', file=sys.stderr)
        rows_iter = run_in_process(configs)
    rows = []
    for row in rows_iter:
        rows.append(row)
        if on_row:
            on_row(row, rows)
    return rows


def markdown_table(rows):
    """The report's table: sorted by validation accuracy, best marked, failures last with their error."""
    ok = sorted((r for r in rows if not r['error']), key=lambda r: -r['val_accuracy'])
    failed = [r for r in rows if r['error']]
    lines = ['| lr | momentum | epochs | validation accuracy | running loss | seconds | |',
             '|---|---|---|---|---|---|---|']
    for k, r in enumerate(ok + failed):
        acc = f'{r["val_accuracy"]:.4f}' if not r['error'] else 'failed'
        loss = f'{r["train_loss"]:.3e}' if not r['error'] else ''
        mark = '**best**' if k == 0 and ok else r['error']
        lines.append(f'| {r["lr"]:g} | {r["momentum"]:g} | {r["epochs"]} | {acc} | {loss} | {r["seconds"]:.1f} | {mark} |')
    return '\n'.join(lines) + '\n'


def run_sweep(parser, args):
    positive(parser, args, 'batch_size', 'workers', 'step_size', 'gamma')
    if any(e <= 0 for e in args.epochs) or any(lr <= 0 for lr in args.lr):
        parser.error('--lr and --epochs values must be positive')
    base = config_from(args, lr=args.lr[0], momentum=args.momentum[0], epochs=args.epochs[0])
    configs = sweep_configs(base, args.lr, args.momentum, args.epochs)
    check_output_folder('--out', args.out)
    csv_path, md_path = os.path.join(args.out, 'sweep.csv'), os.path.join(args.out, 'sweep.md')
    for path in (csv_path, md_path):
        check_output_file('--out', path)
    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=len(configs), desc='sweep')

    def on_row(row, rows):
        write_csv(csv_path, SWEEP_COLUMNS, rows)  # rewritten whole on every arrival: an interrupted sweep keeps them
        if bar is not None:
            bar.update()
        else:
            result = f'accuracy {row["val_accuracy"]:.4f}' if not row['error'] else f'failed: {row["error"]}'
            print(f'[{len(rows)}/{len(configs)}] lr {row["lr"]:g}, momentum {row["momentum"]:g}, '
                  f'epochs {row["epochs"]}: {result} ({row["seconds"]:.1f} s)', flush=True)

    rows = sweep(configs, workers=args.workers, scheduler=args.scheduler, on_row=on_row)
    if bar is not None:
        bar.close()
    table = markdown_table(rows)
    with atomic_open(md_path) as f:
        f.write(table)
    print('\n' + table + f'\nwrote {csv_path} and {md_path}')
    return 0

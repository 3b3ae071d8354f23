"""Figures of training curves (matplotlib, imported only when a figure is drawn)."""
import os

from .files import atomic_open


def plot_format(path):
    """The file format `path`'s extension names, as matplotlib's savefig reads it (PNG without one);
    ValueError for a format matplotlib does not write."""
    from matplotlib.backend_bases import FigureCanvasBase
    ext = os.path.splitext(os.fspath(path))[1][1:].lower()
    if not ext:
        return 'png'
    formats = FigureCanvasBase.get_supported_filetypes()
    if ext not in formats:
        raise ValueError(f'format {ext!r} is not one matplotlib writes; use one of {", ".join(sorted(formats))}')
    return ext


def plot_curves(curves, path, title=None):
    """Validation accuracy and training loss per epoch, one line per curve: curves = {label: history}.
    The format is the one path's extension names (PNG without one), as in matplotlib's savefig. Epoch ticks
    are whole numbers. Returns the (closed) figure."""
    try:
        fmt = plot_format(path)
    except ValueError as e:
        raise ValueError(f'{os.fspath(path)}: {e}') from None
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, history in curves.items():
        epochs = [r['epoch'] for r in history]
        left.plot(epochs, [r['val_accuracy'] for r in history], marker='.', label=label)
        right.plot(epochs, [r['train_loss'] for r in history], marker='.', label=label)
    left.set(xlabel='epoch', ylabel='validation accuracy', title='validation accuracy')
    right.set(xlabel='epoch', ylabel='running loss (summed over the epoch)', title='training loss', yscale='log')
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no 2.5 ticks
        ax.legend()
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_open(path, 'wb') as f:
        fig.savefig(f, format=fmt, dpi=100)
    plt.close(fig)
    return fig  # closed, but its axes can still be read

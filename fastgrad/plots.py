"""Figures of training curves (matplotlib, imported only when a figure is drawn)."""
from .files import atomic_open


def plot_curves(curves, path, title=None):
    """Validation accuracy and training loss per epoch, one line per curve: curves = {label: history}."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, history in curves.items():
        epochs = [r['epoch'] for r in history]
        left.plot(epochs, [r['val_accuracy'] for r in history], marker='.', label=label)
        right.plot(epochs, [r['train_loss'] for r in history], marker='.', label=label)
    left.set(xlabel='epoch', ylabel='validation accuracy', title='validation accuracy')
    right.set(xlabel='epoch', ylabel='running loss (summed over the epoch)', title='training loss', yscale='log')
    for ax in (left, right):
        ax.legend()
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_open(path, 'wb') as f:
        fig.savefig(f, format='png', dpi=100)
    plt.close(fig)

"""Training a classifier (an MLP, or LeNet-5 on images) on synth or MNIST: the loop behind `fastgrad train` and the experiments.

Everything random comes from one seed: the initial weights and the order of the batches. With a
checkpoint folder, the model, the optimizer, the shuffling RNG, the epoch and the log are written
atomically after every epoch, so a run resumed after epoch k ends exactly as an uninterrupted one.
"""
import dataclasses
import json
import os
import time

import numpy as np

from . import data as datasets
from .compiled import compile
from .core import TensorNode, no_grad
from .files import Member, load_npz, save_npz
from .functions import cross_entropy
from .conv import LeNet, warm as warm_conv
from .modules import MLP
from .optim import SGD, Adam, CosineAnnealingLR, StepLR
from .warmup import announce_compiles, warmup

CHECKPOINT_FILE = 'checkpoint.npz'
RESUMABLE_CHANGES = ('epochs', 'eager')  # settings a run may change when it resumes
MODELS = ('mlp', 'lenet')
# each model's defaults for the settings left at None: LeNet learns best from smaller batches and a
# cosine schedule (5 epochs on MNIST: 99.1 % here, against 98.9 % at batch 128 and 98.5 % with a constant rate)
MODEL_DEFAULTS = {'mlp': {'lr': 0.01, 'batch_size': 128, 'schedule': 'constant'},
                  'lenet': {'lr': 0.05, 'batch_size': 64, 'schedule': 'cosine'}}
CHUNK_BATCHES = 64  # a compiled epoch runs this many batches per call, between progress and Ctrl-C checks


@dataclasses.dataclass
class TrainConfig:
    dataset: str = 'synth'
    model: str = 'mlp'         # or 'lenet' (images only)
    batch_size: int = None     # None: the model's default (MODEL_DEFAULTS), as for lr and schedule
    epochs: int = 20
    lr: float = None
    momentum: float = 0.9
    optimizer: str = 'sgd'
    activation: str = 'relu'
    init: str = None           # None: He for relu, Glorot otherwise
    hidden: list = None        # None: vugrad's default, 4 x the number of input features
    dtype: str = 'float32'
    seed: int = 0
    final: bool = False
    data_dir: str = None
    schedule: str = None        # 'constant', or 'step' (lr x gamma every step_size epochs), 'cosine' (to 0 over the epochs)
    step_size: int = None       # None: a third of the epochs
    gamma: float = 0.1
    eager: bool = False         # run each step op by op in Python instead of as one compiled call

    def __post_init__(self):
        for name, value in MODEL_DEFAULTS.get(self.model, MODEL_DEFAULTS['mlp']).items():
            if getattr(self, name) is None:
                setattr(self, name, value)


class TrainingDiverged(FloatingPointError):
    """The training loss stopped being a finite number."""


def load_data(config):
    if config.model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, not {config.model!r}")
    if config.dataset == 'synth':
        if config.model == 'lenet':
            raise ValueError('--model lenet needs images: use -D mnist (or --data-dir with IDX images)')
        return datasets.load_synth(seed=config.seed, dtype=config.dtype)
    if config.dataset == 'mnist':
        return datasets.load_mnist(final=config.final, data_dir=config.data_dir, dtype=config.dtype,
                                   flatten=config.model == 'mlp')
    raise ValueError(f"dataset must be 'synth' or 'mnist', not {config.dataset!r}")


def build(config, num_features, num_classes):
    """The model, its optimizer and the shuffling RNG, all from config.seed. num_features: an int for the
    MLP, the shape of one image (C, H, W) for LeNet."""
    init_seed, shuffle_seed = np.random.SeedSequence(config.seed).spawn(2)
    if config.model == 'lenet':
        if config.hidden:
            raise ValueError('--hidden sets the MLP\'s hidden layers; LeNet\'s are fixed (--model lenet)')
        channels, height, width = num_features
        if height != width:
            raise ValueError(f'--model lenet takes square images, not {height}x{width}')
        model = LeNet(num_classes, in_channels=channels, image_size=height, activation=config.activation,
                      dtype=np.dtype(config.dtype), rng=np.random.default_rng(init_seed))
        warm_conv(config.dtype)  # fastgrad.warmup() leaves the conv kernels out: compile or load them now
    else:
        hidden = config.hidden if config.hidden else [4 * num_features]
        model = MLP(num_features, num_classes, hidden=list(hidden), activation=config.activation,
                    dtype=np.dtype(config.dtype), rng=np.random.default_rng(init_seed), init=config.init)
    if config.optimizer == 'sgd':
        optimizer = SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    elif config.optimizer == 'adam':
        optimizer = Adam(model.parameters(), lr=config.lr)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', not {config.optimizer!r}")
    return model, optimizer, np.random.default_rng(shuffle_seed)


def make_schedule(config, optimizer):
    """The learning-rate schedule config asks for (None for a constant rate); it steps once per epoch."""
    if config.schedule == 'constant':
        return None
    if config.schedule == 'step':
        return StepLR(optimizer, config.step_size or max(1, config.epochs // 3), gamma=config.gamma)
    if config.schedule == 'cosine':
        return CosineAnnealingLR(optimizer, config.epochs)
    raise ValueError(f"schedule must be 'constant', 'step' or 'cosine', not {config.schedule!r}")


def training_step(model, optimizer):
    """One step on a batch: the step fastgrad train runs, eagerly or compiled."""
    def step(xb, yb):
        optimizer.zero_grad()
        loss = cross_entropy(model(TensorNode(xb, requires_grad=False)), yb)
        loss.backward()
        optimizer.step()
        return loss
    return step


def will_be_sparse(x, config):
    """Whether the first layer will take the sparse-input kernels (by the first batch; see ops.Linear)."""
    from . import backend, kernels
    if config.model != 'mlp':  # LeNet's first layer is a convolution
        return False
    first = np.ascontiguousarray(x[:config.batch_size], dtype=config.dtype)
    return backend.sparse_allowed() and kernels.sparse_enough(first)


def accuracy(model, x, y, batch_size=2000):
    """Fraction of rows whose largest logit is the label (in batches, without a graph)."""
    correct = 0
    with no_grad():
        for start in range(0, len(x), batch_size):
            logits = model(TensorNode(x[start:start + batch_size], requires_grad=False)).value
            correct += int((logits.argmax(axis=1) == y[start:start + batch_size]).sum())
    return correct / len(x)


META_MAX_BYTES = 64 << 20  # the JSON of settings, RNG and history: a few kB per hundred epochs
HISTORY_FIELDS = ('epoch', 'val_accuracy', 'train_loss', 'lr', 'seconds', 'samples_per_second')


def save_checkpoint(folder, config, model, optimizer, rng, history):
    arrays = {f'model.{k}': v for k, v in model.state_dict().items()}
    arrays.update({f'optim.{k}': v for k, v in optimizer.state_dict().items()})
    meta = {'config': dataclasses.asdict(config), 'rng': rng.bit_generator.state, 'history': history}
    arrays['meta'] = np.array(json.dumps(meta))
    os.makedirs(folder, exist_ok=True)
    save_npz(os.path.join(folder, CHECKPOINT_FILE), arrays)


def checkpoint_spec(model, optimizer):
    """What a checkpoint of this model and optimizer holds (after at least one epoch: every parameter has
    its optimizer state), {key: files.Member}; load_checkpoint reads nothing else."""
    spec = {'meta': Member((), 'U', max_bytes=META_MAX_BYTES)}
    spec.update({f'model.{k}': m for k, m in model.state_spec().items()})
    spec.update({f'optim.{k}': m for k, m in optimizer.state_spec().items()})
    return spec


def _read_meta(meta, config, rng):
    """The checkpoint's meta entry, checked whole: settings, RNG state, history. ValueError otherwise."""
    try:
        meta = json.loads(str(meta))
    except ValueError as e:
        raise ValueError(f'its meta entry is not valid JSON ({e})') from None
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), t) for k, t in
                                             (('config', dict), ('rng', dict), ('history', list))):
        raise ValueError('its meta entry lacks the settings (config), the rng state or the history of a fastgrad '
                         'training checkpoint')
    known = dataclasses.asdict(TrainConfig())
    unknown = sorted(meta['config'].keys() - known.keys())
    if unknown:
        raise ValueError(f'the checkpoint has settings this fastgrad does not know ({", ".join(unknown)}); '
                         f'it was written by another version, or changed')
    # settings added since the checkpoint was written take their defaults
    saved = {**known, **meta['config']}
    changed = sorted(k for k, v in dataclasses.asdict(config).items()
                     if saved.get(k) != v and k not in RESUMABLE_CHANGES)
    if changed:
        raise ValueError(f'the checkpoint was made with different settings ({", ".join(changed)}); '
                         f'resume with the same ones, or use a new --checkpoint folder')
    for i, record in enumerate(meta['history']):
        if (not isinstance(record, dict) or record.get('epoch') != i
                or not all(type(record.get(k)) in (int, float) for k in HISTORY_FIELDS)):
            raise ValueError(f'history entry {i} is not the record of epoch {i} (numbers for '
                             f'{", ".join(HISTORY_FIELDS)}): {str(record)[:200]}')
    probe = type(rng.bit_generator)()
    try:
        probe.state = meta['rng']
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        raise ValueError(f'its rng state is not a {type(probe).__name__} state ({type(e).__name__}: {e})') from None
    return meta


def load_checkpoint(folder, config, model, optimizer, rng):
    """Restores a checkpoint into model, optimizer and rng; returns the history it holds.

    The file is read against checkpoint_spec (keys, shapes and dtypes from its headers, before any data) and
    checked whole before anything is restored: a damaged or foreign checkpoint is one ValueError naming the
    file and what is wrong, and leaves model, optimizer and rng as they were."""
    path = os.path.join(folder, CHECKPOINT_FILE)
    spec = checkpoint_spec(model, optimizer)
    # the settings first, so that a run with other settings hears that rather than a shape mismatch
    meta = load_npz(path, spec, only=('meta',))['meta']
    try:
        meta = _read_meta(meta, config, rng)
    except ValueError as e:
        raise ValueError(f'{path}: {e}') from None
    arrays = load_npz(path, spec, only=spec.keys() - {'meta'})
    before = model.state_dict()
    try:
        model.load_state_dict({k[6:]: v for k, v in arrays.items() if k.startswith('model.')})
        optimizer.load_state_dict({k[6:]: v for k, v in arrays.items() if k.startswith('optim.')})
    except ValueError as e:
        model.load_state_dict(before)
        raise ValueError(f'{path}: {e}') from None
    rng.bit_generator.state = meta['rng']
    return meta['history']


@announce_compiles  # on a cold numba cache, says on stderr that it compiles (first run only)
def train(config, on_epoch=None, checkpoint=None, resume=False, progress=False, data=None, should_stop=None):
    """Trains config's model; calls on_epoch(record, history) after every epoch and returns a summary dict.

    Each record holds epoch, val_accuracy, train_loss (summed over the epoch's instances), lr (the
    epoch's learning rate), seconds and samples_per_second. Raises TrainingDiverged when the loss becomes NaN or infinite, and
    KeyboardInterrupt between two steps once should_stop() is true.
    """
    with np.errstate(over='ignore'):
        lr = np.dtype(config.dtype).type(config.lr)
    if not (np.isfinite(lr) and lr > 0):  # the updates compute in the parameters' dtype
        raise ValueError(f'--learning-rate {config.lr} is {lr} in {config.dtype}: use a positive rate that '
                         f'{config.dtype} can hold')
    (xtrain, ytrain), (xval, yval), num_classes = data or load_data(config)
    model, optimizer, rng = build(config, xtrain.shape[1] if xtrain.ndim == 2 else xtrain.shape[1:], num_classes)
    schedule = make_schedule(config, optimizer)
    history = []
    if resume and checkpoint and os.path.exists(os.path.join(checkpoint, CHECKPOINT_FILE)):
        history = load_checkpoint(checkpoint, config, model, optimizer, rng)
        if schedule is not None:
            # a schedule laid out over the epochs (cosine; step without --step-size) changes with --epochs: the
            # epochs already run must have had the rates it gives them
            planned = [schedule.lr_at(schedule.base_lrs[0], k) for k in range(len(history))]
            if planned != [r['lr'] for r in history]:
                raise ValueError(f'{os.path.join(checkpoint, CHECKPOINT_FILE)}: its epochs ran at learning rates '
                                 f"{[r['lr'] for r in history]}, but a {config.schedule} schedule over "
                                 f'--epochs {config.epochs} gives them {planned}: resume with the --epochs it was '
                                 f'made with, or use a new --checkpoint folder')
            schedule.load_state_dict({'last_epoch': len(history)})
    step = training_step(model, optimizer)
    compiled = None if config.eager else compile(step, keep_grads=False)  # nothing here reads a gradient
    batches = -(-len(xtrain) // config.batch_size)
    # compiles (or loads) the kernels this run uses before any epoch is timed
    warmup(config.dtype, progress=progress, training='sparse' if will_be_sparse(xtrain, config) else 'dense')
    for epoch in range(len(history), config.epochs):
        start = time.perf_counter()
        compiling = 0.0 if compiled is None else compiled.compile_seconds
        lr = optimizer.lr
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=batches, desc=f'epoch {epoch:03}', leave=False)
        if compiled is None:
            losses = ((float(step(xb, yb).value), len(yb))
                      for xb, yb in datasets.batches(xtrain, ytrain, config.batch_size, rng=rng))
        else:  # the same batch order as batches() draws: one permutation from rng
            losses = _compiled_losses(compiled, xtrain, ytrain, config.batch_size, rng.permutation(len(xtrain)))
        running = 0.0
        for value, size in losses:
            if not np.isfinite(value):
                raise TrainingDiverged(f'the training loss became {value} in epoch {epoch}; '
                                       f'try a smaller learning rate (now {config.lr})')
            running += value * size
            if bar is not None:
                bar.update()
            if should_stop is not None and should_stop():
                raise KeyboardInterrupt
        if bar is not None:
            bar.close()
        # tracing and compiling the step (epoch 0, or a new batch shape) is not training time
        seconds = time.perf_counter() - start - (0.0 if compiled is None else compiled.compile_seconds - compiling)
        record = {'epoch': epoch, 'val_accuracy': accuracy(model, xval, yval), 'train_loss': running, 'lr': lr,
                  'seconds': seconds, 'samples_per_second': len(xtrain) / seconds}
        history.append(record)
        if schedule is not None:
            schedule.step()
        if checkpoint:
            save_checkpoint(checkpoint, config, model, optimizer, rng, history)
        if on_epoch:
            on_epoch(record, history)
    accuracies = [r['val_accuracy'] for r in history]
    seconds = sum(r['seconds'] for r in history)
    return {'history': history, 'model': model,
            'best_accuracy': max(accuracies, default=float('nan')),
            'final_accuracy': accuracies[-1] if accuracies else float('nan'),
            'seconds': seconds,
            'samples_per_second': len(xtrain) * len(history) / seconds if seconds else float('nan')}


def _compiled_losses(compiled, x, y, batch_size, order):
    """(loss, batch size) per batch of a compiled epoch, run CHUNK_BATCHES batches per call."""
    chunk = batch_size * CHUNK_BATCHES
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        sizes = [batch_size] * (len(part) // batch_size) + ([len(part) % batch_size] if len(part) % batch_size else [])
        yield from zip(compiled.run(x, y, batch_size, part).tolist(), sizes)

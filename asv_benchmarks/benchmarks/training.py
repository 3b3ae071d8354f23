"""Training throughput: one epoch of the MNIST MLP and of the synth task, as time, images/s and peak memory,
eager (op by op) and compiled (fastgrad.compile, one call per epoch)."""
from .common import BATCH_SIZES, Trainer, mlp, mnist_train, synth_train


class MNISTEpoch:
    """MLP 784-hidden-10 on the 50,000 MNIST training images, SGD momentum 0.9, float32."""
    params = ([300, 3136], BATCH_SIZES, ['sigmoid', 'relu'])
    param_names = ['hidden', 'batch_size', 'activation']
    number = 1
    repeat = (1, 3, 60.0)
    timeout = 300

    def setup(self, hidden, batch_size, activation):
        x, y = mnist_train()
        self.trainer = Trainer(x, y, mlp(x, y, hidden, activation), batch_size)

    def time_epoch(self, hidden, batch_size, activation):
        self.trainer.epoch()

    def track_images_per_second(self, hidden, batch_size, activation):
        """The same rate as time_epoch, measured over the first fifth of the epoch to keep the suite short."""
        return self.trainer.rate(len(self.trainer.x) // 5)
    track_images_per_second.unit = 'images/s'


class MNISTEpochMemory:
    params = ([300], [128], ['relu'])
    param_names = ['hidden', 'batch_size', 'activation']

    def setup(self, hidden, batch_size, activation):
        x, y = mnist_train()
        self.trainer = Trainer(x, y, mlp(x, y, hidden, activation), batch_size)

    def peakmem_epoch(self, hidden, batch_size, activation):
        self.trainer.epoch()


class SynthEpoch:
    """vugrad's synth task, 2-8-2, 60,000 points: graph overhead dominates."""
    params = (BATCH_SIZES, ['sigmoid', 'relu'])
    param_names = ['batch_size', 'activation']
    number = 1
    repeat = (3, 10, 20.0)

    def setup(self, batch_size, activation):
        x, y = synth_train()
        self.trainer = Trainer(x, y, mlp(x, y, [8], activation), batch_size)

    def time_epoch(self, batch_size, activation):
        self.trainer.epoch()

    def track_points_per_second(self, batch_size, activation):
        return self.trainer.rate(len(self.trainer.x))
    track_points_per_second.unit = 'points/s'

    def peakmem_epoch(self, batch_size, activation):
        self.trainer.epoch()


class CompiledEpoch:
    """The same epochs through fastgrad.compile(step).run: MNIST 784-300-10 and synth 2-8-2, relu."""
    params = (['mnist', 'synth'], BATCH_SIZES)
    param_names = ['data', 'batch_size']
    number = 1
    repeat = (3, 10, 30.0)
    timeout = 300

    def setup(self, data, batch_size):
        x, y = mnist_train() if data == 'mnist' else synth_train()
        self.trainer = Trainer(x, y, mlp(x, y, [300] if data == 'mnist' else [8], 'relu'), batch_size, compiled=True)

    def time_epoch(self, data, batch_size):
        self.trainer.epoch()

    def track_samples_per_second(self, data, batch_size):
        return self.trainer.rate(len(self.trainer.x))
    track_samples_per_second.unit = 'samples/s'

"""Start-up with a warm kernel cache: import fastgrad and take the first training step, in a fresh process."""
import subprocess
import sys

FIRST_STEP = """
import numpy as np
import fastgrad as fg
model = fg.MLP(784, 10, hidden=300, rng=0)
opt = fg.SGD(model.parameters(), lr=0.01, momentum=0.9)
x = fg.TensorNode(np.zeros((128, 784), np.float32), requires_grad=False)
fg.cross_entropy(model(x), np.zeros(128, np.int64)).backward()
opt.step()
"""


class StartUp:
    def setup(self):
        # fill numba's cache first, in a process of its own, so the timed run measures a warm start
        subprocess.run([sys.executable, '-c', FIRST_STEP], check=True)

    def timeraw_import_and_first_step(self):
        return FIRST_STEP

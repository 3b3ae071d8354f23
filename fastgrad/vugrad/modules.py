"""vugrad.modules: vugrad's Linear (float64, initial weights from numpy's global random state) on fastgrad's
fused Linear op, and the course's MLP, which returns probabilities."""
import numpy as np

from .. import modules as fg_modules
from .core import Module
from .functions import sigmoid, softmax


class Linear(fg_modules.Linear):
    """y = x @ w.T + b: w (output_size, input_size) Glorot-normal, std sqrt(2 / (in + out)), drawn with
    np.random.randn as vugrad draws it (so np.random.seed gives vugrad's weights); b zeros (1, output_size).
    float64. parameters() is [w, b]."""

    def __init__(self, input_size, output_size):
        super().__init__(input_size, output_size, dtype=np.float64)
        # into fastgrad's array, in place: it keeps the layout fastgrad's Linear op reads fastest
        self.w.value[...] = np.random.randn(output_size, input_size) * np.sqrt(2.0 / (input_size + output_size))


class MLP(Module):
    """The course's MLP: Linear, sigmoid, Linear, softmax. Returns class probabilities (for celoss), where
    fastgrad's MLP returns logits. hidden_mult: the hidden layer is hidden_mult times the input size."""

    def __init__(self, input_size, output_size, hidden_mult=4):
        super().__init__()
        hidden_size = hidden_mult * input_size
        self.layer1 = Linear(input_size, hidden_size)
        self.layer2 = Linear(hidden_size, output_size)

    def forward(self, input):
        return softmax(self.layer2(sigmoid(self.layer1(input))))

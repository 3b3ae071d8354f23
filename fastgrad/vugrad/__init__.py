"""vugrad's names and module paths on fastgrad's engine.

Code written for vugrad (the dlvu course's teaching engine) runs unchanged with `import fastgrad.vugrad as
vg`, or with its own `import vugrad` under the runner: `python -m fastgrad.vugrad SCRIPT [ARGS]`.

The graph, the ops and Module are fastgrad's own classes (isinstance works across both), with fastgrad's
fixes of vugrad's bugs. What this layer adds is what vugrad does differently from fastgrad: float64
modules whose initial weights, like the synthetic data, come from numpy's global random state; MNIST split
55,000/5,000 with raw 0-255 pixels; the course's MLP, which returns probabilities; the ops Id, RowMax and
RowSum; the name Sub.
"""
from . import core, ops, functions, modules, mnist
from .core import TensorNode, OpNode, Op, Module, Add, Sub, Multiply, MatrixMultiply
from .ops import (Log, Id, Exp, Sum, RowMax, RowSum, Normalize, BatchMM, Sigmoid, Expand, Select, Squeeze,
                  Unsqueeze)
from .functions import load_synth, load_mnist, celoss, logceloss, sigmoid, softmax, logsoftmax
from .mnist import init, load
from .modules import Linear, MLP

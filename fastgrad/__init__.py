"""fastgrad: a small, fast autodiff engine that keeps vugrad's API."""
from .core import TensorNode, OpNode, Op, backward, no_grad, is_grad_enabled
from .ops import (Add, Subtract, Multiply, Divide, MatrixMultiply, BatchMM, Sum, Normalize, Exp, Log,
                  Sigmoid, ReLU, Tanh, Expand, Select, Squeeze, Unsqueeze, Reshape, Transpose, Softmax,
                  LogSoftmax, CrossEntropy, Index, Mean, Max, Abs, Power, Linear as LinearOp)
from .functions import sigmoid, relu, tanh, softmax, logsoftmax, celoss, logceloss, cross_entropy
from .modules import Module, Linear, MLP, Sequential
from .conv import (Conv2d, MaxPool2d, Flatten, LeNet, Conv2dOp, MaxPool2dOp, FlattenOp, conv2d, max_pool2d,
                   flatten)
from .optim import SGD, Adam, StepLR, CosineAnnealingLR
from .backend import threads, set_threads
from .gradcheck import gradcheck, GradcheckError
from .warmup import warmup
from .compiled import compile, CompiledStep
from .data import load_synth, load_mnist, read_idx, batches

__version__ = '0.1.0'

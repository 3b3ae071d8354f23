"""vugrad.core: the graph and the basic ops vugrad defines beside it (fastgrad's classes; Sub is Subtract)."""
from ..core import TensorNode, OpNode, Op
from ..modules import Module
from ..ops import Add, Subtract as Sub, Multiply, MatrixMultiply

"""Epoch time of fastgrad against PyTorch CPU, JAX and a hand-written numpy loop, each in its own process.

    python asv_benchmarks/compare_frameworks.py                 # workloads A and B, 3 runs each
    python asv_benchmarks/compare_frameworks.py --repeats 7 --epochs 3 --scaling --memory

Workload A: MNIST-shaped MLP 784-300-10 relu, batch 128, SGD momentum 0.9, lr 0.01, float32, one epoch over
50,000 images (the real MNIST when `fastgrad.load_mnist` finds it, seeded random pixels otherwise; the
random pixels are all nonzero, so fastgrad's sparse-input first layer stays dense on them and the table
says which data ran). Workload C: LeNet-5 (conv 6@5x5 pad 2, relu, 2x2 max-pool, conv 16@5x5, relu, 2x2
max-pool, dense 400-120-84-10) on the same 50,000 images as (N, 1, 28, 28), batch 128 (`--workload C`; not
in `all`: fastgrad's three columns, PyTorch and a jax.jit step). Workload B: vugrad's synth task,
2-8-2 relu, batch 128, one epoch over 60,000 points. Frameworks run alternately, one process per run
(--epochs timed epochs each, after one warm-up epoch in every column, so that compilation is never timed
and every column's timed epochs come from the same stage of training); the table gives the medians over
all timed epochs and their ratios (fastgrad / other; below 1 means fastgrad is faster), with the lowest and
highest ratio of a single round in brackets. Columns:

  fastgrad        the compiled step, a whole epoch per call (fastgrad.compile(step, keep_grads=False).run)
  fastgrad-step   the compiled step called once per batch from a Python loop
  fastgrad-eager  the eager step (op by op)
  numpy           a hand-written numpy loop of the same maths, no graph
  torch           PyTorch CPU, one step per batch
  jax-step        a jax.jit step fed numpy batches from a Python loop
  jax-scan        the whole epoch as one jitted lax.scan over batches already on the device (the gather of
                  the batches is not timed; the short last batch is one jax-step call)

PyTorch and JAX are skipped when they are not installed.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np


def mlp_flops(sizes):
    """Multiply-adds x2 per image for one training step: forward, weight gradients, input gradients
    of every layer but the first."""
    fwd = sum(2 * i * o for i, o in zip(sizes[:-1], sizes[1:]))
    grad_w = fwd
    grad_x = sum(2 * i * o for i, o in zip(sizes[1:-1], sizes[2:]))
    return fwd + grad_w + grad_x


def workload_data(name, seed=0):
    rng = np.random.default_rng(seed)
    if name == 'A':
        try:
            import fastgrad
            (x, y), _, _ = fastgrad.load_mnist()
            return x[:50_000], y[:50_000], 'MNIST'
        except Exception:  # no loader or no data here: same shapes, random pixels
            x = rng.random((50_000, 784), dtype=np.float32)
            return x, rng.integers(0, 10, 50_000), 'random pixels'
    if name == 'C':
        x, y, source = workload_data('A', seed)
        return x.reshape(-1, 1, 28, 28), y, source
    x = rng.standard_normal((60_000, 2)).astype(np.float32)
    q = np.einsum('bf, fk, bk -> b', x, np.array([[1, 0.5], [1, 0.2]], dtype=np.float32), x)
    return x, (q > 0.6).astype(np.int64), 'synth'


# -- one epoch per framework: same data order, same maths. A trainer returns ('step', fn(xb, yb)) or
# ('epoch', fn(x, y, order, batch)).
def mlp_model(sizes):
    import fastgrad as fg
    return fg.MLP(sizes[0], sizes[-1], hidden=sizes[1:-1], activation='relu', rng=0)


def lenet_model(sizes):
    import fastgrad as fg
    return fg.LeNet(rng=0)


def fastgrad_trainers(make_model):
    """fastgrad's three columns for a model: the compiled epoch, the compiled step and the eager step."""
    def step(sizes, lr, momentum):
        import fastgrad as fg
        from fastgrad.train import training_step
        model = make_model(sizes)
        return training_step(model, fg.SGD(model.parameters(), lr=lr, momentum=momentum))

    def eager(sizes, lr, momentum):
        eager_step = step(sizes, lr, momentum)
        return 'step', lambda xb, yb: eager_step(xb, yb).value

    def compiled_step(sizes, lr, momentum):
        import fastgrad as fg
        return 'step', fg.compile(step(sizes, lr, momentum), keep_grads=False)

    def epoch(sizes, lr, momentum):
        import fastgrad as fg
        compiled = fg.compile(step(sizes, lr, momentum), keep_grads=False)
        return 'epoch', lambda x, y, order, batch: compiled.run(x, y, batch, order)[-1]
    return {'fastgrad': epoch, 'fastgrad-step': compiled_step, 'fastgrad-eager': eager}


def initial_weights(sizes):
    """The (in, out) float32 weights fastgrad's MLP starts from (He normal before a relu, Glorot normal for
    the output layer): every peer starts where fastgrad does."""
    return [np.ascontiguousarray(layer.w.value.T) for layer in mlp_model(sizes).layers]


def jax_functions(sizes, lr, momentum):
    import jax
    import jax.numpy as jnp
    params = [(jnp.asarray(w), jnp.zeros(w.shape[1], jnp.float32)) for w in initial_weights(sizes)]
    bufs = jax.tree_util.tree_map(jnp.zeros_like, params)

    def loss_fn(params, xb, yb):
        h = xb
        for k, (w, b) in enumerate(params):
            h = h @ w + b
            if k < len(params) - 1:
                h = jax.nn.relu(h)
        logp = jax.nn.log_softmax(h)
        return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], axis=1))

    def update(params, bufs, xb, yb):
        loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
        bufs = jax.tree_util.tree_map(lambda b, g: momentum * b + g, bufs, grads)
        params = jax.tree_util.tree_map(lambda p, b: p - lr * b, params, bufs)
        return params, bufs, loss

    def scan_epoch(params, bufs, xs, ys):
        def body(carry, batch):
            p, b, loss = update(*carry, *batch)
            return (p, b), loss
        (params, bufs), losses = jax.lax.scan(body, (params, bufs), (xs, ys))
        return params, bufs, losses
    return {'params': params, 'bufs': bufs, 'step': jax.jit(update), 'epoch': jax.jit(scan_epoch)}


def jax_step_trainer(sizes, lr, momentum):
    f = jax_functions(sizes, lr, momentum)
    state = [f['params'], f['bufs']]

    def step(xb, yb):
        state[0], state[1], loss = f['step'](state[0], state[1], xb, yb)
        return float(loss)
    return 'step', step


def jax_scan_trainer(sizes, lr, momentum):
    import jax
    import jax.numpy as jnp
    f = jax_functions(sizes, lr, momentum)
    state = [f['params'], f['bufs']]
    gathered = {}

    def epoch(x, y, order, batch):
        full = len(order) // batch
        key = id(order)
        if key not in gathered:  # the batches, gathered and on the device before the clock starts
            idx = order[:full * batch].reshape(full, batch)
            tail = order[full * batch:]
            gathered.clear()
            gathered[key] = (jax.device_put(jnp.asarray(x[idx])), jax.device_put(jnp.asarray(y[idx])),
                             jnp.asarray(x[tail]), jnp.asarray(y[tail]))
            return None
        xs, ys, xt, yt = gathered[key]
        state[0], state[1], losses = f['epoch'](state[0], state[1], xs, ys)
        if len(xt):
            state[0], state[1], loss = f['step'](state[0], state[1], xt, yt)
        return float(losses[-1].block_until_ready())
    return 'epoch', epoch


def numpy_trainer(sizes, lr, momentum):
    """A plain float32 numpy loop: no graph, the same maths as fastgrad's fused kernels."""
    return 'step', numpy_step(sizes, lr, momentum)


def numpy_step(sizes, lr, momentum):
    ws = initial_weights(sizes)
    bs = [np.zeros(o, np.float32) for o in sizes[1:]]
    params = ws + bs
    bufs = [np.zeros_like(p) for p in params]
    lr, momentum = np.float32(lr), np.float32(momentum)

    def step(xb, yb):
        acts = [xb]
        for k, (w, b) in enumerate(zip(ws, bs)):
            z = acts[-1] @ w + b
            acts.append(np.maximum(z, 0, out=z) if k < len(ws) - 1 else z)
        logits = acts[-1]
        shifted = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        s = e.sum(axis=1, keepdims=True)
        n = len(yb)
        loss = (np.log(s[:, 0]) - shifted[np.arange(n), yb]).mean()
        g = e / s
        g[np.arange(n), yb] -= 1
        g /= n
        gws, gbs = [None] * len(ws), [None] * len(ws)
        for k in range(len(ws) - 1, -1, -1):
            gws[k] = acts[k].T @ g
            gbs[k] = g.sum(axis=0)
            if k:
                g = (g @ ws[k].T) * (acts[k] > 0)
        for p, gp, buf in zip(params, gws + gbs, bufs):
            buf *= momentum
            buf += gp
            p -= lr * buf
        return loss
    return step


def torch_step(model, lr, momentum):
    import torch
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)

    def step(xb, yb):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(xb)), torch.from_numpy(yb))
        loss.backward()
        opt.step()
        return loss.item()
    return 'step', step


def torch_trainer(sizes, lr, momentum):
    import torch
    layers = []
    for k, w in enumerate(initial_weights(sizes)):
        layers.append(torch.nn.Linear(*w.shape, dtype=torch.float32))
        with torch.no_grad():
            layers[-1].weight.copy_(torch.from_numpy(w.T))
            layers[-1].bias.zero_()
        if k < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch_step(torch.nn.Sequential(*layers), lr, momentum)


def lenet_torch_trainer(sizes, lr, momentum):
    import torch
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                          nn.Linear(84, 10))
    return torch_step(model, lr, momentum)


def lenet_jax_trainer(sizes, lr, momentum):
    import jax
    import jax.numpy as jnp
    rng = np.random.default_rng(0)

    def uniform(shape, fan_in):
        bound = 1 / np.sqrt(fan_in)
        return jnp.asarray(rng.uniform(-bound, bound, shape).astype(np.float32))

    params = [(uniform((6, 1, 5, 5), 25), uniform((6,), 25)), (uniform((16, 6, 5, 5), 150), uniform((16,), 150)),
              (uniform((400, 120), 400), uniform((120,), 400)), (uniform((120, 84), 120), uniform((84,), 120)),
              (uniform((84, 10), 84), uniform((10,), 84))]
    bufs = jax.tree_util.tree_map(jnp.zeros_like, params)

    def pool(h):
        return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), 'VALID')

    def loss_fn(params, xb, yb):
        (w1, b1), (w2, b2), (w3, b3), (w4, b4), (w5, b5) = params
        h = jax.lax.conv_general_dilated(xb, w1, (1, 1), ((2, 2), (2, 2))) + b1[None, :, None, None]
        h = pool(jax.nn.relu(h))
        h = jax.lax.conv_general_dilated(h, w2, (1, 1), 'VALID') + b2[None, :, None, None]
        h = pool(jax.nn.relu(h)).reshape(xb.shape[0], -1)
        h = jax.nn.relu(h @ w3 + b3)
        h = jax.nn.relu(h @ w4 + b4)
        logp = jax.nn.log_softmax(h @ w5 + b5)
        return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], axis=1))

    @jax.jit
    def update(params, bufs, xb, yb):
        loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
        bufs = jax.tree_util.tree_map(lambda b, g: momentum * b + g, bufs, grads)
        params = jax.tree_util.tree_map(lambda p, b: p - lr * b, params, bufs)
        return params, bufs, loss

    state = [params, bufs]

    def step(xb, yb):
        state[0], state[1], loss = update(state[0], state[1], xb, yb)
        return float(loss)
    return 'step', step


TRAINERS = {**fastgrad_trainers(mlp_model), 'numpy': numpy_trainer, 'torch': torch_trainer,
            'jax-step': jax_step_trainer, 'jax-scan': jax_scan_trainer}
LENET_TRAINERS = {**fastgrad_trainers(lenet_model), 'torch': lenet_torch_trainer, 'jax-step': lenet_jax_trainer}


def run_child(args):
    x, y, source = workload_data(args.workload)
    sizes = [x.shape[1]] + args.hidden + [int(y.max()) + 1]
    trainers = LENET_TRAINERS if args.workload == 'C' else TRAINERS
    kind, fn = trainers[args.child](sizes, lr=0.01, momentum=0.9)
    order = np.random.default_rng(1).permutation(len(x))

    def epoch():
        if kind == 'epoch':
            return fn(x, y, order, args.batch)
        for fr in range(0, len(x), args.batch):
            idx = order[fr:fr + args.batch]
            loss = fn(x[idx], y[idx])
        return loss

    # warm up with one trained epoch in every column: compilation (both batch shapes) and faulting in
    # buffers stay outside the clock, and every column's timed epochs start at the same point of training
    # (later epochs meet other numbers: smaller gradients, momenta decaying towards denormals)
    if epoch() is None:  # jax-scan's first call only gathers the batches onto the device
        epoch()
    rss = []
    times = []
    for _ in range(args.epochs):
        start = time.perf_counter()
        loss = epoch()
        times.append(time.perf_counter() - start)
        rss.append(peak_rss_mb())
    print(json.dumps({'seconds': times, 'loss': float(loss), 'peak_rss_mb': rss, 'data': source,
                      'sizes': sizes}))


def peak_rss_mb():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(framework, workload, hidden, batch, epochs=1):
    cmd = [sys.executable, __file__, '--child', framework, '--workload', workload, '--batch', str(batch),
           '--epochs', str(epochs), '--hidden', *map(str, hidden)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f'{framework} failed:\n{out.stderr}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def frameworks():
    names = ['fastgrad', 'fastgrad-step', 'fastgrad-eager', 'numpy']
    for peer, columns in (('torch', ['torch']), ('jax', ['jax-step', 'jax-scan'])):
        try:
            __import__(peer)
            names += columns
        except ImportError:
            print(f'{peer} is not installed: its columns are skipped')
    return names


def pairs(names):
    """The ratios the table gives: the compiled epoch against every other column, and the compiled step
    called per batch against JAX's jitted step fed the same way."""
    out = [('fastgrad', n) for n in names if n != 'fastgrad']
    if 'fastgrad-step' in names and 'jax-step' in names:
        out.append(('fastgrad-step', 'jax-step'))
    return out


def compare(workload, hidden, batch, repeats, names, epochs=1):
    """Medians over every timed epoch of every run, and each pair's ratio in each round (the frameworks'
    runs back to back), whose spread shows how far the shared machine moved."""
    runs = {name: [] for name in names}
    for _ in range(repeats):  # alternate, so drift on a shared machine hits every framework alike
        for name in names:
            result = child(name, workload, hidden, batch, epochs)
            runs[name].append(result['seconds'])
    medians = {name: float(np.median(np.concatenate(times))) for name, times in runs.items()}
    round_ratios = {(a, b): [np.median(mine) / np.median(theirs) for mine, theirs in zip(runs[a], runs[b])]
                    for a, b in pairs(names)}
    return medians, round_ratios, result['data']


def sgemm_peak():
    """Best float32 GFLOP/s of a 2048^3 product through numba's BLAS (the one fastgrad uses)."""
    from fastgrad import kernels
    a = np.random.default_rng(0).random((2048, 2048), dtype=np.float32)
    kernels.matmul(a, a)
    best = min(timed(lambda: kernels.matmul(a, a)) for _ in range(5))
    return 2 * 2048 ** 3 / best / 1e9


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def row(label, medians, names, round_ratios):
    cells = [f'{medians[n]:.4f}' for n in names]
    ratios = [f'{medians[a] / medians[b]:.2f}x ({min(round_ratios[a, b]):.2f}-{max(round_ratios[a, b]):.2f})'
              for a, b in pairs(names)]
    return f'| {label} | ' + ' | '.join(cells + ratios) + ' |'


def header(names):
    cols = [f'{n} s' for n in names] + [f'{a}/{b} (rounds)' for a, b in pairs(names)]
    return '| workload | ' + ' | '.join(cols) + ' |\n|' + '---|' * (len(cols) + 1)


def lenet_flops():
    """Multiply-adds x2 per image for one LeNet-5 training step: forward and weight gradients of every
    layer, input gradients of every layer but the first (whose input is the data)."""
    conv1, conv2 = 2 * 6 * 1 * 25 * 28 * 28, 2 * 16 * 6 * 25 * 10 * 10
    dense = 2 * (400 * 120 + 120 * 84 + 84 * 10)
    return 2 * conv1 + 3 * conv2 + 3 * dense


def compare_lenet(args):
    """Workload C: LeNet-5 epochs, fastgrad compiled, compiled per step and eager, against PyTorch and a
    jax.jit step."""
    names = [n for n in LENET_TRAINERS if n.startswith('fastgrad') or
             __import__('importlib').util.find_spec(n.split('-')[0]) is not None]
    if args.only:
        names = [n for n in names if n == 'fastgrad' or n in args.only]
    peak = sgemm_peak()
    print(f'float32 sgemm peak (numba BLAS, 2048^3): {peak:.1f} GFLOP/s\n')
    print(header(names))
    medians, ratios, source = compare('C', [0], args.batch, args.repeats, names, args.epochs)
    print(row(f'C: LeNet-5, batch {args.batch}, 50k ({source})', medians, names, ratios))
    rate = 50_000 / medians['fastgrad']
    print(f'\nC, fastgrad: {rate:,.0f} images/s, {lenet_flops() / 1e6:.2f} MFLOP per image per step, '
          f'{rate * lenet_flops() / 1e9:.1f} GFLOP/s ({100 * rate * lenet_flops() / 1e9 / peak:.0f} % of the sgemm peak)')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--child', choices=sorted(TRAINERS), help=argparse.SUPPRESS)
    parser.add_argument('--workload', choices=['A', 'B', 'C', 'all'], default='all')
    parser.add_argument('--hidden', type=int, nargs='+', default=None,
                        help="hidden layer sizes of the MLP workloads (default: A's 300, B's 8)")
    parser.add_argument('--batch', type=int, default=128, help='batch size of the workloads (default 128)')
    parser.add_argument('--epochs', type=int, default=1, help='timed epochs per run (each run is a new process)')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--only', nargs='+', choices=sorted(TRAINERS), metavar='NAME',
                        help='these columns only (fastgrad, the compiled epoch, always runs)')
    parser.add_argument('--scaling', action='store_true', help='also time hidden 300/1024/3136/4096 and batch 32/128/512')
    parser.add_argument('--memory', action='store_true', help='also track fastgrad peak RSS over 20 epochs')
    args = parser.parse_args()
    if args.child:
        args.hidden = args.hidden or ([300] if args.workload == 'A' else [8])
        return run_child(args)
    if args.batch < 1 or any(h < 1 for h in args.hidden or []):
        parser.error(f'--batch and --hidden take positive sizes, got --batch {args.batch} --hidden {args.hidden}')
    if args.batch > 50_000:
        parser.error(f'--batch {args.batch} is more than the 50,000 images of an epoch')
    if args.epochs < 1 or args.repeats < 1:
        parser.error(f'--epochs and --repeats must be at least 1, got {args.epochs} and {args.repeats}')

    if args.workload == 'C':
        return compare_lenet(args)
    names = frameworks()
    if args.only:
        names = [n for n in names if n == 'fastgrad' or n in args.only]
    print(f'machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
          f'python {platform.python_version()}, numpy {np.__version__}')
    print(f'float32 sgemm peak (numba BLAS, 2048^3): {sgemm_peak():.1f} GFLOP/s\n')
    print(header(names))
    if args.workload in ('A', 'all'):
        hidden = args.hidden or [300]
        medians, ratios, source = compare('A', hidden, args.batch, args.repeats, names, args.epochs)
        sizes = [784, *hidden, 10]
        print(row(f'A: MLP {"-".join(map(str, sizes))}, batch {args.batch}, 50k ({source})', medians, names, ratios))
        gflops = mlp_flops(sizes) * 50_000 / medians['fastgrad'] / 1e9
    if args.workload in ('B', 'all'):
        hidden = args.hidden or [8]
        medians, ratios, _ = compare('B', hidden, args.batch, args.repeats, names, args.epochs)
        print(row(f'B: synth {"-".join(map(str, [2, *hidden, 2]))}, batch {args.batch}, 60k', medians, names, ratios))
    if args.workload in ('A', 'all'):
        print(f'\nA, fastgrad: {mlp_flops(sizes) / 1e6:.2f} MFLOP per image per step, '
              f'{gflops:.1f} GFLOP/s effective (dense-equivalent: the sparse first layer skips the zero pixels\' '
              'share of the first-layer work, so this can exceed the BLAS rate)')
    if args.scaling:
        print(f'\nScaling (workload A, medians of {args.repeats} runs x {args.epochs} epochs):\n')
        print(header(names))
        for hidden in (300, 1024, 3136, 4096):
            medians, ratios, _ = compare('A', [hidden], 128, args.repeats, names, args.epochs)
            print(row(f'hidden {hidden}, batch 128', medians, names, ratios))
        for batch in (32, 512):
            medians, ratios, _ = compare('A', [300], batch, args.repeats, names, args.epochs)
            print(row(f'hidden 300, batch {batch}', medians, names, ratios))
    if args.memory:
        result = child('fastgrad', 'A', [300], 128, epochs=20)
        rss = result['peak_rss_mb']
        print(f'\nfastgrad peak RSS over 20 epochs after the warm-up epoch (MB): epoch 1 {rss[0]:.0f}, '
              f'epoch 10 {rss[9]:.0f}, epoch 20 {rss[-1]:.0f}')


if __name__ == '__main__':
    main()

"""A short training run on vugrad's synthetic task (until `fastgrad train` lands): `python -m fastgrad.demo`."""
import numpy as np

import fastgrad as fg


def synth(n, rng):
    x = rng.standard_normal((n, 2)).astype(np.float32)
    q = np.einsum('bf, fk, bk -> b', x, np.array([[1, 0.5], [1, 0.2]], dtype=np.float32), x)
    return x, (q > 0.6).astype(np.int64)


def main(epochs=5, batch_size=128):
    rng = np.random.default_rng(0)
    (xtrain, ytrain), (xval, yval) = synth(60_000, rng), synth(10_000, rng)
    model = fg.MLP(2, 2, hidden=8, activation='relu', rng=0)
    opt = fg.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(epochs):
        running = 0.0
        for fr in range(0, len(xtrain), batch_size):
            opt.zero_grad()
            targets = ytrain[fr:fr + batch_size]
            loss = fg.cross_entropy(model(fg.TensorNode(xtrain[fr:fr + batch_size], requires_grad=False)), targets)
            loss.backward()
            opt.step()
            running += float(loss.value) * len(targets)
        with fg.no_grad():
            accuracy = (model(fg.TensorNode(xval)).value.argmax(axis=1) == yval).mean()
        print(f'epoch {epoch:03}\n       accuracy: {accuracy:.4}\n   running loss: {running:.4}')


if __name__ == '__main__':
    main()

"""PyTorch twins of ``functional_cnn.models`` and ``experiments.time_to_accuracy.net``: the same
layers and nesting (``nn.Sequential``), so ``fcn.load_state_dict(params, state,
twin.state_dict())`` copies weights across unchanged.
Used by the tests (the oracle), ``benchmarks.bench`` and ``benchmarks/time_to_accuracy_torch.py``.
"""


def mytorch_net(nn):
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, stride=2, padding=1), nn.MaxPool2d(3, stride=2),
        nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU()),
        nn.AvgPool2d(3), nn.Flatten(), nn.Linear(64, 10))


def lenet(nn):
    return nn.Sequential(nn.Conv2d(1, 10, 5), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(10, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(320, 10))


def mlp(nn):
    layers = [nn.Flatten()]
    for fan_in, width in ((784, 512), (512, 256), (256, 128), (128, 64)):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(64, 10))


def time_to_accuracy(nn):
    """``experiments.time_to_accuracy.net()``: two conv (no bias), BatchNorm, ReLU, pool stages."""
    return nn.Sequential(nn.Conv2d(1, 8, 5, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(8, 16, 5, bias=False), nn.BatchNorm2d(16),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 10))


TWINS = {"mytorch_net": mytorch_net, "lenet": lenet, "mlp": mlp,
         "time_to_accuracy": time_to_accuracy}

"""PyTorch twins of ``functional_cnn.models``: the same layers and nesting (``nn.Sequential``),
so ``fcn.load_state_dict(params, state, twin.state_dict())`` copies weights across unchanged.
Used by the tests (the oracle) and ``benchmarks.bench``. (The time-to-accuracy race runs each
side's own recipe: ``benchmarks/time_to_accuracy_torch.py`` builds its network itself.)
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


TWINS = {"mytorch_net": mytorch_net, "lenet": lenet, "mlp": mlp}

"""PyTorch on the model bench-train measures: steps/s of forward + backward + SGD with momentum.

Usage: torch_bench.py MODEL STEPS THREADS [DEVICE] [--opacus] [--group-norm]
(prints one number: steps/s; DEVICE cpu or cuda). With --opacus: DP-SGD steps with Opacus on the
same model and batch (per-sample gradients, clipping to C = 1, Gaussian noise with σ = 1), as
`consilium-worker bench-train --dp` measures its own (every one of the 64 examples in the step).
With --group-norm: resnet with GroupNorm(gcd(C, 32), C) in place of BatchNorm2d (Opacus's
ModuleValidator.fix; `--norm group` of bench-train).
"""
import math
import sys
import time

import torch
from torch import nn

opacus = "--opacus" in sys.argv
group_norm = "--group-norm" in sys.argv
args = [a for a in sys.argv[1:] if a not in ("--opacus", "--group-norm")]
model_name, steps, threads = args[0], int(args[1]), int(args[2])
device = torch.device(args[3] if len(args) > 3 else "cpu")
torch.set_num_threads(threads)
torch.manual_seed(1)


def small_cnn(classes=10):
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, classes),
    )


def norm(c):
    return nn.GroupNorm(math.gcd(c, 32), c) if group_norm else nn.BatchNorm2d(c)


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (self.down(x) if self.down is not None else x))


def resnet(widths=(16, 32, 64), classes=10):
    layers = [nn.Conv2d(1, widths[0], 3, padding=1, bias=False), norm(widths[0]), nn.ReLU()]
    cin = widths[0]
    for i, w in enumerate(widths):
        layers.append(Block(cin, w, 1 if i == 0 else 2))
        cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


size = 32 if model_name == "resnet" else 28
model = (resnet() if model_name == "resnet" else small_cnn()).to(device)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
if opacus:
    import warnings

    # Opacus's hooks fire on the first layer, whose input needs no gradient: harmless.
    warnings.filterwarnings("ignore", message="Full backward hook")
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model = GradSampleModule(model)
    opt = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=64,
    )
x = torch.rand(64, 1, size, size, device=device)
y = torch.arange(64, device=device) % 10
loss_fn = nn.CrossEntropyLoss()


def step():
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    opt.step()


for _ in range(3):
    step()
if device.type == "cuda":
    torch.cuda.synchronize()
start = time.perf_counter()
for _ in range(steps):
    step()
if device.type == "cuda":
    torch.cuda.synchronize()
print(f"{steps / (time.perf_counter() - start):.3f}")

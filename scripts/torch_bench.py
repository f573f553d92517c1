"""PyTorch on the model bench-train measures: steps/s of forward + backward + SGD with momentum.

Usage: torch_bench.py MODEL STEPS THREADS [DEVICE] [--opacus] [--group-norm]
(prints one number: steps/s; DEVICE cpu or cuda). With --opacus: DP-SGD steps with Opacus on the
same model and batch (per-sample gradients, clipping to C = 1, Gaussian noise with σ = 1), as
`consilium-worker bench-train --dp` measures its own (every one of the 64 examples in the step).
MODEL: small_cnn (batch 64, 28×28), resnet (batch 64, 32×32) or unet (batch 16, 64×64, a random
mask, soft Dice + cross-entropy). With --group-norm: resnet or unet with GroupNorm(gcd(C, 32), C)
in place of BatchNorm2d (Opacus's ModuleValidator.fix; `--norm group` of bench-train).
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


def conv_norm_relu(cin, cout):
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU()]


class UNet(nn.Module):
    """bench-train's unet: per width two 3x3 conv + norm + ReLU, 2x2 max-pooling down; per
    level back up a 2x2 transposed convolution, the skip concatenated first, two 3x3 conv."""

    def __init__(self, widths=(16, 32, 64), classes=2):
        super().__init__()
        self.enc = nn.ModuleList()
        cin = 1
        for w in widths:
            self.enc.append(nn.Sequential(*conv_norm_relu(cin, w), *conv_norm_relu(w, w)))
            cin = w
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in reversed(range(len(widths) - 1)):
            self.up.append(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2))
            self.dec.append(nn.Sequential(*conv_norm_relu(2 * widths[i], widths[i]),
                                          *conv_norm_relu(widths[i], widths[i])))
        self.head = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x):
        skips = []
        for i, level in enumerate(self.enc):
            if i > 0:
                skips.append(x)
                x = nn.functional.max_pool2d(x, 2)
            x = level(x)
        for up, level in zip(self.up, self.dec):
            x = level(torch.cat([skips.pop(), up(x)], 1))
        return self.head(x)


def dice_ce(logits, y):
    """Cross-entropy over every pixel + soft Dice of the foreground classes over the batch
    (smoothed by 1e-5), as the worker's loss."""
    ce = nn.functional.cross_entropy(logits, y)
    p = torch.softmax(logits, 1)[:, 1:]
    t = nn.functional.one_hot(y, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    overlap = (p * t).sum((0, 2, 3))
    total = p.sum((0, 2, 3)) + t.sum((0, 2, 3))
    return ce + 1 - ((2 * overlap + 1e-5) / (total + 1e-5)).mean()


size = {"resnet": 32, "unet": 64}.get(model_name, 28)
batch = 16 if model_name == "unet" else 64
model = {"resnet": resnet, "unet": UNet}.get(model_name, small_cnn)().to(device)
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
        expected_batch_size=batch,
    )
x = torch.rand(batch, 1, size, size, device=device)
if model_name == "unet":
    y = (torch.rand(batch, size, size, device=device) < 0.5).long()
    loss_fn = dice_ce
else:
    y = torch.arange(batch, device=device) % 10
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

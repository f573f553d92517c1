"""The PyTorch side of `scripts/parity`: the model loaded with Consilium's initial weights,
the same batches, plain SGD at lr 0.05; prints both loss curves' largest difference.

Usage: parity.py DIR   (written by `cargo run --release -p consilium-worker --example parity`)
"""
import sys

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

folder = sys.argv[1]
torch.set_num_threads(1)
name, size = open(f"{folder}/model.txt").read().split()
size = int(size)


class SmallCnn(nn.Module):
    """Consilium's small CNN, its parameters named as Consilium names them."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 7 * 7, 2)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Conv2d(cin, cout, 1, stride, bias=False)
            self.bn_down = nn.BatchNorm2d(cout)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        skip = self.bn_down(self.down(x)) if self.down is not None else x
        return torch.relu(y + skip)


class ResNet(nn.Module):
    """Consilium's ResNet (widths 16, 32, 64, batch normalisation), named as Consilium names it."""

    def __init__(self, widths=(16, 32, 64)):
        super().__init__()
        self.stem = nn.Conv2d(1, widths[0], 3, padding=1, bias=False)
        self.bn_stem = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        for i, w in enumerate(widths):
            setattr(self, f"layer{i}", Block(cin, w, 1 if i == 0 else 2))
            cin = w
        self.blocks = len(widths)
        self.fc = nn.Linear(cin, 2)

    def forward(self, x):
        x = torch.relu(self.bn_stem(self.stem(x)))
        for i in range(self.blocks):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(x.mean((2, 3)))


model = SmallCnn() if name == "small_cnn" else ResNet()
weights = load_file(f"{folder}/initial.safetensors")
missing = [k for k in model.state_dict() if k not in weights and not k.endswith("num_batches_tracked")]
if missing:
    sys.exit(f"error: Consilium's weights lack {missing}")
model.load_state_dict({k: weights[k] for k in model.state_dict() if k in weights}, strict=False)
model.train()
images = np.fromfile(f"{folder}/images.f32", dtype="<f4").reshape(-1, 32, 1, size, size)
labels = np.fromfile(f"{folder}/labels.u8", dtype=np.uint8).reshape(-1, 32).astype(np.int64)
ours = [float(x) for x in open(f"{folder}/consilium-losses.txt")]
opt = torch.optim.SGD(model.parameters(), lr=0.05)
theirs = []
for x, y in zip(images, labels):
    loss = nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    theirs.append(loss.item())
    opt.zero_grad()
    loss.backward()
    opt.step()
diff = [abs(a - b) for a, b in zip(ours, theirs)]
worst = max(range(len(diff)), key=diff.__getitem__)
print(f"{name}, {len(ours)} steps: loss {ours[0]:.6f} -> {ours[-1]:.6f} (Consilium), "
      f"{theirs[0]:.6f} -> {theirs[-1]:.6f} (PyTorch)")
print(f"largest difference {diff[worst]:.2e} at step {worst + 1}; "
      f"mean {sum(diff) / len(diff):.2e}; first step {diff[0]:.2e}")

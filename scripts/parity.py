"""The PyTorch side of `scripts/parity`: the small CNN loaded with Consilium's initial weights,
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
model = nn.Sequential(
    nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(64 * 7 * 7, 2),
)
weights = load_file(f"{folder}/initial.safetensors")
names = {"0": "conv1", "3": "conv2", "7": "fc"}
model.load_state_dict({
    k: weights[f"{names[k.split('.')[0]]}.{k.split('.')[1]}"] for k in model.state_dict()
})
images = np.fromfile(f"{folder}/images.f32", dtype="<f4").reshape(-1, 32, 1, 28, 28)
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
print(f"{len(ours)} steps: loss {ours[0]:.6f} -> {ours[-1]:.6f} (Consilium), "
      f"{theirs[0]:.6f} -> {theirs[-1]:.6f} (PyTorch)")
print(f"largest difference {diff[worst]:.2e} at step {worst + 1}; "
      f"mean {sum(diff) / len(diff):.2e}; first step {diff[0]:.2e}")

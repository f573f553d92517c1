"""The federated segmentation benchmark's driver (run by scripts/bench-segmentation, which says
what it measures): lays the example's phantoms out as site folders and as one centralised
folder, runs `consilium simulate` for every strategy and seed, and prints a Markdown table of
the global model's mean Dice per round from the simulation reports."""

import json
import os
import statistics
import subprocess
import sys

BINARY, WORK = sys.argv[1], sys.argv[2]
SEEDS, ROUNDS, EPOCHS = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])

# (row label, plan.aggregation.strategy, extra [plan.optimiser] lines)
STRATEGIES = [
    ("FedAvg", "fedavg", []),
    ("FedProx (μ = 0.01)", "fedavg", ["proximal_mu = 0.01"]),
    ("FedCostWAvg (α = 0.5)", "fedcostwavg", []),
]


def pairs():
    """Per site of the example: its (image, mask) paths, from its labels CSV."""
    sites_dir = os.path.join(WORK, "example", "sites")
    out = {}
    for site in sorted(os.listdir(sites_dir)):
        with open(os.path.join(sites_dir, site, "labels.csv")) as f:
            next(f)
            out[site] = [
                tuple(os.path.join(sites_dir, site, p) for p in line.strip().split(","))
                for line in f
                if line.strip()
            ]
    return out


def write_folder(name, members):
    """A folder of hard links to the (site, image, mask) members, renamed for their site, with
    the labels CSV that pairs them."""
    root = os.path.join(WORK, "sites", name)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "labels.csv"), "w") as f:
        f.write("image,mask\n")
        for site, image, mask in members:
            names = [f"{site}-{os.path.basename(p)}" for p in (image, mask)]
            for src, dst in zip((image, mask), names):
                os.link(src, os.path.join(root, dst))
            f.write(f"{names[0]},{names[1]}\n")
    return root


def simulate(tag, roots, seed, strategy, optimiser, rounds, epochs):
    """One `consilium simulate` run; returns the global mean Dice after each round."""
    lines = [
        f'name = "{tag}"',
        f'data_dir = "run-{tag}"',
        f'report = "report-{tag}.json"',
        "round_timeout_seconds = 900",
        "[plan]",
        f"local_epochs = {epochs}",
        "batch_size = 8",
        f"rounds = {rounds}",
        f"seed = {seed}",
        "[plan.model]",
        'architecture = "unet"',
        "num_classes = 2",
        'labels = { "0" = "background", "1" = "lesion" }',
        'hyper_parameters = { widths = [8, 16, 32], norm = "batch", upsampling = "transposed" }',
        "[plan.preprocessing]",
        "image_size = 32",
        'normalisation = "zscore"',
        'augmentations = ["flip"]',
        "[plan.optimiser]",
        'name = "adamw"',
        "learning_rate = 0.01",
        "weight_decay = 0.0001",
        *optimiser,
        "[plan.aggregation]",
        f'strategy = "{strategy}"',
        f"min_sites = {len(roots)}",
    ]
    for i, root in enumerate(roots):
        lines += [
            "[[sites]]",
            f'name = "site {i + 1}"',
            "[sites.dataset]",
            'kind = "images"',
            f'root = "{root}"',
            f'labels = "{root}/labels.csv"',
            "masks = true",
            "holdout = 0.25",
        ]
    config = os.path.join(WORK, f"{tag}.toml")
    with open(config, "w") as f:
        f.write("\n".join(lines) + "\n")
    out = subprocess.run([BINARY, "simulate", "--config", config], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"simulate {tag} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    with open(os.path.join(WORK, f"report-{tag}.json")) as f:
        report = json.load(f)
    dice = []
    for model in sorted(report["models"], key=lambda m: m["round"]):
        seg = (((model.get("evaluation") or {}).get("global") or {}).get("segmentation")) or {}
        dice.append(seg.get("mean_dice") or 0.0)
    return dice, report["seconds"]


def mean_sd(xs):
    return f"{statistics.mean(xs):.3f}" + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")


def main():
    by_site = pairs()
    site_roots = [
        write_folder(site, [(site, image, mask) for image, mask in members])
        for site, members in by_site.items()
    ]
    central_root = write_folder(
        "central",
        [(site, image, mask) for site, members in by_site.items() for image, mask in members],
    )
    curves = {row: [] for row, _, _ in STRATEGIES}
    central, seconds = [], 0.0
    for seed in range(1, SEEDS + 1):
        dice, s = simulate(f"central-{seed}", [central_root], seed, "fedavg", [], 1, ROUNDS * EPOCHS)
        central.append(dice[-1])
        seconds += s
        for number, (row, strategy, optimiser) in enumerate(STRATEGIES):
            dice, s = simulate(f"fl-{number}-{seed}", site_roots, seed, strategy, optimiser, ROUNDS, EPOCHS)
            curves[row].append(dice)
            seconds += s
        print(f"seed {seed} done", file=sys.stderr, flush=True)

    images = {site: len(members) for site, members in by_site.items()}
    print(
        f"Global mean Dice (lesion) on the sites' held-out images after each round, {ROUNDS} rounds "
        f"of {EPOCHS} local epochs over {len(images)} sites "
        f"({', '.join(f'{k} {v}' for k, v in images.items())} images), mean ± sd over {SEEDS} "
        f"seed(s); centralised: every image at one site, {ROUNDS * EPOCHS} epochs.\n"
    )
    print("| strategy | " + " | ".join(f"round {r}" for r in range(1, ROUNDS + 1)) + " | FL / centralised |")
    print("|---|" + "---|" * (ROUNDS + 1))
    for row, runs in curves.items():
        per_round = [mean_sd([run[r] for run in runs if len(run) > r]) for r in range(ROUNDS)]
        ratios = [run[-1] / c for run, c in zip(runs, central) if c > 0]
        print(f"| {row} | " + " | ".join(per_round) + f" | {mean_sd(ratios) if ratios else '—'} |")
    print(f"| centralised | " + " | " * (ROUNDS - 1) + f" {mean_sd(central)} | 1 |")
    print(f"\n{seconds:.0f} s of simulated runs", file=sys.stderr)


main()

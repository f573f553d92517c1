"""The learning-quality benchmark's driver (run by scripts/bench-learning, which says what it
measures): writes the splits as site folders, runs `consilium simulate` for every strategy ×
split and for the baselines, and prints Markdown tables from the simulation reports."""

import collections
import json
import os
import shutil
import statistics
import subprocess
import sys

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

BINARY, WORK, SEEDS, ROUNDS, LONG = (
    sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
)
SITES = 4

# (row label, plan.aggregation.strategy, optimiser settings over the recipe's, extra [plan.aggregation]
# lines, extra [plan.preprocessing] lines, whether its evaluations are personalised models)
STRATEGIES = [
    ("FedAvg", "fedavg", {}, [], [], False),
    ("FedProx (μ = 0.01)", "fedavg", {"proximal_mu": 0.01}, [], [], False),
    ("FedNova", "fednova", {}, [], [], False),
    ("SCAFFOLD", "scaffold", {}, [], [], False),
    ("SCAFFOLD (lr 0.01)", "scaffold", {"learning_rate": 0.01}, [], [], False),
    ("FedAvg + HarmoFL's amplitude normalisation (band 0.1)", "fedavg", {}, [],
     ["amplitude_normalisation = { band = 0.1 }"], False),
    ("FLOP (fc at the site)", "fedavg", {}, ['local_layers = ["fc"]'], [], True),
    ("FLOP (fc at the site, fitted first for 3 epochs)", "fedavg", {},
     ['local_layers = ["fc"]', "local_fit_epochs = 3"], [], True),
    ("Ditto (λ = 0.1)", "fedavg", {}, ["ditto = { lambda = 0.1 }"], [], True),
    ("FedAvg, fine-tuned at each site for 5 epochs", "fedavg", {}, ["fine_tune_epochs = 5"], [], True),
    ("FedAvg, fc fine-tuned at each site for 5 epochs", "fedavg", {},
     ["fine_tune_epochs = 5", 'fine_tune_layers = ["fc"]'], [], True),
    ("FedAvg, fc fine-tuned at each site for 20 epochs", "fedavg", {},
     ["fine_tune_epochs = 20", 'fine_tune_layers = ["fc"]'], [], True),
]


def site_epochs(aggregation, rounds):
    """The epochs a fine-tuning row's site spends on its own images in all (its rounds, then
    the fine-tuning before it scores the final model), or None for a row that does not
    fine-tune: each site alone is then given as many too, so the extra epochs are not what
    wins."""
    for line in aggregation:
        if line.startswith("fine_tune_epochs = "):
            return rounds + int(line.split("=")[1])
    return None


# BENCH_ROWS (comma-separated parts of row labels, e.g. "FLOP,Ditto") runs only those rows
# (and the centralised baseline, and each site alone where a row personalises).
# A row's runs are numbered by its place in the whole list, so a run is the same with or without it.
NUMBERED = list(enumerate(STRATEGIES))
if os.environ.get("BENCH_ROWS"):
    NUMBERED = [
        (n, s) for n, s in NUMBERED if any(part in s[0] for part in os.environ["BENCH_ROWS"].split(","))
    ]
    if not NUMBERED:
        sys.exit(f"BENCH_ROWS={os.environ['BENCH_ROWS']} names no row of the benchmark")


def pool_digits():
    """Every digit as a PNG named for itself (d0000.png …), and its label."""
    folder = os.path.join(WORK, "digits")
    os.makedirs(folder, exist_ok=True)
    d = load_digits()
    pool = []
    for i, (img, label) in enumerate(zip(d.images, d.target)):
        name = f"d{i:04}.png"
        Image.fromarray((img * (255 / 16)).round().astype(np.uint8), "L").save(
            os.path.join(folder, name)
        )
        pool.append((name, os.path.join(folder, name), int(label)))
    return pool


def pool_phantoms():
    """The example's sites' phantoms, each renamed for its site (north-img00000.png …), and
    the site each came from."""
    pool, origin = [], []
    sites_dir = os.path.join(WORK, "example", "sites")
    for s, site in enumerate(sorted(os.listdir(sites_dir))):
        with open(os.path.join(sites_dir, site, "labels.csv")) as f:
            next(f)
            for line in f:
                file, label = line.strip().split(",")
                pool.append((f"{site}-{file}", os.path.join(sites_dir, site, file), int(label)))
                origin.append(s)
    return pool, origin


def split(kind, labels, rng):
    """Site index lists: IID, Dirichlet α = 0.5 over each class, or 2 label shards of 8 each."""
    n = len(labels)
    if kind == "IID":
        order = rng.permutation(n)
        return [sorted(order[i::SITES]) for i in range(SITES)]
    if kind == "Dirichlet α = 0.5":
        sites = [[] for _ in range(SITES)]
        for c in sorted(set(labels)):
            idx = rng.permutation([i for i in range(n) if labels[i] == c])
            cuts = (np.cumsum(rng.dirichlet([0.5] * SITES)) * len(idx)).astype(int)[:-1]
            for s, part in enumerate(np.split(idx, cuts)):
                sites[s].extend(part.tolist())
        return [sorted(s) for s in sites]
    # Label shards (McMahan et al. 2017): sorted by label, 2 × SITES shards, 2 per site.
    order = sorted(range(n), key=lambda i: (labels[i], i))
    shards = np.array_split(order, 2 * SITES)
    picks = rng.permutation(2 * SITES)
    return [sorted(np.concatenate([shards[picks[2 * s]], shards[picks[2 * s + 1]]]).tolist()) for s in range(SITES)]


def write_sites(tag, pool, sites):
    """Site folders of hard links to the pool's files, each with its labels.csv (kept as they
    are when an earlier, interrupted benchmark in the same folder wrote them)."""
    roots = []
    for s, members in enumerate(sites):
        root = os.path.join(WORK, "sites", tag, f"site{s + 1}")
        roots.append(root)
        if os.path.exists(os.path.join(root, "labels.csv")):
            continue
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, "labels.csv"), "w") as f:
            f.write("file,label\n")
            for i in members:
                name, path, label = pool[i]
                os.link(path, os.path.join(root, name))
                f.write(f"{name},{label}\n")
    return roots


def simulate(tag, roots, classes, seed, strategy, optimiser, aggregation, rounds, epochs, pre=(), experiment=None):
    """One `consilium simulate` run; returns the final model's evaluation. Runs of the same
    `experiment` (default: the tag) give their sites the same ids, so the same seed gives each
    site the same batches: the strategies of one split and seed are compared on equal terms."""
    lines = [
        f'name = "{experiment or tag}"',
        f'data_dir = "run-{tag}"',
        f'report = "report-{tag}.json"',
        "round_timeout_seconds = 900",
        "[plan]",
        f"local_epochs = {epochs}",
        "batch_size = 32",
        f"rounds = {rounds}",
        f"seed = {seed}",
        "[plan.model]",
        'architecture = "small_cnn"',
        f"num_classes = {classes}",
        'initialisation = "pytorch"',
        "[plan.preprocessing]",
        "image_size = 28",
        'normalisation = "dataset"',
        *pre,
        "[plan.optimiser]",
    ]
    # The recipe's optimiser; a strategy's settings add to it or replace its values.
    recipe = {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9, **optimiser}
    lines += [f"{k} = {json.dumps(v)}" for k, v in recipe.items()]
    lines += ["[plan.aggregation]", f'strategy = "{strategy}"', f"min_sites = {len(roots)}"]
    lines += list(aggregation)
    for i, root in enumerate(roots):
        lines += [
            "[[sites]]",
            f'name = "site {i + 1}"',
            "[sites.dataset]",
            'kind = "images"',
            f'root = "{root}"',
            f'labels = "{root}/labels.csv"',
            'label_key = "path"',
            "holdout = 0.2",
        ]
    config = os.path.join(WORK, f"{tag}.toml")
    text = "\n".join(lines) + "\n"
    report_path = os.path.join(WORK, f"report-{tag}.json")
    failed = None
    if not (os.path.exists(report_path) and read(config) == text):
        # A run of an interrupted benchmark is done again from the start.
        shutil.rmtree(os.path.join(WORK, f"run-{tag}"), ignore_errors=True)
        if os.path.exists(report_path):
            os.remove(report_path)
        with open(config, "w") as f:
            f.write(text)
        out = subprocess.run([BINARY, "simulate", "--config", config], capture_output=True, text=True)
        if out.returncode != 0:
            # A run that failed (a model that diverged) counts with the last model it made.
            failed = (out.stderr.strip().splitlines() or ["failed"])[-1]
            if not os.path.exists(report_path):
                sys.exit(f"simulate {tag} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
            with open(report_path + ".failed", "w") as f:
                f.write(failed)
    elif os.path.exists(report_path + ".failed"):
        failed = read(report_path + ".failed").strip()
    with open(report_path) as f:
        report = json.load(f)
    evaluation = (report.get("final_model") or {}).get("evaluation") or {}
    if not evaluation.get("global"):
        if not failed:
            sys.exit(f"simulate {tag} made no evaluated model")
        # Its last model could not even be evaluated (its outputs are not numbers).
        evaluation = {"global": {"accuracy": 0.0}, "sites": []}
    if failed:
        print(f"{tag}: {failed}; counted with its last model", file=sys.stderr, flush=True)
    sites = sorted(evaluation["sites"], key=lambda s: int(s["site_name"].split()[-1]))
    return {
        "failed": failed,
        "global": evaluation["global"]["accuracy"],
        "sites": [s["metrics"]["accuracy"] for s in sites],
        "held_out": [s["metrics"]["samples"] for s in sites],
        "seconds": report["seconds"],
    }


def read(path):
    """A file's text, or None where there is none."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read()


def mean_sd(xs):
    return f"{statistics.mean(xs):.3f}" + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")


def main():
    digits = pool_digits()
    phantoms, origin = pool_phantoms()
    # (dataset, its pool, classes, [(split, rounds of 1 local epoch)]): every split at ROUNDS,
    # and label shards again at LONG rounds (the same total epochs as a centralised LONG).
    datasets = [
        ("digits", digits, 10,
         [("IID", ROUNDS), ("Dirichlet α = 0.5", ROUNDS), ("label shards", ROUNDS), ("label shards", LONG)]),
        ("phantoms", phantoms, 2, [("scanner shift", ROUNDS)]),
    ]
    # table[(dataset, split, rounds)][row] = list over seeds of ratio (or accuracy); a seed whose
    # centralised run collapsed (no better than 1.5 × chance) is no baseline: collapsed[column]
    # lists (seed, its accuracy), and its ratios are left out.
    table, personal, failures, seconds = {}, {}, collections.Counter(), 0.0
    collapsed = collections.defaultdict(list)
    for seed in range(1, SEEDS + 1):
        rng = np.random.default_rng(seed)
        for name, pool, classes, splits in datasets:
            every = list(range(len(pool)))
            central, members_of = {}, {}
            for kind, rounds in splits:
                if rounds not in central:
                    central[rounds] = simulate(
                        f"{name}-central-{rounds}-{seed}",
                        write_sites(f"{name}-central-{rounds}-{seed}", pool, [every]),
                        classes, seed, "fedavg", {}, [], 1, rounds,
                    )
                    seconds += central[rounds]["seconds"]
                base = central[rounds]
                if kind not in members_of:
                    labels = [p[2] for p in pool]
                    members_of[kind] = (
                        [[i for i in every if origin[i] == s] for s in sorted(set(origin))]
                        if kind == "scanner shift"
                        else split(kind, labels, rng)
                    )
                tag = f"{name}-{kind.split()[0].lower()}-{rounds}-{seed}"
                roots = write_sites(tag, pool, members_of[kind])
                cell = table.setdefault((name, kind, rounds), {})
                cell.setdefault("centralised", []).append(base["global"])
                baseline = base["global"] > 1.5 / classes
                if not baseline:
                    collapsed[(name, kind, rounds)].append((seed, base["global"]))
                # each site alone, by the epochs it trains
                alone_for = {}

                def alone(epochs):
                    nonlocal seconds
                    if epochs not in alone_for:
                        alone_for[epochs] = []
                        for s, root in enumerate(roots):
                            # (the first tag is the one the runs have had, so a BENCH_WORK keeps them)
                            label = "alone" if epochs == rounds else f"alone{epochs}"
                            a = simulate(
                                f"{tag}-{label}-{s}", [root], classes, seed, "fedavg", {}, [], 1, epochs
                            )
                            seconds += a["seconds"]
                            alone_for[epochs].append(a["global"])
                    return alone_for[epochs]

                for number, (row, strategy, optimiser, aggregation, pre, personalised) in NUMBERED:
                    r = simulate(
                        f"{tag}-{number}-{strategy}",
                        roots, classes, seed, strategy, optimiser, aggregation, rounds, 1, pre,
                        experiment=tag,
                    )
                    seconds += r["seconds"]
                    if baseline:
                        cell.setdefault(row, []).append(r["global"] / base["global"])
                    if r["failed"] and baseline:
                        failures[(name, kind, rounds, row)] += 1
                    if personalised:
                        personal.setdefault((name, kind, rounds, row), []).append(
                            (r["sites"], alone(rounds), r["held_out"])
                        )
                        longer = site_epochs(aggregation, rounds)
                        if longer:
                            personal.setdefault(
                                (name, kind, rounds, f"{row}, against each site alone for {longer} epochs"), []
                            ).append((r["sites"], alone(longer), r["held_out"]))
                print(f"seed {seed}: {name}, {kind}, {rounds} rounds done", file=sys.stderr, flush=True)

    rows = ["centralised"] + [s[0] for _, s in NUMBERED]
    columns = [(d[0], k, r) for d in datasets for k, r in d[3]]
    print(
        f"FL / centralised held-out accuracy, rounds of 1 local epoch (centralised: 1 site, as many "
        f"epochs), mean ± sd over {SEEDS} seed(s); the centralised row is its accuracy. "
        "The personalised rows' figures (FLOP, Ditto, fine-tuning) are their sites' personalised models (mean over sites, "
        "weighted by held-out images) against the centralised model. A run that failed (its "
        "model diverged, so its sites stopped it) counts with the last model it made. A seed "
        "whose centralised model collapsed (no better than 1.5 × chance) gives no ratios in its "
        "column, which says so.\n"
    )
    def heading(c):
        d, k, r = c
        left_out = "".join(
            f" (seed {seed} left out: centralised {acc:.3f})" for seed, acc in collapsed[c]
        )
        return f"{d}: {k}, {r} rounds{left_out}"

    print("| strategy | " + " | ".join(heading(c) for c in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for row in rows:
        print(
            f"| {row} | "
            + " | ".join(
                mean_sd(table[c][row])
                + (f" ({failures[(*c, row)]} failed)" if failures[(*c, row)] else "")
                for c in columns
            )
            + " |"
        )
    print("\nPersonalisation against each site alone (one site's data, the same epochs; for a "
          "fine-tuning row also as many epochs as its site spent on its own images in all), "
          "held-out accuracy per site, one line per seed:\n")
    # A site's held-out images are the same in both runs (chosen by a hash of each file's name),
    # so a shortfall is a count of images the personalised model gets wrong and the site's own
    # model gets right, net.
    print("| split | personalisation | sites' personalised models | each site alone | sites at least as good | largest shortfall |")
    print("|---|---|---|---|---|---|")
    for (name, kind, rounds, row), runs in personal.items():
        for fl, alone, held_out in runs:
            if not fl:
                # A run that failed before any model was scored at its sites: none of them is
                # at least as good as on its own.
                print(
                    f"| {name}: {kind}, {rounds} rounds | {row} | none (the run failed before its "
                    f"sites scored a model) | {', '.join(f'{x:.3f}' for x in alone)} | "
                    f"0 of {len(alone)} | every site |"
                )
                continue
            ok = sum(f >= a for f, a in zip(fl, alone))
            worst, n = max((round((a - f) * n), n) for f, a, n in zip(fl, alone, held_out))
            print(
                f"| {name}: {kind}, {rounds} rounds | {row} | {', '.join(f'{x:.3f}' for x in fl)} | "
                f"{', '.join(f'{x:.3f}' for x in alone)} | {ok} of {len(fl)} | "
                + (f"{worst} of a site's {n} images |" if worst > 0 else "none |")
            )
    print(f"\n{seconds:.0f} s of simulated runs", file=sys.stderr)


main()

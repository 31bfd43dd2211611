"""Training the project's tile encoder (``slidesynth-tile-v1``) on procedural tissue.

Objective, two terms on two augmented views of each window:

* **supervised**: a cosine classifier over the five procedural classes (logits = 16 · ⟨ê, ŵ_c⟩ with ê the unit
  embedding and ŵ_c a learned unit class vector; cross-entropy, label smoothing 0.05). It makes each class a
  tight cap on the sphere, so a class's mean embedding (its *prototype*) is a usable condition and nearest-
  prototype labelling works;
* **contrastive**: NT-Xent (SimCLR; τ = 0.2) between the two views, through a projection head that is dropped
  after training. It keeps what distinguishes one window from another of the same class (stain strength,
  density, fibre direction) in the embedding, which the supervised term alone would collapse — ∞-Brush asked
  for "a slide like this tile" needs that, not only the class.

Data (deterministic in ``seed``): renders of 256² procedural layouts (three in four ``tile`` layouts, one in four
``slide`` layouts at 0.5–2 µm/px region scales), windows of 64–128 px whose majority class covers ≥ 75 %,
reduced to 64 px with the encoder's own transform (:func:`models.encoders.preprocess.prepare_tile`), so the
encoder sees what ``embed`` hands it for tiles of 64–128 px (0.5–1 µm/px). Augmentation: rot90/flips, stain
strength per channel in optical density, brightness, and a decoder's softness (blur or ×2/×4 down-up) — the
embeddings of generated windows are compared with those of real tiles. Held-out sets use seeds ``seed + 1``
(prototypes) and ``seed + 2`` (accuracy), never seen in training.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.encoders.cards import EncoderCard
from models.encoders.preprocess import prepare_tile
from models.encoders.tile_cnn import DEFAULT_HIDDEN, DEFAULT_STRIDES, DEFAULT_WIDTHS, TileCNN, TileCNNEncoder
from models.hashing import sha256_file

INPUT_SIZE = 64
NATIVE_MPP = 0.5
WINDOW_SIZES = (64, 80, 96, 128)
MIN_SHARE = 0.75
WEIGHTS_FILE = "encoder.safetensors"
PROTOTYPES_FILE = "prototypes.json"


# ------------------------------------------------------------------------------------------------ data
def procedural_tiles(n_images: int, seed: int, *, size: int = 256, per_image: int = 24,
                     window_sizes: Sequence[int] = WINDOW_SIZES, input_size: int = INPUT_SIZE,
                     min_share: float = MIN_SHARE) -> tuple[np.ndarray, np.ndarray]:
    """Windows reduced to ``input_size`` (uint8 (N, s, s, 3)) and their majority class (N,)."""
    from procedural.tissue import NUM_CLASSES, item_seed, random_layout, render_tile

    X, Y = [], []
    for i in range(n_images):
        s = item_seed(seed, i)
        rng = np.random.default_rng([s, 29])
        if i % 4 == 3:
            labels = random_layout(size, size, s, "slide", mpp=float(rng.choice([0.5, 1.0, 2.0])))
        else:
            labels = random_layout(size, size, s, "tile")
        img = render_tile(labels, s)
        for _ in range(per_image):
            w = int(rng.choice(window_sizes))
            y, x = (int(v) for v in rng.integers(0, size - w + 1, 2))
            counts = np.bincount(labels[y:y + w, x:x + w].ravel(), minlength=NUM_CLASSES)
            c = int(counts.argmax())
            if counts[c] >= min_share * w * w:
                X.append(prepare_tile(img[y:y + w, x:x + w], input_size, "area"))
                Y.append(c)
    return np.stack(X), np.asarray(Y, np.int64)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random view of a float [0, 1] batch (B, 3, S, S); every choice is drawn per sample."""
    b = x.shape[0]
    k = torch.randint(0, 4, (b,), generator=gen)
    x = torch.stack([torch.rot90(x[i], int(k[i]), (1, 2)) for i in range(b)])
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    od = -torch.log(x.clamp_min(1 / 255))
    od = od * (0.7 + 0.6 * torch.rand(b, 1, 1, 1, generator=gen)) * (0.88 + 0.24 * torch.rand(b, 3, 1, 1, generator=gen))
    x = torch.exp(-od) * (0.93 + 0.14 * torch.rand(b, 1, 1, 1, generator=gen))
    mode = torch.randint(0, 4, (b,), generator=gen)        # 0 none, 1 blur, 2 ×2 down-up, 3 ×4 down-up
    size = x.shape[-1]
    soft = x.clone()
    if (mode == 1).any():
        sigma = 0.5 + 1.5 * float(torch.rand(1, generator=gen))
        r = 5
        t = torch.arange(-r, r + 1, dtype=x.dtype)
        g = torch.exp(-t * t / (2 * sigma * sigma))
        g = (g / g.sum()).to(x.dtype)
        idx = mode == 1
        y = F.conv2d(F.pad(x[idx], (r, r, 0, 0), mode="replicate"), g.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
        soft[idx] = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), g.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)
    for m, f in ((2, 2), (3, 4)):
        idx = mode == m
        if idx.any():
            soft[idx] = F.interpolate(F.avg_pool2d(x[idx], f), size=(size, size), mode="bilinear", align_corners=False)
    x = soft + torch.randn(x.shape, generator=gen) * (0.02 * torch.rand(b, 1, 1, 1, generator=gen))
    return x.clamp(0, 1)


# ------------------------------------------------------------------------------------------------ losses
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view's positive is the other view of its window, the other 2B − 2 are negatives."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    sim = z @ z.t() / temperature
    n = z1.shape[0]
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


class Trainee(nn.Module):
    """The encoder's network plus what only training uses: class vectors and a projection head."""

    def __init__(self, dim: int, num_classes: int, widths, strides, hidden: int, proj_dim: int = 64):
        super().__init__()
        self.net = TileCNN(dim, widths, strides, hidden)
        self.class_vectors = nn.Parameter(torch.randn(num_classes, dim) * 0.1)
        self.projection = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, proj_dim))


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate(encoder: TileCNNEncoder, X_proto: np.ndarray, Y_proto: np.ndarray, X_test: np.ndarray,
             Y_test: np.ndarray, class_names: dict[int, str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Prototypes (unit mean embedding per class, from the first held-out set) and, on the second, the
    nearest-prototype accuracy, per-class recall and the cosine to the own vs the nearest other prototype."""
    e_proto = encoder.embed(X_proto)
    classes = sorted(int(c) for c in np.unique(Y_proto))
    P = np.stack([e_proto[Y_proto == c].mean(0) for c in classes])
    P /= np.linalg.norm(P, axis=1, keepdims=True)
    keep = np.isin(Y_test, classes)              # a class without a prototype cannot be named
    X_test, Y_test = X_test[keep], Y_test[keep]
    e = encoder.embed(X_test)
    cos = e @ P.T
    pred = np.asarray(classes)[cos.argmax(1)]
    recall = {class_names[c]: round(float((pred[Y_test == c] == c).mean()), 4) for c in classes if (Y_test == c).any()}
    own_i = np.searchsorted(classes, Y_test)
    own = cos[np.arange(len(Y_test)), own_i]
    other = np.where(np.eye(len(classes), dtype=bool)[own_i], -np.inf, cos).max(1)
    metrics = {
        "nearest_prototype_accuracy": round(float((pred == Y_test).mean()), 4),
        "nearest_prototype_balanced_accuracy": round(float(np.mean(list(recall.values()))), 4),
        "recall": recall,
        "mean_cosine_to_own_prototype": round(float(own.mean()), 4),
        "mean_cosine_to_nearest_other_prototype": round(float(other.mean()), 4),
        "share_closer_to_own_by_0.1": round(float((own - other > 0.1).mean()), 4),
        "prototype_cosines": {class_names[a]: {class_names[b]: round(float(P[i] @ P[j]), 3) for j, b in enumerate(classes)}
                              for i, a in enumerate(classes)},
        "test_windows": int(len(Y_test)),
    }
    return {class_names[c]: P[i] for i, c in enumerate(classes)}, metrics


# ------------------------------------------------------------------------------------------------ training
def train_tile_encoder(out_dir: str | Path, *, encoder_id: str = "slidesynth-tile-v1", dim: int = 128,
                       n_images: int = 640, per_image: int = 24, steps: int = 800, batch: int = 96,
                       lr: float = 3e-3, contrastive_weight: float = 0.5, temperature: float = 0.2,
                       seed: int = 0, threads: int | None = None, held_out_images: int = 160,
                       widths: Sequence[int] = DEFAULT_WIDTHS, strides: Sequence[int] = DEFAULT_STRIDES,
                       hidden: int = DEFAULT_HIDDEN, command: str | None = None,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, evaluate on held-out procedural windows, write weights + prototypes + card; returns the card.

    Deterministic for a given ``seed`` and thread count (both on the card)."""
    from safetensors.torch import save_file

    from procedural.tissue import CLASS_NAMES, GENERATOR_VERSION, NUM_CLASSES

    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    out = Path(out_dir)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng([seed, 3])
    X, Y = procedural_tiles(n_images, seed, per_image=per_image)
    X_proto, Y_proto = procedural_tiles(held_out_images, seed + 1, per_image=per_image)
    X_test, Y_test = procedural_tiles(held_out_images, seed + 2, per_image=per_image)
    counts = np.bincount(Y, minlength=NUM_CLASSES)
    log(f"data: {len(Y)} training windows {counts.tolist()}, held out {len(Y_proto)} + {len(Y_test)} "
        f"({time.perf_counter() - t0:.0f} s)")
    if (counts == 0).any():
        raise ValueError(f"training windows miss classes {np.flatnonzero(counts == 0).tolist()}; raise n_images")
    p = (1.0 / counts)[Y]
    p /= p.sum()
    Xt, Yt = torch.from_numpy(X).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(Y)
    model = Trainee(dim, NUM_CLASSES, widths, strides, hidden)
    card = EncoderCard(id=encoder_id, kind="tile-cnn", dim=dim, input_size=INPUT_SIZE, mpp=NATIVE_MPP,
                       resize="area", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), weights=WEIGHTS_FILE,
                       config={"widths": [int(w) for w in widths], "strides": [int(s) for s in strides],
                               "hidden": int(hidden)})
    mean, std = torch.tensor(card.mean).view(1, 3, 1, 1), torch.tensor(card.std).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    t1 = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.from_numpy(rng.choice(len(Y), size=batch, p=p))
        xb = Xt[idx].float().div_(255.0)
        v1, v2 = ((augment(xb, gen) - mean) / std, (augment(xb, gen) - mean) / std)
        e = model.net(torch.cat([v1, v2]))
        logits = 16.0 * F.normalize(e, dim=-1) @ F.normalize(model.class_vectors, dim=-1).t()
        sup = F.cross_entropy(logits, torch.cat([Yt[idx], Yt[idx]]), label_smoothing=0.05)
        con = nt_xent(model.projection(e[:batch]), model.projection(e[batch:]), temperature)
        loss = sup + contrastive_weight * con
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps:
            log(f"step {step}/{steps} loss {loss.item():.3f} (supervised {sup.item():.3f}, contrastive "
                f"{con.item():.3f}) ({time.perf_counter() - t1:.0f} s)")
    train_seconds = time.perf_counter() - t1
    model.eval()
    encoder = TileCNNEncoder(card, model.net)
    class_names = {int(k): v for k, v in CLASS_NAMES.items()}
    prototypes, metrics = evaluate(encoder, X_proto, Y_proto, X_test, Y_test, class_names)
    # the same test layouts with 128-px windows (0.5 → 1 µm/px after the reduction): scale tolerance
    X_big, Y_big = procedural_tiles(held_out_images, seed + 2, per_image=per_image, window_sizes=(128,))
    _, big = evaluate(encoder, X_proto, Y_proto, X_big, Y_big, class_names)
    metrics["nearest_prototype_accuracy_128px_windows"] = big["nearest_prototype_accuracy"]
    log(f"nearest-prototype accuracy {metrics['nearest_prototype_accuracy']} (128-px windows "
        f"{metrics['nearest_prototype_accuracy_128px_windows']}); recall {metrics['recall']}")

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.net.state_dict().items()}, str(out / WEIGHTS_FILE),
              metadata={"format": "pt"})  # one key: safetensors writes a map of several in random order
    ids = {name: c for c, name in class_names.items()}
    (out / PROTOTYPES_FILE).write_text(json.dumps({
        "encoder": encoder_id, "class_ids": {n: ids[n] for n in prototypes},
        "note": f"unit-length mean embedding of the held-out procedural windows of each class (seed {seed + 1}, "
                f"{len(Y_proto)} windows)",
        "vectors": {n: [round(float(v), 6) for v in vec] for n, vec in prototypes.items()}}, indent=1) + "\n")
    n_params = sum(p.numel() for p in model.net.parameters())
    command = command or (f"slidesynth train tile-encoder --out {out_dir} --id {encoder_id} --dim {dim} "
                          f"--n-images {n_images} --per-image {per_image} --steps {steps} --batch {batch} --lr {lr} "
                          f"--contrastive-weight {contrastive_weight} --temperature {temperature} --seed {seed} "
                          f"--threads {threads}")
    card = card.model_copy(update=dict(
        description="The project's small CNN tile encoder: 64-px RGB tiles at 0.5 µm/px → 128-d unit vectors. "
                    "Trained on procedural H&E-like tissue only (procedural.tissue), not on real histology.",
        prototypes=PROTOTYPES_FILE,
        files={WEIGHTS_FILE: sha256_file(out / WEIGHTS_FILE), PROTOTYPES_FILE: sha256_file(out / PROTOTYPES_FILE)},
        training={
            "objective": "supervised cosine classifier over the 5 procedural classes (scale 16, label smoothing "
                         f"0.05) + {contrastive_weight} × NT-Xent between two augmented views (τ = {temperature}, "
                         "through a projection head dropped after training)",
            "command": command,
            "data": f"procedural.tissue v{GENERATOR_VERSION}: {n_images} renders of 256² px (seed {seed}), "
                    f"{len(Y)} windows of {'/'.join(map(str, WINDOW_SIZES))} px reduced to {INPUT_SIZE} px "
                    f"(area), majority share ≥ {MIN_SHARE}, class-balanced sampling",
            "windows_per_class": counts.tolist(),
            "augmentation": "rot90/flips, stain strength in optical density, brightness, blur or ×2/×4 down-up, noise",
            "steps": steps, "batch": batch, "lr": lr, "seed": seed,
            "device": "cpu", "torch": torch.__version__, "threads": threads,
            "seconds": round(train_seconds, 1), "seconds_total": round(time.perf_counter() - t0, 1),
        },
        metrics={**metrics, "held_out": f"prototypes from seed {seed + 1}, accuracy on seed {seed + 2} "
                                        f"(procedural layouts never seen in training)"},
        parameters=n_params, size_bytes=(out / WEIGHTS_FILE).stat().st_size,
        class_names={str(c): n for c, n in class_names.items()},
    ))
    card.save(out)
    return card.model_dump(mode="json")

"""Small generated datasets in the real on-disk layouts (no network, no ../shared)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

ADIENCE_AGES = ["(0, 2)", "(4, 6)", "(8, 12)", "(15, 20)", "(25, 32)", "(38, 43)", "(48, 53)", "(60, 100)"]
HEADER = "user_id\toriginal_image\tface_id\tage\tgender\tx\ty\tdx\tdy\ttilt_ang\tfiducial_yaw_angle\tfiducial_score"


def face_image(age: int, gender: int, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A BGR picture whose colour follows gender and whose blob size follows the age group."""
    img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    colour = (40, 40, 220) if gender == 0 else (220, 60, 40)
    radius = int(size * (0.12 + 0.045 * age))
    cv2.circle(img, (size // 2, size // 2), radius, colour, -1)
    return img


def make_adience(root: Path, users_per_fold: int = 2, per_user: int = 6, size: int = 64, layout: str = "aligned",
                 seed: int = 0) -> Path:
    """Five fold files + images in aligned/ (or faces/); a few rows have None age or 'u' gender."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    prefix = "landmark_aligned_face" if layout == "aligned" else "coarse_tilt_aligned_face"
    for k in range(5):
        lines = [HEADER]
        for u in range(users_per_fold):
            user = f"{1000 + k * 10 + u}@N0{k}"
            for j in range(per_user):
                age = int(rng.integers(0, 8))
                gender = int(rng.integers(0, 2))
                original = f"{k}{u}{j}_abc_o.jpg"
                age_s = "None" if j == per_user - 1 and u == 0 else ADIENCE_AGES[age]
                gender_s = "u" if j == 0 and u == 0 else "mf"[gender]
                lines.append(f"{user}\t{original}\t{j + 1}\t{age_s}\t{gender_s}\t0\t0\t10\t10\t0\t0\t50")
                d = root / layout / user
                d.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(d / f"{prefix}.{j + 1}.{original}"), face_image(age, gender, rng, size))
        (root / f"fold_{k}_data.txt").write_text("\n".join(lines) + "\n")
    return root


def make_csv(root: Path, n: int = 40, size: int = 48, seed: int = 0, folds: int = 5) -> Path:
    """A CSV dataset path,age,gender,fold with exact ages and generated images."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = ["path,age,gender,fold"]
    mids = [1, 5, 10, 17, 28, 40, 50, 70]
    for i in range(n):
        group, gender = int(rng.integers(0, 8)), int(rng.integers(0, 2))
        name = f"img_{i:04d}.jpg"
        cv2.imwrite(str(root / name), face_image(group, gender, rng, size))
        rows.append(f"{name},{mids[group]},{'mf'[gender]},{i % folds}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def tiny_checkpoint(root: Path, arch: str = "mobilenetv3_small_050", size: int = 32, crop_margin: float = 0.1) -> dict:
    """A generated CSV dataset and a checkpoint trained 30 AdamW steps on its training folds (fold 0 is the
    test fold): {"root", "ckpt", "csv", "records"}. Needs torch (export and train tests only)."""
    import torch

    from agegender.export.net import AgeGenderNet, ModelArgs, make_checkpoint, save_checkpoint
    from agegender.export.parity import face_of
    from agegender.runtime.datasets import label_arrays, read_dataset
    from agegender.runtime.preprocess import to_input

    csv = make_csv(root / "data", n=100, size=48)
    records, _ = read_dataset(csv)
    train = [r for r in records if r.fold != 0]
    x = torch.from_numpy(to_input(np.stack([face_of(r.path, size) for r in train])))
    age, gender, _ = label_arrays(train)
    a, g = torch.from_numpy(age), torch.from_numpy(gender)
    torch.manual_seed(0)
    net = AgeGenderNet(ModelArgs(arch=arch, img_size=size, drop_rate=0.0))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(30):
        idx = torch.randint(0, len(train), (16,))
        out = net(x[idx])
        loss = (torch.nn.functional.cross_entropy(out["age"], a[idx], label_smoothing=0.1)
                + torch.nn.functional.cross_entropy(out["gender"], g[idx], label_smoothing=0.1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    data = {"root": str(csv), "format": "csv", "fold": 0, "nfolds": 5, "holdout": 0.0}
    ckpt = make_checkpoint(net.eval(), crop_margin=crop_margin, config={"arch": arch}, data=data,
                           train_data="csv:generated (80 images)", fold=0, epoch=1,
                           metrics={"test": {"age_exact": 0.5, "gender_acc": 0.9}})
    save_checkpoint(root / "tiny.pt", ckpt)
    return {"root": root, "ckpt": root / "tiny.pt", "csv": csv, "records": records}


def make_video(path: Path, frames: int, size: tuple[int, int] = (64, 48), step: int = 20) -> Path:
    """An MJPG AVI of ``frames`` flat grey frames (brightness i * step) at 10 fps."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, size)
    for i in range(frames):
        writer.write(np.full((size[1], size[0], 3), (i * step) % 256, np.uint8))
    writer.release()
    return path

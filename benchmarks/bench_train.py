"""Training throughput of the project's own loop pieces: cached faces -> albumentations ->
model forward/backward/AdamW step, as train-adience runs them on a CPU.

    python benchmarks/bench_train.py --arch mobilenetv3_small_100 --img-size 112 --batch-size 64
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from agegender.export.net import create_net, default_model_args
from agegender.train.data import FaceDataset, train_transform
from agegender.train.engine import _loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="mobilenetv3_small_100")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--augment", choices=["default", "none"], default="default")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    n = a.batch_size * (a.batches + a.warmup)
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, (n, a.img_size, a.img_size, 3), dtype=np.uint8)
    labels = rng.integers(0, 8, n), rng.integers(0, 2, n)
    ds = FaceDataset(faces, np.arange(n), labels[0], labels[1], train_transform(a.img_size, a.augment))
    loader = DataLoader(ds, batch_size=a.batch_size, shuffle=True, num_workers=a.workers, drop_last=True)
    net = create_net(default_model_args(a.arch, "both", a.img_size)).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    seen, t0, data_t, tic = 0, None, 0.0, time.perf_counter()
    for i, (x, age, gender) in enumerate(loader):
        if i == a.warmup:
            t0, seen, data_t = time.perf_counter(), 0, 0.0
        data_t += time.perf_counter() - tic
        loss = _loss(net(x), age, gender, 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(x)
        tic = time.perf_counter()
    dt = time.perf_counter() - t0
    print(f"{a.arch} {a.img_size}px batch {a.batch_size} augment={a.augment} workers={a.workers} "
          f"threads={torch.get_num_threads()}: {seen / dt:.0f} img/s (data {data_t / dt:.0%} of the time)")


if __name__ == "__main__":
    main()

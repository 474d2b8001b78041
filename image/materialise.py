"""The pipeline's data step inside the image: `pipeline.data.materialise` reads data/raw of a
git repository at a revision from its DVC remote on S3, as on a cluster (image/test.sh
serves the repository with `git daemon` and the remote with moto's S3 server on 127.0.0.1).

    python3 /image/materialise.py --repo-url git://127.0.0.1:PORT/dataset \
        --endpoint http://127.0.0.1:PORT --out DIR [--rev REV] --expect-hash HASH.dir

Credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), as from a
Kubernetes secret. Exits 1 unless the materialised folder has the expected DVC hash.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo-url", required=True)
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rev", default="")
    ap.add_argument("--expect-hash", required=True)
    args = ap.parse_args(argv)

    from pipeline.data import materialise

    info = materialise(args.out, repo_url=args.repo_url, rev=args.rev, endpoint_url=args.endpoint)
    print(json.dumps(info))
    if info["data_hash"] != args.expect_hash or "dvc_file_md5" in info:
        print(f"expected data_hash {args.expect_hash}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

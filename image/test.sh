#!/usr/bin/env bash
# `make image-test`: run the built image the way the pipeline runs it, and check what it holds.
#
#   1. contents    as root inside the image: no .git, tests, data, credentials or host CA;
#                  its size
#   2. cli         `skinlesion --help` and `skinlesion info` as the image's default user,
#                  which must not be root
#   3. compile     `skinlesion pipeline compile` names $IMAGE in every step; --image overrides
#   4. pipeline    `skinlesion synth` then `skinlesion pipeline run-local` with params.demo.yaml
#                  (kfp.local: every KFP component body runs on the image's own packages),
#                  outputs checked by image/check_pipeline.py
#   5. data-step   pipeline.data.materialise reads data/raw of a git repository (served by
#                  `git daemon`) at two revisions from its DVC remote in moto's S3 server, both
#                  on 127.0.0.1 on this host (moto is not in the image)
#
# The host side (moto_server, dvc push, git) uses the development venv ($VENV). Settings:
# IMAGE (required), ENGINE (auto|docker|buildah), STORAGE_DRIVER (buildah; overlay),
# VENV (.venv), KEEP=1 keeps the work folder, SYNTH_N (400, the demo's size).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

: "${IMAGE:?IMAGE must name the image to test}"
ENGINE=${ENGINE:-auto}
STORAGE_DRIVER=${STORAGE_DRIVER:-overlay}
VENV=${VENV:-$ROOT/.venv}
SYNTH_N=${SYNTH_N:-400}
if [[ $ENGINE == auto ]]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker; else ENGINE=buildah; fi
fi
buildah=(buildah --storage-driver "$STORAGE_DRIVER")

work=$(mktemp -d "${TMPDIR:-/tmp}/skinlesion-image-test.XXXXXX")
chmod 755 "$work"
mkdir -p "$work/w"                 # /work in the container, written by the non-root user
chown 1000:1000 "$work/w"
ctr=""
cleanup() {
    [[ -n $ctr ]] && "${buildah[@]}" rm "$ctr" >/dev/null 2>&1 || true
    if [[ ${KEEP:-0} == 1 ]]; then echo "work folder kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

mounts=(-v "$work/w:/work" -v "$ROOT/image:/image:ro" -v "$ROOT/params.demo.yaml:/in/params.demo.yaml:ro")
if [[ $ENGINE == buildah ]]; then
    ctr=$("${buildah[@]}" from --pull=never "$IMAGE")
fi

# in_image [--root] [--app] [--env K=V ...] -- CMD...: run CMD in the image, /work mounted,
# cwd /work (--app: the image's WORKDIR /app, where a cluster runs every step), as the image's
# own user (or root with --root); chroot isolation shares the host's network.
in_image() {
    local user=() envs=() cwd=/work
    while [[ $1 != -- ]]; do
        case $1 in
            --root) user=(--user root) ;;
            --app) cwd=/app ;;
            --env) envs+=(--env "$2"); shift ;;
            *) envs+=("$1") ;;
        esac
        shift
    done
    shift
    if [[ $ENGINE == buildah ]]; then
        "${buildah[@]}" run --isolation chroot "${user[@]}" "${envs[@]}" --workingdir "$cwd" \
            "${mounts[@]}" "$ctr" -- "$@"
    else
        docker run --rm --network host "${user[@]}" "${envs[@]}" -w "$cwd" "${mounts[@]}" "$IMAGE" "$@"
    fi
}

passed=() failed=()
check() {   # check NAME FUNCTION: run FUNCTION with `set -e`, record and time it
    local name=$1 t0=$SECONDS rc
    [[ " ${CHECKS:-$name} " == *" $name "* ]] || return 0   # CHECKS="pipeline ...": only those
    echo "== $name"
    set +e
    ( set -e; "$2" )
    rc=$?
    set -e
    if [[ $rc == 0 ]]; then passed+=("$name"); echo "== PASS $name ($((SECONDS - t0)) s)"
    else failed+=("$name"); echo "== FAIL $name (exit $rc, $((SECONDS - t0)) s)"; fi
}

contents() {
    local ca=()
    if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
        mounts+=(-v /etc/ssl/certs/ca-certificates.crt:/hostca/ca.crt:ro)
        ca=(--host-ca /hostca/ca.crt)
    fi
    in_image --root -- python3 /image/contents.py "${ca[@]}" \
        --skip /work --skip /image --skip /in --skip /hostca
    if [[ $ENGINE == buildah ]]; then
        "${buildah[@]}" images --format 'image size (storage): {{.Name}}:{{.Tag}} {{.Size}}' "$IMAGE"
    else
        docker image ls --format 'image size: {{.Repository}}:{{.Tag}} {{.Size}}' "$IMAGE"
    fi
}

only_image() {   # only_image FILE IMAGE: every step of the compiled pipeline runs IMAGE
    local all ours
    all=$(grep -c '^ *image: ' "$1" || true)
    ours=$(grep -cF "image: $2" "$1" || true)
    echo "$1: $ours of $all steps run $2"
    [[ $all -gt 0 && $all == "$ours" ]]
}

cli() {
    local uid
    uid=$(in_image -- id -u)
    echo "default user: $(in_image -- id -un) (uid $uid)"
    [[ $uid != 0 ]]
    in_image -- skinlesion --help
    in_image -- skinlesion info
}

compile() {
    # the compiled pipeline names this image by the tag `make image` built; --image overrides
    in_image --app -- skinlesion pipeline compile -o /work/pipeline.yaml
    in_image --app -- skinlesion pipeline compile -o /work/other.yaml --image registry.example/other:1
    only_image "$work/w/pipeline.yaml" "$IMAGE"
    only_image "$work/w/other.yaml" registry.example/other:1
}

pipeline() {
    in_image -- skinlesion synth --n "$SYNTH_N" --out /work/data/raw
    # from /app with the image's own params.yaml, as on a cluster; outputs and MLflow on /work
    in_image --app -- skinlesion pipeline run-local --data /work/data/raw --pipeline-root /work/kfp \
        --params-file /in/params.demo.yaml \
        -S mlflow_tracking_uri=sqlite:////work/mlflow.db \
        -S register.gate_threshold=0.0  # register whatever gate params.yaml sets
    in_image -- python3 /image/check_pipeline.py --root /work/kfp --raw /work/data/raw \
        --mlflow sqlite:////work/mlflow.db
}

free_port() { "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 100); do
        "$VENV/bin/python" -c "import socket,sys; socket.create_connection(('127.0.0.1', $1), 1)" 2>/dev/null && return 0
        sleep 0.3
    done
    echo "nothing listens on 127.0.0.1:$1" >&2; return 1
}

data_step() {
    local s3_port git_port endpoint repo="$work/git/dataset" first v1 v2
    moto_pid="" git_pid=""           # not local: the EXIT trap reads them
    trap 'kill $moto_pid $git_pid 2>/dev/null || true' EXIT   # this check's own subshell
    local aws=(AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1)
    local host_env=(env "${aws[@]}" AWS_CONFIG_FILE="$work/none" AWS_SHARED_CREDENTIALS_FILE="$work/none"
                    DVC_NO_ANALYTICS=1 GIT_AUTHOR_NAME=t GIT_AUTHOR_EMAIL=t@example.com
                    GIT_COMMITTER_NAME=t GIT_COMMITTER_EMAIL=t@example.com)
    s3_port=$(free_port)
    endpoint=http://127.0.0.1:$s3_port
    "$VENV/bin/moto_server" -H 127.0.0.1 -p "$s3_port" >"$work/moto.log" 2>&1 &
    moto_pid=$!
    wait_port "$s3_port"
    "${host_env[@]}" "$VENV/bin/python" -c \
        "import boto3; boto3.client('s3', endpoint_url='$endpoint').create_bucket(Bucket='data')"

    # two versions of a small dataset, written by the image's own `skinlesion synth`
    in_image -- skinlesion synth --n 24 --seed 1 --out /work/v1
    in_image -- skinlesion synth --n 24 --seed 2 --out /work/v2
    mkdir -p "$repo/data"
    cd "$repo"
    "${host_env[@]}" git init -q
    "${host_env[@]}" "$VENV/bin/dvc" init -q
    "${host_env[@]}" "$VENV/bin/dvc" remote add -d storage s3://data/dvc
    "${host_env[@]}" "$VENV/bin/dvc" remote modify --local storage endpointurl "$endpoint"
    for v in v1 v2; do
        rm -rf data/raw
        cp -r "$work/w/$v" data/raw
        "${host_env[@]}" "$VENV/bin/dvc" add -q data/raw
        "${host_env[@]}" "$VENV/bin/dvc" push -q
        "${host_env[@]}" git add -A
        "${host_env[@]}" git commit -qm "data $v"
    done
    first=$(git rev-list --max-parents=0 HEAD)
    v2=$("$VENV/bin/python" -c "import yaml; print(yaml.safe_load(open('data/raw.dvc'))['outs'][0]['md5'])")
    v1=$(git show "$first:data/raw.dvc" | "$VENV/bin/python" -c "import sys, yaml; print(yaml.safe_load(sys.stdin)['outs'][0]['md5'])")
    rm -rf .dvc/cache .dvc/config.local      # only the remote has the files; no endpoint in the repo
    cd "$ROOT"

    git_port=$(free_port)
    git daemon --reuseaddr --listen=127.0.0.1 --port="$git_port" --export-all \
        --base-path="$work/git" "$work/git" >"$work/git-daemon.log" 2>&1 &
    git_pid=$!
    wait_port "$git_port"

    local url=git://127.0.0.1:$git_port/dataset
    echo "repository $url, DVC remote s3://data/dvc at $endpoint"
    in_image --env "${aws[0]}" --env "${aws[1]}" --env "${aws[2]}" -- python3 /image/materialise.py \
        --repo-url "$url" --rev "$first" --endpoint "$endpoint" --out /work/m1 --expect-hash "$v1"
    in_image --env "${aws[0]}" --env "${aws[1]}" --env "${aws[2]}" -- python3 /image/materialise.py \
        --repo-url "$url" --endpoint "$endpoint" --out /work/m2 --expect-hash "$v2"
    cmp "$work/w/m1/labels.csv" "$work/w/v1/labels.csv"
    cmp "$work/w/m2/labels.csv" "$work/w/v2/labels.csv"
}

echo "image $IMAGE, engine $ENGINE, work folder $work"
check contents contents
check cli cli
check compile compile
check pipeline pipeline
check data-step data_step

echo
for name in "${passed[@]}"; do echo "PASS  $name"; done
for name in "${failed[@]}"; do echo "FAIL  $name"; done
echo "image-test: ${#passed[@]} passed, ${#failed[@]} failed"
[[ ${#failed[@]} == 0 ]]

#!/usr/bin/env bash
# The wheels benchmarks/device_check.sh needs on the GPU machine, fetched here into .whl/:
#
#   bash scripts/device_wheels.sh        # in the repository root, where pip reaches a package index
#
# The GPU machine's image (the device tool's KINDS.md, read 2026-11-17) has Python 3.12 and its
# own torch but not these packages, and no network. Each is fetched at the version installed
# here, so the GPU run uses what the tests here use, as a CPython 3.12 x86-64 wheel (the device
# README's `pip download` line); about 34 MB for 49 wheels. .whl/ is excluded from git (in
# .git/info/exclude) and travels with a device run that names `.whl` in `carry`, where
# device_check.sh installs it into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."

# the harness (throughput, importing every plugin)
HARNESS="pydantic pydantic-core annotated-types typing-inspection torch-pruning gymnasium farama-notifications
stable-baselines3"
# the tests (`jpqbench run` logs to MLflow): MLflow and its dependencies the image lacks
TESTS="mlflow mlflow-skinny mlflow-tracing alembic sqlalchemy greenlet mako flask flask-cors blinker itsdangerous
gunicorn graphene graphql-core graphql-relay docker sqlparse cachetools databricks-sdk google-auth pyasn1
pyasn1-modules fastapi starlette uvicorn gitpython gitdb smmap opentelemetry-api opentelemetry-sdk
opentelemetry-proto opentelemetry-semantic-conventions importlib-metadata python-dotenv huey skops prettytable
wcwidth cryptography cffi pycparser"

specs=()
for package in $HARNESS $TESTS; do
  version=$(python3 -m pip show "$package" 2>/dev/null | awk '/^Version:/ {print $2}')
  if [[ -z $version ]]; then
    echo "error: $package is not installed here; run \`pip install -e '.[test]'\` first" >&2
    exit 2
  fi
  specs+=("$package==$version")
done
grep -qxF /.whl/ .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${specs[@]}"
echo "fetched $(ls .whl/*.whl | wc -l) wheels ($(du -sh .whl | cut -f1)) into .whl/: name .whl in the device run's carry"

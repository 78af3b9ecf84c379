#!/usr/bin/env bash
# Submit a cxr-features job with this project's packages shipped to the executors.
#
#   ./spark-submit.sh [--profile local|gpu-cluster] jobs/extract.py [job flags...]
#
# The profile is a Spark properties file in conf/spark/ (default: local, or $CXR_SPARK_PROFILE).
# common/, jobs/, heads/, finetune/, cxr/ and lungs/ (with the shipped lung model) are zipped into
# build/cxr_features.zip and passed as --py-files, so the same job file also runs under a cluster's
# own spark-submit. Extra spark-submit options go in $SPARK_SUBMIT_OPTS_EXTRA (e.g. "--master yarn
# --num-executors 8").
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
profile="${CXR_SPARK_PROFILE:-local}"
if [[ "${1:-}" == "--profile" ]]; then
  profile="${2:?--profile needs a name}"
  shift 2
fi
props="$here/conf/spark/$profile.conf"
if [[ ! -f "$props" ]]; then
  echo "spark-submit.sh: no Spark profile '$profile' (no file $props); profiles: $(cd "$here/conf/spark" && ls *.conf | sed 's/\.conf$//' | tr '\n' ' ')" >&2
  exit 2
fi
if [[ $# -eq 0 ]]; then
  echo "usage: ./spark-submit.sh [--profile NAME] JOB.py [flags...]" >&2
  exit 2
fi

# The project's virtualenv, when there is one, runs both the driver and the Python workers.
if [[ -x "$here/.venv/bin/python" ]]; then
  export PATH="$here/.venv/bin:$PATH"
  export PYSPARK_PYTHON="${PYSPARK_PYTHON:-$here/.venv/bin/python}"
fi
python="${PYSPARK_PYTHON:-python3}"
if ! command -v spark-submit >/dev/null; then
  echo "spark-submit.sh: spark-submit not found; run 'make sample' once to create .venv, or put Spark on PATH" >&2
  exit 2
fi

# Ship the packages; the profile may name files under the project as @CXR_HOME@.
mkdir -p "$here/build"
"$python" - "$here" <<'PY'
import pathlib, sys, zipfile
root = pathlib.Path(sys.argv[1])
with zipfile.ZipFile(root / "build/cxr_features.zip", "w", zipfile.ZIP_DEFLATED) as z:
    for package in ("common", "jobs", "heads", "finetune", "cxr", "lungs"):
        for f in sorted((root / package).rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:  # modules and their data (lungs/models/)
                z.write(f, f.relative_to(root))
PY
sed "s#@CXR_HOME@#$here#g" "$props" > "$here/build/spark-$profile.conf"

cd "$here"
# shellcheck disable=SC2086
exec spark-submit --properties-file "build/spark-$profile.conf" ${SPARK_SUBMIT_OPTS_EXTRA:-} \
  --py-files build/cxr_features.zip "$@"

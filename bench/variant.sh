#!/usr/bin/env bash
# Another commit's pgolf beside this checkout's, so that one device call times both: issue 16 keeps a speed
# change only when a ratio measured in one call, on one machine, shows that it pays.
#   bash bench/variant.sh REV [PATCH]   # makes .variant/NAME/pgolf from REV's stages/ (NAME: REV's short hash),
#                                       # with PATCH's changes to stages/ applied (NAME: HASH-PATCHNAME)
# Then carry .variant (git-ignored: add it to .git/info/exclude) and give a job of bench/speed_sidebyside.sh
# the variant as a fourth field, NAME:PRESET:SETS:VARIANT (or PGOLF_VARIANT=NAME for its `profile` phase). That
# job runs with .variant/VARIANT first on PYTHONPATH, so it imports REV's pgolf; everything else runs the
# checkout's. VARIANT_DIR (default .variant) puts it elsewhere.
set -euo pipefail
rev=$(git rev-parse --verify "$1^{commit}")
patch=${2:-}
name=$(git rev-parse --short "$rev")${patch:+-$(basename "$patch" .patch)}
dir=${VARIANT_DIR:-.variant}/$name
rm -rf "$dir"
mkdir -p "$dir"
git archive "$rev" stages | tar -x -C "$dir"
# a candidate kept as a patch (say bench/candidates/NAME.patch) until a measurement decides it; its tests and bench
# lines stay out
[ -z "$patch" ] || git apply --unsafe-paths --directory="$dir" --include="$dir/stages/*" "$patch"
mv "$dir/stages" "$dir/pgolf"
python3 - "$name" "$(git rev-parse "$rev")" "$patch" > "$dir/variant.json" <<'PY'
import hashlib, json, sys
name, commit, patch = sys.argv[1:]
info = {"variant": name, "commit": commit}
if patch:
    info |= {"patch": patch, "patch_sha256": hashlib.sha256(open(patch, "rb").read()).hexdigest()}
print(json.dumps(info))
PY
echo "$name"

#!/bin/sh
# TEST STAND-IN for the gryt CLI. This is NOT gryt: it only reproduces what gryt 1.1.8 shows the
# agent, so the agent's tests can prove they are not fooled by it:
#   - it exits 0 whatever happens (a failed step, a script that does not load);
#   - last on stdout it prints a pretty-printed JSON report {"status": "ok", "results": {...}};
#   - a script that cannot be loaded gets `Error: <reason>` on stderr and no report.
# Real gryt runs a Python script; the stand-in reads steps from comment lines instead:
#   # step NAME: SHELL COMMAND
# and a line containing SYNTAX ERROR makes the script "fail to load".
[ "$1" = run ] || { echo "usage: gryt run FILE" >&2; exit 2; }
file=$2
[ -f "$file" ] || { echo "Error: No such file: $file" >&2; exit 0; }
if grep -q 'SYNTAX ERROR' "$file"; then
    echo "Traceback (most recent call last):" >&2
    echo "Error: invalid syntax ($file, line 1)" >&2
    exit 0
fi
echo "[hook] pipeline starting"
steps=$(mktemp)
body=$(mktemp)
grep '^# step ' "$file" > "$steps"
first=1
while IFS= read -r line; do
    spec=${line#\# step }
    name=${spec%%:*}
    cmd=${spec#*: }
    sh -c "$cmd" </dev/null
    rc=$?
    if [ "$rc" -eq 0 ]; then status=success; err=null; else status=error; err="\"Process exited with code $rc\""; fi
    [ "$first" -eq 1 ] || printf ',\n' >> "$body"
    first=0
    printf '      "%s": {"status": "%s", "returncode": %d, "stdout": "", "stderr": "", "duration": 0.0018, "error": %s, "attempts": 1}' \
        "$name" "$status" "$rc" "$err" >> "$body"
done < "$steps"
printf '{\n  "status": "ok",\n  "results": {\n    "runner_0": {\n'
cat "$body"
printf '\n    }\n  }\n}\n'
rm -f "$steps" "$body"
exit 0

#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-only
#
# LAVA test shell step of lava/kvm-private-mem.yaml: unpack the bundle, run
# its run.sh, and report every test of its results.jsonl as one
# `lava-test-case <binary>_<test> --result pass|fail|skip`, each failure's
# message (and each skip's reason) printed to the log just before it.
#
# Usage: kvm-private-mem.sh BUNDLE [KNOWN_FAILURES] [RUN.SH ARGS...]
#
# Outcomes map as in the README ("Running in kernel CI"): pass -> pass,
# fail -> fail, skip -> skip, xfail (a listed known failure that failed as
# listed) -> skip with the message "known failure: REASON: ...". run.sh's
# exit status is one more test case, run_sh: 0 pass, 4 (all skipped) skip,
# else fail, so a run that could test nothing (exit 2) is never silent.
# Outside LAVA (no lava-test-case in PATH) the calls are printed instead.

[ $# -ge 1 ] || { echo "usage: $0 BUNDLE [KNOWN_FAILURES] [RUN.SH ARGS...]" >&2; exit 2; }
bundle=$1
known=${2:-}
if [ $# -ge 2 ]; then shift 2; else shift 1; fi

case_() {
    if command -v lava-test-case > /dev/null 2>&1; then
        lava-test-case "$@"
    else
        echo "lava-test-case $*"
    fi
}

work=${TMPDIR:-/tmp}/kvm-private-mem.$$
rm -rf "$work"
mkdir -p "$work" || { echo "cannot create $work"; case_ run_sh --result fail; exit 0; }

case $bundle in
http://* | https://*)
    echo "fetching $bundle"
    if command -v wget > /dev/null 2>&1; then
        wget -q -O "$work/bundle.tar.xz" "$bundle"
    else
        curl -fsSL -o "$work/bundle.tar.xz" "$bundle"
    fi || { echo "cannot fetch $bundle"; case_ run_sh --result fail; exit 0; }
    bundle=$work/bundle.tar.xz
    ;;
esac
[ -r "$bundle" ] || { echo "no bundle at $bundle"; case_ run_sh --result fail; exit 0; }

# xz through a pipe: busybox tar may lack -J, busybox has xzcat.
if command -v xz > /dev/null 2>&1; then unxz_() { xz -dc "$1"; }; else unxz_() { xzcat "$1"; }; fi
unxz_ "$bundle" | (cd "$work" && tar -xf -) || { echo "cannot unpack $bundle"; case_ run_sh --result fail; exit 0; }
for d in "$work"/kvm-private-mem-selftests-*; do top=$d; done
[ -x "${top:-}/run.sh" ] || { echo "no run.sh in $bundle"; case_ run_sh --result fail; exit 0; }
echo "bundle: ${top##*/}"

set -- -o "$work/results" ${known:+--known-failures "$known"} "$@"
echo "+ $top/run.sh $*"
"$top/run.sh" "$@"
rc=$?
echo "run.sh exited $rc"

# One JSON object per line, written by serde_json (no raw newlines or
# quotes inside strings). awk decodes the three names and the message and
# prints the message lines, then one "@@case NAME RESULT" line per record.
results=$work/results/results.jsonl
[ -r "$results" ] && awk '
function jstr(s, key,    i, n, c, out) {
    i = index(s, "\"" key "\":\"")
    if (i == 0) return ""
    s = substr(s, i + length(key) + 4)
    n = length(s)
    out = ""
    for (i = 1; i <= n; i++) {
        c = substr(s, i, 1)
        if (c == "\\") {
            i++
            c = substr(s, i, 1)
            if (c == "n") out = out "\n"
            else if (c == "t") out = out "\t"
            else if (c == "r") ;
            else if (c == "u") { out = out "?"; i += 4 }
            else out = out c
        } else if (c == "\"") {
            return out
        } else {
            out = out c
        }
    }
    return out
}
{
    binary = jstr($0, "binary"); test = jstr($0, "test"); outcome = jstr($0, "outcome")
    message = jstr($0, "message")
    name = binary "_" test
    gsub(/[^A-Za-z0-9_.-]/, "_", name)
    result = outcome == "pass" ? "pass" : outcome == "fail" ? "fail" : outcome == "skip" || outcome == "xfail" ? "skip" : "unknown"
    if (outcome != "pass") {
        label = outcome == "xfail" ? "XFAIL" : outcome == "skip" ? "SKIP" : "FAIL"
        print label " " binary "::" test ":"
        n = split(message, lines, "\n")
        for (j = 1; j <= n; j++) print "    " lines[j]
    }
    print "@@case " name " " result
}' "$results" | while IFS= read -r line; do
    case $line in
    "@@case "*)
        line=${line#@@case }
        case_ "${line% *}" --result "${line##* }"
        ;;
    *) printf '%s\n' "$line" ;;
    esac
done

case $rc in
0) case_ run_sh --result pass --measurement "$rc" --units exit ;;
4) case_ run_sh --result skip --measurement "$rc" --units exit ;;
*) case_ run_sh --result fail --measurement "$rc" --units exit ;;
esac
# The verdicts are the test cases; the step itself succeeded.
exit 0

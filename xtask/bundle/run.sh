#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-only
#
# run.sh: run the KVM private-memory selftests of this bundle on the running
# kernel (as root, on a kernel with KVM_SW_PROTECTED_VM), strictly by default.
# Made by `cargo xtask bundle`; `cargo xtask vm` runs this same script in its
# guest. Needs a POSIX shell, setsid, sleep, kill, grep, sed, mount.
#
# Usage: run.sh [OPTIONS] [-- TEST ARGS]
#   -o, --output DIR            results directory (default: ./kvm-selftests-results)
#   --no-strict                 a skip is a skip (default: a skip is a failure)
#   --known-failures FILE|NAME  known bugs of this kernel, reported as xfail; NAME is
#                               a list of the bundle (known-failures/NAME.txt)
#   --history FILE              the kernel's changelog or git log lines, the
#                               evidence the versioned rules are decided by
#                               (KVM_SELFTESTS_KERNEL_HISTORY)
#   --timeout [NAME=]SECS       time limit of every binary, or of one (repeatable,
#                               after kvm_private_mem/timeouts and KVM_SELFTESTS_TEST_TIMEOUT)
#   --jobs N                    test binaries at once (needs a shell with `wait -n`)
#   --c-test PATH               also run this C selftest (kselftest exit codes),
#                               recorded as a test of binary `upstream` (repeatable)
#   --hook CMD                  run `CMD begin SUITE` and `CMD end SUITE` around
#                               each suite (rust, upstream), e.g. to save gcov data
#   --no-setup                  do not mount debugfs or reserve huge pages (as a
#                               user, or when the system already did)
#   TEST ARGS                   passed to every test binary: filters, --exact, ...
#
# Prints each test as it ends, writes DIR/results.jsonl (one JSON record per
# test), and exits 0 all passed, 1 a test failed (or skipped, strictly) or a
# binary ran out of its time limit or crashed, 2 nothing could be tested (no
# /dev/kvm, no protected VMs, bad arguments), 4 every test skipped.

B=$(cd "$(dirname "$0")" && pwd -P)
C=$B/kvm_private_mem
M=@@KVM-SELFTESTS@@

die() { echo "run.sh: $*" >&2; exit 2; }

out=$PWD/kvm-selftests-results
strict=1 known= history= hook= jobs=1 limits= c_tests= setup=1
while [ $# -gt 0 ]; do
    case $1 in
    -o | --output) [ $# -ge 2 ] || die "$1 needs a DIR"; out=$2; shift 2 ;;
    --no-strict) strict=0; shift ;;
    --no-setup) setup=0; shift ;;
    --known-failures) [ $# -ge 2 ] || die "$1 needs a FILE or NAME"; known=$2; shift 2 ;;
    --history) [ $# -ge 2 ] || die "$1 needs a FILE"; history=$2; shift 2 ;;
    --timeout) [ $# -ge 2 ] || die "$1 needs [NAME=]SECS"; limits="$limits $2"; shift 2 ;;
    --jobs) [ $# -ge 2 ] || die "$1 needs N"; jobs=$2; shift 2 ;;
    --c-test) [ $# -ge 2 ] || die "$1 needs a PATH"; [ -x "$2" ] || die "--c-test $2: not an executable"
        c_tests="$c_tests $2"; shift 2 ;;
    --hook) [ $# -ge 2 ] || die "$1 needs a CMD"; hook=$2; shift 2 ;;
    -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option \`$1' (test arguments go after --; see run.sh --help)" ;;
    esac
done
case $jobs in '' | *[!0-9]* | 0) die "--jobs $jobs: a whole number above 0" ;; esac
if [ "$jobs" -gt 1 ] && ! (sleep 0 & wait -n) 2>/dev/null; then
    die "--jobs $jobs needs a shell with \`wait -n' (busybox sh, bash): run it as \`busybox sh $0 ...'"
fi

binaries=$(tr "\n" " " < "$C/binaries") && [ -n "$binaries" ] || die "no $C/binaries: is this an unpacked bundle?"
c_names=
for t in $c_tests; do c_names="$c_names ${t##*/}"; done

if [ -n "$known" ]; then
    case $known in */*) ;; *) [ -f "$known" ] || known=$B/known-failures/$known.txt ;; esac
    [ -r "$known" ] || die "--known-failures: no file $known (the bundle has: $(cd "$B/known-failures" && echo *))"
    known=$(cd "$(dirname "$known")" && pwd -P)/${known##*/}
    export KVM_SELFTESTS_KNOWN_FAILURES="$known"
fi
if [ -n "$history" ]; then
    [ -r "$history" ] || die "--history $history: no such file"
    export KVM_SELFTESTS_KERNEL_HISTORY="$history"
fi

# Time limits: the bundle's defaults (kselftest-style, measured), then
# KVM_SELFTESTS_TEST_TIMEOUT, then --timeout; the last setting that applies
# to a binary wins (SECS applies to all).
defaults=$(sed -n 's/^\([A-Za-z0-9_-]*\) \([0-9]*\)$/\1=\2/p' "$C/timeouts")
case ${KVM_SELFTESTS_MODEL_BUDGET:-} in
'' | *[!0-9]*) ;;
*) defaults="$defaults model=$((2 * KVM_SELFTESTS_MODEL_BUDGET + 180))" ;;
esac
settings="$defaults $(echo "${KVM_SELFTESTS_TEST_TIMEOUT:-}" | tr ',' ' ') $limits"
for s in $settings; do
    case $s in
    *=*) n=${s%%=*} v=${s#*=} ;;
    *) n= v=$s ;;
    esac
    case $v in '' | *[!0-9]* | 0) die "time limit \`$s': SECS or NAME=SECS, SECS a whole number above 0" ;; esac
    if [ -n "$n" ]; then
        case " $binaries $c_names guest_probe " in
        *" $n "*) ;;
        *) case " $defaults " in *" $s "*) ;; *) die "time limit \`$s': no test binary or C test is named $n (they are: $binaries$c_names)" ;; esac ;;
        esac
    fi
done
limit_of() {
    _l=300
    for _s in $settings; do
        case $_s in
        "$1"=*) _l=${_s#*=} ;;
        *=*) ;;
        *) _l=$_s ;;
        esac
    done
    echo "$_l"
}

mkdir -p "$out" || die "cannot create the results directory $out"
out=$(cd "$out" && pwd -P)
R=$out
res=$R/results.jsonl
# Scratch space (the tests' TMPDIR and cwd), off the results directory,
# which may be a slow share.
T=$(mktemp -d "${TMPDIR:-/tmp}/kvm-selftests.XXXXXX") || die "cannot create a directory under ${TMPDIR:-/tmp}"
trap 'rm -rf "$T"' EXIT
rm -f "$res" "$R/exit-codes" "$R/wall-times" "$R/timeouts" "$R/status" "$R/rules.txt"
# Every binary reads the kernel's history (6.12's changelog: 2.7 MB) as it
# starts, which from a 9p share cost 0.11 s a binary under TCG: it is read
# from the scratch space instead. A copy that fails leaves the path as it
# was, for the binaries to name what is wrong with it.
if [ -n "${KVM_SELFTESTS_KERNEL_HISTORY:-}" ] && cp "$KVM_SELFTESTS_KERNEL_HISTORY" "$T/kernel-history" 2>/dev/null; then
    export KVM_SELFTESTS_KERNEL_HISTORY="$T/kernel-history"
fi

# debugfs: the fault-injection knobs (allocation_failures) and gcov data.
if [ $setup = 1 ] && [ -d /sys/kernel/debug ] && ! grep -q ' /sys/kernel/debug debugfs ' /proc/mounts; then
    mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || echo "run.sh: cannot mount debugfs (allocation_failures will need it)"
fi
# 2 MiB huge pages for the hugetlb-backed conversion scenarios (128 MiB).
if [ $setup = 1 ] && [ "$(cat /proc/sys/vm/nr_hugepages 2>/dev/null || echo 0)" -lt 64 ]; then
    echo 64 > /proc/sys/vm/nr_hugepages 2>/dev/null || echo "run.sh: cannot reserve 64 huge pages"
fi
# (KVM_DEVICE: for run.sh's own tests, on hosts without /dev/kvm.)
if [ ! -c "${KVM_DEVICE:-/dev/kvm}" ]; then
    echo "$M no-kvm"
    echo "run.sh: no /dev/kvm: nothing to test" >&2
    exit 2
fi

probe=$("$C/bin/guest_probe" --results "$res" --rules "$R/rules.txt" 2>&1)
rc=$?
case $rc in
0) echo "$M probe $probe" ;;
2) echo "$M probe-failed $probe"; echo "run.sh: untestable: $probe" >&2; exit 2 ;;
*) echo "$M setup-failed cannot run the guest probe (exit status $rc): $probe"; exit 2 ;;
esac
echo "run.sh: versioned rules (rule, outcome applied, what decided it):"
cat "$R/rules.txt"

export HOME="${HOME:-$T}" TMPDIR="$T" RUST_BACKTRACE=1
export KVM_SELFTESTS_STRICT=$strict KVM_SELFTESTS_RESULTS="$res"
cd "$T" || die "cd $T"
exec 3>&1

# Wall times in centiseconds, from /proc/uptime ("12.34" -> 1234).
now() { read -r u _ < /proc/uptime; echo "${u%.*}${u#*.}"; }

# `limited NAME SECS PROG ARGS...`: PROG in a session (so a process group)
# of its own, with a watchdog that, once SECS have passed, announces the
# timeout, sends SIGTERM to the whole group (threads, forked children,
# helpers) and SIGKILL 5 s later. `timeout` signals only its child, not the
# group. The watchdog is a session of its own too, so that killing it takes
# its `sleep` along. Returns PROG's status and sets `timed_out` to SECS when
# the watchdog fired, else empty. `setsid` execs in place (a background job
# is no group leader), so `$!` is the group's id.
limited() {
    _n=$1 _s=$2
    shift 2
    setsid "$@" 3>&- &
    _p=$!
    setsid sh -c 'sleep $1 <&- >&- 2>&-; : > $3/timed-out.$4; echo "$5 timeout $2 $1" >&3
        kill -TERM -$4; sleep 5; kill -KILL -$4' limit "$_s" "$_n" "$T" $_p "$M" 2>/dev/null &
    _w=$!
    wait $_p
    _rc=$?
    # The group once the watchdog is in its own session; the process itself
    # if it is not yet (then it has started nothing).
    kill -KILL -$_w 2>/dev/null || kill -KILL $_w 2>/dev/null
    wait $_w 2>/dev/null
    timed_out=
    [ -e "$T/timed-out.$_p" ] && { timed_out=$_s; rm -f "$T/timed-out.$_p"; }
    return $_rc
}

# One JSON record (names and messages here hold no quotes or backslashes).
record() {
    echo "{\"binary\":\"$1\",\"test\":\"$2\",\"outcome\":\"$3\",\"duration_ms\":$4,\"message\":\"$5\"}" >> "$res"
}

# A binary out of time: one failure naming the limit and the tests without
# a result, in the binary's order (from its --list, saved after the kill).
timed_out_record() {
    _n=$1 _s=$2
    _reported=$(grep -c "^{\"binary\":\"$_n\"," "$res" 2>/dev/null)
    _missing= _more=0 _shown=0
    for _t in $(sed -n 's/: test$//p' "$R/$_n.tests" 2>/dev/null); do
        grep -q "^{\"binary\":\"$_n\",\"test\":\"$_t\"," "$res" 2>/dev/null && continue
        if [ $_shown -lt 8 ]; then _missing="$_missing${_missing:+, }$_t"; _shown=$((_shown + 1)); else _more=$((_more + 1)); fi
    done
    _msg="$_n did not finish within its time limit of $_s s: its process group was killed after ${_reported:-0} of its tests had reported"
    [ -n "$_missing" ] && _msg="$_msg; without a result (running or not started, in order): $_missing"
    [ $_more -gt 0 ] && _msg="$_msg and $_more more"
    record "$_n" time_limit fail $((_s * 1000)) "$_msg. The limit is set with --timeout $_n=SECS or KVM_SELFTESTS_TEST_TIMEOUT."
}

run_binary() {
    _b=$1
    shift
    _t0=$(now)
    limited "$_b" "$(limit_of "$_b")" "$C/bin/$_b" "$@"
    _rc=$?
    echo "$_b $_rc" >> "$R/exit-codes"
    echo "$_b $(($(now) - _t0))" >> "$R/wall-times"
    if [ -n "$timed_out" ]; then
        _limit=$timed_out
        echo "$_b $_limit" >> "$R/timeouts"
        limited "$_b" 30 "$C/bin/$_b" --list "$@" > "$R/$_b.tests" 2>/dev/null
        timed_out_record "$_b" "$_limit"
    elif [ $_rc != 0 ] && ! grep -q "^{\"binary\":\"$_b\",.*\"outcome\":\"fail\"" "$res" 2>/dev/null; then
        record "$_b" exit_status fail 0 "$_b exited with status $_rc without reporting a failed test"
    fi
    echo "$M end $_b $_rc"
}

[ -n "$hook" ] && $hook begin rust
if [ "$jobs" -gt 1 ]; then
    running=0
    for b in $binaries; do
        [ $running -ge "$jobs" ] && { wait -n; running=$((running - 1)); }
        # Each binary's output is held back and printed when it ends, so the
        # console shows whole binaries, not interleaved lines.
        echo "$M run $b"
        (run_binary "$b" "$@" > "$T/$b.out" 2>&1; cat "$T/$b.out") &
        running=$((running + 1))
    done
    wait
else
    for b in $binaries; do
        echo "$M run $b"
        run_binary "$b" "$@"
    done
fi
[ -n "$hook" ] && $hook end rust

if [ -n "$c_tests" ]; then
    [ -n "$hook" ] && $hook begin upstream
    for t in $c_tests; do
        n=${t##*/}
        echo "$M run $n"
        t0=$(now)
        limited "$n" "$(limit_of "$n")" "$t"
        rc=$?
        cs=$(($(now) - t0))
        case $rc in 0) o=pass ;; 4) o=skip ;; *) o=fail ;; esac
        msg="exit status $rc"
        [ -n "$timed_out" ] && { o=fail; msg="did not finish within its time limit of $timed_out s: its process group was killed (exit status $rc; the limit is set with --timeout $n=SECS or KVM_SELFTESTS_TEST_TIMEOUT)"; }
        record upstream "$n" $o $((cs * 10)) "$msg"
        echo "$M end $n $rc"
    done
    [ -n "$hook" ] && $hook end upstream
fi
# The kernel-log oracle's final check: the whole kernel log next to the
# results, and one failure for the reports no test's window saw (boot, the
# probe, between binaries).
"$C/bin/guest_probe" --kernel-log "$R/kernel-log.txt" --results "$res"
echo done > "$R/status"

count() { grep -c "\"outcome\":\"$1\"" "$res" 2>/dev/null; }
pass=$(count pass) fail=$(count fail) skip=$(count skip) xfail=$(count xfail)
tests=$(grep -vc '^{"binary":"guest_probe",' "$res" 2>/dev/null)
echo "run.sh: $(uname -r): $pass passed, $fail failed, $skip skipped, $xfail known failures; results in $res"
grep '"outcome":"\(fail\|skip\|xfail\)"' "$res" |
    sed 's/^{"binary":"\([^"]*\)","test":"\([^"]*\)","outcome":"\([^"]*\)".*"message":"\(.\{0,200\}\).*/run.sh:   \3 \1::\2: \4/'
if [ "${fail:-0}" -gt 0 ]; then exit 1; fi
if [ "${tests:-0}" -eq 0 ]; then echo "run.sh: no test ran (do the test arguments select any?)" >&2; exit 2; fi
if [ "${skip:-0}" -gt 0 ] && [ "$skip" -eq "$tests" ]; then exit 4; fi
if [ "${skip:-0}" -gt 0 ] && [ "$strict" = 1 ]; then exit 1; fi
exit 0

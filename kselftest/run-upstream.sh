#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-only
#
# run-upstream.sh: run an unpacked bundle as a kselftest install with the
# kernel's own runner (run_kselftest.sh and kselftest/ from the
# tools/testing/selftests of the tree under test), so its output is what
# kselftest's parsers read: `ok N selftests: kvm_private_mem: BINARY`, each
# binary's TAP 13 nested under it as `# ` lines. The bundle does not ship
# the runner (it belongs to the kernel under test); this puts the two side
# by side in a scratch directory, leaving both unchanged. As root, with a
# POSIX shell; run it in the guest (vng --run ..., a LAVA job, an init).
#
# Usage: run-upstream.sh [OPTIONS] BUNDLE_DIR SELFTESTS_DIR [-- RUN_KSELFTEST ARGS]
#   --known-failures FILE|NAME  known bugs of this kernel, reported as
#                               `# XFAIL` (NAME: a list of the bundle,
#                               known-failures/NAME.txt), as run.sh's option
#   --log FILE                  also write the runner's output to FILE
#   --no-setup                  do not mount debugfs, reserve huge pages or
#                               repair /dev (see below)
#   RUN_KSELFTEST ARGS          default: -c kvm_private_mem
#
# Exits with run_kselftest.sh's status (0 every program passed, 1 one
# failed), or 2 on bad input before anything ran.
#
# Setup, as run.sh does it: debugfs mounted (allocation_failures' fault
# injection knobs) and 64 huge pages of 2 MiB (hugetlb conversions).
# kselftest's runner writes each program's output through /dev/stdout; in a
# guest whose /dev lacks that link or cannot be written (a read-only share),
# the nested lines are lost silently, and vng links it to a port of its
# own (virtme.dev_stdout), a second channel apart from the runner's lines.
# So /dev/stdout is made a link to /proc/self/fd/1 as in a distribution's
# /dev: in place, or on a devtmpfs mounted over a read-only /dev (with the
# stdin, stderr and fd links).

die() { echo "run-upstream.sh: $*" >&2; exit 2; }

known='' log='' setup=1
while [ $# -gt 0 ]; do
    case $1 in
    --known-failures) [ $# -ge 2 ] || die "$1 needs a FILE or NAME"; known=$2; shift 2 ;;
    --log) [ $# -ge 2 ] || die "$1 needs a FILE"; log=$2; shift 2 ;;
    --no-setup) setup=0; shift ;;
    -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    --) die "-- comes after BUNDLE_DIR and SELFTESTS_DIR" ;;
    -*) die "unknown option \`$1' (see run-upstream.sh --help)" ;;
    *) break ;;
    esac
done
[ $# -ge 2 ] || die "usage: run-upstream.sh [OPTIONS] BUNDLE_DIR SELFTESTS_DIR [-- RUN_KSELFTEST ARGS]"
bundle=$1 selftests=$2
shift 2
if [ $# -gt 0 ]; then
    [ "$1" = -- ] || die "unexpected \`$1' after SELFTESTS_DIR (run_kselftest.sh's arguments go after --)"
    shift
fi
[ $# -gt 0 ] || set -- -c kvm_private_mem

if [ ! -r "$bundle/kselftest-list.txt" ] || [ ! -d "$bundle/kvm_private_mem" ]; then
    die "$bundle: no kselftest-list.txt and kvm_private_mem/ (is it an unpacked bundle?)"
fi
if [ ! -r "$selftests/run_kselftest.sh" ] || [ ! -r "$selftests/kselftest/runner.sh" ]; then
    die "$selftests: no run_kselftest.sh and kselftest/runner.sh (give a kernel tree's tools/testing/selftests)"
fi
bundle=$(cd "$bundle" && pwd -P)
if [ -n "$known" ]; then
    case $known in */*) ;; *) [ -f "$known" ] || known=$bundle/known-failures/$known.txt ;; esac
    [ -r "$known" ] || die "--known-failures: no file $known (the bundle has: $(cd "$bundle/known-failures" && echo *))"
    known=$(cd "$(dirname "$known")" && pwd -P)/${known##*/}
    export KVM_SELFTESTS_KNOWN_FAILURES="$known"
fi
if [ -n "$log" ]; then
    : > "$log" || die "--log: cannot write $log"
fi

# /dev/stdout links to /proc/self/fd/1 and opens for writing; checked with
# a pipe as stdout, as the runner will have it (see below).
stdout_ok() {
    [ "$(readlink /dev/stdout 2>/dev/null)" = /proc/self/fd/1 ] &&
        [ "$({ : >> /dev/stdout && echo y; } 2>/dev/null)" = y ]
}

if [ $setup = 1 ]; then
    if [ -d /sys/kernel/debug ] && ! grep -q ' /sys/kernel/debug debugfs ' /proc/mounts; then
        mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || echo "run-upstream.sh: cannot mount debugfs (allocation_failures will need it)" >&2
    fi
    if [ "$(cat /proc/sys/vm/nr_hugepages 2>/dev/null || echo 0)" -lt 64 ]; then
        echo 64 > /proc/sys/vm/nr_hugepages 2>/dev/null || echo "run-upstream.sh: cannot reserve 64 huge pages" >&2
    fi
    if ! stdout_ok; then
        echo "run-upstream.sh: /dev/stdout is not a writable link to /proc/self/fd/1 ($(ls -l /dev/stdout 2>&1)): relinking it" >&2
        if ! ln -sfn /proc/self/fd/1 /dev/stdout 2>/dev/null; then
            echo "run-upstream.sh: /dev is read-only: mounting a devtmpfs on /dev" >&2
            mount -t devtmpfs devtmpfs /dev || die "cannot mount a devtmpfs on /dev; kselftest's runner would lose every program's output"
            [ -e /dev/stdin ] || ln -s /proc/self/fd/0 /dev/stdin
            [ -e /dev/stderr ] || ln -s /proc/self/fd/2 /dev/stderr
            [ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
            ln -sfn /proc/self/fd/1 /dev/stdout || die "cannot link /dev/stdout on the new /dev"
        fi
        stdout_ok || die "/dev/stdout still cannot be opened for writing"
    fi
fi

# The install: the kernel's runner, the bundle's list and (linked) its
# collection directory.
W=$(mktemp -d "${TMPDIR:-/tmp}/kselftest.XXXXXX") || die "cannot create a directory under ${TMPDIR:-/tmp}"
trap 'rm -rf "$W"' EXIT
W=$(cd "$W" && pwd -P)
if ! { cp "$selftests/run_kselftest.sh" "$W/" && cp -R "$selftests/kselftest" "$W/" &&
    cp "$bundle/kselftest-list.txt" "$W/" && ln -s "$bundle/kvm_private_mem" "$W/kvm_private_mem"; }; then
    die "cannot set up the install in $W"
fi

# The runner's output goes through a pipe: its /dev/stdout reopens fd 1, and
# a virtio console port (vng's stdout) can be open only once (EBUSY).
{ "$W/run_kselftest.sh" "$@"; echo $? > "$W/rc"; } | tee "${log:-/dev/null}"
rc=$(cat "$W/rc" 2>/dev/null) || die "run_kselftest.sh left no exit status"
exit "$rc"

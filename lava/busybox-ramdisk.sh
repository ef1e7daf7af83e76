#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-only
#
# The example job's ramdisk: a busybox initramfs (Debian's busybox-static)
# that mounts /proc, /sys and /dev and gives a root shell with the prompt
# `/ # ` on the console. LAVA appends its test overlay and the bundle.
#
# Usage: busybox-ramdisk.sh OUT.cpio.gz
set -eu
out=$1
busybox=$(command -v busybox)
file -L "$busybox" | grep -q 'statically linked' || { echo "$busybox is not static (apt-get install busybox-static)" >&2; exit 1; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$root/root" "$root/etc"
cp "$busybox" "$root/bin/busybox"
echo 'root:x:0:0:root:/root:/bin/sh' > "$root/etc/passwd"
cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "kvm-private-mem LAVA ramdisk: busybox $(busybox | head -1 | cut -d' ' -f2), kernel $(uname -r)"
export HOME=/root PS1='/ # ' PATH=/bin:/sbin:/usr/bin:/usr/sbin
exec setsid cttyhack sh
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc 2>/dev/null) | gzip -9 > "$out"
echo "$out"

#!/usr/bin/env bash
# The main job: install, create the embedded default data directory ./var/data (once), mount it
# on ./var/mnt, and show it working: files written and fsync'd, read back, the daemon killed
# with SIGKILL, remounted, and everything fsync'd still there, fsck clean. Leaves it mounted.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
data=var/data mnt=var/mnt
mkdir -p "$mnt"
if grep -q " $PWD/$mnt fuse.razorfs " /proc/mounts; then razorfs umount "$mnt"; fi
[ -e "$data/superblock" ] || razorfs mkfs "$data"
razorfs fsck --quick "$data"
razorfs mount "$data" "$mnt"

echo "--- writing into $mnt"
stamp=$(date -u +%Y-%m-%dT%H:%M:%SZ)
mkdir -p "$mnt/demo"
echo "written at $stamp" > "$mnt/demo/hello.txt"
head -c 8M /dev/urandom > "$mnt/demo/random.bin"
python3 - "$mnt/demo" <<'PY'
import os, sys
for name in ("hello.txt", "random.bin"):
    fd = os.open(os.path.join(sys.argv[1], name), os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
os.fsync(fd)
os.close(fd)
PY
sum_before=$(sha256sum < "$mnt/demo/random.bin")
ls -l "$mnt/demo"

echo "--- crash: SIGKILL the daemon (pid $(cat "$data/lock")), then remount"
kill -9 "$(cat "$data/lock")"
while [ -n "$(cat "$data/lock" 2>/dev/null)" ] && kill -0 "$(cat "$data/lock")" 2>/dev/null; do sleep 0.1; done
fusermount3 -u -z "$mnt"
razorfs fsck "$data"
razorfs mount "$data" "$mnt"
cat "$mnt/demo/hello.txt"
[ "$(sha256sum < "$mnt/demo/random.bin")" = "$sum_before" ] && echo "random.bin intact after the crash"
grep '"event": "recovered"' "$data/razorfs.log" | tail -n 1
df -h "$mnt"
echo "--- razorfs is mounted on $mnt; unmount with: .venv/bin/razorfs umount $mnt"

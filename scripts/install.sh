#!/usr/bin/env bash
# Installs what razorfs needs on a fresh Debian machine (as root): FUSE 3 from apt, then a
# virtualenv in ./.venv with razorfs and its test dependencies. Safe to run again.
# The service tests (tests/service) also need systemd-nspawn, to boot systemd in a throwaway
# container, and Debian's python3 with venv and headers, for the venv the container's units run;
# the ACL tests use setfacl and getfacl (acl), as an administrator would; the power-cut test
# (tests/crash/test_ext4_power_cut.py) an ext4 image on a loop device: mount (losetup),
# e2fsprogs (mkfs.ext4), kmod (modprobe loop).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v fusermount3 >/dev/null || ! pkg-config --exists fuse3 2>/dev/null \
    || ! command -v systemd-nspawn >/dev/null || ! /usr/bin/python3 -c 'import ensurepip' 2>/dev/null \
    || [ ! -e "/usr/include/python3.$(/usr/bin/python3 -c 'import sys; print(sys.version_info[1])')/Python.h" ] \
    || ! command -v setfacl >/dev/null || ! command -v losetup >/dev/null \
    || ! command -v mkfs.ext4 >/dev/null || ! command -v modprobe >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq fuse3 libfuse3-dev pkg-config python3-venv python3-dev \
        systemd-container acl mount e2fsprogs kmod >/dev/null
fi
# The replica tests' S3 server: OpenStack Swift with s3api, run by tests/replica/s3server.py as
# plain processes (not memcached, whose postinst runs systemd-tmpfiles; not the services).
if ! command -v swift-proxy-server >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends swift swift-proxy swift-account \
        swift-container swift-object >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
echo "installed: $(.venv/bin/razorfs --help | head -n 1)"

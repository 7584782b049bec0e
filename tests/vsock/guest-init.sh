#!/bin/sh
# Stage 2 of the vsock guest's init (see tests/vsock/guest.py): PID 1 in the guest, in an
# overlay over the host's read-only `/`. The results share is mounted at /pf-proxy-guest and
# holds, from the host, settings.sh (MODULES_DIR, CHECKOUT, KEEP_DIRS) and command.sh (env, cd,
# exec CMD).
# Sets up /proc, /sys, /dev, /tmp, /run, the kernel's modules, vsock_loopback, netfilter and lo;
# runs the command with its output to the console and output.log; writes `exit-code`; powers off.
R=/pf-proxy-guest
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH

say() { echo "pf-proxy-guest: $*"; }
power_off() {
    sync
    busybox poweroff -f  # reboot(2) at once: QEMU exits (if not, PID 1 exits: panic=-1 does it)
    echo o >/proc/sysrq-trigger
    sleep 10
}
fail() {
    say "guest setup failed: $*"
    echo "$*" >"$R/setup-failed"
    power_off
}

mount -t proc proc /proc || fail "mount /proc"
say "stage 2 at $(cut -d' ' -f1 /proc/uptime) s of kernel uptime"
. "$R/settings.sh" || fail "reading $R/settings.sh"
mount -t sysfs sysfs /sys || fail "mount /sys"
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev || fail "mount /dev"
mkdir -p /dev/pts /dev/shm /dev/mqueue
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts || fail "mount /dev/pts"
mount -t tmpfs -o mode=1777 tmpfs /dev/shm || fail "mount /dev/shm"
for dir in /tmp /run; do
    case " $KEEP_DIRS " in
    *" $dir "*) say "$dir stays the overlay's: the checkout or the cache is under it" ;;
    *) mount -t tmpfs -o mode=$([ $dir = /tmp ] && echo 1777 || echo 0755) tmpfs $dir \
        || fail "mount $dir" ;;
    esac
done
mkdir -p /run/netns /run/lock /pf-proxy-pycache
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 pycache /pf-proxy-pycache \
    || fail "mount the pycache share"
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
ulimit -n 1048576 2>/dev/null || ulimit -n 65536  # tests open thousands of connections
hostname pf-proxy-guest

# The kernel's modules, unpacked on the host, for modprobe and the kernel's own autoloading.
release=$(uname -r)
mkdir -p /lib/modules && ln -sfn "$MODULES_DIR" "/lib/modules/$release" \
    || fail "linking /lib/modules/$release to $MODULES_DIR"
# vsock_loopback (CID 1: local listeners), or for the hybrid stage the virtio transport of the
# vhost-user-vsock device (VSOCK_MODULE from settings.sh).
modprobe "${VSOCK_MODULE:-vsock_loopback}" || fail "modprobe ${VSOCK_MODULE:-vsock_loopback}"
# Preloaded so iptables-nft REDIRECT, NFQUEUE and ipset work at once in any network namespace
# (the kernel would autoload most of them, one request at a time). One modprobe: each costs.
modprobe -a veth nf_tables nft_compat nft_chain_nat nf_nat nf_conntrack xt_REDIRECT \
    xt_NFQUEUE nfnetlink_queue xt_multiport xt_tcpudp ip_set ip_set_bitmap_port \
    ip_set_hash_net xt_set || say "warning: some netfilter modules did not load (above)"
ip link set lo up || fail "ip link set lo up"

cut -d' ' -f1 /proc/uptime >"$R/started"
say "running the command at $(cat "$R/started") s of kernel uptime"
{
    env -i /bin/sh "$R/command.sh" </dev/null
    echo $? >"$R/exit-code.tmp"
} 2>&1 | tee "$R/output.log"
sync
mv "$R/exit-code.tmp" "$R/exit-code"
power_off

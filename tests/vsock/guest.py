"""The guest stage: run a command (above all pytest) in a throw-away QEMU guest with real AF_VSOCK.

This machine's own vsock belongs to the infrastructure, so tests over real AF_VSOCK run inside a
QEMU guest whose kernel has the `vsock_loopback` transport (CID 1 reaches local listeners). The
guest has no network device and no vsock device; it sees this machine's `/` read-only over
virtio-9p under an overlayfs with a tmpfs upper layer (so it runs the checkout's own `.venv`),
plus a writable 9p share, a fresh temporary directory, for the command, its output and exit code
(and files the command leaves in $PF_PROXY_GUEST_COLLECT, copied out with `--collect DIR`).

    python -m tests.vsock.guest [--timeout S] [--memory MB] [--env K=V ...] -- CMD ARGS...
    python -m tests.vsock.guest --hybrid [...] -- CMD ARGS...

With --hybrid (the hybrid stage, tests/hybrid) the guest's vsock is a vhost-user-vsock-pci
device behind rust-vmm's vhost-device-vsock, the host side of Firecracker's and Cloud
Hypervisor's hybrid vsock (a Unix socket, uds_path), and the guest loads
vmw_vsock_virtio_transport instead of vsock_loopback (its CID is HYBRID_CID; the host is CID
2). The guest runs `tests.hybrid.agent`; CMD runs here, on the host, once the agent is up,
with the variables tests/hybrid/__init__.py names, and its exit status is the harness's. The
backend is $PF_PROXY_VHOST_DEVICE_VSOCK, or vhost-device-vsock on PATH, or built once by
../shared/hybrid/build.sh beside the checkout; without one the stage cannot run (exit 77, or
1 with PF_PROXY_REQUIRE_GUEST=1). Users get it with `cargo install vhost-device-vsock`.

Assets, built on first use and cached in `.cache/vsock-guest/` (`--rebuild` redoes them): the
newest Debian `linux-image-6.1.0-NN-amd64` from `apt-cache search`, fetched with `apt-get
download` and unpacked with `dpkg -x` (never installed); its vmlinux, for QEMU's PVH entry; a
busybox-static initramfs that mounts the shares and the overlay (the `INITRAMFS_INIT` below),
then hands over to `tests/vsock/guest-init.sh`, which sets the guest up and runs the command.

The guest runs the command as root in the checkout with PATH starting at `.venv/bin`, env
PF_PROXY_GUEST=1, PYTHONPYCACHEPREFIX (a persistent share: bytecode compiled once under
emulation is reused), this process's PF_PROXY_* variables (but PF_PROXY_VSOCK_DIR and the
harness's own PF_PROXY_GUEST*) and each `--env`. Its output is streamed here. Exit status: the
command's; 77 when a requirement is missing (printed; 1 instead if PF_PROXY_REQUIRE_GUEST=1);
124 on timeout; 125 when the guest failed to boot or to report (its files are then kept). KVM
is used when /dev/kvm is usable and the CPU has vmx or svm, else TCG; PF_PROXY_GUEST_ACCEL=
kvm|tcg overrides; PF_PROXY_GUEST_APPEND adds kernel parameters (e.g. loglevel=7 to debug a
boot); PF_PROXY_GUEST_CACHE moves the asset cache. Don't `--rebuild` while a guest runs: it
reads the kernel's modules from the cache.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("PF_PROXY_GUEST_CACHE") or CHECKOUT / ".cache" / "vsock-guest")
STAGE2 = Path(__file__).with_name("guest-init.sh")
KERNEL_PACKAGE = re.compile(r"^linux-image-6\.1\.0-(\d+)-amd64$")
# Loaded by the initramfs, with their dependencies from modules.dep.
INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
SKIPPED, TIMED_OUT, GUEST_FAILED = 77, 124, 125
SHARE = "/pf-proxy-guest"  # where the guest mounts the results share
COLLECT_ENV = "PF_PROXY_GUEST_COLLECT"  # in the guest: a directory whose files --collect gets
# Host variables the guest must not inherit: the emulation's directory, the harness's own.
NOT_PASSED = re.compile(r"^PF_PROXY_(VSOCK_DIR|GUEST\w*)$")
# mitigations=off: the guest runs only tests, and the mitigations make syscalls costly under TCG
# (`python -c "import pytest"` took 12.7 s with them, 6.3 s without).
APPEND = "console=ttyS0 quiet panic=-1 mitigations=off pf_proxy_guest=1"
PYCACHE = CACHE / "pycache"  # PYTHONPYCACHEPREFIX in the guest: compiled once, reused
# The hybrid stage (--hybrid): the backend, the guest's CID behind it, and the agent.
BACKEND = "vhost-device-vsock"
BACKEND_ENV = "PF_PROXY_VHOST_DEVICE_VSOCK"
BUILD_SCRIPT = CHECKOUT.parent / "shared" / "hybrid" / "build.sh"
BUILT_BACKEND = Path(os.environ.get("HYBRID_BASE", "/var/tmp/hybrid")) / "bin" / BACKEND
HYBRID_CID = 3
AGENT = "agent"  # its directory in the results share

# Stage 1, the initramfs's /init (busybox sh). Mounts / (read-only 9p) under an overlay with a
# tmpfs upper layer, mounts the results share at /pf-proxy-guest in it and switches to stage 2.
INITRAMFS_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /dev /proc /lower /rw /newroot
mount -t devtmpfs devtmpfs /dev
exec </dev/null >/dev/console 2>&1
mount -t proc proc /proc
fail() {
    echo "pf-proxy-guest: initramfs: $*"
    poweroff -f
}
for m in $(cat /modules.order); do insmod "/modules/$m" || fail "insmod $m failed"; done
opts=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o "$opts,ro" hostroot /lower || fail "mounting the host's / (9p hostroot) failed"
mount -t tmpfs -o mode=0755 tmpfs /rw || fail "mounting the tmpfs upper layer failed"
mkdir /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \\
    || fail "mounting the overlay on the host's / failed"
mkdir -p /newroot/pf-proxy-guest
mount -t 9p -o "$opts" results /newroot/pf-proxy-guest || fail "mounting the results share failed"
[ -f /newroot/pf-proxy-guest/guest-init.sh ] || fail "no guest-init.sh in the results share"
mount --move /dev /newroot/dev || fail "moving /dev failed"
umount /proc
exec switch_root /newroot /bin/sh /pf-proxy-guest/guest-init.sh
"""


class Missing(Exception):
    """A requirement of the guest stage is missing (exit 77, or 1 when required)."""


class GuestFailed(Exception):
    """The guest did not boot, or did not report the command's exit code."""


@dataclass(frozen=True)
class Kernel:
    version: str  # e.g. 6.1.0-57-amd64
    image: Path  # vmlinux (PVH entry) or, failing that, the bzImage
    modules: Path  # the unpacked /lib/modules/<version>


def log(message: str) -> None:
    print(f"pf-proxy-guest: {message}", file=sys.stderr, flush=True)


def run(*args: str | Path, cwd: Path | None = None) -> str:
    """Run a build step; raise Missing naming the command and its output if it fails."""
    try:
        done = subprocess.run(
            [str(a) for a in args], cwd=cwd, capture_output=True, text=True, check=False
        )
    except FileNotFoundError as exc:
        raise Missing(f"{args[0]} not found ({exc})") from exc
    if done.returncode != 0:
        raise Missing(
            f"`{shlex.join(map(str, args))}` failed (exit {done.returncode}) in {cwd or '.'}:\n"
            f"{done.stdout}{done.stderr}".rstrip()
        )
    return done.stdout


def segments(elf: bytes) -> list[tuple[int, bytes]]:
    """(p_type, contents) of each program header of a 64-bit little-endian ELF file."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return []
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    found = []
    for i in range(phnum):
        p_type, _, p_offset = struct.unpack_from("<IIQ", elf, phoff + i * phentsize)
        (p_filesz,) = struct.unpack_from("<Q", elf, phoff + i * phentsize + 0x20)
        found.append((p_type, elf[p_offset : p_offset + p_filesz]))
    return found


def is_static(binary: Path) -> bool:
    """An ELF executable without a PT_INTERP program header needs no dynamic loader."""
    found = segments(binary.read_bytes())
    return bool(found) and all(p_type != 3 for p_type, _ in found)  # 3: PT_INTERP


def has_pvh_entry(vmlinux: bytes) -> bool:
    """QEMU boots an ELF kernel through the PVH entry named by its Xen note
    XEN_ELFNOTE_PHYS32_ENTRY (type 18)."""
    for p_type, notes in segments(vmlinux):
        at = 0
        while p_type == 4 and at + 12 <= len(notes):  # PT_NOTE
            namesz, descsz, n_type = struct.unpack_from("<III", notes, at)
            if notes[at + 12 : at + 12 + namesz] == b"Xen\0" and n_type == 18:
                return True
            at += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def check_tools() -> None:
    path = os.environ.get("PATH", "").split(":")
    os.environ["PATH"] = ":".join([*path, *(d for d in ("/usr/sbin", "/sbin") if d not in path)])
    tools = {
        "qemu-system-x86_64": "qemu-system-x86",
        "apt-get": "apt",
        "apt-cache": "apt",
        "dpkg": "dpkg",
        "depmod": "kmod",
        "cpio": "cpio",
        "busybox": "busybox-static",
    }
    missing = [f"{tool} (package {pkg})" for tool, pkg in tools.items() if not shutil.which(tool)]
    if missing:
        raise Missing(f"not on PATH: {', '.join(missing)}")
    busybox = Path(shutil.which("busybox") or "")
    if not is_static(busybox.resolve()):
        raise Missing(f"{busybox} is not statically linked: install the package busybox-static")


def newest_kernel_package() -> str:
    out = run("apt-cache", "search", "--names-only", r"^linux-image-6\.1\.0-[0-9]+-amd64$")
    names = [line.split(" - ")[0].strip() for line in out.splitlines()]
    found = [(int(m.group(1)), m.group(0)) for n in names if (m := KERNEL_PACKAGE.match(n))]
    if not found:
        raise Missing(
            "apt-cache search finds no linux-image-6.1.0-NN-amd64 package "
            "(needs Debian bookworm's apt sources; run apt-get update?)"
        )
    return max(found)[1]


def extract_vmlinux(bzimage: Path, vmlinux: Path) -> bool:
    """Decompress the bzImage's payload (xz or gzip) to a vmlinux that QEMU can boot through
    the PVH entry (about 5 s faster under TCG); False if it cannot."""
    data = bzimage.read_bytes()
    setup_sects = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)  # payload_offset, payload_length
    payload = data[(setup_sects + 1) * 512 + offset :][:length]
    if payload.startswith(b"\xfd7zXZ\x00"):
        elf = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(b"\x1f\x8b"):
        elf = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    else:
        return False
    if not has_pvh_entry(elf):
        return False
    vmlinux.write_bytes(elf)
    return True


def module_order(modules: Path, names: tuple[str, ...]) -> list[Path]:
    """The .ko files for `names` and their dependencies (from modules.dep), dependencies first."""
    deps: dict[str, list[str]] = {}
    for line in (modules / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    by_name = {re.sub(r"\.ko(\.\w+)?$", "", Path(p).name).replace("-", "_"): p for p in deps}
    order: list[str] = []

    def add(path: str) -> None:
        if path not in order:
            for dep in deps[path]:
                add(dep)
            order.append(path)

    for name in names:
        if name not in by_name:
            raise Missing(f"module {name} not in {modules / 'modules.dep'}")
        add(by_name[name])
    return [modules / p for p in order]


def build_kernel(package: str) -> Kernel:
    version = package.removeprefix("linux-image-")
    kdir = CACHE / version
    log(f"building guest assets in {kdir} from {package} (apt-get download, dpkg -x)")
    tmp = Path(tempfile.mkdtemp(prefix=f"{version}.", dir=kdir.parent))
    try:
        run("apt-get", "download", package, cwd=tmp)
        debs = list(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise Missing(f"apt-get download {package} left {debs} in {tmp}")
        run("dpkg", "-x", debs[0], tmp / "root")
        debs[0].unlink()
        run("depmod", "-b", tmp / "root", version)
        bzimage = tmp / "root" / "boot" / f"vmlinuz-{version}"
        if extract_vmlinux(bzimage, tmp / "vmlinux"):
            (tmp / "boot-image").write_text("vmlinux\n")
        else:
            log(f"no PVH-bootable vmlinux in {bzimage}: booting the bzImage (slower)")
            (tmp / "boot-image").write_text(f"root/boot/vmlinuz-{version}\n")
        shutil.rmtree(kdir, ignore_errors=True)
        tmp.rename(kdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_kernel(kdir)


def load_kernel(kdir: Path) -> Kernel:
    version = kdir.name
    image = kdir / (kdir / "boot-image").read_text().strip()
    return Kernel(version, image, kdir / "root" / "lib" / "modules" / version)


def build_initramfs(kernel: Kernel) -> Path:
    """The busybox initramfs for `kernel`, named by a hash of what goes into it."""
    busybox = Path(shutil.which("busybox") or "busybox").resolve()
    modules = module_order(kernel.modules, INITRAMFS_MODULES)
    key = hashlib.sha256(INITRAMFS_INIT.encode())
    for part in (busybox, *modules):
        key.update(part.read_bytes())
    target = kernel.image.parent / f"initramfs-{key.hexdigest()[:16]}.cpio.gz"
    for old in target.parent.glob("initramfs-*.cpio.gz"):  # QEMU has read a running guest's
        if old != target:
            old.unlink()
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as tmpdir:
        root = Path(tmpdir) / "root"
        (root / "bin").mkdir(parents=True)
        (root / "modules").mkdir()
        shutil.copy(busybox, root / "bin" / "busybox")
        (root / "bin" / "sh").symlink_to("busybox")
        for module in modules:
            shutil.copy(module, root / "modules" / module.name)
        (root / "modules.order").write_text("".join(f"{m.name}\n" for m in modules))
        (root / "init").write_text(INITRAMFS_INIT)
        (root / "init").chmod(0o755)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        archive = subprocess.run(
            ["cpio", "--create", "--format=newc", "--quiet", "--owner=0:0"],
            cwd=root,
            input="\n".join(files).encode(),
            capture_output=True,
            check=False,
        )
        if archive.returncode != 0:
            raise Missing(f"cpio failed in {root}: {archive.stderr.decode()}")
        partial = Path(tmpdir) / "initramfs.cpio.gz"
        partial.write_bytes(gzip.compress(archive.stdout, compresslevel=6))
        partial.rename(target)
    return target


def assets(rebuild: bool) -> tuple[Kernel, Path]:
    """The cached kernel and initramfs, built (under a lock) if missing or if `rebuild`."""
    PYCACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = sorted(
            (d for d in CACHE.iterdir() if (d / "boot-image").exists()),
            key=lambda d: [int(n) for n in re.findall(r"\d+", d.name)],
        )
        if cached and not rebuild:
            kernel = load_kernel(cached[-1])
        else:
            started = time.monotonic()
            kernel = build_kernel(newest_kernel_package())
            for old in cached:
                if old.name != kernel.version:
                    shutil.rmtree(old)
            log(f"kernel assets built in {time.monotonic() - started:.1f} s")
        started = time.monotonic()
        initramfs = build_initramfs(kernel)
        if time.monotonic() - started > 0.5:
            log(f"initramfs {initramfs.name} built in {time.monotonic() - started:.1f} s")
        return kernel, initramfs


def find_backend() -> Path:
    """vhost-device-vsock: named by PF_PROXY_VHOST_DEVICE_VSOCK, or on PATH, or built by
    ../shared/hybrid/build.sh (once: about 2 minutes); Missing if none of these."""
    named = os.environ.get(BACKEND_ENV)
    if named:
        if not os.access(named, os.X_OK):
            raise Missing(f"{BACKEND_ENV}={named} is not an executable file")
        return Path(named)
    found = shutil.which(BACKEND)
    if found:
        return Path(found)
    if BUILD_SCRIPT.exists():
        if not BUILT_BACKEND.exists():
            log(f"building {BACKEND} with {BUILD_SCRIPT} (once, about 2 minutes)")
        run("bash", BUILD_SCRIPT)  # does nothing when the binary is up to date
        if os.access(BUILT_BACKEND, os.X_OK):
            return BUILT_BACKEND
    raise Missing(
        f"no {BACKEND}: install it (cargo install {BACKEND}) and put it on PATH or name it in "
        f"{BACKEND_ENV}"
    )


@dataclass
class Backend:
    """vhost-device-vsock serving the guest's vsock device; `uds_path` is the VM's vsock, as
    the host sees it."""

    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def uds_path(self) -> Path:
        return self.directory / "vm.vsock"

    @property
    def vhost_user_socket(self) -> Path:
        return self.directory / "vhost-user.sock"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def start_backend(binary: Path, results: Path) -> Backend:
    """Start the backend in a fresh short directory (a Unix socket path holds 107 bytes);
    its output goes to `results`/backend.log. Wait for its vhost-user socket."""
    directory = Path(tempfile.mkdtemp(prefix="pfp-hv-"))
    vm = f"guest-cid={HYBRID_CID},socket={directory}/vhost-user.sock,uds-path={directory}/vm.vsock"
    with open(results / "backend.log", "wb") as output:
        process = subprocess.Popen(
            [str(binary), "--vm", vm],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    backend = Backend(directory, process)
    deadline = time.monotonic() + 30
    while not backend.vhost_user_socket.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            backend.stop()
            raise GuestFailed(
                f"{binary} did not open {backend.vhost_user_socket} (exit {process.poll()}): "
                f"{(results / 'backend.log').read_text(errors='replace')[-2000:]}"
            )
        time.sleep(0.05)
    return backend


def accelerator() -> str:
    choice = os.environ.get("PF_PROXY_GUEST_ACCEL", "")
    if choice:
        return choice  # checked by main()
    usable = os.access("/dev/kvm", os.R_OK | os.W_OK)
    flags = re.search(r"^flags\s*:.*\b(vmx|svm)\b", Path("/proc/cpuinfo").read_text(), re.M)
    return "kvm" if usable and flags else "tcg"


def qemu_command(
    kernel: Kernel, initramfs: Path, results: Path, memory: int, backend: Backend | None = None
) -> list[str]:
    accel = accelerator()
    vsock = []
    if backend is not None:  # vhost-user needs the guest's memory shared with the backend
        vsock = [
            "-object", f"memory-backend-memfd,id=mem,size={memory}M,share=on",
            "-numa", "node,memdev=mem",
            "-chardev", f"socket,id=vvsock,path={backend.vhost_user_socket}",
            "-device", "vhost-user-vsock-pci,chardev=vvsock",
        ]  # fmt: skip
    cpus = str(max(1, min(os.cpu_count() or 1, 4)))
    append = f"{APPEND} {os.environ.get('PF_PROXY_GUEST_APPEND', '')}".rstrip()
    return [
        "qemu-system-x86_64",
        "-name", "pf-proxy-guest",
        "-nodefaults", "-display", "none", "-no-reboot", "-nic", "none",
        *(["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else
          ["-accel", "tcg,thread=multi", "-cpu", "max"]),
        "-smp", cpus, "-m", str(memory),
        "-kernel", str(kernel.image), "-initrd", str(initramfs),
        "-append", append,
        "-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console",
        # 9p shares: mount tags as in INITRAMFS_INIT and guest-init.sh
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,"
                   "multidevs=remap",
        "-virtfs", f"local,path={results},mount_tag=results,security_model=passthrough",
        "-virtfs", f"local,path={PYCACHE},mount_tag=pycache,security_model=passthrough",
        *vsock,
    ]  # fmt: skip


def write_job(
    results: Path, kernel: Kernel, argv: list[str], env: dict[str, str], hybrid: bool = False
) -> None:
    """The results share holds what the guest needs: stage 2, its settings, the command; and
    `collect/`, where the command may leave files for `--collect`."""
    shutil.copy(STAGE2, results / "guest-init.sh")
    (results / "collect").mkdir()
    # A fresh tmpfs on /tmp and /run, unless that would hide what the guest needs from there
    needed = [CHECKOUT, CACHE, Path(sys.executable).resolve()]
    shadowed = [d for d in ("/tmp", "/run") if any(p.is_relative_to(d) for p in needed)]
    settings = {
        "MODULES_DIR": str(kernel.modules),
        "CHECKOUT": str(CHECKOUT),
        "KEEP_DIRS": " ".join(shadowed),  # left as the overlay: writable, in memory too
        "VSOCK_MODULE": "vmw_vsock_virtio_transport" if hybrid else "vsock_loopback",
    }
    (results / "settings.sh").write_text(
        "".join(f"{k}={shlex.quote(v)}\n" for k, v in settings.items())
    )
    base = {
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "PYTHONPYCACHEPREFIX": "/pf-proxy-pycache",  # guest-init.sh mounts PYCACHE there
        "PATH": f"{CHECKOUT / '.venv' / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:"
        "/usr/bin:/sbin:/bin",
    }
    passed = {
        k: v for k, v in os.environ.items() if k.startswith("PF_PROXY_") and not NOT_PASSED.match(k)
    }
    full = {**base, **passed, **env, "PF_PROXY_GUEST": "1", COLLECT_ENV: f"{SHARE}/collect"}
    (results / "command.sh").write_text(
        "".join(f"export {k}={shlex.quote(v)}\n" for k, v in full.items())
        + f"cd {shlex.quote(str(CHECKOUT))} || exit 125\n"
        + f"exec {shlex.join(argv)}\n"
    )


class Console:
    """Streams the guest's serial console to stdout (without the serial \\r) and keeps a tail."""

    def __init__(self, stream: object, log_path: Path) -> None:
        self.tail: collections.deque[bytes] = collections.deque(maxlen=60)
        self.thread = threading.Thread(target=self._pump, args=(stream, log_path), daemon=True)
        self.thread.start()

    def _pump(self, stream: object, log_path: Path) -> None:
        out = sys.stdout.buffer
        partial = b""
        with open(log_path, "wb") as saved:
            while chunk := stream.read1(1 << 16):  # type: ignore[attr-defined]
                chunk = chunk.replace(b"\r", b"")
                saved.write(chunk)
                out.write(chunk)
                out.flush()
                lines = (partial + chunk).split(b"\n")
                partial = lines.pop()
                self.tail.extend(lines)
        if partial:
            self.tail.append(partial)

    def text(self) -> str:
        self.thread.join(5)
        return b"\n".join(self.tail).decode(errors="replace")


def die_with_parent() -> None:
    """In QEMU's child, before exec: the kernel kills QEMU if this process dies (even by
    SIGKILL), so no guest outlives the harness."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_in_guest(
    argv: list[str], env: dict[str, str], timeout: float, boot_timeout: float, memory: int,
    rebuild: bool, collect: Path | None = None, hybrid: bool = False,
) -> int:  # fmt: skip
    check_tools()
    binary = find_backend() if hybrid else None
    kernel, initramfs = assets(rebuild)
    results = Path(tempfile.mkdtemp(prefix="pf-proxy-guest-"))  # kept if the guest fails
    backend = None
    try:
        guest_argv = ["python", "-m", "tests.hybrid.agent", f"{SHARE}/{AGENT}"] if hybrid else argv
        write_job(results, kernel, guest_argv, env, hybrid)
        if binary is not None:
            backend = start_backend(binary, results)
        command = qemu_command(kernel, initramfs, results, memory, backend)
    except BaseException:
        if backend is not None:
            backend.stop()
        shutil.rmtree(results, ignore_errors=True)
        raise
    log(f"booting {kernel.version} ({kernel.image.name}, {command[command.index('-accel') + 1]},"
        f" {memory} MB{', hybrid vsock' if hybrid else ''}); results in {results}")  # fmt: skip
    started = time.monotonic()
    qemu = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent,
    )
    console = Console(qemu.stdout, results / "console.log")
    booted: float | None = None
    host: subprocess.Popen[bytes] | None = None  # the hybrid stage's command, run here
    host_code: int | None = None
    try:
        # The hybrid stage's command may outlive the guest (a test kills the backend).
        while qemu.poll() is None or (host is not None and host.poll() is None):
            now = time.monotonic()
            if booted is None and (results / "started").exists():
                booted = now
            if backend is not None and host is None and (results / AGENT / "ready").exists():
                host = start_host_command(argv, backend, results)
            if host is not None and host_code is None and host.poll() is not None:
                host_code = host.returncode
                (results / AGENT / "stop").touch()  # the agent exits, the guest powers off
            limit = started + boot_timeout if booted is None else started + timeout
            if now > limit:
                qemu.kill()
                qemu.wait()
                what = "boot (no command started)" if booted is None else "run"
                raise TimeoutError(
                    f"guest timed out ({what}) after {now - started:.0f} s; QEMU (pid "
                    f"{qemu.pid}) killed; console in {results / 'console.log'}. "
                    f"Console tail:\n{console.text()}"
                )
            time.sleep(0.1)
    finally:
        if qemu.poll() is None:  # interrupted (^C, SIGTERM): never leave the guest running
            qemu.kill()
            qemu.wait()
        if host is not None and host.poll() is None:
            host.kill()
            host.wait()
        if backend is not None:
            backend.stop()
    ended = time.monotonic()
    exit_file = results / "exit-code"
    if not exit_file.exists():
        raise GuestFailed(
            f"QEMU exited with {qemu.returncode} after {ended - started:.1f} s and the guest "
            f"wrote no {exit_file} ({'command started' if booted else 'never booted'}); "
            f"console in {results / 'console.log'}. Console tail:\n{console.text()}"
        )
    console.text()
    written = exit_file.read_text().strip()
    if not written.isdigit():
        raise GuestFailed(f"{exit_file} holds {written!r}, not an exit code")
    code = int(written)
    if hybrid:
        if host_code is None:
            raise GuestFailed(f"the guest's agent exited {code} before the command here ran")
        log(f"the guest's agent exited {code}")
        code = host_code
    boot = f"booted in {booted - started:.1f} s, " if booted else ""
    log(f"{boot}command exited {code} after {ended - (booted or started):.1f} s "
        f"(total {ended - started:.1f} s)")  # fmt: skip
    if collect is not None:
        collect.mkdir(parents=True, exist_ok=True)
        for item in sorted((results / "collect").iterdir()):
            shutil.copy(item, collect / item.name)
            log(f"collected {collect / item.name}")
    shutil.rmtree(results, ignore_errors=True)
    return code


def start_host_command(argv: list[str], backend: Backend, results: Path) -> subprocess.Popen[bytes]:
    """The hybrid stage's command, here on the host, told where the guest's vsock is."""
    from tests.hybrid import AGENT_ENV, BACKEND_PID_ENV, CID_ENV, UDS_ENV

    log(f"the guest's agent is up: running {shlex.join(argv)} here")
    env = {
        **os.environ,
        UDS_ENV: str(backend.uds_path),
        CID_ENV: str(HYBRID_CID),
        AGENT_ENV: str(results / AGENT),
        BACKEND_PID_ENV: str(backend.process.pid),
        COLLECT_ENV: str(results / "collect"),
    }
    return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.vsock.guest",
        description="Run CMD inside a throw-away QEMU guest with real AF_VSOCK (vsock_loopback).",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="overall limit, seconds")
    parser.add_argument("--boot-timeout", type=float, default=300, help="limit to start CMD")
    parser.add_argument("--memory", type=int, default=2048, help="guest memory, MB")
    parser.add_argument("--env", action="append", default=[], metavar="K=V", help="set in guest")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached assets")
    parser.add_argument(
        "--hybrid",
        action="store_true",
        help="vsock behind vhost-device-vsock; CMD runs here, the agent in the guest",
    )
    parser.add_argument(
        "--collect",
        type=Path,
        metavar="DIR",
        help=f"copy the files CMD leaves in ${COLLECT_ENV} to DIR here",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    opts = parser.parse_args(args)
    argv = opts.command[1:] if opts.command[:1] == ["--"] else opts.command
    if not argv:
        parser.error("no command: give it after --")
    bad = [e for e in opts.env if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", e)]
    if bad:
        parser.error(f"--env wants K=V, got {bad}")
    env = dict(e.split("=", 1) for e in opts.env)
    if os.environ.get("PF_PROXY_GUEST_ACCEL", "kvm") not in ("kvm", "tcg"):
        parser.error(
            f"PF_PROXY_GUEST_ACCEL={os.environ['PF_PROXY_GUEST_ACCEL']!r}: want kvm or tcg"
        )
    for sig in (signal.SIGTERM, signal.SIGHUP):  # e.g. timeout(1): unwind, so QEMU is killed
        signal.signal(sig, lambda signum, _: sys.exit(128 + signum))
    try:
        return run_in_guest(
            argv, env, opts.timeout, opts.boot_timeout, opts.memory, opts.rebuild, opts.collect,
            opts.hybrid,
        )  # fmt: skip
    except Missing as exc:
        if os.environ.get("PF_PROXY_REQUIRE_GUEST") == "1":
            log(f"FAILED (PF_PROXY_REQUIRE_GUEST=1): the guest stage cannot run: {exc}")
            return 1
        log(f"SKIPPED: the guest stage cannot run: {exc}")
        return SKIPPED
    except TimeoutError as exc:
        log(f"FAILED: {exc}")
        return TIMED_OUT
    except GuestFailed as exc:
        log(f"FAILED: {exc}")
        return GUEST_FAILED


if __name__ == "__main__":
    sys.exit(main())

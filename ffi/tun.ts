// TUN/TAP through ioctls on /dev/net/tun (Linux Documentation/networking/tuntap.rst,
// include/uapi/linux/if_tun.h) and the few interface ioctls a VMM needs to give a tap an
// IPv4 address, netmask, MAC and the UP flag (include/uapi/linux/sockios.h, linux/if.h).

import { check, closeFd, EAGAIN, EINTR, errno, F_GETFL, F_SETFL, libc, O_NONBLOCK, O_RDWR, openFile } from "./libc.ts";

/** The clone device (Documentation/networking/tuntap.rst). */
export const TUN_CLONE_DEVICE = "/dev/net/tun";

// ---- ioctl request encoding (include/uapi/asm-generic/ioctl.h) ----
const IOC_NRSHIFT = 0;
const IOC_TYPESHIFT = 8;
const IOC_SIZESHIFT = 16;
const IOC_DIRSHIFT = 30;
const IOC_WRITE = 1;
const IOC_READ = 2;
/** sizeof(int) and sizeof(unsigned int) on Linux x86_64. */
const INT_SIZE = 4;
/** The tun ioctl type byte: if_tun.h uses 'T'. */
const TUN_IOC_TYPE = 0x54;

function ioc(dir: number, nr: number, size: number): number {
  return ((dir << IOC_DIRSHIFT) >>> 0) + (size << IOC_SIZESHIFT) + (TUN_IOC_TYPE << IOC_TYPESHIFT) +
    (nr << IOC_NRSHIFT);
}

/** TUNSETIFF = _IOW('T', 202, int) (if_tun.h). Argument: struct ifreq *. */
export const TUNSETIFF = ioc(IOC_WRITE, 202, INT_SIZE);
/** TUNSETPERSIST = _IOW('T', 203, int) (if_tun.h). Argument: the int value. */
export const TUNSETPERSIST = ioc(IOC_WRITE, 203, INT_SIZE);
/** TUNSETOFFLOAD = _IOW('T', 208, unsigned int) (if_tun.h). Argument: the TUN_F_* value itself. */
export const TUNSETOFFLOAD = ioc(IOC_WRITE, 208, INT_SIZE);
/** TUNGETIFF = _IOR('T', 210, unsigned int) (if_tun.h). Argument: struct ifreq *. */
export const TUNGETIFF = ioc(IOC_READ, 210, INT_SIZE);
/** TUNGETVNETHDRSZ = _IOR('T', 215, int) (if_tun.h). Argument: int *. */
export const TUNGETVNETHDRSZ = ioc(IOC_READ, 215, INT_SIZE);
/** TUNSETVNETHDRSZ = _IOW('T', 216, int) (if_tun.h). Argument: int *. */
export const TUNSETVNETHDRSZ = ioc(IOC_WRITE, 216, INT_SIZE);

// ---- TUNSETIFF flags (if_tun.h) ----
export const IFF_TUN = 0x0001;
export const IFF_TAP = 0x0002;
export const IFF_NO_PI = 0x1000;
export const IFF_VNET_HDR = 0x4000;
/** Mask of the device type bits (if_tun.h TUN_TYPE_MASK). */
export const TUN_TYPE_MASK = 0x000f;

// ---- TUNSETOFFLOAD flags (if_tun.h): what the tap may hand us on read ----
/** "You can hand me unchecksummed packets." */
export const TUN_F_CSUM = 0x01;
/** "I can handle TSO for IPv4 packets." */
export const TUN_F_TSO4 = 0x02;
/** "I can handle TSO for IPv6 packets." */
export const TUN_F_TSO6 = 0x04;
/** "I can handle TSO with ECN bits." */
export const TUN_F_TSO_ECN = 0x08;
/** "I can handle UFO packets." */
export const TUN_F_UFO = 0x10;

// ---- struct ifreq (include/uapi/linux/if.h) ----
/** IFNAMSIZ (linux/if.h): interface names are at most 15 bytes plus NUL. */
export const IFNAMSIZ = 16;
/** sizeof(struct ifreq) on x86_64: the 16-byte name, then a 24-byte union (struct ifmap is the largest). */
export const IFREQ_SIZE = 40;
/** ifr_name: char[IFNAMSIZ] at offset 0. */
const IFR_NAME = 0;
/** The union ifr_ifru starts after the name: ifr_flags (short), ifr_addr (struct sockaddr), ifr_mtu (int). */
const IFR_IFRU = IFNAMSIZ;

// ---- Interface ioctls (include/uapi/linux/sockios.h) on an AF_INET socket ----
export const SIOCGIFFLAGS = 0x8913;
export const SIOCSIFFLAGS = 0x8914;
export const SIOCSIFADDR = 0x8916;
export const SIOCSIFNETMASK = 0x891c;
export const SIOCGIFMTU = 0x8921;
export const SIOCSIFHWADDR = 0x8924;
/** IFF_UP (linux/if.h enum net_device_flags). */
export const IFF_UP = 1 << 0;
/** ARPHRD_ETHER (linux/if_arp.h): sa_family of an Ethernet hardware address. */
export const ARPHRD_ETHER = 1;
/** AF_INET (bits/socket.h) and SOCK_DGRAM (bits/socket_type.h); SOCK_CLOEXEC = O_CLOEXEC. */
const AF_INET = 2;
const SOCK_DGRAM = 2;
const SOCK_CLOEXEC = 0o2000000;
/** struct sockaddr_in (linux/in.h): sa_family u16, sin_port be16, sin_addr 4 bytes. */
const SIN_FAMILY = 0;
const SIN_ADDR = 4;
/** struct sockaddr: sa_family u16, then sa_data (the MAC for ARPHRD_ETHER). */
const SA_DATA = 2;
/** An Ethernet address is 6 bytes (linux/if_ether.h ETH_ALEN). */
export const ETH_ALEN = 6;

function ifreq(name: string): Uint8Array<ArrayBuffer> {
  const enc = new TextEncoder().encode(name);
  if (enc.length === 0 || enc.length >= IFNAMSIZ) {
    throw new Error(`tap: interface name "${name}" must be 1..${IFNAMSIZ - 1} bytes`);
  }
  const b = new Uint8Array(IFREQ_SIZE);
  b.set(enc, IFR_NAME);
  return b;
}

function ifreqName(b: Uint8Array): string {
  const name = b.subarray(IFR_NAME, IFR_NAME + IFNAMSIZ);
  const end = name.indexOf(0);
  return new TextDecoder().decode(name.subarray(0, end < 0 ? IFNAMSIZ : end));
}

function ioctlPtr(fd: number, req: number, buf: Uint8Array<ArrayBuffer>, what: string): void {
  check(what, libc().ioctl(fd, BigInt(req), Deno.UnsafePointer.of(buf)));
}

function ioctlInt(fd: number, req: number, value: number, what: string): void {
  check(what, libc().ioctl_int(fd, BigInt(req), BigInt(value)));
}

/** An open tap queue: the fd, the interface name and the flags the kernel reports. */
export interface TapHandle {
  fd: number;
  name: string;
  flags: number;
}

/**
 * Open (or create) tap `name` with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, set the vnet header size,
 * turn all receive offloads off and make the fd non-blocking. An empty name lets the kernel
 * pick one (tap%d). Needs CAP_NET_ADMIN unless the tap already exists and belongs to the caller.
 */
export function openTap(name: string, vnetHdrSize: number): TapHandle {
  const fd = openFile(TUN_CLONE_DEVICE, O_RDWR | O_NONBLOCK);
  try {
    const req = name === "" ? new Uint8Array(IFREQ_SIZE) : ifreq(name);
    new DataView(req.buffer).setUint16(IFR_IFRU, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, true);
    ioctlPtr(fd, TUNSETIFF, req, `TUNSETIFF ${name || "(new)"}`);
    return configureTap(fd, vnetHdrSize);
  } catch (e) {
    closeFd(fd);
    throw e;
  }
}

/**
 * Take over an already open tap fd (crosvm's tap-fd): it must be a tap with IFF_VNET_HDR and
 * IFF_NO_PI. Sets the vnet header size, turns offloads off, makes it non-blocking.
 */
export function adoptTapFd(fd: number, vnetHdrSize: number): TapHandle {
  return configureTap(fd, vnetHdrSize);
}

function configureTap(fd: number, vnetHdrSize: number): TapHandle {
  const req = new Uint8Array(IFREQ_SIZE);
  ioctlPtr(fd, TUNGETIFF, req, "TUNGETIFF");
  const flags = new DataView(req.buffer).getUint16(IFR_IFRU, true);
  const name = ifreqName(req);
  if ((flags & TUN_TYPE_MASK) !== IFF_TAP) throw new Error(`tap ${name}: fd ${fd} is a tun, not a tap`);
  if (!(flags & IFF_VNET_HDR)) throw new Error(`tap ${name}: opened without IFF_VNET_HDR`);
  if (!(flags & IFF_NO_PI)) throw new Error(`tap ${name}: opened without IFF_NO_PI`);
  const sz = new Int32Array([vnetHdrSize]);
  ioctlPtr(fd, TUNSETVNETHDRSZ, new Uint8Array(sz.buffer), "TUNSETVNETHDRSZ");
  setTapOffload(fd, 0);
  const fl = check("fcntl F_GETFL", libc().fcntl(fd, F_GETFL, 0n));
  check("fcntl F_SETFL", libc().fcntl(fd, F_SETFL, BigInt(fl | O_NONBLOCK)));
  return { fd, name, flags };
}

/** TUNSETOFFLOAD: which offloads (TUN_F_*) the reader accepts in frames read from the tap. */
export function setTapOffload(fd: number, tunFlags: number): void {
  ioctlInt(fd, TUNSETOFFLOAD, tunFlags, `TUNSETOFFLOAD 0x${tunFlags.toString(16)}`);
}

/** The vnet header size the tap uses (TUNGETVNETHDRSZ). */
export function tapVnetHdrSize(fd: number): number {
  const sz = new Int32Array(1);
  ioctlPtr(fd, TUNGETVNETHDRSZ, new Uint8Array(sz.buffer), "TUNGETVNETHDRSZ");
  return sz[0];
}

/** read(2) on a non-blocking fd: bytes read, 0 at EOF, -1 when nothing is ready (EAGAIN); throws otherwise. */
export function readNonBlocking(fd: number, buf: Uint8Array<ArrayBuffer>): number {
  for (;;) {
    const n = Number(libc().read(fd, buf, BigInt(buf.length)));
    if (n >= 0) return n;
    const e = errno();
    if (e === EINTR) continue;
    if (e === EAGAIN) return -1;
    throw new TapIoError("read", e);
  }
}

/** write(2) of one whole frame; returns the bytes written or throws TapIoError (EAGAIN included). */
export function writeFrame(fd: number, buf: Uint8Array<ArrayBuffer>): number {
  for (;;) {
    const n = Number(libc().write(fd, buf, BigInt(buf.length)));
    if (n >= 0) return n;
    const e = errno();
    if (e === EINTR) continue;
    throw new TapIoError("write", e);
  }
}

/** A failed read/write on a tap, with its errno. */
export class TapIoError extends Error {
  constructor(readonly call: string, readonly errno: number) {
    super(`tap ${call}: errno ${errno}`);
    this.name = "TapIoError";
  }
}

// ---- Host-side interface configuration (crosvm's `--device SOCKET,IP,NETMASK,MAC` form) ----

/** Parse "aa:bb:cc:dd:ee:ff" into 6 bytes; throws on anything else. */
export function parseMac(s: string): Uint8Array {
  const parts = s.split(":");
  if (parts.length !== ETH_ALEN || !parts.every((p) => /^[0-9a-fA-F]{2}$/.test(p))) {
    throw new Error(`"${s}" is not a MAC address (aa:bb:cc:dd:ee:ff)`);
  }
  return Uint8Array.from(parts.map((p) => parseInt(p, 16)));
}

/** Parse a dotted-quad IPv4 address into 4 bytes (network order). */
export function parseIpv4(s: string): Uint8Array {
  const parts = s.split(".");
  if (parts.length !== 4 || !parts.every((p) => /^\d{1,3}$/.test(p) && Number(p) <= 255)) {
    throw new Error(`"${s}" is not an IPv4 address`);
  }
  return Uint8Array.from(parts.map(Number));
}

function withInetSocket<T>(f: (sock: number) => T): T {
  const sock = check("socket AF_INET", libc().socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  try {
    return f(sock);
  } finally {
    closeFd(sock);
  }
}

function sockaddrIn(name: string, addr: Uint8Array): Uint8Array<ArrayBuffer> {
  const req = ifreq(name);
  new DataView(req.buffer).setUint16(IFR_IFRU + SIN_FAMILY, AF_INET, true);
  req.set(addr, IFR_IFRU + SIN_ADDR);
  return req;
}

/** Configure a host interface: IPv4 address, netmask, MAC (each optional), then bring it up. */
export function configureInterface(
  name: string,
  opts: { ip?: string; netmask?: string; mac?: string; up?: boolean },
): void {
  withInetSocket((sock) => {
    if (opts.ip) ioctlPtr(sock, SIOCSIFADDR, sockaddrIn(name, parseIpv4(opts.ip)), `SIOCSIFADDR ${name}`);
    if (opts.netmask) {
      ioctlPtr(sock, SIOCSIFNETMASK, sockaddrIn(name, parseIpv4(opts.netmask)), `SIOCSIFNETMASK ${name}`);
    }
    if (opts.mac) {
      const req = ifreq(name);
      new DataView(req.buffer).setUint16(IFR_IFRU, ARPHRD_ETHER, true);
      req.set(parseMac(opts.mac), IFR_IFRU + SA_DATA);
      ioctlPtr(sock, SIOCSIFHWADDR, req, `SIOCSIFHWADDR ${name}`);
    }
    if (opts.up ?? true) {
      const req = ifreq(name);
      ioctlPtr(sock, SIOCGIFFLAGS, req, `SIOCGIFFLAGS ${name}`);
      const dv = new DataView(req.buffer);
      dv.setUint16(IFR_IFRU, dv.getUint16(IFR_IFRU, true) | IFF_UP, true);
      ioctlPtr(sock, SIOCSIFFLAGS, req, `SIOCSIFFLAGS ${name}`);
    }
  });
}

/** The interface's MTU (SIOCGIFMTU). */
export function interfaceMtu(name: string): number {
  return withInetSocket((sock) => {
    const req = ifreq(name);
    ioctlPtr(sock, SIOCGIFMTU, req, `SIOCGIFMTU ${name}`);
    return new DataView(req.buffer).getInt32(IFR_IFRU, true);
  });
}

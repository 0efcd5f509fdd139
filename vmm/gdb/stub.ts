// A GDB remote-protocol session (GDB manual, "Remote Protocol"): the packets a debugger sends to a
// bare-metal target and what this stub answers, over any byte transport. The target is the VM: every
// vCPU is a thread (thread id = vCPU index + 1), the VM stops as a whole (all-stop mode), registers
// are the default x86-64 layout, memory is guest-virtual through the selected vCPU's page tables
// (guest-physical after `maintenance packet Qqemu.PhyMemMode:1`, QEMU's packet for it).
//
// Breakpoints: Z1 (hardware) uses the debug registers DR0-DR3 through KVM_SET_GUEST_DEBUG. Z0
// (software) takes a free debug register too, as crosvm's stub does for all its breakpoints: that
// works on every KVM, while int3 does not (kvm_pvm's instruction emulator lacks it, docs/testing.md,
// and QEMU's TCG emulation of SVM, the nested test host, delivers int3 to the guest instead of
// KVM's intercept). With all four taken, Z0 writes int3 into guest memory with
// KVM_GUESTDBG_USE_SW_BP where the host can trap it. Everything the client sends is checked: a
// malformed packet or a bad address gets an `Exx` reply.

import type { GuestMemory } from "../../core/memory.ts";
import {
  GUEST_DEBUG_ADDRESS_REGISTERS,
  GUEST_DEBUG_DR7_INDEX,
  GUEST_DEBUG_REGISTERS,
  KVM_GUESTDBG_ENABLE,
  KVM_GUESTDBG_SINGLESTEP,
  KVM_GUESTDBG_USE_HW_BP,
  KVM_GUESTDBG_USE_SW_BP,
  type RegName,
  regOffset,
  SEG_SELECTOR,
  type SegmentName,
  SREGS_CR0,
  SREGS_CR3,
  SREGS_CR4,
  SREGS_EFER,
  sregsSegmentOffset,
} from "../../ffi/kvm.ts";
import {
  encodePacket,
  fromHex,
  leHex32,
  leHex64,
  MAX_PACKET_SIZE,
  PacketReader,
  parseHexNumber,
  toHex,
  unescapeBinary,
} from "./packet.ts";
import { bytesToPageEnd, type PagingState, translate, TranslationError } from "./paging.ts";

/** What the stub needs of the VM (vmm/gdb/server.ts gives it the Machine's; the tests give a fake). */
export interface DebugTarget {
  readonly vcpuCount: number;
  readonly memory: GuestMemory;
  /** Stop every vCPU; resolves when all are out of KVM_RUN. */
  pause(): Promise<void>;
  resume(): void;
  /** struct kvm_regs / kvm_sregs of a vCPU (only while paused). */
  getRegs(vcpu: number): Uint8Array;
  setRegs(vcpu: number, regs: Uint8Array): void;
  getSregs(vcpu: number): Uint8Array;
  /** KVM_SET_GUEST_DEBUG with `control` and debugreg[0..7]. */
  setGuestDebug(vcpu: number, control: number, debugreg: bigint[]): void;
  /** Hear KVM_EXIT_DEBUG stops: the vCPU, the exception vector, DR6. */
  onStop(handler: ((vcpu: number, exception: number, dr6: bigint) => void) | undefined): void;
}

export interface StubOptions {
  /** Z0 may write int3 into guest memory once the debug registers are taken (the host's KVM traps it). */
  int3: boolean;
  /** Send bytes to the client. */
  send: (bytes: Uint8Array) => void;
  /** The client is done (detach, kill): close the transport. */
  close?: () => void;
}

/** Signal numbers in stop replies (GDB's own numbering, include/gdb/signals.def). */
const GDB_SIGINT = 2;
const GDB_SIGTRAP = 5;
/** x86 exception vectors in kvm_debug_exit_arch.exception: #DB and #BP (Intel SDM vol. 3A table 6-1). */
const DB_VECTOR = 1;
const BP_VECTOR = 3;
/** The int3 opcode (Intel SDM vol. 2A, "INT n/INTO/INT3/INT1"). */
const INT3 = 0xcc;
/** DR6.B0-B3: which debug register matched (Intel SDM vol. 3B, 18.2.3). */
const DR6_HIT_MASK = 0xfn;
/** DR7: local enable L0 at bit 0, global enable G0 at bit 1, two bits per register; R/W0 and LEN0 at
 * 16-19, four bits per register (00 = instruction execution, length 1) (Intel SDM vol. 3B, 18.2.4). */
const DR7_GLOBAL_ENABLE = (i: number) => 1n << BigInt(2 * i + 1);
/** Errno values in `Exx` replies (GDB's File-I/O errno list). */
const E_INVAL = "E16";
const E_FAULT = "E0e";
const E_NOSPC = "E1c";
const E_NOENT = "E02";
const E_IO = "E05";

/**
 * The default x86-64 register layout of GDB when the target description names only the architecture
 * (gdb/amd64-tdep.c, amd64_register_names): rax rbx rcx rdx rsi rdi rbp rsp r8-r15 rip as 64 bits,
 * eflags and the six segment selectors as 32 bits; the x87, SSE and mxcsr registers that follow are
 * not sent (GDB shows them as unavailable).
 */
const GDB_GPRS: readonly RegName[] = [
  "rax",
  "rbx",
  "rcx",
  "rdx",
  "rsi",
  "rdi",
  "rbp",
  "rsp",
  "r8",
  "r9",
  "r10",
  "r11",
  "r12",
  "r13",
  "r14",
  "r15",
  "rip",
];
const GDB_EFLAGS = GDB_GPRS.length;
const GDB_SEGMENTS: readonly SegmentName[] = ["cs", "ss", "ds", "es", "fs", "gs"];
const GDB_REGISTER_COUNT = GDB_GPRS.length + 1 + GDB_SEGMENTS.length;
const GPR_BYTES = 8;
const SMALL_REG_BYTES = 4;
/** Bytes of the `g` packet's register block. */
export const G_PACKET_BYTES = GDB_GPRS.length * GPR_BYTES + (1 + GDB_SEGMENTS.length) * SMALL_REG_BYTES;
/** The target description: the architecture alone, so GDB uses its default x86-64 registers. */
const TARGET_XML = '<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd">' +
  "<target><architecture>i386:x86-64</architecture></target>";
/** The largest m/M/X length served in one packet: the reply's hex must fit in PacketSize. */
const MAX_MEMORY_TRANSFER = MAX_PACKET_SIZE / 2 - 16;

interface Breakpoint {
  type: 0 | 1;
  addr: bigint;
  /** The debug register it holds (hardware, or software on hosts without int3). */
  slot?: number;
  /** int3 breakpoints: where the byte is, and the byte it replaced. */
  phys?: number;
  saved?: number;
}

const decoder = new TextDecoder();

export class GdbSession {
  readonly #target: DebugTarget;
  readonly #opts: StubOptions;
  readonly #reader = new PacketReader();
  #ack = true;
  /** The thread (vCPU index) for g, m and friends (Hg), and for c and s (Hc). */
  #gThread = 0;
  #cThread = 0;
  #running = false;
  #stepping: number | undefined;
  #pending: { vcpu: number; exception: number; dr6: bigint }[] = [];
  readonly #breakpoints = new Map<string, Breakpoint>();
  #physicalMemory = false;
  #clientSwbreak = false;
  #clientHwbreak = false;
  /** Packets are handled one at a time (some wait for the VM to pause). */
  #queue: Promise<void> = Promise.resolve();
  #closed = false;
  /** The last stop reply, for `?`. */
  #lastStop = `T${GDB_SIGTRAP.toString(16).padStart(2, "0")}thread:01;`;

  constructor(target: DebugTarget, opts: StubOptions) {
    this.#target = target;
    this.#opts = opts;
    target.onStop((vcpu, exception, dr6) => this.#enqueue(() => this.#vcpuStopped(vcpu, exception, dr6)));
  }

  /** Stop the VM for the client (called when it connects). */
  async attach(): Promise<void> {
    await this.#target.pause();
  }

  /** Bytes from the client. */
  receive(bytes: Uint8Array): void {
    for (const ev of this.#reader.feed(bytes)) {
      switch (ev.kind) {
        case "packet":
          if (this.#ack) this.#opts.send(new Uint8Array([0x2b]));
          this.#enqueue(() => this.#packet(decoder.decode(ev.data), ev.data));
          break;
        case "bad":
          if (this.#ack) this.#opts.send(new Uint8Array([0x2d]));
          break;
        case "interrupt":
          this.#enqueue(() => this.#interrupt());
          break;
        case "ack":
        case "nack":
          // Replies are not resent: the transport is TCP, which does not lose or corrupt bytes.
          break;
      }
    }
  }

  /** The client has gone: take every breakpoint out and let the VM run. Resolves when that is done. */
  detach(): Promise<void> {
    this.#enqueue(() => this.#detach());
    return this.#queue;
  }

  /** The VM has ended with `code`: tell the client the process exited (W) and close. */
  vmEnded(code: number): void {
    this.#enqueue(() => {
      if (this.#closed) return;
      this.#reply(`W${hex2(code & 0xff)}`);
      this.#closed = true;
      this.#opts.close?.();
    });
  }

  /** Resolves when every packet so far has been handled (for tests). */
  settled(): Promise<void> {
    return this.#queue;
  }

  #enqueue(fn: () => Promise<void> | void): void {
    this.#queue = this.#queue.then(fn).catch((e) => {
      console.error(`denovm: gdb stub: ${(e as Error).message}`);
    });
  }

  #reply(s: string): void {
    if (!this.#closed) this.#opts.send(encodePacket(s));
  }

  async #interrupt(): Promise<void> {
    if (!this.#running) return;
    await this.#target.pause();
    this.#running = false;
    this.#stepping = undefined;
    this.#stopReply(`T${hex2(GDB_SIGINT)}thread:${tid(this.#cThread)};`);
  }

  async #vcpuStopped(vcpu: number, exception: number, dr6: bigint): Promise<void> {
    if (this.#closed) return;
    if (!this.#running) {
      // Another vCPU stopped first (or the client interrupted): report this one at the next resume.
      this.#pending.push({ vcpu, exception, dr6 });
      return;
    }
    await this.#target.pause();
    this.#running = false;
    this.#reportStop(vcpu, exception, dr6);
  }

  #reportStop(vcpu: number, exception: number, dr6: bigint): void {
    this.#stepping = undefined;
    let reason = "";
    if (exception === BP_VECTOR) {
      if (this.#clientSwbreak) reason = "swbreak:;";
    } else if (exception === DB_VECTOR && (dr6 & DR6_HIT_MASK) !== 0n) {
      const slot = [0, 1, 2, 3].find((i) => (dr6 >> BigInt(i)) & 1n);
      const bp = [...this.#breakpoints.values()].find((b) => b.slot === slot);
      if (bp?.type === 0 && this.#clientSwbreak) reason = "swbreak:;";
      if (bp?.type === 1 && this.#clientHwbreak) reason = "hwbreak:;";
    }
    this.#gThread = vcpu;
    this.#cThread = vcpu;
    this.#stopReply(`T${hex2(GDB_SIGTRAP)}thread:${tid(vcpu)};${reason}`);
  }

  #stopReply(s: string): void {
    this.#lastStop = s;
    this.#reply(s);
  }

  async #detach(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#running) await this.#target.pause();
    this.#release();
  }

  /** Take every breakpoint out, stop hearing debug stops and let the VM run (the VM is paused). */
  #release(): void {
    for (const bp of this.#breakpoints.values()) this.#unplant(bp);
    this.#breakpoints.clear();
    this.#stepping = undefined;
    this.#running = false;
    this.#applyGuestDebug();
    this.#target.onStop(undefined);
    this.#target.resume();
  }

  #packet(text: string, raw: Uint8Array): void {
    if (this.#closed) return;
    if (this.#running) {
      // In all-stop mode the client sends nothing but Ctrl-C while the target runs.
      this.#reply(E_INVAL);
      return;
    }
    const r = this.#answer(text, raw);
    if (r !== undefined) this.#reply(r);
    // The OK to QStartNoAckMode still goes out acknowledged; after it neither side sends + or -.
    if (text === "QStartNoAckMode") this.#ack = false;
  }

  /** The reply to one packet; undefined when the reply comes later (a stop after c or s) or never (k). */
  #answer(p: string, raw: Uint8Array): string | undefined {
    const cmd = p[0];
    try {
      switch (cmd) {
        case "?":
          return this.#lastStop;
        case "g":
          return this.#readRegisters(this.#gThread);
        case "G":
          return this.#writeRegisters(this.#gThread, p.slice(1));
        case "p":
          return this.#readRegister(p.slice(1));
        case "P":
          return this.#writeRegister(p.slice(1));
        case "m":
          return this.#readMemory(p.slice(1));
        case "M":
          return this.#writeMemoryHex(p.slice(1));
        case "X":
          return this.#writeMemoryBinary(raw);
        case "Z":
        case "z":
          return this.#breakpoint(cmd === "Z", p.slice(1));
        case "c":
        case "s":
        case "C":
        case "S":
          return this.#resume(cmd === "s" || cmd === "S", cmd === "C" || cmd === "S", p.slice(1));
        case "H":
          return this.#setThread(p.slice(1));
        case "T":
          return this.#vcpuOf(p.slice(1)) !== undefined ? "OK" : E_NOENT;
        case "D":
          this.#release();
          this.#closed = true;
          this.#opts.send(encodePacket("OK"));
          this.#opts.close?.();
          return undefined;
        case "k":
          this.#release();
          this.#closed = true;
          this.#opts.close?.();
          return undefined;
        case "q":
        case "Q":
          return this.#query(p);
        default:
          return ""; // not supported
      }
    } catch (e) {
      if (e instanceof TranslationError || e instanceof RangeError) return E_FAULT;
      // A host-side failure (an ioctl on the vCPU): one line, and the client gets an error, not silence.
      console.error(`denovm: gdb stub: ${p[0]} packet: ${(e as Error).message}`);
      return E_IO;
    }
  }

  #query(p: string): string {
    if (p.startsWith("qSupported")) {
      const features = p.slice("qSupported:".length).split(";");
      this.#clientSwbreak = features.includes("swbreak+");
      this.#clientHwbreak = features.includes("hwbreak+");
      return `PacketSize=${MAX_PACKET_SIZE.toString(16)};qXfer:features:read+;swbreak+;hwbreak+;QStartNoAckMode+`;
    }
    if (p === "QStartNoAckMode") return "OK"; // #packet turns acknowledgements off after this reply
    if (p === "qAttached") return "1";
    if (p === "qC") return `QC${tid(this.#gThread)}`;
    if (p === "qfThreadInfo") {
      return "m" + Array.from({ length: this.#target.vcpuCount }, (_, i) => tid(i)).join(",");
    }
    if (p === "qsThreadInfo") return "l";
    if (p.startsWith("qThreadExtraInfo,")) {
      const vcpu = this.#vcpuOf(p.slice("qThreadExtraInfo,".length));
      if (vcpu === undefined) return E_NOENT;
      return toHex(new TextEncoder().encode(`vCPU ${vcpu}`));
    }
    if (p.startsWith("qXfer:features:read:")) {
      const m = /^qXfer:features:read:([^:]*):([0-9a-fA-F]+),([0-9a-fA-F]+)$/.exec(p);
      if (!m) return E_INVAL;
      if (m[1] !== "target.xml") return E_NOENT;
      const offset = Number(parseHexNumber(m[2]) ?? -1n);
      const length = Number(parseHexNumber(m[3]) ?? -1n);
      if (offset < 0 || length < 0) return E_INVAL;
      const chunk = TARGET_XML.slice(offset, offset + Math.min(length, MAX_MEMORY_TRANSFER));
      return (offset + chunk.length >= TARGET_XML.length ? "l" : "m") + chunk;
    }
    if (p.startsWith("Qqemu.PhyMemMode:")) {
      const v = p.slice("Qqemu.PhyMemMode:".length);
      if (v !== "0" && v !== "1") return E_INVAL;
      this.#physicalMemory = v === "1";
      return "OK";
    }
    if (p === "qqemu.PhyMemMode") return this.#physicalMemory ? "1" : "0";
    if (p.startsWith("qSymbol")) return "OK";
    return "";
  }

  /** A thread id from the client (hex; 0 = any, -1 = all) as a vCPU index, or undefined. */
  #vcpuOf(s: string, allowAny = false): number | undefined {
    if (allowAny && (s === "-1" || s === "0")) return this.#gThread;
    const n = parseHexNumber(s);
    if (n === undefined || n < 1n || n > BigInt(this.#target.vcpuCount)) return undefined;
    return Number(n) - 1;
  }

  #setThread(p: string): string {
    const op = p[0];
    if (op !== "g" && op !== "c") return E_INVAL;
    const id = p.slice(1);
    const vcpu = id === "-1" || id === "0" ? (op === "g" ? this.#gThread : this.#cThread) : this.#vcpuOf(id);
    if (vcpu === undefined) return E_NOENT;
    if (op === "g") this.#gThread = vcpu;
    else this.#cThread = vcpu;
    return "OK";
  }

  // ---- registers ----

  #readRegisters(vcpu: number): string {
    const regs = new DataView(bufferOf(this.#target.getRegs(vcpu)));
    const sregs = new DataView(bufferOf(this.#target.getSregs(vcpu)));
    let out = "";
    for (const r of GDB_GPRS) out += leHex64(regs.getBigUint64(regOffset(r), true));
    out += leHex32(Number(regs.getBigUint64(regOffset("rflags"), true) & 0xffff_ffffn));
    for (const s of GDB_SEGMENTS) out += leHex32(sregs.getUint16(sregsSegmentOffset(s) + SEG_SELECTOR, true));
    return out;
  }

  #writeRegisters(vcpu: number, hex: string): string {
    const bytes = fromHex(hex);
    if (!bytes || bytes.length < GDB_GPRS.length * GPR_BYTES + SMALL_REG_BYTES) return E_INVAL;
    const v = new DataView(bytes.buffer);
    const regsBytes = this.#target.getRegs(vcpu).slice();
    const regs = new DataView(regsBytes.buffer);
    GDB_GPRS.forEach((r, i) => regs.setBigUint64(regOffset(r), v.getBigUint64(i * GPR_BYTES, true), true));
    regs.setBigUint64(regOffset("rflags"), BigInt(v.getUint32(GDB_GPRS.length * GPR_BYTES, true)), true);
    // The segment selectors are not written: a selector alone is not a segment (its cached base and limit).
    this.#target.setRegs(vcpu, regsBytes);
    return "OK";
  }

  #readRegister(s: string): string {
    const n = parseHexNumber(s);
    if (n === undefined) return E_INVAL;
    if (n >= BigInt(GDB_REGISTER_COUNT)) return E_INVAL;
    return this.#readRegisters(this.#gThread).slice(...registerSpan(Number(n)));
  }

  #writeRegister(s: string): string {
    const m = /^([0-9a-fA-F]+)=([0-9a-fA-F]*)$/.exec(s);
    if (!m) return E_INVAL;
    const n = Number(parseHexNumber(m[1]) ?? -1n);
    if (n < 0 || n > GDB_EFLAGS) return E_INVAL; // segment selectors are read-only here
    const [from, to] = registerSpan(n);
    if (m[2].length !== to - from) return E_INVAL;
    const all = this.#readRegisters(this.#gThread);
    return this.#writeRegisters(this.#gThread, all.slice(0, from) + m[2].toLowerCase() + all.slice(to));
  }

  // ---- memory ----

  #paging(vcpu: number): PagingState {
    const s = new DataView(bufferOf(this.#target.getSregs(vcpu)));
    return {
      cr0: s.getBigUint64(SREGS_CR0, true),
      cr3: s.getBigUint64(SREGS_CR3, true),
      cr4: s.getBigUint64(SREGS_CR4, true),
      efer: s.getBigUint64(SREGS_EFER, true),
    };
  }

  /** Guest-physical address of a debugger address (virtual unless physical mode is on). */
  #physical(addr: bigint, paging: PagingState | undefined): number {
    const pa = paging ? translate(this.#target.memory, paging, addr) : addr;
    if (pa > BigInt(Number.MAX_SAFE_INTEGER)) throw new TranslationError("address beyond guest memory");
    return Number(pa);
  }

  /** Split [addr, addr+len) into guest-physical pieces, page by page; throws on the first one missing. */
  #pieces(addr: bigint, len: number): { phys: number; len: number }[] {
    const paging = this.#physicalMemory ? undefined : this.#paging(this.#gThread);
    const out: { phys: number; len: number }[] = [];
    let done = 0;
    while (done < len) {
      const va = BigInt.asUintN(64, addr + BigInt(done));
      const n = Math.min(len - done, bytesToPageEnd(va));
      const phys = this.#physical(va, paging);
      if (!this.#target.memory.isValid(phys, n)) throw new TranslationError("outside guest memory");
      out.push({ phys, len: n });
      done += n;
    }
    return out;
  }

  #addrLen(s: string): [bigint, number] | undefined {
    const m = /^([0-9a-fA-F]+),([0-9a-fA-F]+)$/.exec(s);
    if (!m) return undefined;
    const addr = parseHexNumber(m[1]);
    const len = parseHexNumber(m[2]);
    if (addr === undefined || len === undefined || len > BigInt(MAX_MEMORY_TRANSFER)) return undefined;
    return [addr, Number(len)];
  }

  #readMemory(s: string): string {
    const al = this.#addrLen(s);
    if (!al) return E_INVAL;
    const [addr, len] = al;
    // A read stops at the first byte that cannot be read; nothing readable at all is an error.
    const paging = this.#physicalMemory ? undefined : this.#paging(this.#gThread);
    let out = "";
    let done = 0;
    while (done < len) {
      const va = BigInt.asUintN(64, addr + BigInt(done));
      const n = Math.min(len - done, bytesToPageEnd(va));
      let phys: number;
      try {
        phys = this.#physical(va, paging);
      } catch (e) {
        if (e instanceof TranslationError) break;
        throw e;
      }
      if (!this.#target.memory.isValid(phys, n)) break;
      const bytes = this.#target.memory.read(phys, n);
      // int3 bytes planted by the stub read as the bytes they replaced.
      for (const bp of this.#breakpoints.values()) {
        if (bp.phys !== undefined && bp.phys >= phys && bp.phys < phys + n) bytes[bp.phys - phys] = bp.saved!;
      }
      out += toHex(bytes);
      done += n;
    }
    return done === 0 && len > 0 ? E_FAULT : out;
  }

  #writeMemory(addr: bigint, data: Uint8Array): string {
    const pieces = this.#pieces(addr, data.length);
    let off = 0;
    for (const p of pieces) {
      this.#target.memory.write(p.phys, data.subarray(off, off + p.len));
      off += p.len;
    }
    return "OK";
  }

  #writeMemoryHex(s: string): string {
    const colon = s.indexOf(":");
    if (colon < 0) return E_INVAL;
    const al = this.#addrLen(s.slice(0, colon));
    const data = fromHex(s.slice(colon + 1));
    if (!al || !data || data.length !== al[1]) return E_INVAL;
    return this.#writeMemory(al[0], data);
  }

  #writeMemoryBinary(raw: Uint8Array): string {
    const colon = raw.indexOf(0x3a);
    if (colon < 0) return E_INVAL;
    const al = this.#addrLen(decoder.decode(raw.subarray(1, colon)));
    const data = unescapeBinary(raw.subarray(colon + 1));
    if (!al || data.length !== al[1]) return E_INVAL;
    if (al[1] === 0) return "OK"; // GDB probes X support with an empty write
    return this.#writeMemory(al[0], data);
  }

  // ---- breakpoints ----

  #breakpoint(insert: boolean, s: string): string {
    const m = /^([0-9]),([0-9a-fA-F]+),([0-9a-fA-F]+)$/.exec(s);
    if (!m) return E_INVAL;
    const type = Number(m[1]);
    if (type !== 0 && type !== 1) return ""; // watchpoints are not supported
    const addr = parseHexNumber(m[2]);
    if (addr === undefined) return E_INVAL;
    const key = `${type}:${addr}`;
    if (!insert) {
      const bp = this.#breakpoints.get(key);
      if (bp) {
        this.#unplant(bp);
        this.#breakpoints.delete(key);
      }
      return "OK";
    }
    if (this.#breakpoints.has(key)) return "OK";
    const bp: Breakpoint = { type, addr };
    const used = new Set([...this.#breakpoints.values()].map((b) => b.slot));
    const slot = [...Array(GUEST_DEBUG_ADDRESS_REGISTERS).keys()].find((i) => !used.has(i));
    if (slot !== undefined) bp.slot = slot;
    else if (type === 1 || !this.#opts.int3) return E_NOSPC;
    else {
      const [piece] = this.#pieces(addr, 1);
      bp.phys = piece.phys;
      bp.saved = this.#target.memory.getU8(piece.phys);
      this.#target.memory.setU8(piece.phys, INT3);
    }
    this.#breakpoints.set(key, bp);
    return "OK";
  }

  #unplant(bp: Breakpoint): void {
    if (bp.phys !== undefined && this.#target.memory.getU8(bp.phys) === INT3) {
      this.#target.memory.setU8(bp.phys, bp.saved!);
    }
  }

  /** KVM_SET_GUEST_DEBUG on every vCPU from the breakpoints and the vCPU being stepped. */
  #applyGuestDebug(): void {
    const debugreg: bigint[] = new Array(GUEST_DEBUG_REGISTERS).fill(0n);
    let int3 = false;
    for (const bp of this.#breakpoints.values()) {
      if (bp.slot !== undefined) {
        debugreg[bp.slot] = bp.addr;
        debugreg[GUEST_DEBUG_DR7_INDEX] |= DR7_GLOBAL_ENABLE(bp.slot);
      } else int3 = true;
    }
    const hw = debugreg[GUEST_DEBUG_DR7_INDEX] !== 0n;
    for (let vcpu = 0; vcpu < this.#target.vcpuCount; vcpu++) {
      let control = 0;
      if (hw) control |= KVM_GUESTDBG_USE_HW_BP;
      if (int3) control |= KVM_GUESTDBG_USE_SW_BP;
      if (this.#stepping === vcpu) control |= KVM_GUESTDBG_SINGLESTEP;
      if (control) control |= KVM_GUESTDBG_ENABLE;
      this.#target.setGuestDebug(vcpu, control, debugreg);
    }
  }

  // ---- running ----

  #resume(step: boolean, withSignal: boolean, args: string): string | undefined {
    // c [addr], s [addr], C sig[;addr], S sig[;addr]: the signal is not delivered (a VM has none).
    const addrText = withSignal ? (args.includes(";") ? args.slice(args.indexOf(";") + 1) : "") : args;
    if (addrText) {
      const addr = parseHexNumber(addrText);
      if (addr === undefined) return E_INVAL;
      const regs = this.#target.getRegs(this.#cThread).slice();
      new DataView(regs.buffer).setBigUint64(regOffset("rip"), addr, true);
      this.#target.setRegs(this.#cThread, regs);
    }
    const pending = this.#pending.shift();
    if (pending) {
      // A stop that came while the VM was already stopped: report it without running.
      this.#reportStop(pending.vcpu, pending.exception, pending.dr6);
      return undefined;
    }
    this.#stepping = step ? this.#cThread : undefined;
    this.#applyGuestDebug();
    this.#running = true;
    this.#target.resume();
    return undefined;
  }
}

/** A vCPU index as the protocol's thread id (hex, from 1). */
function tid(vcpu: number): string {
  return (vcpu + 1).toString(16).padStart(2, "0");
}

function hex2(n: number): string {
  return n.toString(16).padStart(2, "0");
}

/** The hex-digit span of GDB register `n` in the `g` reply. */
function registerSpan(n: number): [number, number] {
  if (n < GDB_GPRS.length) return [n * GPR_BYTES * 2, (n + 1) * GPR_BYTES * 2];
  const base = GDB_GPRS.length * GPR_BYTES * 2;
  const i = n - GDB_GPRS.length;
  return [base + i * SMALL_REG_BYTES * 2, base + (i + 1) * SMALL_REG_BYTES * 2];
}

function bufferOf(b: Uint8Array): ArrayBuffer {
  return b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength) as ArrayBuffer;
}

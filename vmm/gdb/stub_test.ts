import assert from "node:assert/strict";
import { OwnedGuestMemory } from "../../core/memory.ts";
import {
  GUEST_DEBUG_DR7_INDEX,
  KVM_GUESTDBG_ENABLE,
  KVM_GUESTDBG_SINGLESTEP,
  KVM_GUESTDBG_USE_HW_BP,
  KVM_GUESTDBG_USE_SW_BP,
  KVM_REGS_SIZE,
  KVM_SREGS_SIZE,
  regOffset,
  SEG_SELECTOR,
  SREGS_CR0,
  SREGS_CR3,
  SREGS_EFER,
  sregsSegmentOffset,
} from "../../ffi/kvm.ts";
import { encodePacket, leHex64, PacketReader } from "./packet.ts";
import { CR0_PG, EFER_LMA } from "./paging.ts";
import { type DebugTarget, G_PACKET_BYTES, GdbSession } from "./stub.ts";

const MiB = 1 << 20;
const PRESENT_WRITABLE = 0x3n;
const PAGE_SIZE_BIT = 0x80n;
/** The guest's virtual 0x40000000 is physical 0x200000 (one 2 MiB page); low 2 MiB identity-mapped. */
const VIRT = 0x4000_0000;
const PHYS = 0x20_0000;
/** Free guest RAM in the identity-mapped 2 MiB (above the page tables). */
const LOW = 0x7000;

class FakeTarget implements DebugTarget {
  readonly memory = OwnedGuestMemory.allocate([{ start: 0, size: 4 * MiB }]);
  readonly regs: Uint8Array[];
  readonly sregs: Uint8Array[];
  paused = true;
  pauses = 0;
  resumes = 0;
  debug: { vcpu: number; control: number; debugreg: bigint[] }[] = [];
  stop: ((vcpu: number, exception: number, dr6: bigint) => void) | undefined;

  constructor(readonly vcpuCount: number) {
    this.regs = Array.from({ length: vcpuCount }, () => new Uint8Array(KVM_REGS_SIZE));
    this.sregs = Array.from({ length: vcpuCount }, () => new Uint8Array(KVM_SREGS_SIZE));
    const m = this.memory;
    m.setU64(0x1000, 0x2000n | PRESENT_WRITABLE); // PML4[0]
    m.setU64(0x2000, 0x3000n | PRESENT_WRITABLE); // PDPT[0]
    m.setU64(0x2008, 0x4000n | PRESENT_WRITABLE); // PDPT[1]: 1 GiB..2 GiB
    m.setU64(0x3000, 0n | PRESENT_WRITABLE | PAGE_SIZE_BIT); // 0..2 MiB identity
    m.setU64(0x4000, BigInt(PHYS) | PRESENT_WRITABLE | PAGE_SIZE_BIT); // VIRT -> PHYS
    for (const s of this.sregs) {
      const v = new DataView(s.buffer);
      v.setBigUint64(SREGS_CR0, CR0_PG | 1n, true);
      v.setBigUint64(SREGS_CR3, 0x1000n, true);
      v.setBigUint64(SREGS_EFER, EFER_LMA, true);
      v.setUint16(sregsSegmentOffset("cs") + SEG_SELECTOR, 0x10, true);
    }
    this.regs.forEach((r, i) => {
      const v = new DataView(r.buffer);
      v.setBigUint64(regOffset("rip"), 0x1000_0000n + BigInt(i), true);
      v.setBigUint64(regOffset("rsp"), 0x8000n, true);
      v.setBigUint64(regOffset("rbp"), 0x9000n, true);
      v.setBigUint64(regOffset("rflags"), 0x202n, true);
    });
  }
  pause() {
    this.pauses++;
    this.paused = true;
    return Promise.resolve();
  }
  resume() {
    this.resumes++;
    this.paused = false;
  }
  getRegs(vcpu: number) {
    assert.ok(this.paused, "registers read while running");
    return this.regs[vcpu].slice();
  }
  setRegs(vcpu: number, regs: Uint8Array) {
    this.regs[vcpu].set(regs);
  }
  getSregs(vcpu: number) {
    return this.sregs[vcpu].slice();
  }
  setGuestDebug(vcpu: number, control: number, debugreg: bigint[]) {
    this.debug.push({ vcpu, control, debugreg: [...debugreg] });
  }
  onStop(handler: typeof this.stop) {
    this.stop = handler;
  }
}

/** A session on a fake target and a client that sends packets and reads the replies. */
function rig(vcpus = 1, int3 = true) {
  const target = new FakeTarget(vcpus);
  const fromStub = new PacketReader();
  const replies: string[] = [];
  let acks = 0;
  let closed = false;
  const session = new GdbSession(target, {
    int3,
    send: (b) => {
      for (const e of fromStub.feed(b)) {
        if (e.kind === "packet") replies.push(new TextDecoder().decode(e.data));
        else if (e.kind === "ack") acks++;
      }
    },
    close: () => closed = true,
  });
  const ask = async (p: string): Promise<string | undefined> => {
    const before = replies.length;
    session.receive(encodePacket(p));
    await session.settled();
    return replies.length > before ? replies[replies.length - 1] : undefined;
  };
  const raw = async (bytes: string) => {
    session.receive(new TextEncoder().encode(bytes));
    await session.settled();
  };
  return { target, session, ask, raw, replies, acks: () => acks, closed: () => closed };
}

Deno.test("gdb stub: qSupported, threads, target description, stop reason", async () => {
  const { ask, target } = rig(3);
  try {
    const sup = await ask("qSupported:multiprocess+;swbreak+;hwbreak+;xmlRegisters=i386");
    assert.match(sup!, /PacketSize=4000;qXfer:features:read\+;swbreak\+;hwbreak\+;QStartNoAckMode\+/);
    assert.equal(await ask("?"), "T05thread:01;");
    assert.equal(await ask("qfThreadInfo"), "m01,02,03");
    assert.equal(await ask("qsThreadInfo"), "l");
    assert.equal(await ask("qC"), "QC01");
    assert.equal(await ask("qAttached"), "1");
    assert.equal(await ask("qThreadExtraInfo,2"), Array.from("vCPU 1", (c) => c.charCodeAt(0).toString(16)).join(""));
    assert.equal(await ask("T3"), "OK");
    assert.equal(await ask("T4"), "E02");
    assert.equal(await ask("T0"), "E02");
    const xml = await ask("qXfer:features:read:target.xml:0,1000");
    assert.match(xml!, /^l<\?xml.*<architecture>i386:x86-64<\/architecture>/);
    const part = await ask("qXfer:features:read:target.xml:0,10");
    assert.equal(part, 'm<?xml version="1'); // 0x10 characters
    assert.equal(await ask("qXfer:features:read:other.xml:0,10"), "E02");
    assert.equal(await ask("qXfer:features:read:target.xml:zz"), "E16");
    assert.equal(await ask("vMustReplyEmpty"), "");
  } finally {
    target.memory.close();
  }
});

Deno.test("gdb stub: g reads the default x86-64 layout (rbp before rsp), G and P write, per thread", async () => {
  const { ask, target } = rig(2);
  try {
    const g = (await ask("g"))!;
    assert.equal(g.length, G_PACKET_BYTES * 2);
    const reg = (i: number) => g.slice(i * 16, i * 16 + 16);
    assert.equal(reg(6), leHex64(0x9000n)); // rbp
    assert.equal(reg(7), leHex64(0x8000n)); // rsp
    assert.equal(reg(16), leHex64(0x1000_0000n)); // rip
    assert.equal(g.slice(17 * 16, 17 * 16 + 8), "02020000"); // eflags
    assert.equal(g.slice(17 * 16 + 8, 17 * 16 + 16), "10000000"); // cs
    assert.equal(await ask("p10"), leHex64(0x1000_0000n));
    assert.equal(await ask("Hg2"), "OK");
    assert.equal(await ask("p10"), leHex64(0x1000_0001n));
    assert.equal(await ask(`P0=${leHex64(0xabcdn)}`), "OK");
    assert.equal(new DataView(target.regs[1].buffer).getBigUint64(regOffset("rax"), true), 0xabcdn);
    assert.equal(new DataView(target.regs[0].buffer).getBigUint64(regOffset("rax"), true), 0n);
    // G: rip changed, the rest written back as read.
    const g2 = (await ask("g"))!;
    const newG = g2.slice(0, 16 * 16) + leHex64(0x2000n) + g2.slice(17 * 16);
    assert.equal(await ask("G" + newG), "OK");
    assert.equal(new DataView(target.regs[1].buffer).getBigUint64(regOffset("rip"), true), 0x2000n);
    assert.equal(new DataView(target.regs[1].buffer).getBigUint64(regOffset("rbp"), true), 0x9000n);
    // Malformed: each an error, nothing written.
    assert.equal(await ask("Gabc"), "E16");
    assert.equal(await ask("G00"), "E16");
    assert.equal(await ask("P0=12"), "E16");
    assert.equal(await ask("P12=00000000"), "E16"); // a segment selector: read-only
    assert.equal(await ask("Pzz=00"), "E16");
    assert.equal(await ask("p99"), "E16");
    assert.equal(await ask("Hg9"), "E02");
    assert.equal(await ask("Hx1"), "E16");
    assert.equal(await ask("Hg-1"), "OK");
  } finally {
    target.memory.close();
  }
});

Deno.test("gdb stub: memory through the page tables and physical, checked addresses", async () => {
  const { ask, target } = rig();
  try {
    target.memory.write(PHYS, new Uint8Array([1, 2, 3, 4]));
    assert.equal(await ask(`m${VIRT.toString(16)},4`), "01020304");
    target.memory.write(LOW, new Uint8Array([5, 6]));
    assert.equal(await ask(`m${LOW.toString(16)},2`), "0506"); // identity-mapped low memory
    assert.equal(await ask(`M${(VIRT + 2).toString(16)},2:aabb`), "OK");
    assert.deepEqual(target.memory.read(PHYS, 4), new Uint8Array([1, 2, 0xaa, 0xbb]));
    // X: binary data as GDB sends it, with '#' escaped once (0x23 -> } 0x03).
    const body = new Uint8Array([...new TextEncoder().encode(`X${VIRT.toString(16)},2:`), 0x7d, 0x03, 0x55]);
    let sum = 0;
    for (const b of body) sum = (sum + b) & 0xff;
    const once = new Uint8Array([0x24, ...body, 0x23, ...new TextEncoder().encode(sum.toString(16).padStart(2, "0"))]);
    assert.equal(await askRaw(target, once), "OK");
    assert.deepEqual(target.memory.read(PHYS, 2), new Uint8Array([0x23, 0x55]));
    // A read that runs into an unmapped page returns what it could read; one that starts there fails.
    const edge = 0x20_0000 - 2; // the last two bytes of the identity-mapped 2 MiB
    target.memory.write(edge, new Uint8Array([7, 8]));
    assert.equal(await ask(`m${edge.toString(16)},4`), "0708");
    assert.equal(await ask("m200000,4"), "E0e");
    assert.equal(await ask("mffff800000000000,4"), "E0e");
    assert.equal(await ask("m8000000000000000,4"), "E0e"); // not canonical
    assert.equal(await ask("M200000,1:00"), "E0e");
    // Physical mode: QEMU's packet.
    assert.equal(await ask("Qqemu.PhyMemMode:1"), "OK");
    assert.equal(await ask("qqemu.PhyMemMode"), "1");
    assert.equal(await ask(`m${PHYS.toString(16)},2`), "2355");
    assert.equal(await ask(`m${VIRT.toString(16)},2`), "E0e"); // beyond the 4 MiB of RAM
    assert.equal(await ask("Qqemu.PhyMemMode:2"), "E16");
    assert.equal(await ask("Qqemu.PhyMemMode:0"), "OK");
    // Malformed requests.
    for (const bad of ["m", "mzz,4", "m1000", "m1000,zz", "m1000,100000", "M1000,2:aa", "M1000,1", "M1000,1:zz"]) {
      assert.equal(await ask(bad), "E16", bad);
    }
    assert.equal(await ask("m10000000000000000,1"), "E16"); // more than 64 bits
  } finally {
    target.memory.close();
  }
});

/** Send pre-framed bytes to a fresh session on `target` and return its reply. */
async function askRaw(target: FakeTarget, bytes: Uint8Array): Promise<string | undefined> {
  const reader = new PacketReader();
  let reply: string | undefined;
  const s = new GdbSession(target, {
    int3: true,
    send: (b) => {
      for (const e of reader.feed(b)) if (e.kind === "packet") reply = new TextDecoder().decode(e.data);
    },
  });
  s.receive(bytes);
  await s.settled();
  return reply;
}

Deno.test("gdb stub: with the debug registers taken, int3 breakpoints are planted, hidden from reads, and removed", async () => {
  const { ask, target } = rig();
  try {
    for (const a of ["1000", "1100", "1200"]) assert.equal(await ask(`Z1,${a},1`), "OK");
    assert.equal(await ask(`Z0,${LOW.toString(16)},1`), "OK"); // the fourth debug register
    assert.equal(target.memory.getU8(LOW), 0);
    target.memory.setU8(PHYS, 0x55);
    assert.equal(await ask(`Z0,${VIRT.toString(16)},1`), "OK"); // now int3
    assert.equal(target.memory.getU8(PHYS), 0xcc);
    assert.equal(await ask(`m${VIRT.toString(16)},1`), "55");
    assert.equal(await ask(`Z0,${VIRT.toString(16)},1`), "OK"); // again: no second plant
    assert.equal(await ask(`z0,${VIRT.toString(16)},1`), "OK");
    assert.equal(target.memory.getU8(PHYS), 0x55);
    assert.equal(await ask("Z0,ffff800000000000,1"), "E0e");
    assert.equal(await ask("Z1,1300,1"), "E1c"); // a hardware breakpoint needs a register
    assert.equal(await ask("Z0,zz,1"), "E16");
    assert.equal(await ask("Z2,1000,4"), ""); // watchpoints: not supported
    // On resume, every vCPU gets KVM_GUESTDBG_USE_SW_BP while an int3 is planted.
    await ask(`Z0,${VIRT.toString(16)},1`);
    assert.equal(await ask("c"), undefined);
    assert.deepEqual(
      target.debug.at(-1)!.control,
      KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP | KVM_GUESTDBG_USE_SW_BP,
    );
  } finally {
    target.memory.close();
  }
});

Deno.test("gdb stub: hardware breakpoints and, without int3, software ones take DR0-DR3", async () => {
  const { ask, target, replies, session } = rig(2, false);
  try {
    await ask("qSupported:swbreak+;hwbreak+");
    assert.equal(await ask("Z1,1000,1"), "OK");
    assert.equal(await ask(`Z0,${LOW.toString(16)},1`), "OK");
    assert.equal(target.memory.getU8(LOW), 0); // nothing written into the guest
    assert.equal(await ask("Z1,3000,1"), "OK");
    assert.equal(await ask("Z1,4000,1"), "OK");
    assert.equal(await ask("Z1,5000,1"), "E1c"); // four debug registers
    assert.equal(await ask("Z0,6000,1"), "E1c"); // and no int3 on this host
    assert.equal(await ask("z1,3000,1"), "OK");
    assert.equal(await ask("Z1,5000,1"), "OK"); // the freed register
    assert.equal(await ask("c"), undefined);
    assert.equal(target.resumes, 1);
    const last = target.debug.slice(-2);
    assert.deepEqual(last.map((d) => d.vcpu), [0, 1]);
    for (const d of last) {
      assert.equal(d.control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP);
      assert.deepEqual(d.debugreg.slice(0, 4), [0x1000n, BigInt(LOW), 0x5000n, 0x4000n]);
      // G0-G3: bits 1, 3, 5, 7; R/W and LEN zero (instruction breakpoints).
      assert.equal(d.debugreg[GUEST_DEBUG_DR7_INDEX], 0xaan);
    }
    // vCPU 1 hits DR1 (the Z0): a software-breakpoint stop on thread 2, after the VM paused.
    const pausesBefore = target.pauses;
    target.stop!(1, 1, 0x2n);
    await session.settled();
    assert.equal(replies.at(-1), "T05thread:02;swbreak:;");
    assert.equal(target.pauses, pausesBefore + 1);
    assert.equal(await ask("qC"), "QC02");
    // Continue; DR0 (the Z1) on vCPU 0.
    await ask("c");
    target.stop!(0, 1, 0x1n);
    await session.settled();
    assert.equal(replies.at(-1), "T05thread:01;hwbreak:;");
  } finally {
    target.memory.close();
  }
});

Deno.test("gdb stub: single step on the Hc thread, Ctrl-C, and a second vCPU's stop reported at the next resume", async () => {
  const { ask, raw, target, replies, session } = rig(2);
  try {
    assert.equal(await ask("Hc2"), "OK");
    assert.equal(await ask("s"), undefined);
    const step = target.debug.slice(-2);
    assert.equal(step[0].control, 0); // vCPU 0: debugging off
    assert.equal(step[1].control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP);
    // While running, only Ctrl-C is expected; anything else is an error reply.
    assert.equal(await ask("g"), "E16");
    target.stop!(1, 1, 0x4000n); // DR6.BS: a single step
    // vCPU 0 stops too before the client resumes (a second breakpoint at once).
    target.stop!(0, 3, 0n);
    await session.settled();
    assert.equal(replies.at(-1), "T05thread:02;");
    // The next continue reports vCPU 0's stop at once, without running the VM.
    const resumes = target.resumes;
    await ask("c");
    assert.equal(target.resumes, resumes);
    assert.equal(replies.at(-1), "T05thread:01;");
    // A plain continue turns single-step off again.
    await ask("c");
    assert.equal(target.debug.at(-1)!.control, 0);
    // Ctrl-C: the VM pauses and the stub says SIGINT.
    await raw("\x03");
    assert.equal(replies.at(-1), "T02thread:01;");
    assert.ok(target.paused);
    // Resume at an address: c ADDR sets rip first.
    await ask("c1234");
    assert.equal(new DataView(target.regs[0].buffer).getBigUint64(regOffset("rip"), true), 0x1234n);
    await raw("\x03");
    await ask("C05;4321"); // a signal to deliver is ignored, the address is used
    assert.equal(new DataView(target.regs[0].buffer).getBigUint64(regOffset("rip"), true), 0x4321n);
    await raw("\x03");
    assert.equal(await ask("czz"), "E16");
  } finally {
    target.memory.close();
  }
});

Deno.test("gdb stub: acknowledgements, bad checksums, no-ack mode, detach and kill", async () => {
  const { ask, raw, target, replies, acks, closed, session } = rig();
  try {
    await ask("?");
    assert.equal(acks(), 1);
    await raw("$g#00"); // bad checksum: a '-' and no reply
    const n = replies.length;
    assert.equal(acks(), 1);
    assert.equal(replies.length, n);
    assert.equal(await ask("QStartNoAckMode"), "OK");
    assert.equal(acks(), 2); // the OK's own packet was still acknowledged
    await ask("?");
    assert.equal(acks(), 2);
    // Detach: breakpoints out, debugging off, the VM runs, the transport closes.
    for (const a of ["1000", "1100", "1200", "1300"]) await ask(`Z1,${a},1`);
    target.memory.setU8(LOW, 0x90);
    target.memory.setU8(PHYS, 0x66);
    await ask(`Z0,${LOW.toString(16)},1`);
    await ask(`Z0,${VIRT.toString(16)},1`);
    assert.equal(target.memory.getU8(LOW), 0xcc);
    assert.equal(target.memory.getU8(PHYS), 0xcc);
    session.receive(encodePacket("D"));
    await session.settled();
    assert.equal(replies.at(-1), "OK");
    assert.equal(target.memory.getU8(LOW), 0x90);
    assert.equal(target.debug.at(-1)!.control, 0);
    assert.equal(target.memory.getU8(PHYS), 0x66); // the int3 taken out too
    assert.equal(target.paused, false);
    assert.equal(target.stop, undefined);
    assert.ok(closed());
  } finally {
    target.memory.close();
  }
  // The VM ends while the client waits for a stop: it hears W and the exit code.
  const w = rig();
  try {
    await w.ask("c");
    w.session.vmEnded(33);
    await w.session.settled();
    assert.equal(w.replies.at(-1), "W21");
    assert.ok(w.closed());
  } finally {
    w.target.memory.close();
  }
  // A client that disconnects while the VM runs: the VM pauses, the breakpoints go, it runs on.
  const b = rig();
  try {
    for (const a of ["1000", "1100", "1200", "1300"]) await b.ask(`Z1,${a},1`);
    b.target.memory.setU8(LOW, 0x90);
    await b.ask(`Z0,${LOW.toString(16)},1`);
    assert.equal(b.target.memory.getU8(LOW), 0xcc);
    await b.ask("c");
    await b.session.detach();
    assert.equal(b.target.memory.getU8(LOW), 0x90);
    assert.equal(b.target.paused, false);
    // Kill: the same, without a reply.
    const c = rig();
    try {
      const before = c.replies.length;
      c.session.receive(encodePacket("k"));
      await c.session.settled();
      assert.equal(c.replies.length, before);
      assert.ok(c.closed());
      assert.equal(c.target.paused, false);
    } finally {
      c.target.memory.close();
    }
  } finally {
    b.target.memory.close();
  }
});

Deno.test("gdb stub: random packets get a reply or an error, never an exception", async () => {
  const { ask, raw, target } = rig(2);
  const errors: unknown[] = [];
  const consoleError = console.error;
  console.error = (...a: unknown[]) => errors.push(a);
  // A fixed seed (xorshift32), so a failure repeats.
  let seed = 0x1234_5678;
  const rand = (n: number) => {
    seed ^= seed << 13;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    return (seed >>> 0) % n;
  };
  const heads = [
    "g",
    "G",
    "p",
    "P",
    "m",
    "M",
    "X",
    "Z0,",
    "Z1,",
    "z0,",
    "H",
    "T",
    "q",
    "Q",
    "qXfer:features:read:",
    "?",
  ];
  const alphabet = "0123456789abcdefABCDEF,:;=-xyz}\x00\xff";
  try {
    for (let i = 0; i < 2000; i++) {
      let p = heads[rand(heads.length)];
      for (let n = rand(40); n > 0; n--) p += alphabet[rand(alphabet.length)];
      const reply = await ask(p);
      assert.ok(reply !== undefined, `no reply to ${JSON.stringify(p)}`);
      if (!target.paused) await raw("\x03"); // a stray resume: stop again
    }
  } finally {
    console.error = consoleError;
    target.memory.close();
  }
  assert.deepEqual(errors, []);
});

// virtio-console driven through the virtio-mmio registers by the test driver: port 0 both ways,
// bounded input, the MULTIPORT control handshake as Linux's virtio_console.c runs it, named ports,
// hostile chains and control messages.

import assert from "node:assert/strict";
import fc from "fast-check";
import {
  CONSOLE_CFG_COLS,
  CONSOLE_CFG_EMERG_WR,
  CONSOLE_CFG_MAX_NR_PORTS,
  CONSOLE_CFG_ROWS,
  CONSOLE_CONTROL_RXQ,
  CONSOLE_CONTROL_TXQ,
  CONSOLE_CTRL_SIZE,
  ConsoleDevice,
  type ConsoleOptions,
  portRxQueue,
  portTxQueue,
  VIRTIO_CONSOLE_CONSOLE_PORT,
  VIRTIO_CONSOLE_DEVICE_READY,
  VIRTIO_CONSOLE_F_MULTIPORT,
  VIRTIO_CONSOLE_F_SIZE,
  VIRTIO_CONSOLE_PORT_ADD,
  VIRTIO_CONSOLE_PORT_NAME,
  VIRTIO_CONSOLE_PORT_OPEN,
  VIRTIO_CONSOLE_PORT_READY,
} from "../devices/virtio/console.ts";
import { VIRTIO_ID_CONSOLE } from "../devices/virtio/device.ts";
import { VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from "../devices/virtio/queue.ts";
import { GuardedGuestMemory, type Segment, VirtioTestDriver } from "./support/virtio_driver.ts";
import { captureVirtioLog, closeDeviceRig, mmioRig } from "./support/device_rig.ts";

const MiB = 1024 * 1024;
const enc = new TextEncoder();
const dec = new TextDecoder();
/** Linux's virtio_console.c gives control receive buffers of a page. */
const CONTROL_BUF = 4096;
/** VIRTIO_CONSOLE_BAD_ID (virtio_console.h): the id DEVICE_READY carries. */
const BAD_ID = 0xffff_ffff;

interface Rig {
  dev: ConsoleDevice;
  drv: VirtioTestDriver;
  g: GuardedGuestMemory;
  out: Uint8Array[];
  irqs: { n: number };
  lines: string[];
  /** Submit writable buffers on a queue, kick it. */
  rx(qi: number, sizes: number[]): { addr: number; len: number; head: number }[];
  /** What the device wrote into receive buffers since the last call, per used entry. */
  received(qi: number, bufs: { addr: number; len: number; head: number }[]): Uint8Array[];
  tx(qi: number, data: Segment[]): void;
  [Symbol.dispose](): void;
}

function rig(opts: Partial<ConsoleOptions> = {}, features?: bigint): Rig {
  const out: Uint8Array[] = [];
  const dev = new ConsoleDevice({ output: (b) => out.push(b.slice()), ...opts });
  const g = new GuardedGuestMemory([{ start: 0, size: 16 * MiB }]);
  const { drv, irqs } = mmioRig(dev, g.mem, 16 * MiB);
  const log = captureVirtioLog();
  drv.init({ features, queueSize: 64 });
  return {
    dev,
    drv,
    g,
    out,
    irqs,
    lines: log.lines,
    rx(qi, sizes) {
      const res = sizes.map((n) => {
        const s = drv.queues[qi].submit([n]);
        return { addr: s.buffers[0].addr, len: n, head: s.head };
      });
      drv.kick(qi);
      return res;
    },
    received(qi, bufs) {
      return drv.queues[qi].used().map((u) => {
        const b = bufs.find((x) => x.head === u.id);
        assert.ok(b, `used id ${u.id} is one of the submitted buffers`);
        assert.ok(u.len <= b.len);
        return g.mem.read(b.addr, u.len);
      });
    },
    tx(qi, data) {
      drv.queues[qi].submit(data);
      drv.kick(qi);
      drv.queues[qi].used();
    },
    [Symbol.dispose]() {
      closeDeviceRig(log, g, dev);
    },
  };
}

function concat(parts: Uint8Array[]): Uint8Array {
  const o = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let i = 0;
  for (const p of parts) {
    o.set(p, i);
    i += p.length;
  }
  return o;
}

function ctrl(id: number, event: number, value: number): Uint8Array {
  const b = new Uint8Array(CONSOLE_CTRL_SIZE);
  const v = new DataView(b.buffer);
  v.setUint32(0, id, true);
  v.setUint16(4, event, true);
  v.setUint16(6, value, true);
  return b;
}

function parseCtrl(b: Uint8Array): { id: number; event: number; value: number; extra: string } {
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  return {
    id: v.getUint32(0, true),
    event: v.getUint16(4, true),
    value: v.getUint16(6, true),
    extra: dec.decode(b.subarray(CONSOLE_CTRL_SIZE)),
  };
}

Deno.test("console: config, features, port 0 output and buffered input", () => {
  using r = rig({ size: { cols: 80, rows: 25 }, multiport: false });
  assert.equal(r.drv.readReg(0x008), VIRTIO_ID_CONSOLE);
  const f = r.drv.deviceFeatures();
  assert.ok(f & VIRTIO_CONSOLE_F_SIZE);
  assert.ok(!(f & VIRTIO_CONSOLE_F_MULTIPORT), "multiport: false");
  const cfg = new DataView(r.drv.readConfig(0, 12).buffer);
  assert.equal(cfg.getUint16(CONSOLE_CFG_COLS, true), 80);
  assert.equal(cfg.getUint16(CONSOLE_CFG_ROWS, true), 25);
  assert.equal(cfg.getUint32(CONSOLE_CFG_MAX_NR_PORTS, true), 1);
  assert.equal(r.dev.queueMaxSizes.length, 2);

  // Output: two descriptors in one chain arrive as one write.
  r.tx(1, [enc.encode("hello "), enc.encode("world\n")]);
  assert.equal(dec.decode(concat(r.out)), "hello world\n");

  // Input before the guest has buffers waits; then it fills buffers in order.
  r.dev.sendInput(enc.encode("0123456789"));
  r.dev.sendInput(enc.encode("abc"));
  const irqsBefore = r.irqs.n;
  const bufs = r.rx(0, [4, 4, 100]);
  const got = r.received(0, bufs);
  assert.deepEqual(got.map((b) => dec.decode(b)), ["0123", "4567", "89abc"]);
  assert.ok(r.irqs.n > irqsBefore, "an interrupt for the used receive buffers");
  // With a buffer already waiting, new input is delivered at once.
  const more = r.rx(0, [16]);
  r.dev.sendInput(enc.encode("now"));
  assert.deepEqual(r.received(0, more).map((b) => dec.decode(b)), ["now"]);
  // Emergency write puts one character out on port 0.
  r.out.length = 0;
  r.drv.transport.write(0x100 + CONSOLE_CFG_EMERG_WR, Uint8Array.of(0x21, 0, 0, 0));
  assert.equal(dec.decode(concat(r.out)), "!");
  const s = r.dev.stats();
  assert.equal(s.bytesIn, 16);
  assert.equal(s.bytesOut, 13);
});

Deno.test("console: input beyond the limit is dropped and counted, never unbounded", () => {
  using r = rig({ inputLimit: 8, multiport: false });
  r.dev.sendInput(enc.encode("12345"));
  r.dev.sendInput(enc.encode("67890"));
  assert.equal(r.dev.stats().inputDropped, 2);
  assert.equal(r.lines.length, 1, r.lines.join("\n"));
  const bufs = r.rx(0, [64]);
  assert.equal(dec.decode(concat(r.received(0, bufs))), "12345678");
});

/** Run Linux's multiport start-up: control buffers, DEVICE_READY, PORT_READY for each PORT_ADD. */
function handshake(r: Rig): {
  ports: Map<number, { name?: string; console: boolean; open: boolean }>;
  cbufs: { addr: number; len: number; head: number }[];
} {
  const cbufs = r.rx(CONSOLE_CONTROL_RXQ, Array(16).fill(CONTROL_BUF));
  const ports = new Map<number, { name?: string; console: boolean; open: boolean }>();
  r.tx(CONSOLE_CONTROL_TXQ, [ctrl(BAD_ID, VIRTIO_CONSOLE_DEVICE_READY, 1)]);
  for (let round = 0; round < 4; round++) {
    for (const m of r.received(CONSOLE_CONTROL_RXQ, cbufs).map(parseCtrl)) {
      if (m.event === VIRTIO_CONSOLE_PORT_ADD) {
        ports.set(m.id, { console: false, open: false });
        r.tx(CONSOLE_CONTROL_TXQ, [ctrl(m.id, VIRTIO_CONSOLE_PORT_READY, 1)]);
      } else if (m.event === VIRTIO_CONSOLE_CONSOLE_PORT) {
        ports.get(m.id)!.console = true;
      } else if (m.event === VIRTIO_CONSOLE_PORT_NAME) {
        ports.get(m.id)!.name = m.extra;
      } else if (m.event === VIRTIO_CONSOLE_PORT_OPEN) {
        ports.get(m.id)!.open = m.value === 1;
      }
    }
  }
  return { ports, cbufs };
}

Deno.test("console: by default port 0 alone uses MULTIPORT, and early input waits for the guest's PORT_OPEN", () => {
  using r = rig();
  assert.ok(r.drv.deviceFeatures() & VIRTIO_CONSOLE_F_MULTIPORT);
  assert.equal(r.dev.queueMaxSizes.length, 4);
  r.dev.sendInput(enc.encode("typed early\n"));
  // Linux fills the port's receive queue before it marks the console connected.
  const bufs = r.rx(portRxQueue(0), [64]);
  assert.equal(r.drv.queues[portRxQueue(0)].used().length, 0, "held before PORT_OPEN");
  const { ports } = handshake(r);
  assert.deepEqual([...ports.keys()], [0]);
  assert.equal(ports.get(0)!.console, true);
  r.tx(CONSOLE_CONTROL_TXQ, [ctrl(0, VIRTIO_CONSOLE_PORT_OPEN, 1)]);
  assert.equal(dec.decode(concat(r.received(portRxQueue(0), bufs))), "typed early\n");
  assert.throws(() => r.dev.openPort("x"), /no free port/);
});

Deno.test("console: MULTIPORT handshake, console port 0 and a named port both ways, hot-added port", () => {
  using r = rig({ ports: ["org.denovm.agent"], maxPorts: 4 });
  assert.ok(r.drv.deviceFeatures() & VIRTIO_CONSOLE_F_MULTIPORT);
  assert.equal(r.dev.queueMaxSizes.length, 10, "2 * (maxPorts + 1) queues");
  assert.equal(new DataView(r.drv.readConfig(CONSOLE_CFG_MAX_NR_PORTS, 4).buffer).getUint32(0, true), 4);
  const agent = r.dev.openPort("org.denovm.agent");
  assert.equal(agent.id, 1);
  // Host data before the guest opened the port waits (Linux would discard it).
  agent.write(enc.encode("early "));
  const agentRx = r.rx(portRxQueue(1), [64, 64]);
  assert.equal(r.drv.queues[portRxQueue(1)].used().length, 0, "nothing delivered before PORT_OPEN");

  const { ports, cbufs: early } = handshake(r);
  assert.deepEqual(ports.get(0), { console: true, open: true });
  assert.deepEqual(ports.get(1), { name: "org.denovm.agent", console: false, open: true });
  assert.equal(ports.size, 2);

  // Console port: the guest opens it (init_port_console sends PORT_OPEN 1), then input flows.
  r.tx(CONSOLE_CONTROL_TXQ, [ctrl(0, VIRTIO_CONSOLE_PORT_OPEN, 1)]);
  const conRx = r.rx(portRxQueue(0), [32]);
  r.dev.sendInput(enc.encode("ls\n"));
  assert.equal(dec.decode(concat(r.received(portRxQueue(0), conRx))), "ls\n");
  r.tx(portTxQueue(0), [enc.encode("$ ")]);
  assert.equal(dec.decode(concat(r.out)), "$ ");

  // Named port: opening it releases the early data.
  r.tx(CONSOLE_CONTROL_TXQ, [ctrl(1, VIRTIO_CONSOLE_PORT_OPEN, 1)]);
  agent.write(enc.encode("late"));
  assert.equal(dec.decode(concat(r.received(portRxQueue(1), agentRx))), "early late");
  const fromGuest: string[] = [];
  agent.onData((b) => fromGuest.push(dec.decode(b)));
  r.tx(portTxQueue(1), [enc.encode('{"ping":1}')]);
  assert.deepEqual(fromGuest, ['{"ping":1}']);
  assert.equal(dec.decode(concat(r.out)), "$ ", "port 1 output does not reach the console");

  // Hot add: PORT_ADD goes out at once.
  const cbufs = [...early, ...r.rx(CONSOLE_CONTROL_RXQ, [CONTROL_BUF])];
  const second = r.dev.openPort("second");
  assert.equal(second.id, 2);
  assert.deepEqual(r.received(CONSOLE_CONTROL_RXQ, cbufs).map(parseCtrl), [{
    id: 2,
    event: VIRTIO_CONSOLE_PORT_ADD,
    value: 0,
    extra: "",
  }]);
  assert.equal(r.dev.openPort("org.denovm.agent"), agent, "the same name is the same port");
  r.dev.openPort("third");
  assert.throws(() => r.dev.openPort("fourth"), /no free port/);
});

Deno.test("console: hostile control messages and chains cost a log line, never an exception", () => {
  using r = rig({ ports: ["p"], maxPorts: 3 });
  handshake(r);
  const before = r.lines.length;
  r.tx(CONSOLE_CONTROL_TXQ, [ctrl(99, VIRTIO_CONSOLE_PORT_OPEN, 1)]); // unknown port
  r.tx(CONSOLE_CONTROL_TXQ, [Uint8Array.of(1, 2, 3)]); // short
  r.tx(CONSOLE_CONTROL_TXQ, [ctrl(1, 0x7777, 0)]); // unknown event
  r.tx(CONSOLE_CONTROL_TXQ, [8]); // a writable-only chain: no readable bytes
  r.tx(portTxQueue(2), [enc.encode("x")]); // queue of a port that does not exist (yet)
  assert.equal(r.lines.length - before, 5, r.lines.slice(before).join("\n"));
  // A receive "buffer" that is read-only gets nothing written; the data stays for the next one.
  r.tx(CONSOLE_CONTROL_TXQ, [ctrl(1, VIRTIO_CONSOLE_PORT_OPEN, 1)]);
  r.dev.openPort("p").write(enc.encode("data"));
  const ro = r.drv.queues[portRxQueue(1)].submit([enc.encode("ro")]);
  const ok = r.rx(portRxQueue(1), [16]);
  const got = r.received(portRxQueue(1), [...ok, { addr: ro.buffers[0].addr, len: 0, head: ro.head }]);
  assert.deepEqual(got.map((b) => dec.decode(b)), ["", "data"]);
  // A descriptor pointing outside guest memory: the chain is completed with 0, the device goes on.
  const qc = r.drv.queues[CONSOLE_CONTROL_TXQ];
  qc.writeDesc(60, { addr: 0x7fff_0000_0000, len: 8, flags: 0, next: 0 });
  qc.publish(60);
  r.drv.kick(CONSOLE_CONTROL_TXQ);
  qc.used();
  assert.ok(r.lines.some((l) => l.includes("outside guest memory")), r.lines.join("\n"));
});

Deno.test("console: property: input split at random points arrives whole through random receive buffers", () => {
  fc.assert(
    fc.property(
      fc.array(fc.uint8Array({ minLength: 1, maxLength: 300 }), { minLength: 1, maxLength: 20 }),
      fc.array(fc.integer({ min: 1, max: 200 }), { minLength: 1, maxLength: 30 }),
      (chunks, sizes) => {
        using r = rig({ multiport: false });
        const want = concat(chunks);
        const got: Uint8Array[] = [];
        let ci = 0;
        let si = 0;
        // Interleave host writes and guest buffers until everything is through.
        for (let step = 0; step < 10_000 && concat(got).length < want.length; step++) {
          if (ci < chunks.length && (step % 2 === 0 || si >= sizes.length)) r.dev.sendInput(chunks[ci++]);
          else {
            const bufs = r.rx(0, [sizes[si++ % sizes.length]]);
            got.push(...r.received(0, bufs));
          }
        }
        assert.deepEqual(concat(got), want);
      },
    ),
    { numRuns: 60 },
  );
});

Deno.test("console: property: random descriptor chains on every queue never throw or escape guest memory", () => {
  fc.assert(
    fc.property(
      fc.array(
        fc.record({
          q: fc.integer({ min: 0, max: 5 }),
          descs: fc.array(
            fc.record({
              addr: fc.oneof(fc.integer({ min: 0, max: 16 * MiB + 4096 }), fc.constant(0xffff_ffff_f000)),
              len: fc.integer({ min: 0, max: 9000 }),
              write: fc.boolean(),
              next: fc.integer({ min: 0, max: 70 }),
              chain: fc.boolean(),
            }),
            { minLength: 1, maxLength: 4 },
          ),
          input: fc.uint8Array({ maxLength: 64 }),
        }),
        { maxLength: 25 },
      ),
      (ops) => {
        using r = rig({ ports: ["a"] });
        handshake(r);
        for (const op of ops) {
          const dq = r.drv.queues[op.q];
          const base = 40;
          op.descs.forEach((d, i) =>
            dq.writeDesc(base + i, {
              addr: d.addr,
              len: d.len,
              flags: (d.write ? VIRTQ_DESC_F_WRITE : 0) | (d.chain ? VIRTQ_DESC_F_NEXT : 0),
              next: d.next,
            })
          );
          dq.publish(base);
          r.dev.sendInput(op.input);
          r.drv.kick(op.q);
        }
      },
    ),
    { numRuns: 80 },
  );
});

// The host event socket of `--input TYPE[path=SOCKET]`: a program listens, the device connects, and the
// struct virtio_input_event records it writes reach the guest's event queue in order, batched by the
// program's own EV_SYN records; records split across writes, records of no event type, the socket closing
// and a full pending queue; status events written back.

import assert from "node:assert/strict";
import { INPUT_EVENT_SIZE, INPUT_MAX_PENDING_EVENTS, type InputEvent } from "./device.ts";
import { BTN_TOUCH, EV_ABS, EV_LED, EV_MSC, EV_SYN, KEY_A, LED_CAPSL, SYN_REPORT } from "./codes.ts";
import { InputSocketSource } from "./socket_source.ts";
import { UnixListener, type UnixStream } from "../../../core/unix_socket.ts";
import { inputRig, key, syn } from "../../../test/support/input_rig.ts";

function encode(events: InputEvent[]): Uint8Array {
  const b = new Uint8Array(events.length * INPUT_EVENT_SIZE);
  const v = new DataView(b.buffer);
  events.forEach((e, i) => {
    v.setUint16(i * INPUT_EVENT_SIZE, e.type, true);
    v.setUint16(i * INPUT_EVENT_SIZE + 2, e.code, true);
    v.setInt32(i * INPUT_EVENT_SIZE + 4, e.value, true);
  });
  return b;
}

/** Wait (a few seconds at most) until `cond` holds. */
async function until(cond: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 5000;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** A listening program's socket, the device connected to it, and the accepted end. */
async function connected(r: ReturnType<typeof inputRig>) {
  const dir = Deno.makeTempDirSync();
  const listener = UnixListener.listen(`${dir}/input.sock`);
  const source = InputSocketSource.connect(listener.path, r.dev);
  const peer: UnixStream = await listener.accept();
  return {
    source,
    peer,
    async [Symbol.asyncDispose]() {
      peer.close();
      source.close();
      await source.done;
      listener.close();
      Deno.removeSync(dir, { recursive: true });
    },
  };
}

const abs = (code: number, value: number): InputEvent => ({ type: EV_ABS, code, value });

Deno.test("input socket: records arrive in order with the program's EV_SYN batches, split records joined", async () => {
  using r = inputRig("single-touch");
  await using c = await connected(r);
  const stream = [abs(0, 10), abs(1, 20), key(BTN_TOUCH, 1), syn, key(BTN_TOUCH, 0), syn, abs(0, -5)];
  const bytes = encode(stream);
  // Before the guest posts buffers the events wait; the last record comes in three pieces.
  await c.peer.send(bytes.subarray(0, 6 * INPUT_EVENT_SIZE + 3));
  await until(() => r.dev.pendingEvents === 6, "six events pending");
  r.post(4);
  await c.peer.send(bytes.subarray(6 * INPUT_EVENT_SIZE + 3, 6 * INPUT_EVENT_SIZE + 5));
  await c.peer.send(bytes.subarray(6 * INPUT_EVENT_SIZE + 5));
  await until(() => c.source.stats.eventsForwarded === 7, "seven events forwarded");
  r.post(16);
  // No EV_SYN is added after the last record: the program batches.
  assert.deepEqual([...r.events()], stream);
  assert.equal(r.dev.pendingEvents, 0);
  assert.deepEqual(r.lines, []);
});

Deno.test("input socket: malformed records are one line, the socket closing is one line", async () => {
  using r = inputRig("keyboard");
  await using c = await connected(r);
  r.post(16);
  const bad = { type: 0x1234, code: 1, value: 2 };
  await c.peer.send(encode([key(KEY_A, 1), bad, bad, syn, bad]));
  await until(() => c.source.stats.malformed === 3 && c.source.stats.eventsForwarded === 2, "records read");
  assert.deepEqual(r.events(), [key(KEY_A, 1), syn]);
  assert.equal(r.lines.length, 1);
  assert.match(r.lines[0], /type 4660 .* dropped/);
  // Half a record, then the program goes away.
  await c.peer.send(encode([key(KEY_A, 0)]).subarray(0, 5));
  c.peer.close();
  await c.source.done;
  assert.equal(r.lines.length, 2);
  assert.match(r.lines[1], /closed \(5 bytes of an unfinished event dropped\); no more host events/);
  // The device goes on: the API still reaches the guest.
  r.dev.sendKey(KEY_A, false);
  assert.deepEqual(r.events(), [key(KEY_A, 0), syn]);
});

Deno.test("input socket: a full pending queue stops reading until the guest takes events", async () => {
  using r = inputRig("keyboard");
  await using c = await connected(r);
  const total = INPUT_MAX_PENDING_EVENTS + 100;
  const stream: InputEvent[] = [];
  for (let i = 0; i < total; i++) stream.push(i % 2 ? syn : key(KEY_A, i & 2 ? 1 : 0));
  const sending = c.peer.send(encode(stream));
  await until(() => r.dev.pendingEvents === INPUT_MAX_PENDING_EVENTS, "a full queue");
  assert.equal(c.source.stats.eventsForwarded, INPUT_MAX_PENDING_EVENTS);
  const got: InputEvent[] = [];
  while (got.length < total) {
    r.post(64);
    got.push(...r.events());
    await new Promise((res) => setTimeout(res, 1));
  }
  await sending;
  assert.deepEqual(got, stream);
  assert.equal(r.dev.stats().batchesDropped, 0);
});

Deno.test("input socket: status events go back to the program, EV_MSC left out", async () => {
  using r = inputRig("keyboard");
  await using c = await connected(r);
  const q = r.drv.queues[1];
  q.submit([encode([{ type: EV_LED, code: LED_CAPSL, value: 1 }, { type: EV_MSC, code: 4, value: 1 }, syn])]);
  r.drv.kick(1);
  await until(() => c.source.stats.statusWritten === 2, "status written");
  const back = await c.peer.recvExact(2 * INPUT_EVENT_SIZE);
  assert.deepEqual(
    back.data,
    encode([{ type: EV_LED, code: LED_CAPSL, value: 1 }, {
      type: EV_SYN,
      code: SYN_REPORT,
      value: 0,
    }]),
  );
  assert.equal(r.dev.leds.get(LED_CAPSL), 1);
});

Deno.test("input socket: nobody listening is an error at connect; closing the device closes the source", async () => {
  using r = inputRig("keyboard");
  const dir = Deno.makeTempDirSync();
  try {
    assert.throws(() => InputSocketSource.connect(`${dir}/none.sock`, r.dev), /connect .*none.sock/);
    const listener = UnixListener.listen(`${dir}/in.sock`);
    const source = InputSocketSource.connect(listener.path, r.dev);
    const peer = await listener.accept();
    r.dev.close();
    await source.done;
    // The device's end is closed: the program sees the end of the stream.
    await assert.rejects(() => peer.recvExact(1), /closed/);
    peer.close();
    listener.close();
    assert.deepEqual(r.lines, []);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

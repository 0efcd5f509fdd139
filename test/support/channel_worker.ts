/// <reference lib="deno.worker" />
// A stand-in for a vCPU Worker: performs accesses through the real vCPU channel
// (vmm/kvm/vcpu_channel.ts exchange) the way the KVM loop does, without KVM.

import { DOORBELL, exchange, KIND_MMIO, KIND_PIO } from "../../vmm/kvm/vcpu_channel.ts";

self.onmessage = (e: MessageEvent<{ io: SharedArrayBuffer; count: number }>) => {
  const io = new Int32Array(e.data.io);
  const bytes = new Uint8Array(e.data.io);
  const results: number[] = [];
  const data = new Uint8Array(8);
  const ring = () => self.postMessage(DOORBELL);
  for (let i = 0; i < e.data.count; i++) {
    // A 4-byte MMIO write of i at a 64-bit address, then a 4-byte port read that must return i * 3.
    new DataView(data.buffer).setUint32(0, i, true);
    exchange(io, bytes, ring, KIND_MMIO, true, 0x1_0000_0000 + 0x1000 + (i % 16) * 4, 4, data);
    data.fill(0);
    exchange(io, bytes, ring, KIND_PIO, false, 0x3f8, 4, data);
    results.push(new DataView(data.buffer).getUint32(0, true));
  }
  self.postMessage(results);
  self.close();
};

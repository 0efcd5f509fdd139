// The VM generation ID (Microsoft's "Virtual Machine Generation ID" specification): 16 random bytes in a reserved
// guest page that the DSDT's \_SB.VGEN device points at (its ADDR package, vmm/arch/acpi.ts). Linux's driver
// (drivers/virt/vmgenid.c) mixes the ID into its entropy pool when it binds; when the device is notified (0x80, from
// the Generic Event Device's _EVT) it reads the ID again and, when it changed, reseeds its RNG as after a fork of the
// VM (add_vmfork_randomness). A clone restored from a snapshot therefore gets a new ID and a notify.

import type { GuestMemory } from "../../core/memory.ts";
import { VMGENID_PAGE_SIZE, VMGENID_PAGE_START, VMGENID_SIZE } from "./layout.ts";

/** A new generation ID: 16 bytes from the platform's cryptographic random source. */
export function newGenerationId(): Uint8Array {
  return crypto.getRandomValues(new Uint8Array(VMGENID_SIZE));
}

function checkLength(id: Uint8Array): void {
  if (id.length !== VMGENID_SIZE) {
    throw new RangeError(`a VM generation ID is ${VMGENID_SIZE} bytes, not ${id.length}`);
  }
}

/** Write `id` at the start of the generation ID's page, the rest of the page zero. */
export function writeGenerationId(memory: GuestMemory, id: Uint8Array): void {
  checkLength(id);
  memory.fill(VMGENID_PAGE_START + VMGENID_SIZE, VMGENID_PAGE_SIZE - VMGENID_SIZE);
  memory.write(VMGENID_PAGE_START, id);
}

/** The generation ID in guest memory now. */
export function readGenerationId(memory: GuestMemory): Uint8Array {
  return memory.read(VMGENID_PAGE_START, VMGENID_SIZE);
}

/** The ID as 32 lower-case hex digits, byte by byte in memory order (the snapshot's `vmgenid` field). */
export function generationIdHex(id: Uint8Array): string {
  checkLength(id);
  return Array.from(id, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The ID from 32 hex digits (generationIdHex's form); a RangeError names what is wrong. */
export function parseGenerationId(hex: string): Uint8Array {
  if (!/^[0-9a-fA-F]{32}$/.test(hex)) {
    throw new RangeError(`a VM generation ID is ${2 * VMGENID_SIZE} hex digits, not "${hex.slice(0, 40)}"`);
  }
  return Uint8Array.from({ length: VMGENID_SIZE }, (_, i) => parseInt(hex.slice(2 * i, 2 * i + 2), 16));
}

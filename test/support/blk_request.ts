// virtio-blk requests as a test driver builds them: the request header and sector-sized test data.

import { BLK_OUTHDR_SIZE, SECTOR_SIZE } from "../../devices/virtio/block/device.ts";

/** struct virtio_blk_outhdr (linux/virtio_blk.h): le32 type at 0, le64 sector at 8. */
const BLK_OUTHDR_TYPE = 0;
const BLK_OUTHDR_SECTOR = 8;

/** A virtio-blk request header of `type` at `sector`. */
export function blkHeader(type: number, sector: number): Uint8Array {
  const h = new Uint8Array(BLK_OUTHDR_SIZE);
  const v = new DataView(h.buffer);
  v.setUint32(BLK_OUTHDR_TYPE, type, true);
  v.setBigUint64(BLK_OUTHDR_SECTOR, BigInt(sector), true);
  return h;
}

/** One sector of bytes that differ with `seed` (what a test writes, then finds again). */
export function sectorPattern(seed: number): Uint8Array {
  return Uint8Array.from({ length: SECTOR_SIZE }, (_, i) => (i * 13 + seed) & 0xff);
}

// The virtio-fs configuration space (the tag and the request-queue count). The device against a real
// virtiofsd, with FUSE requests on its rings, is tested in vmm/virtiofsd_test.ts.

import assert from "node:assert/strict";
import { VIRTIO_FS_CONFIG_SIZE, VIRTIO_FS_TAG_SIZE, virtioFsConfig } from "./fs.ts";

Deno.test("virtio-fs config: the tag NUL-padded, then num_request_queues", () => {
  const c = virtioFsConfig("data");
  assert.equal(c.length, VIRTIO_FS_CONFIG_SIZE);
  assert.deepEqual([...c.subarray(0, 5)], [0x64, 0x61, 0x74, 0x61, 0]);
  assert.equal(new DataView(c.buffer).getUint32(VIRTIO_FS_TAG_SIZE, true), 1);
  assert.equal(virtioFsConfig("t".repeat(VIRTIO_FS_TAG_SIZE))[VIRTIO_FS_TAG_SIZE - 1], 0x74);
  assert.throws(() => virtioFsConfig(""), RangeError);
  assert.throws(() => virtioFsConfig("t".repeat(VIRTIO_FS_TAG_SIZE + 1)), RangeError);
});

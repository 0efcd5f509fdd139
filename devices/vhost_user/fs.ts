// virtio-fs through the vhost-user front end: the rings go to a virtio-fs back end (virtiofsd) like any
// other VhostUserFrontEndDevice's, but the configuration space is this device's own, as QEMU's
// vhost-user-fs and crosvm's fs device make it: the tag the guest mounts and the number of request
// queues (virtio 1.2 §5.11.4 `struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }`).
// virtiofsd does not answer GET_CONFIG, and the tag is the VMM's to choose.
//
// Queues (virtio 1.2 §5.11.2): queue 0 is the high-priority queue, 1..n the request queues.

import { readConfigSpace, VIRTIO_ID_FS } from "../virtio/device.ts";
import { VhostUserFrontEndDevice, type VhostUserFrontEndOptions } from "./front_end.ts";

/** virtio 1.2 §5.11.4: bytes of the tag field (UTF-8, NUL-padded; not NUL-terminated when full). */
export const VIRTIO_FS_TAG_SIZE = 36;
/** virtio 1.2 §5.11.4: offset of num_request_queues (le32) in the configuration space. */
const NUM_REQUEST_QUEUES_OFFSET = VIRTIO_FS_TAG_SIZE;
/** virtio 1.2 §5.11.4: size of struct virtio_fs_config. */
export const VIRTIO_FS_CONFIG_SIZE = NUM_REQUEST_QUEUES_OFFSET + 4;
/** virtio 1.2 §5.11.2: the high-priority queue, before the request queues. */
const HIPRIO_QUEUES = 1;
/**
 * Queue size offered to the driver: crosvm's fs device's (devices/src/virtio/fs/mod.rs QUEUE_SIZE), which is
 * also the most QEMU's libvhost-user, under its C virtiofsd, is built for (VIRTQUEUE_MAX_SIZE).
 */
export const VIRTIO_FS_QUEUE_SIZE = 1024;
/** Request queues: one, as QEMU's vhost-user-fs defaults to and QEMU's C virtiofsd serves. */
export const VIRTIO_FS_REQUEST_QUEUES = 1;

export interface VirtioFsFrontEndOptions
  extends Omit<VhostUserFrontEndOptions, "deviceType" | "queues" | "configSize"> {
  /** The tag the guest mounts: 1..36 bytes of UTF-8. */
  tag: string;
  /** Called once when the device is closed (the VMM stops the back end it started). */
  onClose?: () => void;
}

/** The configuration space for `tag`: the tag NUL-padded, then num_request_queues. */
export function virtioFsConfig(tag: string, requestQueues = VIRTIO_FS_REQUEST_QUEUES): Uint8Array {
  const bytes = new TextEncoder().encode(tag);
  if (bytes.length === 0 || bytes.length > VIRTIO_FS_TAG_SIZE) {
    throw new RangeError(`virtio-fs tag "${tag}" is ${bytes.length} bytes; it must be 1..${VIRTIO_FS_TAG_SIZE}`);
  }
  const config = new Uint8Array(VIRTIO_FS_CONFIG_SIZE);
  config.set(bytes, 0);
  new DataView(config.buffer).setUint32(NUM_REQUEST_QUEUES_OFFSET, requestQueues, true);
  return config;
}

/** A virtio-fs device whose rings a vhost-user back end serves. */
export class VirtioFsFrontEnd extends VhostUserFrontEndDevice {
  readonly tag: string;
  readonly #config: Uint8Array;
  #onClose?: () => void;

  constructor(opts: VirtioFsFrontEndOptions) {
    const config = virtioFsConfig(opts.tag);
    super({
      ...opts,
      deviceType: VIRTIO_ID_FS,
      queues: HIPRIO_QUEUES + VIRTIO_FS_REQUEST_QUEUES,
      maxQueueSize: opts.maxQueueSize ?? VIRTIO_FS_QUEUE_SIZE,
      // Nothing is read from the back end: the configuration space is built here.
      configSize: 0,
    });
    this.tag = opts.tag;
    this.#config = config;
    this.#onClose = opts.onClose;
  }

  override readConfig(offset: number, data: Uint8Array): void {
    readConfigSpace(this.#config, offset, data);
  }

  /** The virtio-fs configuration space is read-only to the driver (virtio 1.2 §5.11.4). */
  override writeConfig(_offset: number, _data: Uint8Array): void {}

  override close(): void {
    super.close();
    const onClose = this.#onClose;
    this.#onClose = undefined;
    onClose?.();
  }
}

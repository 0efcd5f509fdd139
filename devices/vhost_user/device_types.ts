// The virtio device types a vhost-user front end may carry, by the names crosvm's `--vhost-user type=`
// takes (google/crosvm devices/src/virtio/mod.rs DeviceType: serde kebab-case names, "9p" and
// "mac80211-hwsim" renamed): each type's device ID (virtio 1.2 section 5 "Device Types"; ids past the
// spec's from crosvm's virtio_sys/src/virtio_ids.rs), the queues a device of that type has when the
// back end does not say (crosvm's DeviceType::min_queues, from each device's section of the spec), the
// configuration-space bytes the front end asks the back end for (the Linux uapi header's struct), and
// why denovm refuses a type it cannot carry.

/** One device type a `--vhost-user type=` names. */
export interface VhostUserDeviceType {
  /** crosvm's name for it. */
  name: string;
  /** Virtio device ID. */
  id: number;
  /** Queues when the back end does not offer VHOST_USER_PROTOCOL_F_MQ. */
  queues: number;
  /** Configuration-space bytes read from the back end (GET_CONFIG); 0 when the type has none. */
  configSize: number;
  /** Why denovm cannot carry it, when it cannot. */
  refused?: string;
}

// Configuration-space sizes (Linux include/uapi/linux/virtio_*.h), through the fields a driver reads.
/** struct virtio_net_config: mac[6], status, max_virtqueue_pairs, mtu (u16 each). */
const NET_CONFIG_SIZE = 12;
/** struct virtio_blk_config through write_zeroes_may_unmap and its padding (QEMU's vhost-user-blk asks the same). */
const BLOCK_CONFIG_SIZE = 60;
/** struct virtio_console_config: cols, rows (u16), max_nr_ports, emerg_wr (u32). */
const CONSOLE_CONFIG_SIZE = 12;
/** struct virtio_balloon_config: num_pages, actual (u32). */
const BALLOON_CONFIG_SIZE = 8;
/** struct virtio_scsi_config: nine u32 fields. */
const SCSI_CONFIG_SIZE = 36;
/** struct virtio_9p_config: tag_len (u16) and a tag; sized as virtio-fs's 36-byte tag. */
const P9_CONFIG_SIZE = 38;
/** struct virtio_input_config: select, subsel, size, reserved[5], a 128-byte union. */
const INPUT_CONFIG_SIZE = 136;
/** struct virtio_vsock_config: guest_cid (u64). */
const VSOCK_CONFIG_SIZE = 8;
/** struct virtio_snd_config: jacks, streams, chmaps (u32). */
const SOUND_CONFIG_SIZE = 12;
/** struct virtio_fs_config: tag[36], num_request_queues (u32); virtiofsd answers exactly these 40 bytes. */
const FS_CONFIG_SIZE = 40;

const SHARED_MEMORY =
  "its shared-memory regions would have to be mapped from the back end, which this front end does not do";

/** Every type crosvm's `--vhost-user` takes, in crosvm's order. */
export const VHOST_USER_DEVICE_TYPES: readonly VhostUserDeviceType[] = [
  { name: "net", id: 1, queues: 3, configSize: NET_CONFIG_SIZE },
  { name: "block", id: 2, queues: 1, configSize: BLOCK_CONFIG_SIZE },
  { name: "console", id: 3, queues: 2, configSize: CONSOLE_CONFIG_SIZE },
  { name: "rng", id: 4, queues: 1, configSize: 0 },
  { name: "balloon", id: 5, queues: 2, configSize: BALLOON_CONFIG_SIZE },
  { name: "scsi", id: 8, queues: 3, configSize: SCSI_CONFIG_SIZE },
  { name: "9p", id: 9, queues: 1, configSize: P9_CONFIG_SIZE },
  {
    name: "gpu",
    id: 16,
    queues: 2,
    configSize: 0,
    refused: "vhost-user-gpu needs the display socket (VHOST_USER_GPU_SET_SOCKET); use --gpu",
  },
  { name: "input", id: 18, queues: 2, configSize: INPUT_CONFIG_SIZE },
  { name: "vsock", id: 19, queues: 3, configSize: VSOCK_CONFIG_SIZE },
  { name: "iommu", id: 23, queues: 2, configSize: 0, refused: "an IOMMU is the VMM's to implement" },
  { name: "sound", id: 25, queues: 4, configSize: SOUND_CONFIG_SIZE },
  { name: "fs", id: 26, queues: 2, configSize: FS_CONFIG_SIZE },
  { name: "pmem", id: 27, queues: 1, configSize: 0, refused: "its memory is mapped by the VMM; use --pmem" },
  { name: "mac80211-hwsim", id: 29, queues: 2, configSize: 0 },
  { name: "video-encoder", id: 30, queues: 2, configSize: 0, refused: SHARED_MEMORY },
  { name: "video-decoder", id: 31, queues: 2, configSize: 0, refused: SHARED_MEMORY },
  { name: "scmi", id: 32, queues: 2, configSize: 0 },
  { name: "wl", id: 63, queues: 2, configSize: 0, refused: SHARED_MEMORY },
  { name: "tpm", id: 62, queues: 1, configSize: 0 },
  { name: "pvclock", id: 61, queues: 1, configSize: 0, refused: "the paravirtual clock is the VMM's to implement" },
  { name: "media", id: 48, queues: 2, configSize: 0, refused: SHARED_MEMORY },
];

/** The type crosvm calls `name`, or undefined. */
export function vhostUserDeviceType(name: string): VhostUserDeviceType | undefined {
  return VHOST_USER_DEVICE_TYPES.find((t) => t.name === name);
}

/** The type with device ID `id`, or undefined (a generic device). */
export function vhostUserDeviceTypeById(id: number): VhostUserDeviceType | undefined {
  return VHOST_USER_DEVICE_TYPES.find((t) => t.id === id);
}

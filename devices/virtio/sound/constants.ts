// virtio-snd's wire numbers and layouts: the virtio 1.2 spec, section 5.14 "Sound Device", and Linux's
// include/uapi/linux/virtio_snd.h (which the guest driver, sound/virtio/, is built from). Every number
// here names its structure or enum there; offsets are into those little-endian structures.

/** Configuration space: struct virtio_snd_config { le32 jacks; le32 streams; le32 chmaps; } (5.14.4). */
export const SND_CONFIG_JACKS = 0;
export const SND_CONFIG_STREAMS = 4;
export const SND_CONFIG_CHMAPS = 8;
export const SND_CONFIG_SIZE = 12;

/** Virtqueue indexes (5.14.2; enum VIRTIO_SND_VQ_*). */
export const VIRTIO_SND_VQ_CONTROL = 0;
export const VIRTIO_SND_VQ_EVENT = 1;
export const VIRTIO_SND_VQ_TX = 2;
export const VIRTIO_SND_VQ_RX = 3;
export const VIRTIO_SND_VQ_MAX = 4;

/** Data flow directions (5.14.6.2; enum VIRTIO_SND_D_*). */
export const VIRTIO_SND_D_OUTPUT = 0;
export const VIRTIO_SND_D_INPUT = 1;

/** Request, event and status codes (5.14.6; enum VIRTIO_SND_R_*, VIRTIO_SND_EVT_*, VIRTIO_SND_S_*). */
export const VIRTIO_SND_R_JACK_INFO = 1;
export const VIRTIO_SND_R_JACK_REMAP = 2;
export const VIRTIO_SND_R_PCM_INFO = 0x0100;
export const VIRTIO_SND_R_PCM_SET_PARAMS = 0x0101;
export const VIRTIO_SND_R_PCM_PREPARE = 0x0102;
export const VIRTIO_SND_R_PCM_RELEASE = 0x0103;
export const VIRTIO_SND_R_PCM_START = 0x0104;
export const VIRTIO_SND_R_PCM_STOP = 0x0105;
export const VIRTIO_SND_R_CHMAP_INFO = 0x0200;
export const VIRTIO_SND_EVT_JACK_CONNECTED = 0x1000;
export const VIRTIO_SND_EVT_JACK_DISCONNECTED = 0x1001;
export const VIRTIO_SND_EVT_PCM_PERIOD_ELAPSED = 0x1100;
export const VIRTIO_SND_EVT_PCM_XRUN = 0x1101;
export const VIRTIO_SND_S_OK = 0x8000;
export const VIRTIO_SND_S_BAD_MSG = 0x8001;
export const VIRTIO_SND_S_NOT_SUPP = 0x8002;
export const VIRTIO_SND_S_IO_ERR = 0x8003;

/** struct virtio_snd_hdr { le32 code; } */
export const SND_HDR_SIZE = 4;
/** struct virtio_snd_event { struct virtio_snd_hdr hdr; le32 data; } */
export const SND_EVENT_SIZE = 8;
/** struct virtio_snd_query_info { hdr; le32 start_id; le32 count; le32 size; }: sizes past the header. */
export const SND_QUERY_INFO_SIZE = 16;
/** struct virtio_snd_info { le32 hda_fn_nid; } */
export const SND_INFO_SIZE = 4;

/** struct virtio_snd_jack_hdr { hdr; le32 jack_id; } */
export const SND_JACK_HDR_SIZE = 8;
/** Jack feature bits (enum VIRTIO_SND_JACK_F_*). */
export const VIRTIO_SND_JACK_F_REMAP = 0;
/**
 * struct virtio_snd_jack_info { info hdr; le32 features; le32 hda_reg_defconf; le32 hda_reg_caps; u8 connected;
 * u8 padding[7]; }
 */
export const SND_JACK_INFO_SIZE = 24;
export const SND_JACK_INFO_FEATURES = 4;
export const SND_JACK_INFO_DEFCONF = 8;
export const SND_JACK_INFO_CAPS = 12;
export const SND_JACK_INFO_CONNECTED = 16;
/** struct virtio_snd_jack_remap { jack_hdr; le32 association; le32 sequence; } */
export const SND_JACK_REMAP_SIZE = 16;

/** struct virtio_snd_pcm_hdr { hdr; le32 stream_id; } */
export const SND_PCM_HDR_SIZE = 8;
/** PCM feature bits (enum VIRTIO_SND_PCM_F_*); denovm offers none of them. */
export const VIRTIO_SND_PCM_F_SHMEM_HOST = 0;
export const VIRTIO_SND_PCM_F_SHMEM_GUEST = 1;
export const VIRTIO_SND_PCM_F_MSG_POLLING = 2;
export const VIRTIO_SND_PCM_F_EVT_SHMEM_PERIODS = 3;
export const VIRTIO_SND_PCM_F_EVT_XRUNS = 4;
/**
 * struct virtio_snd_pcm_info { info hdr; le32 features; le64 formats; le64 rates; u8 direction;
 * u8 channels_min; u8 channels_max; u8 padding[5]; }
 */
export const SND_PCM_INFO_SIZE = 32;
export const SND_PCM_INFO_FEATURES = 4;
export const SND_PCM_INFO_FORMATS = 8;
export const SND_PCM_INFO_RATES = 16;
export const SND_PCM_INFO_DIRECTION = 24;
export const SND_PCM_INFO_CHANNELS_MIN = 25;
export const SND_PCM_INFO_CHANNELS_MAX = 26;
/**
 * struct virtio_snd_pcm_set_params { pcm_hdr hdr; le32 buffer_bytes; le32 period_bytes; le32 features;
 * u8 channels; u8 format; u8 rate; u8 padding; }: 24 bytes; the offsets are past the pcm_hdr.
 */
export const SND_PCM_SET_PARAMS_SIZE = 24;
export const SND_SET_PARAMS_BUFFER_BYTES = 8;
export const SND_SET_PARAMS_PERIOD_BYTES = 12;
export const SND_SET_PARAMS_FEATURES = 16;
export const SND_SET_PARAMS_CHANNELS = 20;
export const SND_SET_PARAMS_FORMAT = 21;
export const SND_SET_PARAMS_RATE = 22;
/** struct virtio_snd_pcm_xfer { le32 stream_id; } */
export const SND_PCM_XFER_SIZE = 4;
/** struct virtio_snd_pcm_status { le32 status; le32 latency_bytes; } */
export const SND_PCM_STATUS_SIZE = 8;

/** struct virtio_snd_chmap_hdr { hdr; le32 chmap_id; } */
export const SND_CHMAP_HDR_SIZE = 8;
/** VIRTIO_SND_CHMAP_MAX_SIZE */
export const VIRTIO_SND_CHMAP_MAX_SIZE = 18;
/** struct virtio_snd_chmap_info { info hdr; u8 direction; u8 channels; u8 positions[18]; } */
export const SND_CHMAP_INFO_SIZE = 24;
export const SND_CHMAP_INFO_DIRECTION = 4;
export const SND_CHMAP_INFO_CHANNELS = 5;
export const SND_CHMAP_INFO_POSITIONS = 6;
/** Channel positions (enum VIRTIO_SND_CHMAP_*), the ones denovm's maps use. */
export const VIRTIO_SND_CHMAP_NONE = 0;
export const VIRTIO_SND_CHMAP_MONO = 2;
export const VIRTIO_SND_CHMAP_FL = 3;
export const VIRTIO_SND_CHMAP_FR = 4;
export const VIRTIO_SND_CHMAP_RL = 5;
export const VIRTIO_SND_CHMAP_RR = 6;
export const VIRTIO_SND_CHMAP_FC = 7;
export const VIRTIO_SND_CHMAP_LFE = 8;

/** Sample formats (enum VIRTIO_SND_PCM_FMT_*), the ones denovm's back ends carry. */
export const VIRTIO_SND_PCM_FMT_U8 = 4;
export const VIRTIO_SND_PCM_FMT_S16 = 5;
export const VIRTIO_SND_PCM_FMT_S24_3 = 11;
export const VIRTIO_SND_PCM_FMT_S32 = 17;
export const VIRTIO_SND_PCM_FMT_FLOAT = 19;
/** Bytes per sample of the formats above (the header's "physical width"). */
export const SAMPLE_BYTES: Readonly<Record<number, number>> = {
  [VIRTIO_SND_PCM_FMT_U8]: 1,
  [VIRTIO_SND_PCM_FMT_S16]: 2,
  [VIRTIO_SND_PCM_FMT_S24_3]: 3,
  [VIRTIO_SND_PCM_FMT_S32]: 4,
  [VIRTIO_SND_PCM_FMT_FLOAT]: 4,
};
/** The format bit map (1 << VIRTIO_SND_PCM_FMT_*) of every format in SAMPLE_BYTES. */
export const SUPPORTED_FORMATS: bigint = Object.keys(SAMPLE_BYTES).reduce((m, f) => m | (1n << BigInt(f)), 0n);

/** Frame rates by index (enum VIRTIO_SND_PCM_RATE_*: 5512 is index 0 ... 384000 is index 13). */
export const PCM_RATES: readonly number[] = [
  5512,
  8000,
  11025,
  16000,
  22050,
  32000,
  44100,
  48000,
  64000,
  88200,
  96000,
  176400,
  192000,
  384000,
];
/** The rate bit map (1 << VIRTIO_SND_PCM_RATE_*) of every rate. */
export const SUPPORTED_RATES: bigint = (1n << BigInt(PCM_RATES.length)) - 1n;

// The web display's PNG rectangles: the GPU's PNG writer (devices/virtio/gpu/png_writer.ts).

export { encodeRectPng } from "../../../devices/virtio/gpu/png_writer.ts";

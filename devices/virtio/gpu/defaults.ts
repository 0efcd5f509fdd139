// crosvm's GPU defaults that both the device and the VMM's configuration use.

/** crosvm's default display size (vm_control/src/gpu.rs DEFAULT_DISPLAY_WIDTH/HEIGHT). */
export const DEFAULT_DISPLAY_WIDTH = 1280;
export const DEFAULT_DISPLAY_HEIGHT = 1024;

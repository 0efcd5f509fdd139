// The README's library example, kept type-checked (`deno task check`) and run by
// test/nested/linux_boot_test.ts where KVM runs Linux (or in the nested KVM host). By hand:
//   deno run -A examples/boot_type_screenshot.ts [KERNEL [INITRD]]
import { type Image, pixel, Vm } from "../mod.ts";

const kernel = Deno.args[0] ?? ".cache/debian-kernel/vmlinux";
const initrd = Deno.args[1] ?? ".cache/initramfs/default.cpio.gz"; // busybox, virtio modules, the guest agent
await using vm = await Vm.boot({
  kernel,
  initrd,
  agent: true, // a virtio-console port for the guest agent: vm.exec()
  inputs: [{ kind: "keyboard" }],
  gpu: { backend: "2d", displays: [{ mode: "windowed", width: 800, height: 600 }] }, // unset keys: crosvm's defaults
});
await vm.step("boot", () => vm.console.waitFor(/DENOVM-INIT-OK/, { timeout: 300_000 }));
vm.console.send("echo hello from the serial console\n"); // the shell on ttyS0
await vm.console.waitFor(/^hello from the serial console\r?$/m);
const { code, stdout } = await vm.exec("uname -r"); // through the guest agent
console.log(`uname -r: ${stdout.trim()} (exit ${code})`);

// The virtio keyboard types into the shell on the framebuffer console (tty1); the agent reads the result.
const typed = async () => (await vm.exec("cat /tmp/typed 2>/dev/null")).stdout;
vm.input.type("clear; echo typed on the keyboard | tee /tmp/typed\n");
for (let i = 0; i < 100 && !(await typed()).includes("typed on the keyboard"); i++) {
  await new Promise((r) => setTimeout(r, 200));
}
if (!(await typed()).includes("typed on the keyboard")) throw new Error("the typed command did not run");

// `clear` left the command's output and a prompt at the top of a black screen: text there, none below.
/** Pixels brighter than half in rows y0..y1 (text is light grey on black). */
function lit(img: Image, y0: number, y1: number): number {
  let n = 0;
  for (let y = y0; y < y1; y++) for (let x = 0; x < img.width; x++) if (pixel(img, x, y)[0] > 128) n++;
  return n;
}
const shot = await vm.step(
  "screen",
  () => vm.waitForScreen((img) => lit(img, 0, 32) > 100 && lit(img, 300, 600) === 0, { timeout: 30_000 }),
);
await Deno.writeFile("screenshot.png", await vm.screenshot());
console.log(`screenshot ${shot.width}x${shot.height}: typed text at the top, saved as screenshot.png`);
console.log(vm.gpu.stats()); // bytes copied per resource and per context
console.log(`exit code ${await vm.stop()}`); // 0

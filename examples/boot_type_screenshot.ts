// The README's library example, kept type-checked (`deno task check`). Run it on a host with /dev/kvm:
//   deno run -A examples/boot_type_screenshot.ts KERNEL
import { Vm } from "../mod.ts";

const kernel = Deno.args[0] ?? ".cache/debian-kernel/vmlinux";
await using vm = await Vm.boot({
  kernel,
  initrd: ".cache/initramfs/default.cpio.gz", // the default guest: busybox, virtio modules, the guest agent
  agent: true, // a virtio-console port for the guest agent: vm.exec()
  inputs: [{ kind: "keyboard" }],
  gpu: { backend: "2d", displays: [{ mode: "windowed", width: 800, height: 600 }] }, // unset keys: crosvm's defaults
});
await vm.step("boot", () => vm.console.waitFor(/DENOVM-INIT-OK/, { timeout: 60_000 }));
vm.console.send("echo hello\n");
await vm.console.waitFor(/^hello$/m);
const { code, stdout } = await vm.exec("uname -r"); // through the guest agent
console.log(`uname -r: ${stdout.trim()} (exit ${code})`);
vm.input.type("ls\n"); // virtio-input keyboard
await vm.waitForScreen((img) => img.width === 800, { timeout: 10_000 });
await Deno.writeFile("screenshot.png", vm.screenshot());
console.log(vm.gpu.stats()); // bytes copied per resource and per context
console.log(`exit code ${await vm.stop()}`); // 0

// The layering rule, checked on the whole import graph: every .ts file's static imports, export-from,
// dynamic import() and new URL(..., import.meta.url) specifiers, read with a small scanner that skips
// comments, strings and regular expressions, so that text which only looks like an import is not counted.
//
//   ffi/       imports only ffi/
//   core/      only core/ and ffi/
//   devices/   only devices/, core/ and ffi/
//   vmm/arch/  only vmm/arch/, core/ and ffi/ (not devices/)
//   vmm/kvm/   only vmm/kvm/, vmm/arch/, devices/, core/ and ffi/ (not the device manager or what is above)
//   vmm/       anything below it: vmm/, devices/, core/, ffi/
//
// So nothing in those four imports test/, bench/, examples/, main.ts or mod.ts. A unit test beside its
// module (*_test.ts) keeps its layer's rule for the code it imports, and may also use the test helpers
// (test/) and start the program (main.ts, mod.ts). Node built-ins (node:) and npm packages (npm:, or a name
// that deno.json's import map sends to npm:) are allowed everywhere; any other outside specifier is not.
// test/, bench/ and examples/ are not restricted.

import assert from "node:assert/strict";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
/** Directories never walked: build output and caches, not the project's code. */
const SKIPPED_DIRS = new Set([".git", ".cache", "node_modules"]);

/** One import-like reference found in a file. */
export interface ImportRef {
  line: number;
  kind: "import" | "dynamic import" | "new URL";
  specifier: string;
  /** A template literal with substitutions: only the text before the first `${` is known. */
  prefixOnly: boolean;
}

/** One import that breaks the rule. */
export interface Violation {
  file: string;
  line: number;
  specifier: string;
  target: string;
  reason: string;
}

// ---- Scanner ----

interface StringToken {
  start: number; // index of the opening quote
  end: number; // index after the closing quote
  value: string;
  template: boolean;
  hasSubstitution: boolean;
  /** A template's text before its first substitution. */
  head: string;
}

const REGEX_AFTER_PUNCT = new Set("(,=:[!&|?{};+-*%<>~^".split(""));
const REGEX_AFTER_WORD = new Set([
  "return",
  "typeof",
  "case",
  "do",
  "else",
  "in",
  "of",
  "new",
  "delete",
  "void",
  "throw",
  "instanceof",
  "yield",
  "await",
]);

/**
 * The source with comments blanked (newlines kept, so positions and line numbers stay), and its string and
 * template literals. Code inside a template's `${...}` is scanned as code.
 */
export function scan(src: string): { code: string; strings: StringToken[] } {
  const out = src.split("");
  const strings: StringToken[] = [];
  const blank = (from: number, to: number) => {
    for (let k = from; k < to; k++) if (out[k] !== "\n") out[k] = " ";
  };
  /** For each open `${`: the brace depth inside it, and the template token it belongs to. */
  const templates: { depth: number; token: StringToken; chunk: number }[] = [];
  let i = 0;

  // Scan template text from `i` (after a backtick or a closing `}` of a substitution) to its end or the next
  // `${`; returns true when the template ended.
  const templateText = (token: StringToken): boolean => {
    while (i < src.length) {
      const c = src[i];
      if (c === "\\") {
        token.value += src.slice(i, i + 2);
        i += 2;
      } else if (c === "`") {
        i++;
        token.end = i;
        return true;
      } else if (c === "$" && src[i + 1] === "{") {
        if (!token.hasSubstitution) token.head = token.value;
        token.hasSubstitution = true;
        i += 2;
        templates.push({ depth: 0, token, chunk: 0 });
        return false;
      } else {
        token.value += c;
        i++;
      }
    }
    token.end = i;
    return true;
  };

  const previousSignificant = (): { char: string; word: string } => {
    let k = i - 1;
    while (k >= 0 && /\s/.test(out[k])) k--;
    if (k < 0) return { char: "", word: "" };
    let w = k;
    while (w >= 0 && /[A-Za-z0-9_$]/.test(out[w])) w--;
    return { char: out[k], word: out.slice(w + 1, k + 1).join("") };
  };

  while (i < src.length) {
    const c = src[i];
    const next = src[i + 1];
    if (c === "/" && next === "/") {
      const end = src.indexOf("\n", i);
      const stop = end < 0 ? src.length : end;
      blank(i, stop);
      i = stop;
    } else if (c === "/" && next === "*") {
      const end = src.indexOf("*/", i + 2);
      const stop = end < 0 ? src.length : end + 2;
      blank(i, stop);
      i = stop;
    } else if (c === '"' || c === "'") {
      const start = i++;
      let value = "";
      while (i < src.length && src[i] !== c && src[i] !== "\n") {
        if (src[i] === "\\") {
          value += src[i + 1] ?? "";
          i += 2;
        } else value += src[i++];
      }
      i++;
      strings.push({ start, end: i, value, template: false, hasSubstitution: false, head: value });
    } else if (c === "`") {
      const token: StringToken = { start: i, end: i, value: "", template: true, hasSubstitution: false, head: "" };
      strings.push(token);
      i++;
      templateText(token);
    } else if (c === "{" && templates.length > 0) {
      templates[templates.length - 1].depth++;
      i++;
    } else if (c === "}" && templates.length > 0) {
      const top = templates[templates.length - 1];
      i++;
      if (top.depth === 0) {
        templates.pop();
        templateText(top.token);
      } else top.depth--;
    } else if (c === "/") {
      const prev = previousSignificant();
      const isRegex = prev.char === "" || REGEX_AFTER_PUNCT.has(prev.char) ||
        (prev.word !== "" && REGEX_AFTER_WORD.has(prev.word));
      if (!isRegex) {
        i++;
        continue;
      }
      const start = i++;
      let inClass = false;
      while (i < src.length && src[i] !== "\n") {
        const r = src[i];
        if (r === "\\") i += 2;
        else {
          i++;
          if (r === "[") inClass = true;
          else if (r === "]") inClass = false;
          else if (r === "/" && !inClass) break;
        }
      }
      while (i < src.length && /[a-z]/.test(src[i])) i++;
      blank(start, i);
    } else i++;
  }
  return { code: out.join(""), strings };
}

/** Every import-like reference in a TypeScript source, with its line. */
export function findImports(src: string): ImportRef[] {
  const { code, strings } = scan(src);
  const refs: ImportRef[] = [];
  const lineOf = (pos: number) => src.slice(0, pos).split("\n").length;
  for (const s of strings) {
    const before = code.slice(Math.max(0, s.start - 200), s.start);
    const after = code.slice(s.end, s.end + 200);
    const prefixOnly = s.hasSubstitution;
    let kind: ImportRef["kind"] | undefined;
    if (/(?:^|[^.\w$])from\s*$/.test(before) || /(?:^|[^.\w$])import\s*$/.test(before)) kind = "import";
    else if (/(?:^|[^.\w$])import\s*\(\s*$/.test(before)) kind = "dynamic import";
    else if (/(?:^|[^.\w$])new\s+URL\s*\(\s*$/.test(before) && /^\s*,\s*import\.meta\.url\b/.test(after)) {
      kind = "new URL";
    }
    const specifier = prefixOnly ? s.head : s.value;
    if (kind) refs.push({ line: lineOf(s.start), kind, specifier, prefixOnly });
  }
  return refs;
}

// ---- Rule ----

type Layer =
  | "ffi"
  | "core"
  | "devices"
  | "vmm/arch"
  | "vmm/kvm"
  | "vmm"
  | "test"
  | "bench"
  | "examples"
  | "entry"
  | "other";

/** The layer of a repository-relative path (files or, for template prefixes, directories). */
function layerOf(rel: string): Layer {
  const p = rel.replaceAll("\\", "/");
  if (p === "main.ts" || p === "mod.ts") return "entry";
  for (const layer of ["ffi", "core", "devices", "vmm/arch", "vmm/kvm", "test", "bench", "examples"] as const) {
    if (p === layer || p.startsWith(layer + "/")) return layer;
  }
  if (p === "vmm" || p.startsWith("vmm/")) return "vmm";
  return "other";
}

/** What each restricted layer may import. */
const ALLOWED: Partial<Record<Layer, Layer[]>> = {
  ffi: ["ffi"],
  core: ["core", "ffi"],
  devices: ["devices", "core", "ffi"],
  "vmm/arch": ["vmm/arch", "core", "ffi"],
  "vmm/kvm": ["vmm/kvm", "vmm/arch", "devices", "core", "ffi"],
  vmm: ["vmm", "vmm/kvm", "vmm/arch", "devices", "core", "ffi"],
};
/** What a unit test in a restricted layer may import besides its layer's allowance. */
const ALLOWED_TO_TESTS: Layer[] = ["test", "entry"];

const describeLayer = (
  l: Layer,
) => (l === "entry" ? "main.ts/mod.ts" : l === "other" ? "the repository root" : `${l}/`);

/** The import map of deno.json at `root` (bare name → target), empty when there is none. */
function importMap(root: string): Record<string, string> {
  try {
    return JSON.parse(Deno.readTextFileSync(join(root, "deno.json"))).imports ?? {};
  } catch {
    return {};
  }
}

/** Every .ts file under `root`, repository-relative, sorted. */
export function tsFiles(root: string): string[] {
  const files: string[] = [];
  const walk = (dir: string) => {
    for (const e of Deno.readDirSync(dir)) {
      if (e.isDirectory && !SKIPPED_DIRS.has(e.name)) walk(join(dir, e.name));
      else if (e.isFile && e.name.endsWith(".ts")) files.push(relative(root, join(dir, e.name)));
    }
  };
  walk(root);
  return files.sort();
}

/** Every import in the tree at `root` that breaks the rule, and how many references were checked. */
export function checkLayering(root: string): { violations: Violation[]; files: number; references: number } {
  const map = importMap(root);
  const files = tsFiles(root);
  const violations: Violation[] = [];
  let references = 0;
  for (const file of files) {
    const layer = layerOf(file);
    const allowed = ALLOWED[layer];
    const refs = findImports(Deno.readTextFileSync(join(root, file)));
    references += refs.length;
    if (!allowed) continue;
    const isTest = file.endsWith("_test.ts");
    const mayImport = isTest ? [...allowed, ...ALLOWED_TO_TESTS] : allowed;
    const rule = `${describeLayer(layer)} may import only ${allowed.map(describeLayer).join(", ")}` +
      (isTest ? " (and, from a test, test/ and main.ts/mod.ts)" : "");
    for (const ref of refs) {
      const spec = ref.specifier;
      const report = (target: string, reason: string) =>
        violations.push({ file, line: ref.line, specifier: spec, target, reason });
      let path: string;
      if (spec.startsWith("./") || spec.startsWith("../") || spec.startsWith("/") || spec.startsWith("file:")) {
        const abs = spec.startsWith("file:")
          ? fileURLToPath(spec)
          : resolve(dirname(join(root, file)), ref.prefixOnly ? spec.replace(/[^/]*$/, "") || "." : spec);
        path = relative(root, abs);
        if (path.startsWith("..") || resolve(root, path) !== abs) {
          report(abs, "leaves the repository");
          continue;
        }
      } else {
        const mapped = map[spec] ?? Object.entries(map).find(([k]) => k.endsWith("/") && spec.startsWith(k))?.[1];
        const target = mapped ?? spec;
        if (target.startsWith("node:") || target.startsWith("npm:")) continue;
        report(target, "is not a Node built-in or an npm: package");
        continue;
      }
      const target = layerOf(path);
      if (!mayImport.includes(target)) report(path, `${describeLayer(target)} is not allowed: ${rule}`);
    }
  }
  return { violations, files: files.length, references };
}

export function formatViolation(v: Violation): string {
  return `${v.file}:${v.line}: imports ${v.target} ("${v.specifier}"): ${v.reason}`;
}

// ---- Tests ----

Deno.test("layering: every import in the repository respects the layers", () => {
  const { violations, files, references } = checkLayering(ROOT);
  // Not vacuous: the walk saw the tree and its imports.
  assert.ok(files > 100, `only ${files} .ts files found under ${ROOT}`);
  assert.ok(references > 500, `only ${references} imports found`);
  if (violations.length > 0) {
    assert.fail(`${violations.length} imports break the layering:\n${violations.map(formatViolation).join("\n")}`);
  }
});

Deno.test("layering: the scanner finds each kind of import and ignores look-alikes in comments, strings, regexps", () => {
  const src = [
    `import { a } from "./a.ts";`, // 1
    `import type { B } from '../b.ts';`, // 2
    `export * from "./c.ts";`, // 3
    `export { d } from "./d.ts";`, // 4
    `import "./side_effect.ts";`, // 5
    `const m = await import("./dynamic.ts");`, // 6
    `const w = new URL("./worker.ts", import.meta.url);`, // 7
    `const t = new URL(\`./device/\${type}.ts\`, import.meta.url);`, // 8
    `// import { x } from "./commented.ts";`, // 9
    `/* export * from "./block_comment.ts"; */`, // 10
    `const s = 'import { y } from "./in_string.ts"';`, // 11
    `const re = /from "\\.\\/in_regex.ts"/;`, // 12
    `const u = new URL("./not_relative_to_module.ts", base);`, // 13
    `const half = 4 / 2; const also = x / 2 / "./divided.ts".length;`, // 14
    `const tpl = \`\${await import("./in_template.ts")} import "./template_text.ts"\`;`, // 15
    `type T = typeof import("./type_query.ts");`, // 16
    `import {`, // 17
    `  e,`, // 18
    `} from "./multi_line.ts";`, // 19
    `const arr = Array.from("./not_an_import.ts");`, // 20
  ].join("\n");
  const found = findImports(src).map((r) => `${r.line} ${r.kind} ${r.specifier}${r.prefixOnly ? " (prefix)" : ""}`);
  assert.deepEqual(found, [
    "1 import ./a.ts",
    "2 import ../b.ts",
    "3 import ./c.ts",
    "4 import ./d.ts",
    "5 import ./side_effect.ts",
    "6 dynamic import ./dynamic.ts",
    "7 new URL ./worker.ts",
    "8 new URL ./device/ (prefix)",
    "15 dynamic import ./in_template.ts",
    "16 dynamic import ./type_query.ts",
    "19 import ./multi_line.ts",
  ]);
});

Deno.test("layering: the checker reports each broken rule in a fake tree, and nothing that keeps it", () => {
  const root = Deno.makeTempDirSync({ prefix: "denovm-layering-" });
  try {
    const files: Record<string, string> = {
      "deno.json": JSON.stringify({ imports: { "fast-check": "npm:fast-check@3", "std": "jsr:@std/path" } }),
      "main.ts": `import { Machine } from "./vmm/machine.ts";\nimport { x } from "./test/t.ts";\n`,
      "mod.ts": `export * from "./vmm/machine.ts";\n`,
      "ffi/libc.ts": `import { a } from "./other.ts";\nimport { MiB } from "../core/units.ts";\n`,
      "ffi/other.ts": `import process from "node:process";\n`,
      "core/units.ts": `import { libc } from "../ffi/libc.ts";\nimport { LAYOUT } from "../vmm/arch/layout.ts";\n`,
      "core/memory.ts": `// import { x } from "../vmm/machine.ts";\nconst s = "from '../vmm/machine.ts'";\n` +
        `export { Machine } from "../mod.ts";\n`,
      "devices/serial.ts": `import { Bus } from "../core/units.ts";\nimport fc from "fast-check";\n` +
        `const w = new URL("../vmm/worker.ts", import.meta.url);\nawait import("../test/support/rig.ts");\n`,
      "devices/serial_test.ts": `import { rig } from "../test/support/rig.ts";\nimport "../main.ts";\n` +
        `import { parse } from "../vmm/cli/parse.ts";\nimport { join } from "std";\n` +
        `import { b } from "../bench/run.ts";\n`,
      "vmm/arch/layout.ts":
        `import { Serial } from "../../devices/serial.ts";\nimport { K } from "../../core/units.ts";\n` +
        `import type { Vm } from "../kvm/vm.ts";\n`,
      "vmm/machine.ts": `import { Serial } from "../devices/serial.ts";\nimport { L } from "./arch/layout.ts";\n` +
        `import { x } from "../examples/demo.ts";\nimport { y } from "../../outside.ts";\n` +
        `const d = new URL(\`./device/\${t}.ts\`, import.meta.url);\n`,
      "vmm/cli/parse.ts": `import { Machine } from "../machine.ts";\n`,
      "vmm/kvm/vcpu.ts": `import { Serial } from "../../devices/serial.ts";\nimport { L } from "../arch/layout.ts";\n` +
        `import { m } from "../device_manager/mmio.ts";\n`,
      "test/t.ts": `import { Machine } from "../vmm/machine.ts";\nimport x from "https://example.com/x.ts";\n`,
      "bench/run.ts": `import { m } from "../mod.ts";\n`,
      ".cache/skipped.ts": `import { m } from "../vmm/machine.ts";\n`,
    };
    for (const [path, text] of Object.entries(files)) {
      Deno.mkdirSync(dirname(join(root, path)), { recursive: true });
      Deno.writeTextFileSync(join(root, path), text);
    }
    const { violations, files: count } = checkLayering(root);
    assert.equal(count, Object.keys(files).filter((f) => f.endsWith(".ts") && !f.startsWith(".cache/")).length);
    assert.deepEqual(violations.map((v) => `${v.file}:${v.line} ${v.target}`), [
      "core/memory.ts:3 mod.ts",
      "core/units.ts:2 vmm/arch/layout.ts",
      "devices/serial.ts:3 vmm/worker.ts",
      "devices/serial.ts:4 test/support/rig.ts",
      "devices/serial_test.ts:3 vmm/cli/parse.ts",
      "devices/serial_test.ts:4 jsr:@std/path",
      "devices/serial_test.ts:5 bench/run.ts",
      "ffi/libc.ts:2 core/units.ts",
      "vmm/arch/layout.ts:1 devices/serial.ts",
      "vmm/arch/layout.ts:3 vmm/kvm/vm.ts",
      "vmm/kvm/vcpu.ts:3 vmm/device_manager/mmio.ts",
      "vmm/machine.ts:3 examples/demo.ts",
      `vmm/machine.ts:4 ${resolve(root, "../outside.ts")}`,
    ]);
    const line = formatViolation(violations.find((v) => v.file === "vmm/arch/layout.ts")!);
    assert.equal(
      line,
      `vmm/arch/layout.ts:1: imports devices/serial.ts ("../../devices/serial.ts"): devices/ is not allowed: ` +
        `vmm/arch/ may import only vmm/arch/, core/, ffi/`,
    );
  } finally {
    Deno.removeSync(root, { recursive: true });
  }
});

// crosvm's key=value option syntax (the serde_keyvalue crate in google/crosvm), parsed in two steps:
//  1. `parseKeyValues(text)` turns the text into entries without knowing the option: comma-separated
//     `key=value` or bare items; values may be quoted ("a,b" with backslash escapes, 'a,b' without),
//     bracketed lists ([1,2] or [[k=v],[k=v]]) or enum variants with arguments (windowed[1280,720],
//     multi-touch[path=p,width=800]). A key is an identifier (letters, digits, `_`, `-`) directly followed
//     by `=`; an unquoted value runs to the next `,`, `[` or `]`, so it may itself contain `=`
//     (`path=a=b.img`, or a first item `/tmp/a=b.img`), as in serde_keyvalue's any_string.
//  2. `decodeKeyValues(schema, entries)` checks them against an option's schema: the first item may omit
//     its key (the schema's positional key) unless it is the name of one of the option's keys, which is
//     then a flag (`ro,path=disk.img`), as serde_keyvalue's deserialize_struct decides; a bare key means
//     true; unknown and repeated keys are errors. Keys crosvm has and denovm does not act on (the table
//     in help.ts) are accepted with one warning, or refused as known but unsupported.

import { UsageError } from "../../core/exit.ts";
export { UsageError };

export type KvValue =
  | { kind: "scalar"; text: string; quoted: boolean }
  | { kind: "list"; items: KvEntry[] }
  | { kind: "variant"; name: string; items: KvEntry[] };

/** `key=value` has both; a bare item (`ro`, `disk.img`, `[..]`, `windowed[..]`) has only `value`. */
export interface KvEntry {
  key?: string;
  value: KvValue;
}

/** Characters that end an unquoted value (serde_keyvalue any_string). */
const VALUE_END = ",[]";
/** An identifier directly followed by "=" (serde_keyvalue any_identifier). */
const KEY_AHEAD = /^[A-Za-z0-9_][A-Za-z0-9_-]*=/;

class Scanner {
  pos = 0;
  constructor(readonly text: string, readonly where: string) {}
  peek(): string | undefined {
    return this.text[this.pos];
  }
  fail(what: string): never {
    throw new UsageError(`${this.where}: ${what} at character ${this.pos + 1} of "${this.text}"`);
  }
  /**
   * A double-quoted string (backslash escapes the next character), a single-quoted one (no escapes), or a
   * run of characters up to the next `,`, `[` or `]`.
   */
  token(): { text: string; quoted: boolean } {
    if (this.peek() === "'") {
      const end = this.text.indexOf("'", this.pos + 1);
      if (end < 0) this.fail("unterminated quoted string");
      const text = this.text.slice(this.pos + 1, end);
      this.pos = end + 1;
      return { text, quoted: true };
    }
    if (this.peek() === '"') {
      this.pos++;
      let out = "";
      for (;;) {
        const c = this.text[this.pos++];
        if (c === undefined) this.fail("unterminated quoted string");
        if (c === '"') return { text: out, quoted: true };
        if (c === "\\") {
          const n = this.text[this.pos++];
          if (n === undefined) this.fail("unterminated quoted string");
          out += n;
        } else out += c;
      }
    }
    const start = this.pos;
    while (this.pos < this.text.length && !VALUE_END.includes(this.text[this.pos])) this.pos++;
    return { text: this.text.slice(start, this.pos), quoted: false };
  }
  /** Entries up to the end of text (closing undefined) or up to and including a `]`. */
  entries(closing: "]" | undefined): KvEntry[] {
    const out: KvEntry[] = [];
    if (closing && this.peek() === "]") {
      this.pos++;
      return out;
    }
    for (;;) {
      out.push(this.entry());
      const c = this.peek();
      if (c === ",") {
        this.pos++;
        continue;
      }
      if (c === undefined) {
        if (closing) this.fail(`missing "${closing}"`);
        return out;
      }
      if (c === "]" && closing) {
        this.pos++;
        return out;
      }
      this.fail(`unexpected "${c}"`);
    }
  }
  entry(): KvEntry {
    if (this.peek() === "[") {
      this.pos++;
      return { value: { kind: "list", items: this.entries("]") } };
    }
    const key = KEY_AHEAD.exec(this.text.slice(this.pos));
    if (key) {
      this.pos += key[0].length;
      return { key: key[0].slice(0, -1), value: this.value() };
    }
    if (this.peek() === "=") this.fail("missing key");
    const tok = this.token();
    if (tok.text === "" && !tok.quoted) this.fail("empty item");
    if (this.peek() === "[" && !tok.quoted) {
      this.pos++;
      return { value: { kind: "variant", name: tok.text, items: this.entries("]") } };
    }
    return { value: { kind: "scalar", ...tok } };
  }
  value(): KvValue {
    if (this.peek() === "[") {
      this.pos++;
      return { kind: "list", items: this.entries("]") };
    }
    const tok = this.token();
    if (tok.text === "" && !tok.quoted) this.fail("missing value");
    if (this.peek() === "[" && !tok.quoted) {
      this.pos++;
      return { kind: "variant", name: tok.text, items: this.entries("]") };
    }
    return { kind: "scalar", ...tok };
  }
}

/** Parses crosvm key=value text; `where` names the option in error messages (e.g. "--block"). */
export function parseKeyValues(text: string, where: string): KvEntry[] {
  if (text === "") throw new UsageError(`${where}: empty value`);
  return new Scanner(text, where).entries(undefined);
}

// ---- Value decoders ----

function describe(v: KvValue): string {
  switch (v.kind) {
    case "scalar":
      return `"${v.text}"`;
    case "list":
      return "a [...] list";
    case "variant":
      return `"${v.name}[...]"`;
  }
}

export function asString(v: KvValue, where: string): string {
  if (v.kind !== "scalar") throw new UsageError(`${where}: expected a string, got ${describe(v)}`);
  return v.text;
}

export function asBool(v: KvValue, where: string): boolean {
  const s = asString(v, where);
  if (s === "true") return true;
  if (s === "false") return false;
  throw new UsageError(`${where}: expected true or false, got "${s}"`);
}

/** A non-negative integer, decimal or 0x hex, within `min..max`. */
export function parseUint(s: string, where: string, min = 0, max = Number.MAX_SAFE_INTEGER): number {
  const n = /^0x[0-9a-f]+$/i.test(s) ? Number.parseInt(s.slice(2), 16) : /^[0-9]+$/.test(s) ? Number(s) : NaN;
  if (!Number.isSafeInteger(n)) throw new UsageError(`${where}: "${s}" is not a valid number`);
  if (n < min || n > max) {
    throw new UsageError(`${where}: ${n} is out of range (${min}..${max === Number.MAX_SAFE_INTEGER ? "" : max})`);
  }
  return n;
}

export function asUint(v: KvValue, where: string, min?: number, max?: number): number {
  return parseUint(asString(v, where), where, min, max);
}

/** Binary size suffixes accepted by `parseSize` (K = 2^10 ... T = 2^40). */
const SIZE_SUFFIX: Record<string, number> = { k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 };

/** A byte count: a number as `parseUint` takes it, or a decimal number with a K/M/G/T (binary) suffix. */
export function parseSize(s: string, where: string): number {
  const m = /^([0-9]+)([kmgt])(i?b)?$/i.exec(s);
  if (!m) return parseUint(s, where);
  const n = Number(m[1]) * SIZE_SUFFIX[m[2].toLowerCase()];
  if (!Number.isSafeInteger(n)) throw new UsageError(`${where}: "${s}" is too large`);
  return n;
}

export function asSize(v: KvValue, where: string): number {
  return parseSize(asString(v, where), where);
}

/** A [a,b,...] list of bare scalars, e.g. dpi=[320,320]. */
export function asScalarList(v: KvValue, where: string): string[] {
  if (v.kind !== "list") throw new UsageError(`${where}: expected a [...] list, got ${describe(v)}`);
  return v.items.map((e) => {
    if (e.key !== undefined) throw new UsageError(`${where}: unexpected "${e.key}=" inside the list`);
    return asString(e.value, where);
  });
}

// ---- Schemas ----

export type KeyType =
  | "string"
  | "bool"
  | "uint"
  | "size"
  | { enum: readonly string[] }
  | { decode: (v: KvValue, where: string) => unknown };

/**
 * A key crosvm has that denovm does not act on: "ignore" accepts it with one warning line saying what it
 * means here, "refuse" stops with one line naming it as a known but unsupported crosvm key (exit 35).
 */
export interface CrosvmOnlyKey {
  action: "ignore" | "refuse";
  /** What the key means for denovm, e.g. "denovm's devices are virtio-mmio: there is no PCI address". */
  note: string;
  /** How its value is checked (crosvm's type); default: any value. */
  type?: KeyType;
}

export interface KvSchema {
  /** Option name for messages, e.g. "--block" or "--gpu displays". */
  option: string;
  /** Key that a first item without "key=" gives a value to (crosvm: the struct's first field). */
  positional?: string;
  keys: Record<string, KeyType>;
  /** Other accepted spellings (crosvm serde aliases), e.g. block_size → block-size. */
  aliases?: Record<string, string>;
  /** crosvm's keys that denovm accepts with a warning or refuses by name (help.ts crosvmOnlyKeys). */
  crosvmOnly?: Record<string, CrosvmOnlyKey>;
}

// ---- Warnings ----

let warningSink: string[] | undefined;

/** One warning line: collected by `collectWarnings` while it runs, else printed on stderr at once. */
export function warn(message: string): void {
  if (warningSink) warningSink.push(message);
  else console.error(`denovm: warning: ${message}`);
}

/** Runs `f` (synchronous), gathering the warnings it gives instead of printing them. */
export function collectWarnings<T>(f: () => T): { value: T; warnings: string[] } {
  const outer = warningSink;
  const warnings: string[] = [];
  warningSink = warnings;
  try {
    return { value: f(), warnings };
  } finally {
    warningSink = outer;
  }
}

/** What `schema.crosvmOnly[key]` asks for: a warning, or a UsageError. */
function crosvmOnlyKey(schema: KvSchema, key: string, known: CrosvmOnlyKey, v: KvValue): void {
  const where = `${schema.option} ${key}`;
  if (known.type !== undefined) decodeValue(known.type, v, where);
  if (known.action === "refuse") throw new UsageError(`${where}: a crosvm key denovm does not support: ${known.note}`);
  warn(`${where}: ${known.note}; ignored`);
}

function decodeValue(type: KeyType, v: KvValue, where: string): unknown {
  if (type === "string") return asString(v, where);
  if (type === "bool") return asBool(v, where);
  if (type === "uint") return asUint(v, where);
  if (type === "size") return asSize(v, where);
  if ("enum" in type) {
    const s = asString(v, where);
    if (!type.enum.includes(s)) throw new UsageError(`${where}: "${s}" is not one of ${type.enum.join(", ")}`);
    return s;
  }
  return type.decode(v, where);
}

const TRUE: KvValue = { kind: "scalar", text: "true", quoted: false };

/**
 * Checks `entries` against `schema`; returns the given keys (canonical names) with decoded values.
 * Keys that were not given are absent: the caller applies defaults.
 */
export function decodeKeyValues(schema: KvSchema, entries: KvEntry[]): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  const seen = new Set<string>();
  const canonicalOf = (key: string) => schema.aliases?.[key] ?? key;
  const isKey = (key: string) => {
    const k = canonicalOf(key);
    return schema.keys[k] !== undefined || schema.crosvmOnly?.[k] !== undefined;
  };
  const put = (key: string, v: KvValue, flag = false) => {
    const canonical = canonicalOf(key);
    if (seen.has(canonical)) throw new UsageError(`${schema.option}: key "${canonical}" given twice`);
    seen.add(canonical);
    const known = schema.crosvmOnly?.[canonical];
    if (known && schema.keys[canonical] === undefined) return crosvmOnlyKey(schema, canonical, known, v);
    const type = schema.keys[canonical];
    if (type === undefined) throw new UsageError(`${schema.option}: unknown key "${key}"`);
    if (flag && type !== "bool") throw new UsageError(`${schema.option}: key "${canonical}" needs a value`);
    out[canonical] = decodeValue(type, v, `${schema.option} ${canonical}`);
  };
  entries.forEach((e, i) => {
    if (e.key !== undefined) return put(e.key, e.value);
    const v = e.value;
    // A bare word that names one of the option's keys is that key as a flag (`ro`, `console`, `egl`), even
    // in first place (`ro,path=disk.img`); any other first item is the positional key's value.
    if (v.kind === "scalar" && !v.quoted && isKey(v.text)) return put(v.text, TRUE, true);
    if (i === 0 && schema.positional !== undefined) return put(schema.positional, v);
    if (v.kind === "scalar") throw new UsageError(`${schema.option}: unknown key "${v.text}"`);
    throw new UsageError(`${schema.option}: unexpected ${describe(v)}`);
  });
  return out;
}

/** `parseKeyValues` then `decodeKeyValues`. */
export function parseOption(schema: KvSchema, text: string): Record<string, unknown> {
  return decodeKeyValues(schema, parseKeyValues(text, schema.option));
}

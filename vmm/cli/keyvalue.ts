// crosvm's key=value option syntax (the serde_keyvalue crate in google/crosvm), parsed in two steps:
//  1. `parseKeyValues(text)` turns the text into entries without knowing the option: comma-separated
//     `key=value` or bare items; values may be quoted ("a,b"), bracketed lists ([1,2] or [[k=v],[k=v]])
//     or enum variants with arguments (windowed[1280,720], multi-touch[path=p,width=800]).
//  2. `decodeKeyValues(schema, entries)` checks them against an option's schema: the first item may omit
//     its key (the schema's positional key), a bare key means true, unknown and repeated keys are errors.

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

const SEPARATORS = ",=[]";

class Scanner {
  pos = 0;
  constructor(readonly text: string, readonly where: string) {}
  peek(): string | undefined {
    return this.text[this.pos];
  }
  fail(what: string): never {
    throw new UsageError(`${this.where}: ${what} at character ${this.pos + 1} of "${this.text}"`);
  }
  /** A quoted string (backslash escapes the next character) or a run of non-separator characters. */
  token(): { text: string; quoted: boolean } {
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
    while (this.pos < this.text.length && !SEPARATORS.includes(this.text[this.pos])) this.pos++;
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
    const tok = this.token();
    if (tok.text === "" && !tok.quoted) this.fail("empty item");
    if (this.peek() === "=") {
      if (tok.quoted) this.fail("a key cannot be quoted");
      this.pos++;
      return { key: tok.text, value: this.value() };
    }
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

export interface KvSchema {
  /** Option name for messages, e.g. "--block" or "--gpu displays". */
  option: string;
  /** Key that a first item without "key=" gives a value to (crosvm: the struct's first field). */
  positional?: string;
  keys: Record<string, KeyType>;
  /** Other accepted spellings (crosvm serde aliases), e.g. block_size → block-size. */
  aliases?: Record<string, string>;
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

/**
 * Checks `entries` against `schema`; returns the given keys (canonical names) with decoded values.
 * Keys that were not given are absent: the caller applies defaults.
 */
export function decodeKeyValues(schema: KvSchema, entries: KvEntry[]): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  const put = (key: string, v: KvValue) => {
    const canonical = schema.aliases?.[key] ?? key;
    const type = schema.keys[canonical];
    if (type === undefined) throw new UsageError(`${schema.option}: unknown key "${key}"`);
    if (Object.hasOwn(out, canonical)) throw new UsageError(`${schema.option}: key "${canonical}" given twice`);
    out[canonical] = decodeValue(type, v, `${schema.option} ${canonical}`);
  };
  entries.forEach((e, i) => {
    if (e.key !== undefined) return put(e.key, e.value);
    const v = e.value;
    // A bare word that names a boolean key is that flag (`ro`, `console`, `egl`) unless it stands first and
    // can only be the positional value (a path, a number, a string).
    if (v.kind === "scalar" && !v.quoted) {
      const canonical = schema.aliases?.[v.text] ?? v.text;
      const isFlag = schema.keys[canonical] === "bool";
      const posType = schema.positional !== undefined ? schema.keys[schema.positional] : undefined;
      const positionalAccepts = posType !== undefined &&
        (typeof posType !== "object" || !("enum" in posType) || posType.enum.includes(v.text));
      if (isFlag && !(i === 0 && positionalAccepts)) {
        return put(v.text, { kind: "scalar", text: "true", quoted: false });
      }
    }
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

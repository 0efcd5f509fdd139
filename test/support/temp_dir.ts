// A temporary directory for the length of one test step.

/** `fn` with a new temporary directory (its name starting with `prefix`), removed with all in it after. */
export async function withTempDir<T>(prefix: string, fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await Deno.makeTempDir({ prefix });
  try {
    return await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

// A hang guard for tests: a promise that must settle within a time limit.

/** `p`, or a rejection naming `what()` when it has not settled after `ms`. */
export async function within<T>(p: Promise<T>, what: () => string, ms: number): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const guard = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out: ${what()}`)), ms);
  });
  try {
    return await Promise.race([p, guard]);
  } finally {
    clearTimeout(timer);
  }
}

// The web display's HTTP side and its access token. Every request needs the per-VM token, as the query
// parameter `token` or as the cookie that the page load with the token sets; anything else gets 403.
// Routes: `/` the page (GET, HEAD), `/ws?scanout=N` the page's WebSocket, which also has to come from this
// server's own origin (a page elsewhere could otherwise open it with the cookie). The token is compared in
// time that does not depend on where it differs.

import type { IncomingMessage, ServerResponse } from "node:http";
import { pageHtml } from "./page.ts";

const TOKEN_BYTES = 16;
const TOKEN_PATTERN = /^[0-9A-Za-z_-]{16,128}$/;

const enc = new TextEncoder();

/** Compare a presented token with the secret in time independent of where they differ. */
export function tokenMatches(presented: string | null | undefined, secret: string): boolean {
  const a = enc.encode(presented ?? ""), b = enc.encode(secret);
  let diff = a.length ^ b.length;
  for (let i = 0; i < b.length; i++) diff |= (i < a.length ? a[i] : 0) ^ b[i];
  return diff === 0;
}

export function randomToken(): string {
  const b = crypto.getRandomValues(new Uint8Array(TOKEN_BYTES));
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

/** The token to use: `given` if it is 16..128 of [0-9A-Za-z_-], a random one if none is given. */
export function checkedToken(given: string | undefined): string {
  const token = given ?? randomToken();
  if (!TOKEN_PATTERN.test(token)) throw new Error("web display: token must be 16..128 of [0-9A-Za-z_-]");
  return token;
}

function cookieValue(header: string | null, name: string): string | null {
  if (!header) return null;
  for (const part of header.split(";")) {
    const eq = part.indexOf("=");
    if (eq > 0 && part.slice(0, eq).trim() === name) return part.slice(eq + 1).trim();
  }
  return null;
}

/** Whether a peer address is this machine's loopback (127.0.0.0/8, ::1, ::ffff:127.x.y.z). */
export function isLoopback(hostname: string): boolean {
  const h = hostname.toLowerCase().replace(/^\[|\]$/g, "");
  return h === "::1" || /^(::ffff:)?127\.\d+\.\d+\.\d+$/.test(h);
}

/** Who this server is once it listens: its origin, the page's address and the token cookie's name. */
export class Site {
  readonly origin: string;
  readonly url: string;
  readonly cookieName: string;

  constructor(readonly token: string, addr: Deno.NetAddr) {
    const host = addr.hostname.includes(":") ? `[${addr.hostname}]` : addr.hostname;
    this.origin = `http://${host}:${addr.port}`;
    // Cookies are per host, not per port: name it after the port so two VMs' pages don't clash.
    this.cookieName = `denovm_token_${addr.port}`;
    this.url = `${this.origin}/?token=${token}`;
  }

  /** How the request proves it knows the token (a query token wins over the cookie), or null. */
  #authorized(req: Request, url: URL): "query" | "cookie" | null {
    const q = url.searchParams.get("token");
    if (q !== null) return tokenMatches(q, this.token) ? "query" : null;
    return tokenMatches(cookieValue(req.headers.get("cookie"), this.cookieName), this.token) ? "cookie" : null;
  }

  /**
   * Where a request goes: refused (no token, or a WebSocket from another origin), a WebSocket for a scanout
   * (below `scanouts`), or a finished response (the page, 404, 426).
   */
  route(
    req: Request,
    scanouts: number,
  ): { kind: "refused" } | { kind: "socket"; scanout: number } | { kind: "response"; response: Response } {
    const url = new URL(req.url);
    const how = this.#authorized(req, url);
    if (!how) return { kind: "refused" };
    if (url.pathname === "/ws") {
      // A page from another origin could open our socket with the cookie: only our own page may.
      const origin = req.headers.get("origin");
      if (origin !== null && origin !== this.origin && origin !== `http://${req.headers.get("host")}`) {
        return { kind: "refused" };
      }
      if (req.headers.get("upgrade")?.toLowerCase() !== "websocket") {
        return { kind: "response", response: new Response("WebSocket expected\n", { status: 426 }) };
      }
      const scanout = Number(url.searchParams.get("scanout") ?? "0");
      if (!Number.isInteger(scanout) || scanout < 0 || scanout >= scanouts) {
        const response = new Response(`no scanout ${url.searchParams.get("scanout")}\n`, { status: 404 });
        return { kind: "response", response };
      }
      return { kind: "socket", scanout };
    }
    if (url.pathname !== "/" || (req.method !== "GET" && req.method !== "HEAD")) {
      return { kind: "response", response: new Response("not found\n", { status: 404 }) };
    }
    return { kind: "response", response: this.#page(req, how) };
  }

  /** The page; a load with the token in the query sets the cookie that later requests use. */
  #page(req: Request, how: "query" | "cookie"): Response {
    const headers = new Headers({
      "content-type": "text/html; charset=utf-8",
      "cache-control": "no-store",
      "referrer-policy": "no-referrer",
      "x-content-type-options": "nosniff",
      "x-frame-options": "DENY",
      // Everything is inline and served from here: no CDN, no other origin.
      "content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; " +
        "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    });
    if (how === "query") {
      headers.set("set-cookie", `${this.cookieName}=${this.token}; Path=/; HttpOnly; SameSite=Strict`);
    }
    return new Response(req.method === "HEAD" ? null : pageHtml(), { status: 200, headers });
  }
}

/** The answer to a refused request. */
export function refusedResponse(): Response {
  return new Response("403 forbidden: this display needs its token (?token=...)\n", {
    status: 403,
    headers: { "content-type": "text/plain; charset=utf-8", "cache-control": "no-store" },
  });
}

// ---- node:http glue ----

/** The longest request head (request line and header fields) node:http reads; a longer one gets 431. */
export const MAX_REQUEST_HEAD_BYTES = 16 * 1024;

/** The reason phrases this server uses on a connection it answers itself (RFC 9110 section 15). */
const REASONS: Record<number, string> = {
  200: "OK",
  400: "Bad Request",
  403: "Forbidden",
  404: "Not Found",
  405: "Method Not Allowed",
  426: "Upgrade Required",
  431: "Request Header Fields Too Large",
  503: "Service Unavailable",
};

/** A node:http request as a Request on `origin` (this server's), or the status that refuses it. */
export function requestFrom(req: IncomingMessage, origin: string): Request | number {
  // Only origin-form targets (RFC 9112 section 3.2.1): a path, not a URL of some other host.
  if (!req.url?.startsWith("/") || req.url.startsWith("//")) return 400;
  const headers = new Headers();
  const raw = req.rawHeaders;
  try {
    for (let i = 0; i + 1 < raw.length; i += 2) headers.append(raw[i], raw[i + 1]);
  } catch {
    return 400;
  }
  try {
    return new Request(origin + req.url, { method: req.method, headers });
  } catch {
    // A method Request does not take (CONNECT, TRACE), or a target that is not a URL path.
    return 405;
  }
}

/** Send `response` on `res`; the connection ends after it (every response here is the last on its connection). */
export async function sendResponse(res: ServerResponse, response: Response, head = false): Promise<void> {
  const body = head ? new Uint8Array(0) : new Uint8Array(await response.arrayBuffer());
  const headers: Record<string, string> = Object.fromEntries(response.headers);
  if (!head) headers["content-length"] = String(body.length);
  headers["connection"] = "close";
  res.writeHead(response.status, headers);
  res.end(body);
}

/**
 * `response` as bytes for a connection this server answers without node:http (an upgrade request it does
 * not upgrade, a request head it could not read), to be written before the connection is ended.
 */
export async function responseBytes(response: Response): Promise<Uint8Array> {
  const body = new Uint8Array(await response.arrayBuffer());
  let text = `HTTP/1.1 ${response.status} ${REASONS[response.status] ?? response.statusText}\r\n`;
  for (const [k, v] of response.headers) text += `${k}: ${v}\r\n`;
  text += `content-length: ${body.length}\r\nconnection: close\r\n\r\n`;
  const out = new Uint8Array(text.length + body.length);
  // Header bytes are ISO-8859-1 (RFC 9110 section 5.5): one byte per char.
  for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i) & 0xff;
  out.set(body, text.length);
  return out;
}

/** A plain-text response. */
export function textResponse(status: number, text: string, headers: Record<string, string> = {}): Response {
  return new Response(text, {
    status,
    headers: { "content-type": "text/plain; charset=utf-8", "cache-control": "no-store", ...headers },
  });
}

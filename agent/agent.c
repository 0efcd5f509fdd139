/*
 * denovm-agent: the guest side of `vm.exec`. Serves framed requests on a byte
 * stream (a virtio-console named port, or one vsock connection at a time) and
 * runs commands for the host. The protocol is described in agent/README.md.
 *
 * Build: gcc -static -O2 -Wall -o denovm-agent agent.c
 * Usage: denovm-agent [--port NAME|/dev/PATH] [--vsock PORT] [--stdio]
 *
 * Single-threaded: one poll() loop over the transport, the pipes of the
 * running commands and a signalfd for SIGCHLD. Input from the host is hostile:
 * a malformed frame gets an error frame and is skipped, never a crash.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

/* ---- Protocol constants (agent/README.md, "Frames") ---- */
#define PROTOCOL_VERSION 1
/* Every frame starts with these 4 bytes: "dvma". */
static const unsigned char FRAME_MAGIC[4] = {'d', 'v', 'm', 'a'};
/* magic (4) + header length (u32 LE) + payload length (u32 LE) */
#define FRAME_PREFIX 12
#define MAX_HEADER (64 * 1024)
/* Largest request payload (stdin) accepted. */
#define MAX_REQUEST_PAYLOAD (16 * 1024 * 1024)
/* stdout and stderr are each kept up to this many bytes; the rest is counted and dropped. */
#define MAX_OUTPUT (16 * 1024 * 1024)
#define MAX_JOBS 64
/* timeout_ms values at or above this (over 31 years) mean no timeout. */
#define MAX_TIMEOUT_MS 1e12
#define MAX_ARGV 1024
/* After the command exits, its pipes may stay open in background children: wait this long for EOF. */
#define EXIT_DRAIN_MS 200
#define DEFAULT_PORT_NAME "org.denovm.agent"
#define PORT_RETRY_MS 100

/* ---- Small helpers ---- */

/* One log line, written with a single write(2) so other console output cannot split it. */
static void logf_(const char *fmt, ...) {
  char line[512];
  int n = snprintf(line, sizeof line, "denovm-agent: ");
  va_list ap;
  va_start(ap, fmt);
  int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
  va_end(ap);
  if (m < 0) m = 0;
  size_t len = (size_t)n + ((size_t)m < sizeof line - (size_t)n - 1 ? (size_t)m : sizeof line - (size_t)n - 2);
  line[len++] = '\n';
  ssize_t w = write(2, line, len);
  (void)w;
}

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

typedef struct {
  unsigned char *data;
  size_t len, cap;
} buf_t;

static void buf_reserve(buf_t *b, size_t extra) {
  if (b->len + extra <= b->cap) return;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < b->len + extra) cap *= 2;
  unsigned char *d = realloc(b->data, cap);
  if (!d) {
    logf_("out of memory");
    exit(1);
  }
  b->data = d;
  b->cap = cap;
}

static void buf_add(buf_t *b, const void *p, size_t n) {
  buf_reserve(b, n);
  memcpy(b->data + b->len, p, n);
  b->len += n;
}

static void buf_str(buf_t *b, const char *s) { buf_add(b, s, strlen(s)); }

static void buf_fmt(buf_t *b, const char *fmt, ...) {
  char tmp[256];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
  va_end(ap);
  if (n > 0) buf_add(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

/* Drop the first n bytes. */
static void buf_consume(buf_t *b, size_t n) {
  memmove(b->data, b->data + n, b->len - n);
  b->len -= n;
}

static void buf_free(buf_t *b) {
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}

/* Length of the valid UTF-8 sequence at s[0..n) (RFC 3629 section 4), or 0 when it is not one. */
static size_t utf8_valid_len(const unsigned char *s, size_t n) {
  unsigned c = s[0];
  size_t len;
  unsigned min, cp;
  if (c < 0x80) return 1;
  if (c >= 0xc2 && c <= 0xdf) len = 2, min = 0x80, cp = c & 0x1f;
  else if (c >= 0xe0 && c <= 0xef) len = 3, min = 0x800, cp = c & 0x0f;
  else if (c >= 0xf0 && c <= 0xf4) len = 4, min = 0x10000, cp = c & 0x07;
  else return 0;
  if (n < len) return 0;
  for (size_t i = 1; i < len; i++) {
    if ((s[i] & 0xc0) != 0x80) return 0;
    cp = (cp << 6) | (s[i] & 0x3f);
  }
  if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
  return len;
}

/*
 * A JSON string literal (RFC 8259 section 7) with control characters escaped and bytes that
 * are not UTF-8 replaced by U+FFFD, so every header the agent writes is valid JSON text.
 */
static void buf_json_str(buf_t *b, const char *s, size_t n) {
  const unsigned char *u = (const unsigned char *)s;
  buf_str(b, "\"");
  for (size_t i = 0; i < n;) {
    unsigned char c = u[i];
    size_t len = utf8_valid_len(u + i, n - i);
    if (len == 0) {
      buf_str(b, "\\ufffd");
      i++;
      continue;
    }
    if (c == '"' || c == '\\') {
      char e[2] = {'\\', (char)c};
      buf_add(b, e, 2);
    } else if (c < 0x20 || c == 0x7f) {
      buf_fmt(b, "\\u%04x", c);
    } else {
      buf_add(b, u + i, len);
    }
    i += len;
  }
  buf_str(b, "\"");
}

static void put_u32le(unsigned char *p, uint32_t v) {
  p[0] = v & 0xff;
  p[1] = (v >> 8) & 0xff;
  p[2] = (v >> 16) & 0xff;
  p[3] = (v >> 24) & 0xff;
}

static uint32_t get_u32le(const unsigned char *p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* ---- Minimal JSON reader: one object of scalars and arrays of strings ---- */

typedef struct {
  const char *p, *end;
  const char *err;
} json_t;

static void js_ws(json_t *j) {
  while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r')) j->p++;
}

static int js_fail(json_t *j, const char *why) {
  if (!j->err) j->err = why;
  return -1;
}

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

static int js_hex4(json_t *j, unsigned *out) {
  if (j->end - j->p < 4) return js_fail(j, "short \\u escape");
  unsigned v = 0;
  for (int i = 0; i < 4; i++) {
    int h = hexval(j->p[i]);
    if (h < 0) return js_fail(j, "bad \\u escape");
    v = v * 16 + (unsigned)h;
  }
  j->p += 4;
  *out = v;
  return 0;
}

static void utf8_put(buf_t *b, unsigned cp) {
  unsigned char o[4];
  size_t n;
  if (cp < 0x80) {
    o[0] = cp, n = 1;
  } else if (cp < 0x800) {
    o[0] = 0xc0 | (cp >> 6), o[1] = 0x80 | (cp & 0x3f), n = 2;
  } else if (cp < 0x10000) {
    o[0] = 0xe0 | (cp >> 12), o[1] = 0x80 | ((cp >> 6) & 0x3f), o[2] = 0x80 | (cp & 0x3f), n = 3;
  } else {
    o[0] = 0xf0 | (cp >> 18), o[1] = 0x80 | ((cp >> 12) & 0x3f), o[2] = 0x80 | ((cp >> 6) & 0x3f);
    o[3] = 0x80 | (cp & 0x3f), n = 4;
  }
  buf_add(b, o, n);
}

/* Parse a string; *out is malloc'd and NUL-terminated (NUL bytes inside are rejected). */
static int js_string(json_t *j, char **out) {
  js_ws(j);
  if (j->p >= j->end || *j->p != '"') return js_fail(j, "expected a string");
  j->p++;
  buf_t b = {0};
  while (j->p < j->end && *j->p != '"') {
    unsigned char c = (unsigned char)*j->p++;
    if (c < 0x20) {
      buf_free(&b);
      return js_fail(j, "control character in string");
    }
    if (c != '\\') {
      buf_add(&b, &c, 1);
      continue;
    }
    if (j->p >= j->end) break;
    char e = *j->p++;
    unsigned cp;
    switch (e) {
      case '"': case '\\': case '/': buf_add(&b, &e, 1); break;
      case 'b': buf_add(&b, "\b", 1); break;
      case 'f': buf_add(&b, "\f", 1); break;
      case 'n': buf_add(&b, "\n", 1); break;
      case 'r': buf_add(&b, "\r", 1); break;
      case 't': buf_add(&b, "\t", 1); break;
      case 'u':
        if (js_hex4(j, &cp) < 0) {
          buf_free(&b);
          return -1;
        }
        if (cp >= 0xd800 && cp < 0xdc00) {
          unsigned lo;
          if (j->end - j->p < 6 || j->p[0] != '\\' || j->p[1] != 'u') {
            buf_free(&b);
            return js_fail(j, "lone surrogate");
          }
          j->p += 2;
          if (js_hex4(j, &lo) < 0 || lo < 0xdc00 || lo > 0xdfff) {
            buf_free(&b);
            return js_fail(j, "bad surrogate pair");
          }
          cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
        }
        if (cp == 0) {
          buf_free(&b);
          return js_fail(j, "NUL in string");
        }
        utf8_put(&b, cp);
        break;
      default:
        buf_free(&b);
        return js_fail(j, "bad escape");
    }
  }
  if (j->p >= j->end) {
    buf_free(&b);
    return js_fail(j, "unterminated string");
  }
  j->p++;
  buf_add(&b, "", 1);
  *out = (char *)b.data;
  return 0;
}

static int js_number(json_t *j, double *out) {
  js_ws(j);
  char tmp[64];
  size_t n = 0;
  while (j->p < j->end && n < sizeof tmp - 1 && strchr("+-0123456789.eE", *j->p)) tmp[n++] = *j->p++;
  tmp[n] = 0;
  char *e;
  if (n == 0) return js_fail(j, "expected a number");
  *out = strtod(tmp, &e);
  if (*e) return js_fail(j, "bad number");
  if (!isfinite(*out)) return js_fail(j, "number out of range");
  return 0;
}

static int js_lit(json_t *j, const char *lit) {
  size_t n = strlen(lit);
  if ((size_t)(j->end - j->p) < n || memcmp(j->p, lit, n)) return js_fail(j, "bad literal");
  j->p += n;
  return 0;
}

/* Skip any value (nesting bounded). */
static int js_skip(json_t *j, int depth) {
  if (depth > 32) return js_fail(j, "nesting too deep");
  js_ws(j);
  if (j->p >= j->end) return js_fail(j, "unexpected end");
  char c = *j->p;
  if (c == '"') {
    char *s;
    if (js_string(j, &s) < 0) return -1;
    free(s);
    return 0;
  }
  if (c == 't') return js_lit(j, "true");
  if (c == 'f') return js_lit(j, "false");
  if (c == 'n') return js_lit(j, "null");
  if (c == '[' || c == '{') {
    char close = c == '[' ? ']' : '}';
    j->p++;
    js_ws(j);
    if (j->p < j->end && *j->p == close) {
      j->p++;
      return 0;
    }
    for (;;) {
      if (c == '{') {
        char *k;
        if (js_string(j, &k) < 0) return -1;
        free(k);
        js_ws(j);
        if (j->p >= j->end || *j->p++ != ':') return js_fail(j, "expected ':'");
      }
      if (js_skip(j, depth + 1) < 0) return -1;
      js_ws(j);
      if (j->p >= j->end) return js_fail(j, "unexpected end");
      if (*j->p == ',') {
        j->p++;
        continue;
      }
      if (*j->p == close) {
        j->p++;
        return 0;
      }
      return js_fail(j, "expected ',' or a closing bracket");
    }
  }
  double d;
  return js_number(j, &d);
}

/* A request header (README.md, "Requests"). */
typedef struct {
  int has_id;
  double id;
  char *op;
  char *sh;
  char *cwd;
  char **argv;
  int argc;
  int has_timeout;
  double timeout_ms;
} request_t;

static void request_free(request_t *r) {
  free(r->op);
  free(r->sh);
  free(r->cwd);
  for (int i = 0; i < r->argc; i++) free(r->argv[i]);
  free(r->argv);
  memset(r, 0, sizeof *r);
}

static int js_string_array(json_t *j, request_t *r) {
  js_ws(j);
  if (j->p >= j->end || *j->p != '[') return js_fail(j, "argv must be an array of strings");
  j->p++;
  r->argv = calloc(MAX_ARGV + 1, sizeof(char *));
  if (!r->argv) return js_fail(j, "out of memory");
  js_ws(j);
  if (j->p < j->end && *j->p == ']') {
    j->p++;
    return 0;
  }
  for (;;) {
    if (r->argc >= MAX_ARGV) return js_fail(j, "argv too long");
    if (js_string(j, &r->argv[r->argc]) < 0) return -1;
    r->argc++;
    js_ws(j);
    if (j->p >= j->end) return js_fail(j, "unexpected end");
    if (*j->p == ',') {
      j->p++;
      continue;
    }
    if (*j->p == ']') {
      j->p++;
      return 0;
    }
    return js_fail(j, "expected ',' or ']'");
  }
}

/* Parse a header object into r. Returns 0, or -1 with *err set. Unknown keys are skipped. */
static int parse_request(const char *text, size_t n, request_t *r, const char **err) {
  json_t j = {text, text + n, NULL};
  memset(r, 0, sizeof *r);
  js_ws(&j);
  if (j.p >= j.end || *j.p != '{') {
    *err = "header is not a JSON object";
    return -1;
  }
  j.p++;
  js_ws(&j);
  if (j.p < j.end && *j.p == '}') {
    j.p++;
  } else {
    for (;;) {
      char *key;
      if (js_string(&j, &key) < 0) break;
      js_ws(&j);
      if (j.p >= j.end || *j.p++ != ':') {
        free(key);
        js_fail(&j, "expected ':'");
        break;
      }
      js_ws(&j);
      int rc;
      if (!strcmp(key, "id")) {
        rc = js_number(&j, &r->id);
        r->has_id = rc == 0;
      } else if (!strcmp(key, "op") && !r->op) {
        rc = js_string(&j, &r->op);
      } else if (!strcmp(key, "sh") && !r->sh) {
        rc = js_string(&j, &r->sh);
      } else if (!strcmp(key, "cwd") && !r->cwd) {
        rc = js_string(&j, &r->cwd);
      } else if (!strcmp(key, "argv") && !r->argv) {
        rc = js_string_array(&j, r);
      } else if (!strcmp(key, "timeout_ms")) {
        rc = js_number(&j, &r->timeout_ms);
        r->has_timeout = rc == 0;
      } else {
        rc = js_skip(&j, 0);
      }
      free(key);
      if (rc < 0) break;
      js_ws(&j);
      if (j.p < j.end && *j.p == ',') {
        j.p++;
        continue;
      }
      if (j.p < j.end && *j.p == '}') {
        j.p++;
        break;
      }
      js_fail(&j, "expected ',' or '}'");
      break;
    }
  }
  js_ws(&j);
  if (!j.err && j.p != j.end) j.err = "trailing bytes after the header object";
  if (j.err) {
    *err = j.err;
    return -1;
  }
  return 0;
}

/* ---- Transport ---- */

static int g_fd = -1;             /* the port or the vsock connection (read side) */
static int g_wfd = -1;            /* where frames are written: g_fd, or stdout with --stdio */
static buf_t g_in;                /* bytes received, not yet parsed */
static size_t g_skipped;          /* bytes discarded while looking for a frame magic */

/* Write a whole buffer; on failure the connection is considered gone. */
static int write_all(int fd, const unsigned char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) {
        struct pollfd pf = {fd, POLLOUT, 0};
        poll(&pf, 1, 1000);
        continue;
      }
      return -1;
    }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

static void send_frame(const buf_t *header, const unsigned char *p1, size_t n1, const unsigned char *p2, size_t n2) {
  if (g_wfd < 0) return;
  unsigned char prefix[FRAME_PREFIX];
  memcpy(prefix, FRAME_MAGIC, 4);
  put_u32le(prefix + 4, (uint32_t)header->len);
  put_u32le(prefix + 8, (uint32_t)(n1 + n2));
  if (write_all(g_wfd, prefix, sizeof prefix) < 0 || write_all(g_wfd, header->data, header->len) < 0 ||
      (n1 && write_all(g_wfd, p1, n1) < 0) || (n2 && write_all(g_wfd, p2, n2) < 0)) {
    logf_("write to the host failed: %s", strerror(errno));
  }
}

static void put_id(buf_t *h, int has_id, double id) {
  if (has_id) buf_fmt(h, ",\"id\":%.17g", id);
}

static void send_error(int has_id, double id, const char *fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  buf_t h = {0};
  buf_str(&h, "{\"op\":\"error\"");
  put_id(&h, has_id, id);
  buf_str(&h, ",\"message\":");
  buf_json_str(&h, msg, strlen(msg));
  buf_str(&h, "}");
  send_frame(&h, NULL, 0, NULL, 0);
  buf_free(&h);
}

static void send_hello(int has_id, double id) {
  buf_t h = {0};
  buf_fmt(&h, "{\"op\":\"hello\",\"version\":%d,\"agent\":\"denovm-agent\",\"pid\":%d", PROTOCOL_VERSION,
          (int)getpid());
  put_id(&h, has_id, id);
  buf_str(&h, "}");
  send_frame(&h, NULL, 0, NULL, 0);
  buf_free(&h);
}

/* ---- Jobs (running commands) ---- */

typedef struct {
  int used;
  double id;
  pid_t pid;
  int out_fd, err_fd, in_fd;
  buf_t out, err;
  size_t out_dropped, err_dropped;
  unsigned char *stdin_data;
  size_t stdin_len, stdin_off;
  int64_t deadline;  /* 0: none */
  int64_t drain_deadline;
  int reaped, status, timed_out, killed;
} job_t;

static job_t g_jobs[MAX_JOBS];

static job_t *find_job(double id) {
  for (int i = 0; i < MAX_JOBS; i++)
    if (g_jobs[i].used && g_jobs[i].id == id) return &g_jobs[i];
  return NULL;
}

static void close_fd(int *fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

static void job_kill(job_t *j) {
  if (j->reaped) return;
  /* The command leads its own process group (setsid in the child): kill the group. */
  kill(-j->pid, SIGKILL);
  kill(j->pid, SIGKILL);
}

static void job_finish(job_t *j) {
  buf_t h = {0};
  int code = 0, sig = 0;
  if (WIFEXITED(j->status)) code = WEXITSTATUS(j->status);
  else if (WIFSIGNALED(j->status)) sig = WTERMSIG(j->status), code = 128 + sig;
  buf_fmt(&h, "{\"op\":\"exit\",\"id\":%.17g,\"code\":%d", j->id, code);
  if (sig) buf_fmt(&h, ",\"signal\":%d", sig);
  buf_fmt(&h, ",\"stdout_len\":%zu,\"stderr_len\":%zu", j->out.len, j->err.len);
  if (j->out_dropped) buf_fmt(&h, ",\"stdout_truncated\":true,\"stdout_dropped\":%zu", j->out_dropped);
  if (j->err_dropped) buf_fmt(&h, ",\"stderr_truncated\":true,\"stderr_dropped\":%zu", j->err_dropped);
  if (j->timed_out) buf_str(&h, ",\"timed_out\":true");
  if (j->killed) buf_str(&h, ",\"killed\":true");
  buf_str(&h, "}");
  send_frame(&h, j->out.data, j->out.len, j->err.data, j->err.len);
  buf_free(&h);
  close_fd(&j->out_fd);
  close_fd(&j->err_fd);
  close_fd(&j->in_fd);
  buf_free(&j->out);
  buf_free(&j->err);
  free(j->stdin_data);
  memset(j, 0, sizeof *j);
  j->out_fd = j->err_fd = j->in_fd = -1;
}

static void maybe_finish(job_t *j) {
  if (!j->used || !j->reaped) return;
  if ((j->out_fd < 0 && j->err_fd < 0) || now_ms() >= j->drain_deadline) job_finish(j);
}

static void start_job(request_t *r, unsigned char *payload, size_t plen) {
  if (!r->has_id) {
    send_error(0, 0, "exec without an id");
    return;
  }
  if (find_job(r->id)) {
    send_error(1, r->id, "id %.17g is already running", r->id);
    return;
  }
  char *sh_argv[] = {"/bin/sh", "-c", r->sh, NULL};
  char **argv = r->sh ? sh_argv : r->argv;
  if ((r->sh && r->argv) || !argv || !argv[0] || !argv[0][0]) {
    send_error(1, r->id, "exec needs exactly one of \"sh\" (a string) or \"argv\" (a non-empty array)");
    return;
  }
  job_t *j = NULL;
  for (int i = 0; i < MAX_JOBS && !j; i++)
    if (!g_jobs[i].used) j = &g_jobs[i];
  if (!j) {
    send_error(1, r->id, "too many commands running (at most %d)", MAX_JOBS);
    return;
  }
  int in[2], out[2], err[2];
  if (pipe2(in, O_CLOEXEC) < 0) {
    send_error(1, r->id, "pipe: %s", strerror(errno));
    return;
  }
  if (pipe2(out, O_CLOEXEC) < 0) {
    send_error(1, r->id, "pipe: %s", strerror(errno));
    close(in[0]), close(in[1]);
    return;
  }
  if (pipe2(err, O_CLOEXEC) < 0) {
    send_error(1, r->id, "pipe: %s", strerror(errno));
    close(in[0]), close(in[1]), close(out[0]), close(out[1]);
    return;
  }
  pid_t pid = fork();
  if (pid < 0) {
    send_error(1, r->id, "fork: %s", strerror(errno));
    close(in[0]), close(in[1]), close(out[0]), close(out[1]), close(err[0]), close(err[1]);
    return;
  }
  if (pid == 0) {
    /* Child: its own session (so a timeout kills the whole group), default signals, the pipes as 0/1/2. */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_DFL);
    setsid();
    dup2(in[0], 0);
    dup2(out[1], 1);
    dup2(err[1], 2);
    if (r->cwd && chdir(r->cwd) < 0) {
      fprintf(stderr, "denovm-agent: chdir %s: %s\n", r->cwd, strerror(errno));
      _exit(126);
    }
    execvp(argv[0], argv);
    fprintf(stderr, "denovm-agent: exec %s: %s\n", argv[0], strerror(errno));
    _exit(127);
  }
  close(in[0]), close(out[1]), close(err[1]);
  memset(j, 0, sizeof *j);
  j->used = 1;
  j->id = r->id;
  j->pid = pid;
  j->out_fd = out[0];
  j->err_fd = err[0];
  j->in_fd = in[1];
  fcntl(j->in_fd, F_SETFL, O_NONBLOCK);
  if (plen) {
    j->stdin_data = malloc(plen);
    if (j->stdin_data) memcpy(j->stdin_data, payload, plen), j->stdin_len = plen;
  }
  if (!j->stdin_len) close_fd(&j->in_fd);
  if (r->has_timeout && r->timeout_ms > 0 && r->timeout_ms < MAX_TIMEOUT_MS) j->deadline = now_ms() + (int64_t)r->timeout_ms;
}

/* ---- Frames from the host ---- */

static void handle_frame(const unsigned char *header, size_t hlen, unsigned char *payload, size_t plen) {
  request_t r;
  const char *err = NULL;
  if (memchr(header, 0, hlen) || parse_request((const char *)header, hlen, &r, &err) < 0) {
    if (!err) err = "NUL byte in the header";
    send_error(0, 0, "malformed header: %s", err);
    return;
  }
  if (!r.op) {
    send_error(r.has_id, r.id, "request without \"op\"");
  } else if (!strcmp(r.op, "ping")) {
    send_hello(r.has_id, r.id);
  } else if (!strcmp(r.op, "exec")) {
    start_job(&r, payload, plen);
  } else if (!strcmp(r.op, "kill")) {
    job_t *j = r.has_id ? find_job(r.id) : NULL;
    if (j) {
      j->killed = 1;
      job_kill(j);
    }
  } else {
    send_error(r.has_id, r.id, "unknown op \"%.64s\"", r.op);
  }
  request_free(&r);
}

/* Parse as many whole frames as g_in holds. */
static void parse_input(void) {
  for (;;) {
    /* Find the magic at the start; skip (and report once) whatever precedes it. */
    size_t skip = 0;
    while (skip < g_in.len) {
      size_t avail = g_in.len - skip < 4 ? g_in.len - skip : 4;
      if (!memcmp(g_in.data + skip, FRAME_MAGIC, avail)) break;
      skip++;
    }
    if (skip) {
      buf_consume(&g_in, skip);
      g_skipped += skip;
    }
    if (g_in.len < 4) return;
    if (g_skipped) {
      send_error(0, 0, "skipped %zu bytes that were not a frame (bad magic)", g_skipped);
      g_skipped = 0;
    }
    if (g_in.len < FRAME_PREFIX) return;
    uint32_t hlen = get_u32le(g_in.data + 4), plen = get_u32le(g_in.data + 8);
    if (hlen == 0 || hlen > MAX_HEADER || plen > MAX_REQUEST_PAYLOAD) {
      send_error(0, 0, "frame with header length %u and payload length %u is out of range (header 1..%d, payload <= %d)",
                 hlen, plen, MAX_HEADER, MAX_REQUEST_PAYLOAD);
      buf_consume(&g_in, 4); /* resynchronise on the next magic */
      continue;
    }
    size_t total = FRAME_PREFIX + (size_t)hlen + plen;
    if (g_in.len < total) return;
    handle_frame(g_in.data + FRAME_PREFIX, hlen, g_in.data + FRAME_PREFIX + hlen, plen);
    buf_consume(&g_in, total);
  }
}

/* ---- Opening the transport ---- */

/* The device node of a named virtio-console port: /dev/virtio-ports/NAME (udev), else found in sysfs. */
static int open_named_port(const char *name) {
  char path[512];
  snprintf(path, sizeof path, "/dev/virtio-ports/%s", name);
  int fd = open(path, O_RDWR | O_CLOEXEC);
  if (fd >= 0) return fd;
  DIR *d = opendir("/sys/class/virtio-ports");
  if (!d) return -1;
  struct dirent *e;
  while ((e = readdir(d))) {
    if (e->d_name[0] == '.') continue;
    char p[512], got[256] = {0}, dev[64] = {0};
    snprintf(p, sizeof p, "/sys/class/virtio-ports/%s/name", e->d_name);
    FILE *f = fopen(p, "r");
    if (!f) continue;
    if (!fgets(got, sizeof got, f)) got[0] = 0;
    fclose(f);
    got[strcspn(got, "\n")] = 0;
    if (strcmp(got, name)) continue;
    /* Prefer /dev/vportNpM (devtmpfs); else make a node from the sysfs "dev" (MAJOR:MINOR). */
    snprintf(path, sizeof path, "/dev/%s", e->d_name);
    fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
      snprintf(p, sizeof p, "/sys/class/virtio-ports/%s/dev", e->d_name);
      f = fopen(p, "r");
      unsigned maj, min;
      if (f && fgets(dev, sizeof dev, f) && sscanf(dev, "%u:%u", &maj, &min) == 2) {
        mkdir("/dev/virtio-ports", 0755);
        snprintf(path, sizeof path, "/dev/virtio-ports/%s", name);
        if (mknod(path, S_IFCHR | 0600, makedev(maj, min)) == 0 || errno == EEXIST)
          fd = open(path, O_RDWR | O_CLOEXEC);
      }
      if (f) fclose(f);
    }
    break;
  }
  closedir(d);
  return fd;
}

static int open_port(const char *spec) {
  return spec[0] == '/' ? open(spec, O_RDWR | O_CLOEXEC) : open_named_port(spec);
}

static int vsock_listen(unsigned port) {
  int s = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (s < 0) return -1;
  struct sockaddr_vm a;
  memset(&a, 0, sizeof a);
  a.svm_family = AF_VSOCK;
  a.svm_cid = VMADDR_CID_ANY;
  a.svm_port = port;
  if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 1) < 0) {
    close(s);
    return -1;
  }
  return s;
}

/* ---- Main loop ---- */

static void reap(void) {
  int st;
  pid_t pid;
  while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
    for (int i = 0; i < MAX_JOBS; i++) {
      job_t *j = &g_jobs[i];
      if (j->used && !j->reaped && j->pid == pid) {
        j->reaped = 1;
        j->status = st;
        j->drain_deadline = now_ms() + EXIT_DRAIN_MS;
      }
    }
  }
}

/* Read what a pipe has into b, keeping at most MAX_OUTPUT bytes. */
static void read_pipe(int *fd, buf_t *b, size_t *dropped) {
  unsigned char tmp[65536];
  ssize_t n = read(*fd, tmp, sizeof tmp);
  if (n < 0 && (errno == EINTR || errno == EAGAIN)) return;
  if (n <= 0) {
    close_fd(fd);
    return;
  }
  size_t keep = b->len >= MAX_OUTPUT ? 0 : MAX_OUTPUT - b->len;
  if (keep > (size_t)n) keep = (size_t)n;
  buf_add(b, tmp, keep);
  *dropped += (size_t)n - keep;
}

static void kill_all_jobs(void) {
  for (int i = 0; i < MAX_JOBS; i++)
    if (g_jobs[i].used) g_jobs[i].killed = 1, job_kill(&g_jobs[i]);
}

int main(int argc, char **argv) {
  const char *port = DEFAULT_PORT_NAME;
  int vsock_port = -1, use_stdio = 0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--port") && i + 1 < argc) {
      port = argv[++i];
    } else if (!strcmp(argv[i], "--vsock") && i + 1 < argc) {
      vsock_port = atoi(argv[++i]);
    } else if (!strcmp(argv[i], "--stdio")) {
      use_stdio = 1;
    } else {
      fprintf(stderr, "usage: denovm-agent [--port NAME|/dev/PATH] [--vsock PORT] [--stdio]\n");
      return 2;
    }
  }
  for (int i = 0; i < MAX_JOBS; i++) g_jobs[i].out_fd = g_jobs[i].err_fd = g_jobs[i].in_fd = -1;
  signal(SIGPIPE, SIG_IGN);
  sigset_t chld;
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  sigprocmask(SIG_BLOCK, &chld, NULL);
  int sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
  if (sfd < 0) {
    logf_("signalfd: %s", strerror(errno));
    return 1;
  }

  int listener = -1;
  if (use_stdio) {
    /* Frames on stdin/stdout (for tests on the host, or a pipe transport); EOF on stdin ends the agent. */
    g_fd = dup3(0, 100, O_CLOEXEC) < 0 ? -1 : 100;
    g_wfd = dup3(1, 101, O_CLOEXEC) < 0 ? -1 : 101;
    if (g_fd < 0 || g_wfd < 0) {
      logf_("stdio: %s", strerror(errno));
      return 1;
    }
    int devnull = open("/dev/null", O_RDWR);
    if (devnull >= 0) dup2(devnull, 0), dup2(devnull, 1), close(devnull);
    send_hello(0, 0);
  } else if (vsock_port >= 0) {
    listener = vsock_listen((unsigned)vsock_port);
    if (listener < 0) {
      logf_("vsock port %d: %s", vsock_port, strerror(errno));
      return 1;
    }
    logf_("listening on vsock port %d", vsock_port);
  } else {
    int warned = 0;
    while ((g_fd = open_port(port)) < 0) {
      if (!warned) logf_("waiting for port %s (%s)", port, strerror(errno)), warned = 1;
      sleep_ms(PORT_RETRY_MS);
    }
    g_wfd = g_fd;
    logf_("serving on port %s", port);
    send_hello(0, 0);
  }

  for (;;) {
    if (g_fd < 0 && listener >= 0) {
      /* vsock: wait for the next host connection (commands keep running meanwhile). */
      struct pollfd pf = {listener, POLLIN, 0};
      if (poll(&pf, 1, 100) > 0) {
        g_fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (g_fd >= 0) {
          g_wfd = g_fd;
          g_in.len = 0;
          g_skipped = 0;
          send_hello(0, 0);
        }
      }
    }
    struct pollfd pfs[2 + 3 * MAX_JOBS];
    job_t *owner[2 + 3 * MAX_JOBS];
    int kind[2 + 3 * MAX_JOBS];
    int n = 0;
    pfs[n] = (struct pollfd){sfd, POLLIN, 0}, owner[n] = NULL, kind[n++] = 0;
    if (g_fd >= 0) pfs[n] = (struct pollfd){g_fd, POLLIN, 0}, owner[n] = NULL, kind[n++] = 1;
    int64_t now = now_ms(), wake = -1;
    for (int i = 0; i < MAX_JOBS; i++) {
      job_t *j = &g_jobs[i];
      if (!j->used) continue;
      if (j->out_fd >= 0) pfs[n] = (struct pollfd){j->out_fd, POLLIN, 0}, owner[n] = j, kind[n++] = 2;
      if (j->err_fd >= 0) pfs[n] = (struct pollfd){j->err_fd, POLLIN, 0}, owner[n] = j, kind[n++] = 3;
      if (j->in_fd >= 0) pfs[n] = (struct pollfd){j->in_fd, POLLOUT, 0}, owner[n] = j, kind[n++] = 4;
      int64_t t = j->reaped ? j->drain_deadline : (j->deadline && !j->timed_out ? j->deadline : -1);
      if (t >= 0 && (wake < 0 || t < wake)) wake = t;
    }
    int timeout = wake < 0 ? -1 : (int)(wake > now ? wake - now : 0);
    if (g_fd < 0 && listener >= 0 && (timeout < 0 || timeout > 100)) timeout = 100;
    int rc = poll(pfs, (nfds_t)n, timeout);
    if (rc < 0 && errno != EINTR) {
      logf_("poll: %s", strerror(errno));
      sleep_ms(PORT_RETRY_MS);
    }
    for (int i = 0; rc > 0 && i < n; i++) {
      if (!pfs[i].revents) continue;
      job_t *j = owner[i];
      switch (kind[i]) {
        case 0: {
          struct signalfd_siginfo si;
          while (read(sfd, &si, sizeof si) == sizeof si) {
          }
          break;
        }
        case 1: {
          unsigned char tmp[65536];
          ssize_t r = read(g_fd, tmp, sizeof tmp);
          if (r > 0) {
            buf_add(&g_in, tmp, (size_t)r);
          } else if (r == 0 || (errno != EINTR && errno != EAGAIN)) {
            if (use_stdio) {
              kill_all_jobs();
              return 0;
            } else if (listener >= 0) {
              /* vsock: the host went away; its commands are of no use to anyone now. */
              close_fd(&g_fd);
              g_wfd = -1;
              kill_all_jobs();
            } else {
              /* Console port: the host side is closed (read returns 0 until it reopens). */
              if (r < 0) logf_("read: %s", strerror(errno));
              sleep_ms(PORT_RETRY_MS);
            }
          }
          break;
        }
        case 2:
          if (j->out_fd >= 0) read_pipe(&j->out_fd, &j->out, &j->out_dropped);
          break;
        case 3:
          if (j->err_fd >= 0) read_pipe(&j->err_fd, &j->err, &j->err_dropped);
          break;
        case 4:
          if (j->in_fd >= 0) {
            ssize_t w = write(j->in_fd, j->stdin_data + j->stdin_off, j->stdin_len - j->stdin_off);
            if (w > 0) j->stdin_off += (size_t)w;
            if ((w < 0 && errno != EAGAIN && errno != EINTR) || j->stdin_off >= j->stdin_len) close_fd(&j->in_fd);
          }
          break;
      }
    }
    if (g_fd >= 0) parse_input();
    reap();
    now = now_ms();
    for (int i = 0; i < MAX_JOBS; i++) {
      job_t *j = &g_jobs[i];
      if (!j->used) continue;
      if (!j->reaped && j->deadline && !j->timed_out && now >= j->deadline) {
        j->timed_out = 1;
        job_kill(j);
      }
      maybe_finish(j);
    }
  }
}

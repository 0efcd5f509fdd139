/*
 * The blk-uml benchmark's guest program (runs inside user-mode Linux, built static by
 * bench/blk_uml.ts): O_DIRECT I/O on one file for a fixed time, timed inside the guest.
 *
 * Usage: blk_io PATTERN FILE MILLISECONDS
 *   seqread   sequential 1 MiB preads from offset 0, wrapping at the end of the file
 *   seqwrite  sequential 1 MiB pwrites, the same way
 *   rand4k    4 KiB at random 4 KiB-aligned offsets, reads and writes alternating (a fixed
 *             xorshift seed, so every device sees the same offsets)
 * Prints one line: BLKIO pattern=P ops=N bytes=B ns=T
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define SEQ_BLOCK (1024 * 1024)
#define RAND_BLOCK 4096
/* O_DIRECT buffers and offsets: aligned to the logical block size; a page covers every disk here. */
#define DIRECT_ALIGN 4096
/* Check the clock every this many operations (a clock read in UML is a host system call). */
#define CLOCK_EVERY 4

static void die(const char *what) {
  fprintf(stderr, "blk_io: %s: %s\n", what, strerror(errno));
  exit(1);
}

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static uint64_t xorshift64(uint64_t *s) {
  uint64_t x = *s;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return *s = x;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: blk_io seqread|seqwrite|rand4k FILE MILLISECONDS\n");
    return 2;
  }
  const char *pattern = argv[1];
  int seqread = strcmp(pattern, "seqread") == 0;
  int seqwrite = strcmp(pattern, "seqwrite") == 0;
  int rand4k = strcmp(pattern, "rand4k") == 0;
  if (!seqread && !seqwrite && !rand4k) {
    fprintf(stderr, "blk_io: unknown pattern %s\n", pattern);
    return 2;
  }
  uint64_t budget_ns = strtoull(argv[3], NULL, 10) * 1000000ULL;
  int fd = open(argv[2], O_RDWR | O_DIRECT);
  if (fd < 0) die(argv[2]);
  struct stat st;
  if (fstat(fd, &st) < 0) die("fstat");
  uint64_t size = (uint64_t)st.st_size / SEQ_BLOCK * SEQ_BLOCK;
  if (size == 0) {
    fprintf(stderr, "blk_io: %s is smaller than one block\n", argv[2]);
    return 1;
  }
  void *buf;
  if (posix_memalign(&buf, DIRECT_ALIGN, SEQ_BLOCK) != 0) die("posix_memalign");
  memset(buf, 0x5a, SEQ_BLOCK);

  uint64_t seed = 0x9e3779b97f4a7c15ULL;
  uint64_t ops = 0, bytes = 0, off = 0, elapsed = 0;
  uint64_t t0 = now_ns();
  for (;;) {
    ssize_t n;
    if (rand4k) {
      uint64_t o = (xorshift64(&seed) % (size / RAND_BLOCK)) * RAND_BLOCK;
      n = (ops & 1) ? pwrite(fd, buf, RAND_BLOCK, (off_t)o) : pread(fd, buf, RAND_BLOCK, (off_t)o);
      if (n != RAND_BLOCK) die(ops & 1 ? "pwrite" : "pread");
    } else {
      n = seqread ? pread(fd, buf, SEQ_BLOCK, (off_t)off) : pwrite(fd, buf, SEQ_BLOCK, (off_t)off);
      if (n != SEQ_BLOCK) die(seqread ? "pread" : "pwrite");
      off = (off + SEQ_BLOCK) % size;
    }
    ops++;
    bytes += (uint64_t)n;
    if (ops % CLOCK_EVERY == 0 && (elapsed = now_ns() - t0) >= budget_ns) break;
  }
  printf("BLKIO pattern=%s ops=%llu bytes=%llu ns=%llu\n", pattern, (unsigned long long)ops,
         (unsigned long long)bytes, (unsigned long long)elapsed);
  close(fd);
  return 0;
}

/*
 * vmferry-fshelper: the three file operations Node's fs module lacks, for the
 * storage server's volumes: punch a hole (TRIM, WRITE_ZEROES), zero a range
 * keeping it allocated (WRITE_ZEROES with NO_HOLE), and map data and holes
 * with SEEK_DATA/SEEK_HOLE (BLOCK_STATUS). One process serves a whole server;
 * requests are lines on stdin, answered in order on stdout:
 *
 *   <id> P <offset> <length> <path>    punch hole (FALLOC_FL_PUNCH_HOLE | KEEP_SIZE)
 *   <id> Z <offset> <length> <path>    zero range (FALLOC_FL_ZERO_RANGE | KEEP_SIZE)
 *   <id> M <offset> <length> <path>    map: up to 1024 extents from offset
 *
 *   <id> 0                              done
 *   <id> 0 <length>:<hole 0|1> ...      map result (extents cover offset.. in order)
 *   <id> -<errno>                       failed with errno
 *
 * Paths are the last field and may contain spaces, never newlines.
 * Built on first use by src/storage/fs-helper.ts (cc -O2).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_EXTENTS 1024

static void reply_errno(unsigned long long id, int err) {
  printf("%llu -%d\n", id, err);
}

static void map(unsigned long long id, int fd, off_t offset, off_t length) {
  off_t end = offset + length;
  off_t size = lseek(fd, 0, SEEK_END);
  if (size < 0) return reply_errno(id, errno);
  if (end > size) end = size;
  printf("%llu 0", id);
  off_t pos = offset;
  for (int n = 0; pos < end && n < MAX_EXTENTS; n++) {
    off_t data = lseek(fd, pos, SEEK_DATA);
    if (data < 0 && errno != ENXIO) {
      /* Unknown: everything left is data, which is always a correct answer. */
      printf(" %lld:0", (long long)(end - pos));
      break;
    }
    if (data < 0 || data >= end) {
      printf(" %lld:1", (long long)(end - pos));
      break;
    }
    if (data > pos) {
      printf(" %lld:1", (long long)(data - pos));
      pos = data;
      continue;
    }
    off_t hole = lseek(fd, pos, SEEK_HOLE);
    if (hole < 0 || hole > end) hole = end;
    printf(" %lld:0", (long long)(hole - pos));
    pos = hole;
  }
  putchar('\n');
}

int main(void) {
  char *line = NULL;
  size_t capacity = 0;
  ssize_t got;
  while ((got = getline(&line, &capacity, stdin)) > 0) {
    if (line[got - 1] == '\n') line[got - 1] = '\0';
    unsigned long long id;
    char op;
    long long offset, length;
    int consumed = 0;
    if (sscanf(line, "%llu %c %lld %lld %n", &id, &op, &offset, &length, &consumed) < 4 || consumed == 0 || offset < 0 || length < 0) {
      fprintf(stderr, "vmferry-fshelper: bad request: %s\n", line);
      return 2;
    }
    const char *path = line + consumed;
    int fd = open(path, op == 'M' ? O_RDONLY : O_WRONLY);
    if (fd < 0) {
      reply_errno(id, errno);
    } else {
      if (op == 'P' || op == 'Z') {
        int mode = (op == 'P' ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE) | FALLOC_FL_KEEP_SIZE;
        if (fallocate(fd, mode, offset, length) == 0) printf("%llu 0\n", id);
        else reply_errno(id, errno);
      } else if (op == 'M') {
        map(id, fd, offset, length);
      } else {
        reply_errno(id, EINVAL);
      }
      close(fd);
    }
    fflush(stdout);
  }
  free(line);
  return 0;
}

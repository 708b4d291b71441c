/*
 * vmferry-cached-read: a Node addon with one function, a read that never
 * waits for a disk. preadv2(RWF_NOWAIT) copies what the page cache holds and
 * fails with EAGAIN where it would have to wait for I/O, so the storage
 * server can run it on its event loop and hand only the rest to libuv's
 * thread pool, whose hand-off per request costs more CPU than a cached 4 KiB
 * read itself (docs/BENCHMARKS.md, issue 20).
 *
 *   readCached(fd, buffer, offset, length, position) -> bytes read (>= 0) or -errno
 *
 * Built with the system's cc against Node's own headers by src/storage/cached-read.ts.
 */
#define _GNU_SOURCE
#define NAPI_VERSION 8
#include <errno.h>
#include <node_api.h>
#include <stdint.h>
#include <sys/uio.h>

static napi_value fail(napi_env env, const char *message) {
  napi_throw_type_error(env, NULL, message);
  return NULL;
}

static napi_value read_cached(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 5) return fail(env, "readCached(fd, buffer, offset, length, position)");
  int32_t fd;
  void *data;
  size_t size;
  int64_t offset, length, position;
  if (napi_get_value_int32(env, argv[0], &fd) != napi_ok) return fail(env, "readCached: fd is not a number");
  if (napi_get_buffer_info(env, argv[1], &data, &size) != napi_ok) return fail(env, "readCached: buffer is not a Buffer");
  if (napi_get_value_int64(env, argv[2], &offset) != napi_ok || napi_get_value_int64(env, argv[3], &length) != napi_ok ||
      napi_get_value_int64(env, argv[4], &position) != napi_ok) return fail(env, "readCached: offset, length and position must be numbers");
  if (offset < 0 || length < 0 || position < 0 || (uint64_t)offset + (uint64_t)length > size) {
    napi_throw_range_error(env, NULL, "readCached: the range is outside the buffer or negative");
    return NULL;
  }
  struct iovec io = { (char *)data + offset, (size_t)length };
  ssize_t done;
  do done = preadv2(fd, &io, 1, position, RWF_NOWAIT);
  while (done < 0 && errno == EINTR);
  napi_value result;
  napi_create_int64(env, done < 0 ? -(int64_t)errno : (int64_t)done, &result);
  return result;
}

NAPI_MODULE_INIT(/* napi_env env, napi_value exports */) {
  napi_value fn;
  if (napi_create_function(env, "readCached", NAPI_AUTO_LENGTH, read_cached, NULL, &fn) != napi_ok) return NULL;
  if (napi_set_named_property(env, exports, "readCached", fn) != napi_ok) return NULL;
  return exports;
}

/*
 * vmferry-ram-hash: a Node addon that hashes chunks of a stopped guest's RAM
 * off the event loop, for the memory comparison at a switch-over
 * (src/qemu/memory-digest.ts). It runs while the guest is paused, so it does
 * in native code what cost most there in JavaScript: each chunk is copied
 * straight out of QEMU's address space with process_vm_readv (one copy; a
 * read of /proc/PID/mem copies every page twice, through a bounce page) in
 * pieces that stay in the CPU's cache while XXH64 hashes them
 * (docs/BENCHMARKS.md, issue 22).
 *
 *   hashChunks(pid, fd, base, chunkBytes, chunks, hashes) -> Promise<void>
 *
 * With pid > 0 the chunks are read from that process's memory at base +
 * index * chunkBytes; otherwise from the file fd at the same offsets (a
 * memfd or a dump). chunks is a Uint32Array of chunk indexes, hashes a
 * BigUint64Array that receives XXH64 (seed 0) of each, in the same order:
 * the same value as xxhash-wasm's h64Raw, so agents with and without this
 * addon compare equal digests as equal.
 *
 * Built with the system's cc against Node's headers and xxhash.h by
 * src/util/native-build.ts.
 */
#define _GNU_SOURCE
#define NAPI_VERSION 8
#define XXH_INLINE_ALL
#include <errno.h>
#include <node_api.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>
#include <xxhash.h>

/* Small enough to stay in a core's L2 cache between the copy and the hash. */
#define PIECE_BYTES (256 * 1024)

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref chunks_ref, hashes_ref;
  int32_t pid, fd;
  int64_t base, chunk_bytes;
  const uint32_t *chunks;
  uint64_t *hashes;
  size_t count;
  char error[256];
} HashJob;

static napi_value fail(napi_env env, const char *message) {
  napi_throw_type_error(env, NULL, message);
  return NULL;
}

/* Copies length bytes at address into buffer; -1 with errno set, or 0. */
static int read_piece(const HashJob *job, char *buffer, uint64_t address, size_t length) {
  for (size_t done = 0; done < length;) {
    ssize_t got;
    if (job->pid > 0) {
      struct iovec local = { buffer + done, length - done };
      struct iovec remote = { (void *)(uintptr_t)(address + done), length - done };
      got = process_vm_readv(job->pid, &local, 1, &remote, 1, 0);
    } else {
      got = pread(job->fd, buffer + done, length - done, (off_t)(address + done));
    }
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) return -1;
    if (got == 0) {
      errno = EFAULT;
      return -1;
    }
    done += (size_t)got;
  }
  return 0;
}

static void execute(napi_env env, void *data) {
  (void)env;
  HashJob *job = data;
  char *buffer = malloc(PIECE_BYTES);
  XXH64_state_t *state = XXH64_createState();
  if (!buffer || !state) {
    snprintf(job->error, sizeof job->error, "out of memory for a %d-byte buffer", PIECE_BYTES);
  } else {
    for (size_t i = 0; i < job->count && !job->error[0]; i++) {
      uint64_t start = (uint64_t)job->base + (uint64_t)job->chunks[i] * (uint64_t)job->chunk_bytes;
      XXH64_reset(state, 0);
      for (int64_t offset = 0; offset < job->chunk_bytes; offset += PIECE_BYTES) {
        size_t length = job->chunk_bytes - offset < PIECE_BYTES ? (size_t)(job->chunk_bytes - offset) : PIECE_BYTES;
        if (read_piece(job, buffer, start + (uint64_t)offset, length) != 0) {
          snprintf(job->error, sizeof job->error, "%s of chunk %u at 0x%llx: %s", job->pid > 0 ? "process_vm_readv" : "pread", job->chunks[i],
                   (unsigned long long)(start + (uint64_t)offset), strerror(errno));
          break;
        }
        XXH64_update(state, buffer, length);
      }
      job->hashes[i] = XXH64_digest(state);
    }
  }
  XXH64_freeState(state);
  free(buffer);
}

static void complete(napi_env env, napi_status status, void *data) {
  HashJob *job = data;
  napi_value result;
  if (status != napi_ok && !job->error[0]) snprintf(job->error, sizeof job->error, "the hashing was cancelled");
  if (job->error[0]) {
    napi_value message;
    napi_create_string_utf8(env, job->error, NAPI_AUTO_LENGTH, &message);
    napi_create_error(env, NULL, message, &result);
    napi_reject_deferred(env, job->deferred, result);
  } else {
    napi_get_undefined(env, &result);
    napi_resolve_deferred(env, job->deferred, result);
  }
  napi_delete_reference(env, job->chunks_ref);
  napi_delete_reference(env, job->hashes_ref);
  napi_delete_async_work(env, job->work);
  free(job);
}

static int typed_array(napi_env env, napi_value value, napi_typedarray_type want, void **data, size_t *length) {
  bool is;
  napi_typedarray_type type;
  napi_value buffer;
  size_t offset;
  if (napi_is_typedarray(env, value, &is) != napi_ok || !is) return -1;
  if (napi_get_typedarray_info(env, value, &type, length, data, &buffer, &offset) != napi_ok || type != want) return -1;
  return 0;
}

static napi_value hash_chunks(napi_env env, napi_callback_info info) {
  size_t argc = 6;
  napi_value argv[6];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 6) return fail(env, "hashChunks(pid, fd, base, chunkBytes, chunks, hashes)");
  HashJob *job = calloc(1, sizeof *job);
  if (!job) return fail(env, "hashChunks: out of memory");
  void *chunks, *hashes;
  size_t chunk_count, hash_count;
  if (napi_get_value_int32(env, argv[0], &job->pid) != napi_ok || napi_get_value_int32(env, argv[1], &job->fd) != napi_ok ||
      napi_get_value_int64(env, argv[2], &job->base) != napi_ok || napi_get_value_int64(env, argv[3], &job->chunk_bytes) != napi_ok) {
    free(job);
    return fail(env, "hashChunks: pid, fd, base and chunkBytes must be numbers");
  }
  if (typed_array(env, argv[4], napi_uint32_array, &chunks, &chunk_count) != 0 || typed_array(env, argv[5], napi_biguint64_array, &hashes, &hash_count) != 0 ||
      chunk_count != hash_count) {
    free(job);
    return fail(env, "hashChunks: chunks must be a Uint32Array and hashes a BigUint64Array of the same length");
  }
  if (job->base < 0 || job->chunk_bytes <= 0 || (job->pid <= 0 && job->fd < 0)) {
    free(job);
    napi_throw_range_error(env, NULL, "hashChunks: base must be >= 0, chunkBytes > 0, and a pid or an fd given");
    return NULL;
  }
  job->chunks = chunks;
  job->hashes = hashes;
  job->count = chunk_count;
  napi_value promise, name;
  napi_create_promise(env, &job->deferred, &promise);
  napi_create_reference(env, argv[4], 1, &job->chunks_ref);
  napi_create_reference(env, argv[5], 1, &job->hashes_ref);
  napi_create_string_utf8(env, "vmferry:hashChunks", NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, NULL, name, execute, complete, job, &job->work);
  napi_queue_async_work(env, job->work);
  return promise;
}

NAPI_MODULE_INIT(/* napi_env env, napi_value exports */) {
  napi_value fn;
  if (napi_create_function(env, "hashChunks", NAPI_AUTO_LENGTH, hash_chunks, NULL, &fn) != napi_ok) return NULL;
  if (napi_set_named_property(env, exports, "hashChunks", fn) != napi_ok) return NULL;
  return exports;
}

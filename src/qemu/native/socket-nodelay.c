/*
 * vmferry-socket-nodelay: a Node addon that turns Nagle's algorithm off on
 * the TCP sockets another process (a QEMU) has bound to a port, by taking a
 * duplicate of each with pidfd_getfd(2) and setting TCP_NODELAY on it: a
 * duplicate shares the socket, so the option holds for QEMU's own descriptor,
 * and sockets a listener accepts later inherit it from the listener.
 *
 * Why (src/qemu/socket-nodelay.ts): QEMU 7.2's NBD server writes its
 * negotiation replies in several small pieces with Nagle on, and the client
 * delays its ACK, so each multi-part reply waited for the delayed-ACK timer
 * (docs/BENCHMARKS.md, issue 22).
 *
 *   setNoDelay(pid, port) -> number of sockets set
 *
 * Throws an Error naming the system call that failed (EPERM without ptrace
 * access to pid, ENOSYS on kernels before 5.6).
 */
#define _GNU_SOURCE
#define NAPI_VERSION 8
#include <dirent.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <node_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

static napi_value fail(napi_env env, const char *message) {
  napi_throw_error(env, NULL, message);
  return NULL;
}

/* The local port of a TCP socket, or -1 for anything else. */
static int tcp_port(int fd) {
  int type;
  socklen_t type_length = sizeof type;
  struct sockaddr_storage address;
  socklen_t length = sizeof address;
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &type_length) != 0 || type != SOCK_STREAM) return -1;
  if (getsockname(fd, (struct sockaddr *)&address, &length) != 0) return -1;
  if (address.ss_family == AF_INET) return ntohs(((struct sockaddr_in *)&address)->sin_port);
  if (address.ss_family == AF_INET6) return ntohs(((struct sockaddr_in6 *)&address)->sin6_port);
  return -1;
}

static napi_value set_no_delay(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  int32_t pid, port;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 2 || napi_get_value_int32(env, argv[0], &pid) != napi_ok ||
      napi_get_value_int32(env, argv[1], &port) != napi_ok || pid <= 0 || port <= 0 || port > 65535) {
    return fail(env, "setNoDelay(pid, port): a process id and a TCP port");
  }
  char message[320];
  char directory[64];
  snprintf(directory, sizeof directory, "/proc/%d/fd", pid);
  int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
  if (pidfd < 0) {
    snprintf(message, sizeof message, "pidfd_open(%d): %s", pid, strerror(errno));
    return fail(env, message);
  }
  DIR *fds = opendir(directory);
  if (!fds) {
    snprintf(message, sizeof message, "opendir(%s): %s", directory, strerror(errno));
    close(pidfd);
    return fail(env, message);
  }
  int set = 0;
  message[0] = 0;
  for (struct dirent *entry; (entry = readdir(fds)) != NULL && !message[0];) {
    char link_path[320], target[64];
    if (entry->d_name[0] == '.') continue;
    snprintf(link_path, sizeof link_path, "%s/%s", directory, entry->d_name);
    ssize_t length = readlink(link_path, target, sizeof target - 1);
    if (length < 0) continue; /* closed since the listing */
    target[length] = 0;
    if (strncmp(target, "socket:", 7) != 0) continue;
    int copy = (int)syscall(SYS_pidfd_getfd, pidfd, atoi(entry->d_name), 0);
    if (copy < 0) {
      if (errno == EBADF) continue; /* closed since the listing */
      snprintf(message, sizeof message, "pidfd_getfd(%d, fd %s): %s", pid, entry->d_name, strerror(errno));
      break;
    }
    if (tcp_port(copy) == port) {
      int on = 1;
      if (setsockopt(copy, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on) != 0) {
        snprintf(message, sizeof message, "setsockopt(TCP_NODELAY) on fd %s of %d: %s", entry->d_name, pid, strerror(errno));
      } else {
        set++;
      }
    }
    close(copy);
  }
  closedir(fds);
  close(pidfd);
  if (message[0]) return fail(env, message);
  napi_value result;
  napi_create_int32(env, set, &result);
  return result;
}

NAPI_MODULE_INIT(/* napi_env env, napi_value exports */) {
  napi_value fn;
  if (napi_create_function(env, "setNoDelay", NAPI_AUTO_LENGTH, set_no_delay, NULL, &fn) != napi_ok) return NULL;
  if (napi_set_named_property(env, exports, "setNoDelay", fn) != napi_ok) return NULL;
  return exports;
}

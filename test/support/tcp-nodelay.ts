/**
 * The TCP sockets a process has on a local port, and whether each has Nagle's algorithm off, read from outside
 * the process as the agent sets it (a duplicate taken with pidfd_getfd), with python3 so the test does not read
 * through the code it tests.
 */
import { execFile as execFileCallback } from 'node:child_process';
import { promisify } from 'node:util';

const execFile = promisify(execFileCallback);

const script = `
import ctypes, json, os, socket, sys
pid, port = int(sys.argv[1]), int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
pidfd = os.pidfd_open(pid)
found = []
for name in os.listdir(f'/proc/{pid}/fd'):
    try:
        if not os.readlink(f'/proc/{pid}/fd/{name}').startswith('socket:'):
            continue
    except FileNotFoundError:
        continue
    fd = libc.syscall(438, pidfd, int(name), 0)
    if fd < 0:
        continue
    s = socket.socket(fileno=fd)
    try:
        if s.type == socket.SOCK_STREAM and s.family in (socket.AF_INET, socket.AF_INET6) and s.getsockname()[1] == port:
            found.append({'listening': bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)),
                          'noDelay': bool(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))})
    finally:
        s.close()
print(json.dumps(found))
`;

export interface TcpSocketState {
  listening: boolean;
  noDelay: boolean;
}

export async function tcpSocketsOn(pid: number, port: number): Promise<TcpSocketState[]> {
  const { stdout } = await execFile('python3', ['-I', '-c', script, String(pid), String(port)], { timeout: 10_000 });
  return JSON.parse(stdout) as TcpSocketState[];
}

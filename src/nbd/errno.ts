/**
 * The one errno → NBD error mapping (after nbdkit's server/protocol.c
 * nbd_errno): whatever a backend throws becomes one of the few error values
 * the protocol defines, and a client turns them back into names.
 */
import { NbdBackendError } from './backend.ts';
import { NbdErrno } from './constants.ts';

const fromSystemCode: Record<string, number> = {
  EROFS: NbdErrno.EPERM,
  EPERM: NbdErrno.EPERM,
  EACCES: NbdErrno.EPERM,
  EIO: NbdErrno.EIO,
  ENOMEM: NbdErrno.ENOMEM,
  EINVAL: NbdErrno.EINVAL,
  ENOSPC: NbdErrno.ENOSPC,
  EDQUOT: NbdErrno.ENOSPC,
  EFBIG: NbdErrno.ENOSPC,
  EOVERFLOW: NbdErrno.EOVERFLOW,
  ENOTSUP: NbdErrno.ENOTSUP,
  EOPNOTSUPP: NbdErrno.ENOTSUP,
  ESHUTDOWN: NbdErrno.ESHUTDOWN,
};

/** The NBD error for anything a backend threw: its own NbdBackendError errno, a mapped system code, or EIO. */
export function nbdErrnoOf(err: unknown): number {
  if (err instanceof NbdBackendError) return err.errno;
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  return (code !== undefined && fromSystemCode[code]) || NbdErrno.EIO;
}

const names: Record<number, string> = Object.fromEntries(Object.entries(NbdErrno).map(([name, value]) => [value, name]));

/** "EINVAL" for 22; "errno 99" for values the protocol does not define. */
export function nbdErrnoName(errno: number): string {
  return names[errno] ?? `errno ${errno}`;
}

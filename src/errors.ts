/**
 * One root error class for everything vmferry raises on purpose. Each failure
 * has a stable code (`VMF_…`) that scripts and the HTTP API can rely on, a
 * message a user can act on, and the underlying `cause` when there is one.
 * Each code is registered here with the HTTP status a server answers it with,
 * so a new code cannot reach clients as a default 500. docs/ERRORS.md lists
 * every code with its status; test/unit/errors.test.ts keeps the two in step.
 */
interface ErrorKind {
  /** 4xx: the request cannot succeed as sent; 502/504: a part vmferry drives (QEMU, an agent, a program) failed; 500: vmferry itself. */
  status: 400 | 403 | 404 | 409 | 500 | 502 | 503 | 504;
  meaning: string;
}

export const errorCodes = {
  VMF_INVALID_SPEC: { status: 400, meaning: 'A VM specification is invalid; the message names the field.' },
  VMF_INVALID_ARGUMENT: { status: 400, meaning: 'A command-line argument or API parameter is invalid.' },
  VMF_QMP_CONNECT: { status: 502, meaning: 'Could not connect to the QMP socket of a QEMU process.' },
  VMF_QMP_PROTOCOL: { status: 502, meaning: 'A QMP peer sent something that is not valid QMP.' },
  VMF_QMP_COMMAND: { status: 502, meaning: 'QEMU answered a QMP command with an error.' },
  VMF_QMP_CLOSED: { status: 502, meaning: 'The QMP connection closed while commands or waits were pending.' },
  VMF_TIMEOUT: { status: 504, meaning: 'An operation did not finish within its time limit.' },
  VMF_ABORTED: { status: 409, meaning: 'An operation was cancelled.' },
  VMF_ACCEL_UNAVAILABLE: { status: 503, meaning: 'The accelerator asked for (`--accel kvm`) cannot run guests on this host; the message says why (no /dev/kvm, a probe guest that hung, …).' },
  VMF_QEMU_START: { status: 502, meaning: 'A QEMU process failed to start.' },
  VMF_QEMU_EXITED: { status: 502, meaning: 'A QEMU process exited unexpectedly.' },
  VMF_COMMAND_FAILED: { status: 502, meaning: 'An external program (qemu-img, …) failed; the message carries its output.' },
  VMF_IMAGE_INVALID: { status: 400, meaning: 'A disk image to import, or the shared base volume of an overlay, is missing or unusable; the message says which and why. Nothing was created.' },
  VMF_VOLUME_EXISTS: { status: 409, meaning: 'A volume of that name already exists.' },
  VMF_VOLUME_NOT_FOUND: { status: 404, meaning: 'No volume of that name exists.' },
  VMF_MIGRATION_REFUSED: { status: 409, meaning: 'The migration plan was refused before anything moved; the message gives the reasons.' },
  VMF_MIGRATION_FAILED: { status: 502, meaning: 'A migration step failed; the VM still runs on the source.' },
  VMF_UNRESOLVED: { status: 409, meaning: "A migration could not be settled yet: the destination may have been told to resume and has not said whether its guest ran, or the source's agent could not be reached to resume its guest. The guest never runs on two hosts meanwhile; vmferry keeps asking until it can settle it, except when the destination cannot tell at all (its QEMU and its agent died after the resume was sent): then an operator settles it with `vmferry migration resolve ID --run-on HOST`." },
  VMF_MEMORY_MISMATCH: { status: 502, meaning: "The guest's memory differed between source and destination after pre-copy; the destination was not resumed and the VM still runs on the source." },
  VMF_FORBIDDEN: { status: 403, meaning: "The caller's certificate does not carry a role allowed on this route (or names another host than the request), or the request asks an agent for what its operator did not allow: a host file outside its --trusted-dir directories, a disk outside its pool or off its storage server, a migration's data sent elsewhere than the destination of its plan; see docs/SECURITY.md." },
  VMF_NETWORK: { status: 409, meaning: "A VM's NIC could not be connected on this host: its bridge is missing, or its tap could not be set up." },
  VMF_NOT_FOUND: { status: 404, meaning: 'No such VM, host, migration or route.' },
  VMF_CONFLICT: { status: 409, meaning: 'The request conflicts with the current state (a VM already migrating, a name in use, a VM in the wrong state).' },
  VMF_UNREACHABLE: { status: 502, meaning: 'A vmferry server (agent, controller, storage) could not be reached.' },
  VMF_DATABASE: { status: 503, meaning: "The controller's database (`--db`: a SQLite file or a PostgreSQL server) could not be opened, reached or written; the message names it (without its password) and says why." },
  VMF_NOT_LEADER: { status: 503, meaning: 'This controller is a standby: another controller sharing its PostgreSQL database holds the leader lease; the message names it.' },
  // Several controllers (issue 18).
  VMF_STALE_LEADER: { status: 409, meaning: 'An agent refused a request stamped with an older leader epoch than one it has seen: the controller that sent it lost the leader lease (paused, cut off from PostgreSQL) and another leads now.' },
  VMF_INTERNAL: { status: 500, meaning: 'An unexpected server error; the log has the details.' },
  VMF_TOOL_MISSING: { status: 503, meaning: 'A required external program is not installed (run scripts/setup.sh).' },
  VMF_NBD_PROTOCOL: { status: 502, meaning: 'An NBD peer sent something that is not valid NBD.' },
  VMF_NBD_NO_EXPORT: { status: 404, meaning: 'The NBD server has no export of that name.' },
  VMF_NBD_REFUSED: { status: 502, meaning: 'The NBD server refused an option (TLS required, policy, meta context, …); the message carries its reply.' },
  VMF_NBD_REQUEST: { status: 502, meaning: 'The NBD server answered a request with an error; the message names the NBD errno.' },
  VMF_NBD_CLOSED: { status: 502, meaning: 'The NBD connection closed while requests were in flight, or was used after close.' },
} as const satisfies Record<string, ErrorKind>;

export type ErrorCode = keyof typeof errorCodes;

export function httpStatus(code: ErrorCode): number {
  return errorCodes[code].status;
}

export class VmferryError extends Error {
  readonly code: ErrorCode;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'VmferryError';
    this.code = code;
  }
}

/** True when `err` is a VmferryError with the given code. */
export function hasCode(err: unknown, code: ErrorCode): err is VmferryError {
  return err instanceof VmferryError && err.code === code;
}

/** A readable one-line description of any thrown value, for logs and error chains. */
export function describeError(err: unknown): string {
  if (err instanceof Error) return err.message;
  return String(err);
}

/**
 * One root error class for everything vmferry raises on purpose. Each failure
 * has a stable code (`VMF_…`) that scripts and the HTTP API can rely on, a
 * message a user can act on, and the underlying `cause` when there is one.
 * docs/ERRORS.md lists every code; test/unit/errors.test.ts keeps the two in step.
 */
export const errorCodes = {
  VMF_INVALID_SPEC: 'A VM specification is invalid; the message names the field.',
  VMF_INVALID_ARGUMENT: 'A command-line argument or API parameter is invalid.',
  VMF_QMP_CONNECT: 'Could not connect to the QMP socket of a QEMU process.',
  VMF_QMP_PROTOCOL: 'A QMP peer sent something that is not valid QMP.',
  VMF_QMP_COMMAND: 'QEMU answered a QMP command with an error.',
  VMF_QMP_CLOSED: 'The QMP connection closed while commands or waits were pending.',
  VMF_TIMEOUT: 'An operation did not finish within its time limit.',
  VMF_ABORTED: 'An operation was cancelled.',
  VMF_QEMU_START: 'A QEMU process failed to start.',
  VMF_QEMU_EXITED: 'A QEMU process exited unexpectedly.',
  VMF_COMMAND_FAILED: 'An external program (qemu-img, …) failed; the message carries its output.',
  VMF_VOLUME_EXISTS: 'A volume of that name already exists.',
  VMF_VOLUME_NOT_FOUND: 'No volume of that name exists.',
  VMF_MIGRATION_REFUSED: 'The migration plan was refused before anything moved; the message gives the reasons.',
  VMF_MIGRATION_FAILED: 'A migration step failed; the VM still runs on the source.',
  VMF_UNRESOLVED: "A migration could not be settled yet: the destination may have been told to resume and has not said whether its guest ran, or the source's agent could not be reached to resume its guest. The guest never runs on two hosts meanwhile; vmferry keeps asking until it can settle it.",
  VMF_MEMORY_MISMATCH: "The guest's memory differed between source and destination after pre-copy; the destination was not resumed and the VM still runs on the source.",
  VMF_NETWORK: "A VM's NIC could not be connected on this host: its bridge is missing, or its tap could not be set up.",
  VMF_NOT_FOUND: 'No such VM, host, migration or route.',
  VMF_CONFLICT: 'The request conflicts with the current state (a VM already migrating, a name in use, a VM in the wrong state).',
  VMF_UNREACHABLE: 'A vmferry server (agent, controller, storage) could not be reached.',
  VMF_INTERNAL: 'An unexpected server error; the log has the details.',
  VMF_TOOL_MISSING: 'A required external program is not installed (run scripts/setup.sh).',
  VMF_NBD_PROTOCOL: 'An NBD peer sent something that is not valid NBD.',
  VMF_NBD_NO_EXPORT: 'The NBD server has no export of that name.',
  VMF_NBD_REFUSED: 'The NBD server refused an option (TLS required, policy, meta context, …); the message carries its reply.',
  VMF_NBD_REQUEST: 'The NBD server answered a request with an error; the message names the NBD errno.',
  VMF_NBD_CLOSED: 'The NBD connection closed while requests were in flight, or was used after close.',
} as const;

export type ErrorCode = keyof typeof errorCodes;

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

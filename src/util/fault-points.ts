/**
 * Named places where a test makes this process die as a crash would, at a
 * moment no outside timing can hit reliably: between an action and its reply
 * (a `cont` sent, its reply not yet given). Off unless the environment names
 * them: VMFERRY_FAULT_POINTS=name[,name…]; each fires once per process.
 */
const armed = new Set((process.env.VMFERRY_FAULT_POINTS ?? '').split(',').map((s) => s.trim()).filter(Boolean));

export type FaultPoint =
  /** The destination claimed the shared volumes' writer leases; its QEMU has not been continued. */
  | 'destination-after-claim'
  /** The destination's QEMU was continued; the agent has not adopted it nor replied. */
  | 'destination-after-cont'
  /** The destination fenced the RBD images' other clients (the source's among them) and its QEMU dies before `cont` is sent. */
  | 'destination-qemu-dies-after-fence'
  /** The destination's QEMU ran `cont` and dies before its reply is read: a cont whose reply was lost with its QEMU. */
  | 'destination-qemu-dies-in-cont'
  /** The destination's QEMU answered `cont` and dies before the agent adopted it: a guest that crashed right after the switch. */
  | 'destination-qemu-dies-after-cont'
  /** The destination's QEMU answered `cont`, then it and its agent die before the agent recorded that the guest ran: a power loss of that host. */
  | 'destination-dies-after-cont'
  /** The source's migration was told to continue; the agent has not replied. */
  | 'source-after-continue'
  /** The leading controller stored `paused-at-switchover`: the source is paused before the switch-over, nothing resumed. */
  | 'controller-at-switchover'
  /** The leading controller stored `resumed`: the guest runs on the destination, the source is not retired yet. */
  | 'controller-after-resume';

/** Arms `point` in this process: for a test that runs a migration's halves in its own process rather than in agents. */
export function armFaultPoint(point: FaultPoint): void {
  armed.add(point);
}

/** SIGKILL of this process when `point` is armed: no handler runs, nothing is flushed. */
export function faultPoint(point: FaultPoint): void {
  if (!armed.delete(point)) return;
  process.kill(process.pid, 'SIGKILL');
}

/** SIGKILL of a child process (a QEMU) when `point` is armed, resolving once it has exited: a crash of it, not of this process. */
export async function faultPointKills(point: FaultPoint, child: { pid: number; exited: Promise<unknown> }): Promise<boolean> {
  if (!armed.delete(point)) return false;
  process.kill(child.pid, 'SIGKILL');
  await child.exited;
  return true;
}

/** SIGKILL of a child process (a QEMU), then of this process, when `point` is armed: both die, as in a power loss. */
export async function faultPointKillsAll(point: FaultPoint, child: { pid: number; exited: Promise<unknown> }): Promise<void> {
  if (await faultPointKills(point, child)) process.kill(process.pid, 'SIGKILL');
}

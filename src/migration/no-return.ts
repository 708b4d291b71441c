/**
 * The point of no return, in one place (docs/ARCHITECTURE.md, "The switch-over
 * as a state machine"). Every path that undoes a migration reads this rule:
 * the executor's failure path, an agent settling a half its controller
 * abandoned, and a controller recovering migrations after a restart.
 *
 * The dangerous moment is the destination's resume: its `cont` may have
 * reached QEMU even when the reply never came back. From then on the source
 * runs again only once the destination has confirmed that its QEMU never ran
 * the guest and is gone; while that cannot be confirmed the source stays
 * paused and the migration is `unresolved`. Once post-copy may have begun the
 * source never runs again at all: its RAM is split with the destination.
 */
import { migrationSteps, type MigrationPhase } from './phases.ts';

/**
 * Phases once post-copy may have begun: the source was told to continue a
 * switch-over to post-copy, so the destination may run the guest while part of
 * its RAM is still only on the source. The guest's memory is then split
 * between the hosts: the source never runs again, whatever the destination says.
 */
const postcopyPhases: readonly MigrationPhase[] = ['postcopy-started', 'postcopy-active'];

/** Phases in which the destination may already have been asked to resume (or run the guest in post-copy). */
const pastNoReturn: readonly MigrationPhase[] = migrationSteps.filter((s) => s.pastNoReturn).map((s) => s.phase);

export function resumeMayHaveBeenSent(phase: MigrationPhase): boolean {
  return pastNoReturn.includes(phase);
}

/**
 * Whether post-copy may have begun, from the phases a migration went through:
 * `unresolved` alone does not say, so callers pass the whole history they have
 * (a report's phases, the stored phase before it).
 */
export function postcopyMayHaveBegun(phases: readonly MigrationPhase[]): boolean {
  return phases.some((phase) => postcopyPhases.includes(phase));
}

/**
 * What the destination host says of its half of a migration.
 * - `guest-ran`: its QEMU was continued (it runs the guest, or did): the guest lives there now;
 * - `never-ran`: its QEMU is alive but was never continued: it can be killed, the source still holds the guest;
 * - `gone`: no QEMU of this migration is alive there, and none ran the guest there;
 * - `unknown`: a resume may have reached a QEMU of this migration that is gone now with nothing left to say
 *   whether it ran the guest (its agent died with it). Nobody can ever tell, so vmferry never settles it:
 *   the source stays paused until an operator chooses the host (`vmferry migration resolve ID --run-on`).
 */
export type DestinationFate = 'guest-ran' | 'never-ran' | 'gone' | 'unknown';

/**
 * What to do after a fault or a cancel:
 * - `roll-back`: destination rollback first (its QEMU killed and reaped), then the source resumes;
 * - `finish`: the guest runs on the destination, the source retires;
 * - `wait`: the destination's word is needed and missing; the source stays paused (unresolved);
 * - `resume-destination` (post-copy only): the destination holds all of the guest's RAM but was never
 *   continued; continuing it is the only way the guest runs again, then the migration finishes.
 */
export type Settlement = 'roll-back' | 'finish' | 'wait' | 'resume-destination';

/**
 * What the source says of its RAM migration once post-copy may have begun:
 * `completed` only when its QEMU reported it (the destination then holds every
 * page); anything else (in flight, paused, unreachable) is `not-completed`.
 */
export type PostcopyRam = 'completed' | 'not-completed';

/**
 * `fate` is undefined when the destination could not be asked (down, cut off, no answer).
 * `postcopy` is set when post-copy may have begun (postcopyMayHaveBegun over the migration's
 * history): then the source is never rolled back. The migration finishes once the guest ran on
 * the destination and the source's RAM migration completed; until then it waits (`unresolved`):
 * the guest stays on the destination, running or paused for pages, and the source keeps the pages.
 */
export function settlement(phase: MigrationPhase, fate: DestinationFate | undefined, postcopy?: PostcopyRam): Settlement {
  if (postcopy !== undefined || postcopyMayHaveBegun([phase])) {
    if (postcopy !== 'completed') return 'wait';
    return fate === 'guest-ran' ? 'finish' : fate === 'never-ran' ? 'resume-destination' : 'wait';
  }
  // Before any resume was sent the destination's QEMU (started paused with -S) cannot have run the guest.
  if (!resumeMayHaveBeenSent(phase)) return 'roll-back';
  if (fate === undefined || fate === 'unknown') return 'wait';
  return fate === 'guest-ran' ? 'finish' : 'roll-back';
}

/**
 * Why a migration whose destination answered `unknown` waits for a person, with the choices left:
 * the one text the executor and the controller store. Once post-copy may have begun, the source is
 * no choice: its RAM is split with the destination.
 */
export function cannotTell(migration: { id?: string; vm: string; from: string; to: string }, postcopy: boolean): string {
  const { vm, from, to } = migration;
  const command = `vmferry migration resolve ${migration.id ?? '<id>'}`;
  const runOnTo = `${command} --run-on ${to} (${from}'s QEMU is stopped, its RAM discarded and its disks kept; the VM is kept on ${to}, stopped, to start as after a crash)`;
  return (
    `${to} cannot tell whether the guest ran there: its QEMU and its agent died after the resume was sent, so the guest may have run there for a moment ` +
    `(acknowledged writes, written shared volumes) or not at all, and nothing left can say which. vmferry does not guess: ${vm} stays paused on ${from} and ${to}'s disks are kept. ` +
    (postcopy
      ? `Post-copy had begun, so ${from} never runs the guest again; an operator decides: ${runOnTo}`
      : `An operator decides: ${command} --run-on ${from} (the paused guest resumes there; whatever it did on ${to} in that moment is lost) or ${runOnTo}`)
  );
}

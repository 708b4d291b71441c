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
 * paused and the migration is `unresolved`.
 */
import { migrationSteps, type MigrationPhase } from './phases.ts';

/** Phases in which the destination may already have been asked to resume. */
const pastNoReturn: readonly MigrationPhase[] = migrationSteps.filter((s) => s.pastNoReturn).map((s) => s.phase);

export function resumeMayHaveBeenSent(phase: MigrationPhase): boolean {
  return pastNoReturn.includes(phase);
}

/**
 * What the destination host says of its half of a migration.
 * - `guest-ran`: its QEMU was continued (it runs the guest, or did): the guest lives there now;
 * - `never-ran`: its QEMU is alive but was never continued: it can be killed, the source still holds the guest;
 * - `gone`: no QEMU of this migration is alive there, and none ran the guest there.
 */
export type DestinationFate = 'guest-ran' | 'never-ran' | 'gone';

/**
 * What to do after a fault or a cancel:
 * - `roll-back`: destination rollback first (its QEMU killed and reaped), then the source resumes;
 * - `finish`: the guest runs on the destination, the source retires;
 * - `wait`: the destination's word is needed and missing; the source stays paused (unresolved).
 */
export type Settlement = 'roll-back' | 'finish' | 'wait';

/** `fate` is undefined when the destination could not be asked (down, cut off, no answer). */
export function settlement(phase: MigrationPhase, fate: DestinationFate | undefined): Settlement {
  // Before any resume was sent the destination's QEMU (started paused with -S) cannot have run the guest.
  if (!resumeMayHaveBeenSent(phase)) return 'roll-back';
  if (fate === undefined) return 'wait';
  return fate === 'guest-ran' ? 'finish' : 'roll-back';
}

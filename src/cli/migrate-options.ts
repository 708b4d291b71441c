/**
 * `vmferry migrate`'s options, each with its default in --help (taken from
 * defaultMigrationOptions, so help and behaviour cannot disagree), and the
 * request fields they become.
 */
import { Option, type Command } from 'commander';
import type { MigrateRequest } from '../api/controller-types.ts';
import {
  defaultMigrationOptions,
  ramFallbacks,
  ramModes,
  timeoutActions,
  type CopyMode,
  type RamFallback,
  type RamMode,
  type TimeoutAction,
} from '../migration/plan.ts';
import { parsePositive } from './common.ts';

export interface MigrateCliOptions {
  to: string;
  dryRun?: boolean;
  bandwidth?: number;
  maxDowntime: number;
  ramMode: RamMode;
  timeout: number;
  timeoutAction: TimeoutAction;
  deadline: number;
  stallTimeout: number;
  fallback: RamFallback;
  allowPostcopy?: boolean;
  keepSource?: boolean;
  copyMode: CopyMode;
  /** Commander's negation: true unless --no-tcg-stop-copy. */
  tcgStopCopy: boolean;
}

const copyModes: readonly CopyMode[] = ['write-blocking', 'background'];

function positive(flag: string): (value: string) => number {
  return (value) => parsePositive(value, flag);
}

export function addMigrateOptions(command: Command): Command {
  const d = defaultMigrationOptions;
  return command
    .requiredOption('--to <host>', 'destination host')
    .option('--dry-run', 'print the plan and stop')
    .addOption(
      new Option(
        '--ram-mode <mode>',
        'how RAM moves: live (pre-copy, the guest paused for the last pass only), postcopy (the guest runs on the destination after one pass of pre-copy while the rest of RAM follows; from then on the source never runs again), stop-and-copy (the guest stopped for the RAM phase; disks still mirrored live before it)',
      )
        .choices(ramModes)
        .default(d.ramMode),
    )
    .addOption(new Option('--bandwidth <MiB/s>', 'bandwidth cap for disks and RAM (default: unlimited)').argParser(positive('--bandwidth')))
    .addOption(new Option('--max-downtime <ms>', 'longest acceptable pause at switch-over (pre-copy)').argParser((v) => Math.round(positive('--max-downtime')(v))).default(d.maxDowntimeMs))
    .addOption(new Option('--timeout <s>', 'seconds into the RAM phase (not counting the disk mirrors) after which --timeout-action is taken').argParser(positive('--timeout')).default(d.timeoutS))
    .addOption(
      new Option('--timeout-action <action>', 'at --timeout: abort (roll back, the guest stays on the source), pause (stop the guest so the rest of its RAM moves in one pass), postcopy (switch to post-copy)')
        .choices(timeoutActions)
        .default(d.timeoutAction),
    )
    .addOption(new Option('--deadline <s>', 'roll back an attempt not completed after this many seconds, disk mirrors included').argParser(positive('--deadline')).default(d.deadlineS))
    .addOption(new Option('--stall-timeout <s>', 'roll back when nothing moved for this many seconds (a cut link, a hung peer)').argParser(positive('--stall-timeout')).default(d.stallTimeoutS))
    .addOption(
      new Option('--fallback <mode>', 'after two attempts refused for a memory mismatch (QEMU under TCG), run the last one in this RAM mode')
        .choices(ramFallbacks)
        .default(d.fallback),
    )
    .option('--allow-postcopy', 'switch to post-copy if pre-copy does not converge, after the other escalation steps')
    .option('--keep-source', "keep the source's local disk files after success")
    .addOption(new Option('--copy-mode <mode>', 'mirror copy mode').choices(copyModes).default(d.copyMode))
    .option(
      '--no-tcg-stop-copy',
      'a TCG guest whose live pre-copy did not converge in its first pass keeps running for more passes instead of being stopped for the rest (QEMU 7.2 under TCG may lose its writes then; the memory comparison refuses such an attempt)',
    );
}

/** The migrate request's option fields, every one explicit. */
export function migrateRequestOptions(opts: MigrateCliOptions): Omit<MigrateRequest, 'vm' | 'to' | 'dryRun'> {
  return {
    ...(opts.bandwidth !== undefined ? { bandwidthMiBs: opts.bandwidth } : {}),
    ramMode: opts.ramMode,
    maxDowntimeMs: opts.maxDowntime,
    timeoutS: opts.timeout,
    timeoutAction: opts.timeoutAction,
    deadlineS: opts.deadline,
    stallTimeoutS: opts.stallTimeout,
    fallback: opts.fallback,
    ...(opts.allowPostcopy ? { allowPostcopy: true } : {}),
    ...(opts.keepSource ? { keepSource: true } : {}),
    copyMode: opts.copyMode,
    ...(opts.tcgStopCopy ? {} : { tcgStopCopy: false }),
  };
}

/** Request bodies of the controller's API that its clients (the CLI, the demo) build too. */
import { Type, type Static } from '@sinclair/typebox';
import { AnnounceSettingsSchema, CopyModeSchema, RamFallbackSchema, RamModeSchema, TimeoutActionSchema, VmNameParamsSchema } from './agent-types.ts';

export const MigrateRequestSchema = Type.Object(
  {
    vm: VmNameParamsSchema.properties.name,
    to: Type.String({ minLength: 1, maxLength: 64 }),
    dryRun: Type.Optional(Type.Boolean()),
    bandwidthMiBs: Type.Optional(Type.Number({ exclusiveMinimum: 0, maximum: 1e6 })),
    maxDowntimeMs: Type.Optional(Type.Integer({ minimum: 1, maximum: 60_000 })),
    ramMode: Type.Optional(RamModeSchema),
    /** Seconds from the start of the RAM phase after which timeoutAction is taken (virsh's --timeout). */
    timeoutS: Type.Optional(Type.Number({ exclusiveMinimum: 0, maximum: 7 * 24 * 3600 })),
    timeoutAction: Type.Optional(TimeoutActionSchema),
    /** The most an attempt may take, disk mirrors included: rolled back after it. */
    deadlineS: Type.Optional(Type.Number({ exclusiveMinimum: 0, maximum: 7 * 24 * 3600 })),
    /** After two refusals for a memory mismatch, the last attempt runs in this RAM mode. */
    fallback: Type.Optional(RamFallbackSchema),
    stallTimeoutS: Type.Optional(Type.Number({ minimum: 1, maximum: 24 * 3600 })),
    /** `ramMode` live, switching to post-copy when pre-copy stops converging. */
    allowPostcopy: Type.Optional(Type.Boolean()),
    keepSource: Type.Optional(Type.Boolean()),
    copyMode: Type.Optional(CopyModeSchema),
    /** false: a TCG guest's live pre-copy is not stopped after its first pass (plan-shape.ts MigrationOptions.tcgStopCopy). */
    tcgStopCopy: Type.Optional(Type.Boolean()),
    /** How the destination announces the guest's NICs after the switch-over (plan-shape.ts AnnounceSettings). */
    announce: Type.Optional(AnnounceSettingsSchema),
  },
  { additionalProperties: false },
);
export type MigrateRequest = Static<typeof MigrateRequestSchema>;

/** An operator's choice for an unresolved migration: the host its guest runs on (src/controller/resolve.ts). */
export const ResolveRequestSchema = Type.Object({ runOn: Type.String({ minLength: 1, maxLength: 64 }) }, { additionalProperties: false });

/**
 * The agent's HTTP API types, as typebox schemas: the agent validates requests
 * with them, and the controller's client is typed by them. Neither side
 * imports the other's code.
 */
import { Type, type Static } from '@sinclair/typebox';
import { bridgeSchema, cephNameSchema, cpuModelSchema, diskIdSchema as diskId, vmNameSchema as name } from '../qemu/spec.ts';
import { namePatternSource } from '../util/names.ts';

/** A host's address as others reach it (an IP address or a DNS name): it goes into QEMU URIs, so no ',' '/' or space. */
export const hostAddressPattern = '^[A-Za-z0-9.:_-]+$';

export const NbdServerSchema = Type.Union([
  Type.Object({ type: Type.Literal('inet'), host: Type.String({ minLength: 1, maxLength: 255 }), port: Type.Integer({ minimum: 1, maximum: 65535 }) }, { additionalProperties: false }),
  Type.Object({ type: Type.Literal('unix'), path: Type.String({ pattern: '^/[^,]*$', maxLength: 4096 }) }, { additionalProperties: false }),
]);

/**
 * Whether a destination's QEMU takes the migration stream and its mirror
 * exports over TLS only (PreparedDestination.tls in migration/sides.ts): in the
 * destination's prepare answer, and on to the source with each mirror target
 * and the migrate request, where the source holds it against its own.
 */
export const StreamTlsSchema = Type.Boolean({ description: 'the destination takes this stream over TLS only (its agent has a TLS identity)' });

/**
 * Where the source mirrors one local disk (MirrorTarget in migration/sides.ts):
 * what the destination's prepare returned, passed on by the controller. Checked
 * here so a malformed target is a 400 naming its field, not a QMP error from
 * blockdev-add halfway through starting the mirrors.
 */
export const MirrorTargetSchema = Type.Object(
  {
    diskId,
    sync: Type.Union([Type.Literal('full'), Type.Literal('top')]),
    server: NbdServerSchema,
    exportName: Type.String({ maxLength: 4096 }),
    tls: StreamTlsSchema,
  },
  { additionalProperties: false },
);

export const CreateVmRequestSchema = Type.Object(
  {
    name,
    vcpus: Type.Optional(Type.Integer({ minimum: 1, maximum: 64 })),
    memoryMiB: Type.Optional(Type.Integer({ minimum: 16, maximum: 1024 * 1024 })),
    machine: Type.Optional(Type.String({ pattern: '^[a-z0-9._-]+$', maxLength: 64 })),
    /** QEMU CPU model; default qemu64-v1 (defaultCpuModel in src/qemu/cpu-models.ts). */
    cpu: Type.Optional(cpuModelSchema),
    boot: Type.Union([
      Type.Object(
        { kind: Type.Literal('kernel'), kernel: Type.String({ pattern: '^/[^,]*$', maxLength: 4096 }), initrd: Type.Optional(Type.String({ pattern: '^/[^,]*$', maxLength: 4096 })), append: Type.Optional(Type.String({ maxLength: 4096 })) },
        { additionalProperties: false },
      ),
      Type.Object({ kind: Type.Literal('disk'), diskId }, { additionalProperties: false }),
    ]),
    disks: Type.Array(
      Type.Object(
        {
          id: diskId,
          /**
           * A disk in the host's pool: empty of `sizeBytes`; a copy of the image file `import` (qcow2 or raw, on
           * the agent's host; the file is only read); or a qcow2 overlay on the shared volume `base` of the
           * storage server at `baseServer`, read-only (`sizeBytes`, if given, may make it larger than the base).
           */
          local: Type.Optional(
            Type.Object(
              {
                sizeBytes: Type.Optional(Type.Integer({ minimum: 1 << 20, maximum: 2 ** 50 })),
                format: Type.Optional(Type.Union([Type.Literal('qcow2'), Type.Literal('raw')])),
                /** An existing qcow2/raw image on the agent's host to copy into the pool. */
                import: Type.Optional(Type.String({ pattern: '^/[^,]*$', maxLength: 4096 })),
                /** A shared volume used as the read-only backing file of a qcow2 overlay in the pool. */
                base: Type.Optional(Type.String({ pattern: namePatternSource, description: 'a volume name of the storage server' })),
                /** Where the base volume is served: the storage server's NBD address. */
                baseServer: Type.Optional(NbdServerSchema),
              },
              { additionalProperties: false },
            ),
          ),
          shared: Type.Optional(Type.Object({ server: NbdServerSchema, export: Type.String({ maxLength: 4096 }) }, { additionalProperties: false })),
          /** An RBD image on a Ceph cluster: the conf names the monitors and the keyring (no key in the request). */
          rbd: Type.Optional(
            Type.Object(
              {
                pool: cephNameSchema,
                image: cephNameSchema,
                conf: Type.String({ pattern: '^/[^,:]*$', maxLength: 4096 }),
                user: cephNameSchema,
              },
              { additionalProperties: false },
            ),
          ),
          readOnly: Type.Optional(Type.Boolean()),
          cache: Type.Optional(
            Type.Union([Type.Literal('none'), Type.Literal('writeback'), Type.Literal('writethrough'), Type.Literal('directsync'), Type.Literal('unsafe')]),
          ),
        },
        { additionalProperties: false },
      ),
      { maxItems: 16 },
    ),
    nics: Type.Optional(
      Type.Array(
        Type.Object(
          {
            bridge: bridgeSchema,
            mac: Type.Optional(Type.String({ pattern: '^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$' })),
          },
          { additionalProperties: false },
        ),
        { maxItems: 8 },
      ),
    ),
    serialPorts: Type.Optional(Type.Integer({ minimum: 0, maximum: 4 })),
  },
  { additionalProperties: false },
);
export type CreateVmRequest = Static<typeof CreateVmRequestSchema>;

export const VmNameParamsSchema = Type.Object({ name });
export const MigrationParamsSchema = Type.Object({ id: Type.String({ pattern: '^[A-Za-z0-9_-]{1,64}$' }) });

export interface VmInfo {
  name: string;
  host: string;
  state: 'running' | 'paused' | 'stopped';
  pid: number | null;
  migrating: boolean;
  /** Block jobs its QEMU runs (a mirror a migration started); none once no migration is in progress. */
  blockJobs: string[];
  spec: import('../qemu/spec.ts').VmSpec;
  /** Set by the controller: the VM's migration that has not ended, with why it waits when it is unresolved. */
  migration?: { id: string; phase: import('../migration/phases.ts').MigrationPhase; reason?: string };
}

/** What an agent holds of one migration (GET /v1/migrations/:id). */
export interface MigrationHalves {
  /** settling: the agent is rolling it back by itself (--abandon-after); a rollback sent now waits for that. */
  source: { vm: string; settling: boolean } | null;
  destination: { state: import('../migration/qemu-destination.ts').QemuDestination['state'] } | null;
}

export interface HostInfo {
  hostId: string;
  /** The address other hosts reach this one at, for migration streams and NBD exports. */
  address: string;
  qemuVersion: string;
  /** What runs this host's guests, and why (src/qemu/accel.ts). */
  accelerator: 'kvm' | 'tcg';
  acceleratorReason: string;
  freeMemoryMiB: number;
  poolFreeBytes: number;
  vms: number;
}

export const QuarantineParamsSchema = Type.Object({ id: Type.String({ pattern: '^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$' }) });

/** Files an agent could not account for at start, moved aside instead of deleted (src/agent/quarantine.ts). */
export interface QuarantineEntry {
  id: string;
  /** The VM directory name the files belonged to. */
  vm: string;
  reason: string;
  /** When they were moved, ms since the epoch. */
  at: number;
  items: {
    kind: 'pool-image' | 'vm-dir';
    /** Where it was, and where a restore puts it back. */
    from: string;
    /** Bytes (a directory: the sum of its files); null when it is missing from the quarantine. */
    sizeBytes: number | null;
  }[];
}

/** How RAM moves (src/migration/plan-shape.ts RamMode). */
export const RamModeSchema = Type.Union([Type.Literal('live'), Type.Literal('postcopy'), Type.Literal('stop-and-copy')]);
export const TimeoutActionSchema = Type.Union([Type.Literal('abort'), Type.Literal('pause'), Type.Literal('postcopy')]);
export const RamFallbackSchema = Type.Union([Type.Literal('none'), Type.Literal('stop-and-copy')]);
export const CopyModeSchema = Type.Union([Type.Literal('background'), Type.Literal('write-blocking')]);

/** How the destination announces the guest's NICs after the switch-over (plan-shape.ts AnnounceSettings). */
export const AnnounceSettingsSchema = Type.Object(
  {
    initialMs: Type.Integer({ minimum: 1, maximum: 100_000 }),
    maxMs: Type.Integer({ minimum: 1, maximum: 100_000 }),
    rounds: Type.Integer({ minimum: 1, maximum: 1000 }),
    stepMs: Type.Integer({ minimum: 1, maximum: 10_000 }),
  },
  { additionalProperties: false },
);

const seconds = Type.Number({ exclusiveMinimum: 0, maximum: 7 * 24 * 3600 });

/** The settings a migration runs with (plan-shape.ts MigrationOptions), as the controller completed them from defaults. */
export const MigrationOptionsSchema = Type.Object({
  bandwidthMiBs: Type.Optional(Type.Number({ exclusiveMinimum: 0 })),
  maxDowntimeMs: Type.Number({ exclusiveMinimum: 0 }),
  timeoutS: seconds,
  timeoutAction: TimeoutActionSchema,
  deadlineS: seconds,
  fallback: RamFallbackSchema,
  stallTimeoutS: seconds,
  ramMode: RamModeSchema,
  allowPostcopy: Type.Boolean(),
  keepSource: Type.Boolean(),
  copyMode: CopyModeSchema,
  tcgStopCopy: Type.Boolean(),
  announce: Type.Optional(AnnounceSettingsSchema),
});

const bytes = Type.Integer({ minimum: 0, maximum: Number.MAX_SAFE_INTEGER });
const downtimeMs = Type.Number({ exclusiveMinimum: 0 });

const milliseconds = Type.Integer({ minimum: 0, maximum: Number.MAX_SAFE_INTEGER });

/** src/migration/prediction.ts Prediction: carried with the plan for people; no agent acts on it. */
const PredictionSchema = Type.Object({
  totalMs: Type.Optional(milliseconds),
  passes: Type.Optional(Type.Integer({ minimum: 0 })),
  pauseMs: Type.Optional(milliseconds),
  converges: Type.Optional(Type.Boolean()),
  dirtyRateBytesPerS: Type.Number({ minimum: 0 }),
  linkBytesPerS: Type.Optional(Type.Number({ exclusiveMinimum: 0 })),
  diskBytes: bytes,
  ramBytes: bytes,
  basis: Type.Array(Type.String({ maxLength: 8192 }), { maxItems: 32 }),
});

/**
 * The plan the controller computes (src/migration/plan.ts MigrationPlan, which
 * a type test holds equal to this) and both agents run: checked at the agent,
 * so a field missing or malformed between the two is a 400 naming it, not a
 * migration that quietly runs without it. Extra fields are allowed, so the
 * planner can add some without breaking agents of the previous version.
 */
export const MigrationPlanSchema = Type.Object({
  vm: name,
  from: Type.String({ minLength: 1, maxLength: 64 }),
  to: Type.String({ minLength: 1, maxLength: 64 }),
  toAddress: Type.String({ pattern: hostAddressPattern, maxLength: 255 }),
  disks: Type.Array(
    Type.Object({
      id: diskId,
      operation: Type.Union([Type.Literal('mirror'), Type.Literal('reattach')]),
      kind: Type.Union([Type.Literal('local'), Type.Literal('shared')]),
      readOnly: Type.Boolean(),
      virtualSize: bytes,
      bytesToCopy: bytes,
      mirrorSync: Type.Optional(Type.Union([Type.Literal('full'), Type.Literal('top')])),
      base: Type.Optional(Type.Object({ export: Type.String({ maxLength: 8192 }), virtualSize: bytes, reachable: Type.Boolean() })),
      reason: Type.String({ maxLength: 8192 }),
    }),
    { maxItems: 16 },
  ),
  ram: Type.Object({
    memoryMiB: Type.Integer({ minimum: 1 }),
    maxDowntimeMs: downtimeMs,
    downtimeLimitsMs: Type.Array(downtimeMs, { minItems: 1, maxItems: 64 }),
    bandwidthMiBs: Type.Optional(Type.Number({ exclusiveMinimum: 0 })),
    mode: RamModeSchema,
    postcopyAtOnce: Type.Optional(Type.Boolean()),
    allowPostcopy: Type.Boolean(),
    compareMemory: Type.Boolean(),
    stopAfterFirstPass: Type.Optional(Type.Boolean()),
  }),
  options: MigrationOptionsSchema,
  refusals: Type.Array(Type.String({ maxLength: 8192 }), { maxItems: 256 }),
  prediction: Type.Optional(PredictionSchema),
});
